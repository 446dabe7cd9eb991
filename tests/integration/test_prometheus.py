"""The real Prometheus (Debian's `prometheus` binary) scrapes the live server with the
project's own configuration and alert rules; the assertions go through its HTTP query API.
`promtool` checks the rules and runs their unit tests. Missing binaries fail the test with
an install hint: these checks must not silently disappear."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers import REPO_ROOT, http_call, infer_request, rest_infer_body
from prometheus_client.parser import text_string_to_metric_families

from serving.generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving.generated.mnist37.v1 import classifier_pb2, classifier_pb2_grpc
from serving.launcher import free_port, start_server

PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "mnist37.json"
INSTALL_HINT = "install it with `apt-get install prometheus` (Debian 12; .ci/run does this)"
QUERY_DEADLINE_S = 60.0
INFER_REQUESTS, IMAGES_PER_REQUEST, CLASSIFY_REQUESTS, UNKNOWN_MODEL_REQUESTS = 30, 4, 10, 5
HTTP_INFER_REQUESTS = 7  # the same ModelInfer over HTTP: its own protocol="http" series


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found: {INSTALL_HINT}")
    return found


def promtool(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [binary("promtool"), *arguments], capture_output=True, text=True, timeout=60
    )


def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    checked = promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 9 rules found" in checked.stdout
    tested = promtool("test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def scrape_config_for(metrics_port: int, directory: Path) -> Path:
    """The project's prometheus.yml and alert rules, the target pointed at the test server."""
    original = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    assert '"server:8002"' in original
    config = directory / "prometheus.yml"
    config.write_text(original.replace('"server:8002"', f'"127.0.0.1:{metrics_port}"'))
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", directory / "alerts.yml")
    checked = promtool("check", "config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return config


class Prometheus:
    def __init__(self, config: Path, directory: Path) -> None:
        self.port = free_port()
        self.log_path = directory / "prometheus.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def get(self, path: str, **parameters: str) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(parameters)}"
        with urllib.request.urlopen(url, timeout=5) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expression: str) -> list[dict]:
        return self.get("/api/v1/query", query=expression)["result"]

    def poll(self, expression: str, expected: object, convert=lambda result: result) -> list:
        """Query until `convert(result) == expected`: the first sample is scraped only
        about 6 s after start and then every 5 s, so never sleep a fixed time."""
        deadline = time.monotonic() + QUERY_DEADLINE_S
        seen: object = None
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()
            try:
                result = self.query(expression)
            except OSError:
                result = None  # not listening yet
            if result is not None:
                seen = convert(result)
                if seen == expected:
                    return result
            time.sleep(0.25)
        raise AssertionError(f"{expression}: {seen!r}, expected {expected!r}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def scraped(model_repository, test_digits, tmp_path_factory) -> Iterator[tuple[Prometheus, str]]:
    """A server under a short load, and Prometheus scraping it: (prometheus, /metrics)."""
    tmp_path = tmp_path_factory.mktemp("prometheus")
    metrics_port = free_port()
    server = start_server(model_repository, tmp_path, "--metrics-port", str(metrics_port))
    try:
        prometheus = Prometheus(scrape_config_for(metrics_port, tmp_path), tmp_path)
    except BaseException:
        server.terminate()  # Prometheus did not start: the server must not outlive the test
        raise
    try:
        with grpc.insecure_channel(server.target) as channel:
            oip = pb_grpc.GRPCInferenceServiceStub(channel)
            classifier = classifier_pb2_grpc.ClassifierStub(channel)
            images = test_digits[0][:IMAGES_PER_REQUEST]
            for _ in range(INFER_REQUESTS):
                oip.ModelInfer(infer_request(images))
            for number in range(UNKNOWN_MODEL_REQUESTS):
                with pytest.raises(grpc.RpcError):
                    oip.ModelInfer(infer_request(images, model=f"nope-{number}"))
            request = classifier_pb2.ClassifyRequest()
            request.images.add(pixels=images[0].tobytes())
            for _ in range(CLASSIFY_REQUESTS):
                classifier.Classify(request)
        body, headers = rest_infer_body(images)
        for _ in range(HTTP_INFER_REQUESTS):
            status, _, answer = http_call(
                server.http_address, "POST", "/v2/models/mnist37/infer", body, headers
            )
            assert status == 200, answer
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(metrics_url, timeout=5) as page:
            exposition = page.read().decode()
        yield prometheus, exposition
    finally:
        prometheus.stop()
        server.terminate()


def single_value(result: list[dict]) -> float | None:
    return float(result[0]["value"][1]) if len(result) == 1 else None


def histogram_quantile(quantile: float, exposition: str, name: str, labels: dict) -> float:
    """Prometheus's histogram_quantile over one scraped histogram, for comparison."""
    buckets = sorted(
        (float(sample.labels["le"]), sample.value)
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == f"{name}_bucket"
        and all(sample.labels.get(key) == value for key, value in labels.items())
    )
    rank = quantile * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    raise AssertionError("unreachable")


def test_prometheus_scrapes_the_live_server_with_the_project_config(scraped):
    prometheus, exposition = scraped
    assert prometheus.poll('up{job="mnist37"}', 1.0, single_value)

    def by_protocol(result: list[dict]) -> dict[str, float]:
        return {series["metric"]["protocol"]: float(series["value"][1]) for series in result}

    ok = prometheus.poll(
        'sum by (protocol) (mnist37_requests_total{rpc="ModelInfer",model="mnist37",code="OK"})',
        {"grpc": float(INFER_REQUESTS), "http": float(HTTP_INFER_REQUESTS)},
        by_protocol,
    )
    assert ok
    unknown = prometheus.query('mnist37_requests_total{code="NOT_FOUND"}')
    assert [
        (series["metric"]["model"], series["metric"]["protocol"], float(series["value"][1]))
        for series in unknown
    ] == [("_unknown", "grpc", float(UNKNOWN_MODEL_REQUESTS))]
    classified = prometheus.query("sum(mnist37_images_total)")
    images = (INFER_REQUESTS + HTTP_INFER_REQUESTS) * IMAGES_PER_REQUEST + CLASSIFY_REQUESTS
    assert single_value(classified) == images

    for protocol in ("grpc", "http"):
        selector = {"protocol": protocol, "rpc": "ModelInfer", "model": "mnist37"}
        expected_p99 = histogram_quantile(
            0.99, exposition, "mnist37_request_duration_seconds", selector
        )
        p99 = single_value(
            prometheus.query(
                "histogram_quantile(0.99, sum by (le) (mnist37_request_duration_seconds_bucket"
                f'{{protocol="{protocol}",rpc="ModelInfer",model="mnist37"}}))'
            )
        )
        assert p99 == pytest.approx(expected_p99, rel=1e-9), protocol
        assert 0 < p99 < 1.0
    # The recording rule keeps the protocols apart: one p99 series per (rpc, protocol).
    recorded = prometheus.poll(
        'mnist37:request_duration_seconds:p99_5m{rpc="ModelInfer"}',
        {"grpc", "http"},
        lambda result: {series["metric"]["protocol"] for series in result},
    )
    assert recorded

    info = prometheus.query("mnist37_model_info")
    assert {
        (
            series["metric"]["model"],
            series["metric"]["version"],
            series["metric"]["arch"],
            series["metric"]["provider"],
            series["value"][1],
        )
        for series in info
    } == {
        ("mnist37", "2", "linear", "CPUExecutionProvider", "1"),
        ("other", "1", "linear", "CPUExecutionProvider", "1"),
    }

    def rule_health(data: dict) -> dict[str, str]:
        return {rule["name"]: rule["health"] for group in data["groups"] for rule in group["rules"]}

    deadline = time.monotonic() + QUERY_DEADLINE_S
    while set((health := rule_health(prometheus.get("/api/v1/rules"))).values()) != {"ok"}:
        assert "err" not in health.values(), health
        assert time.monotonic() < deadline, health
        time.sleep(0.25)
    assert len(health) == 9
    firing = prometheus.query('ALERTS{alertname="Mnist37NoModelLoaded"}')
    assert firing == []

    for expression in dashboard_expressions():
        prometheus.query(expression)  # each must parse and evaluate


def dashboard_expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def test_every_metric_the_dashboard_and_alerts_use_is_exported(scraped):
    _, exposition = scraped
    exported = {
        sample.name
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
    used_text = (PROMETHEUS_DIR / "alerts.yml").read_text() + "\n".join(dashboard_expressions())
    used = set(re.findall(r"\bmnist37_[a-z_]+", used_text))
    assert used, "no metric names found"
    assert used <= exported, used - exported

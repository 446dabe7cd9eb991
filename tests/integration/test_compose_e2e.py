"""docker-compose.yml end to end, without Docker: the services' own commands as plain
processes, in compose's order, with their environments and a real Prometheus.

train-init publishes version 1; the server starts and its compose healthcheck passes;
Prometheus (the project's configuration) scrapes it; retrain publishes an `mlp` version 2,
its report in a new run directory of the `runs` volume; the running server switches to it
and Prometheus sees the switch.

What differs from the containers, and nothing else (see tests/compose_helpers.py):
- container paths: each volume's mount point and each container's /tmp map to temporary
  directories; `./deploy/prometheus` maps to a copy whose scrape target `server:<metrics
  port>` (compose's service name) is 127.0.0.1 and the server's metrics port;
- ports: the server listens on 127.0.0.1 on free ports (MNIST37_HOST, MNIST37_HTTP_PORT,
  MNIST37_GRPC_PORT, MNIST37_METRICS_PORT), Prometheus on 127.0.0.1 on a free port
  (--web.listen-address);
- binaries: Prometheus's entrypoint /bin/prometheus is Debian's `prometheus`; `python` and
  `mnist37-*` are this virtual environment's;
- speed: MNIST37_POLL_INTERVAL is 1 s instead of compose's 5 s (the switch to version 2
  is then checked within a few of those seconds).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import yaml
from compose_helpers import (
    MODELS_MOUNT,
    REPO_ROOT,
    RUNS_MOUNT,
    ContainerPaths,
    compose_services,
    load_compose,
    plain_environment,
    seconds,
    volume_mounts,
)

from serving.client import Mnist37Client, Prediction
from serving.launcher import free_port

PROMETHEUS_BIND_SOURCE = "./deploy/prometheus"
PROMETHEUS_INSTALL_HINT = (
    "`prometheus` not found: apt-get install -y --no-install-recommends prometheus "
    "(Debian 12; .ci/run installs it)"
)
LOOPBACK = "127.0.0.1"
# The only variable changed for speed: the server scans for new versions every second.
POLL_INTERVAL_OVERRIDE = "1"
REQUESTS_BEFORE_RETRAIN = 20
IMAGES_PER_REQUEST = 8
JOB_TIMEOUT_S = 180.0
READY_TIMEOUT_S = 60.0
# The first sample arrives about 6 s after Prometheus starts, then one every 5 s.
SCRAPE_TIMEOUT_S = 40.0

T = TypeVar("T")


class WaitTimedOut(AssertionError):
    pass


def wait_for(
    description: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.25
) -> T:
    """Call `probe` until it returns something other than None, for at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = probe()
        if result is not None:
            return result
        time.sleep(interval)
    raise WaitTimedOut(f"{description}: not within {timeout} s")


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assert_running(self) -> None:
        code = self.process.poll()
        assert code is None, f"{self.name} exited with {code}:\n{self.log()[-4000:]}"

    def stop(self, stop_signal: signal.Signals, grace_s: float) -> int:
        """What `docker stop` does: the stop signal, then SIGKILL after the grace period."""
        if self.process.poll() is None:
            self.process.send_signal(stop_signal)
        try:
            return self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"{self.name} ignored {stop_signal.name} for {grace_s} s:\n{self.log()[-4000:]}"
            ) from None


class PlainCompose:
    """The compose project's services run as plain processes under one directory."""

    def __init__(self, root: Path, services: Mapping[str, dict[str, Any]]) -> None:
        self.root = root
        self.services = services
        self.volumes_dir = root / "volumes"
        for volume in load_compose()["volumes"]:
            (self.volumes_dir / volume).mkdir(parents=True)
        self.bind_sources: dict[str, Path] = {}
        self.running: list[ServiceProcess] = []

    def paths(self, name: str) -> ContainerPaths:
        container_tmp = self.root / "containers" / name / "tmp"
        container_tmp.mkdir(parents=True, exist_ok=True)
        return ContainerPaths.for_service(
            self.services[name], self.volumes_dir, container_tmp, self.bind_sources
        )

    def working_dir(self, name: str) -> Path:
        directory = self.root / "containers" / name / "workdir"
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def command(
        self,
        name: str,
        executable: str | None = None,
        replace: Mapping[str, str] | None = None,
    ) -> list[str]:
        """The service's entrypoint + command, paths mapped; `executable` replaces the
        first word (an image's own binary path), `replace` whole arguments (each must be
        there)."""
        service = self.services[name]
        argv = [*service.get("entrypoint", []), *service["command"]]
        replace = replace or {}
        missing = set(replace) - set(argv)
        assert not missing, f"{name}'s command has no {sorted(missing)}"
        argv = [replace.get(argument, argument) for argument in argv]
        if executable is not None:
            argv[0] = executable
        return [argv[0], *self.paths(name).arguments(argv[1:])]

    def environment(self, name: str, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        return plain_environment(self.services[name], self.paths(name), overrides)

    def run_job(self, name: str, env: Mapping[str, str]) -> subprocess.CompletedProcess:
        """A one-shot service, to completion."""
        return subprocess.run(
            self.command(name),
            env=dict(env),
            cwd=self.working_dir(name),
            capture_output=True,
            text=True,
            timeout=JOB_TIMEOUT_S,
            check=False,
        )

    def start(
        self,
        name: str,
        env: Mapping[str, str],
        executable: str | None = None,
        replace: Mapping[str, str] | None = None,
    ) -> ServiceProcess:
        log_path = self.root / f"{name}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                self.command(name, executable, replace),
                env=dict(env),
                cwd=self.working_dir(name),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started = ServiceProcess(name, process, log_path)
        self.running.append(started)
        return started

    def kill_all(self) -> None:
        for started in self.running:
            if started.process.poll() is None:
                started.process.kill()
                started.process.wait()


@contextmanager
def plain_compose(root: Path, services: Mapping[str, dict[str, Any]]) -> Iterator[PlainCompose]:
    project = PlainCompose(root, services)
    try:
        yield project
    finally:
        project.kill_all()


def check_compose_has_the_shape_this_test_maps(services: Mapping[str, dict[str, Any]]) -> None:
    """What the rewrite rules rely on; a compose change that breaks them fails here."""
    assert services["server"]["depends_on"] == {
        "train-init": {"condition": "service_completed_successfully"}
    }
    assert services["prometheus"]["depends_on"] == ["server"]
    assert volume_mounts(services["server"]) == {MODELS_MOUNT: "models"}
    for name in ("train-init", "retrain"):
        assert volume_mounts(services[name]) == {MODELS_MOUNT: "models", RUNS_MOUNT: "runs"}
    for name in ("train-init", "server", "retrain"):
        assert "entrypoint" not in services[name], name
    assert volume_mounts(services["prometheus"]) == {
        "/etc/prometheus": PROMETHEUS_BIND_SOURCE,
        "/prometheus": "prometheus-data",
    }
    server = services["server"]
    environment = server["environment"]
    assert environment["MNIST37_HOST"] == "0.0.0.0"
    assert server["ports"] == [
        f"{environment[name]}:{environment[name]}"
        for name in ("MNIST37_HTTP_PORT", "MNIST37_GRPC_PORT", "MNIST37_METRICS_PORT")
    ]
    assert server["healthcheck"]["test"][0] == "CMD"
    prometheus = services["prometheus"]
    assert prometheus["entrypoint"] == ["/bin/prometheus"]
    assert listen_address_argument(prometheus) == "--web.listen-address=0.0.0.0:9090"
    assert prometheus["ports"] == ["9090:9090"]


def listen_address_argument(prometheus: Mapping[str, Any]) -> str:
    (argument,) = [a for a in prometheus["command"] if a.startswith("--web.listen-address=")]
    return argument


def copy_prometheus_config(destination: Path, scrape_target: str, metrics_port: int) -> Path:
    """The mounted ./deploy/prometheus, with compose's scrape target pointed at loopback."""
    shutil.copytree(REPO_ROOT / PROMETHEUS_BIND_SOURCE, destination)
    config_path = destination / "prometheus.yml"
    text = config_path.read_text()
    config = yaml.safe_load(text)
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    assert targets == [scrape_target], targets
    assert text.count(f'"{scrape_target}"') == 1
    config_path.write_text(text.replace(f'"{scrape_target}"', f'"{LOOPBACK}:{metrics_port}"'))
    return destination


class PrometheusApi:
    def __init__(self, port: int, process: ServiceProcess) -> None:
        self.base = f"http://{LOOPBACK}:{port}"
        self.process = process

    def ready(self) -> bool | None:
        self.process.assert_running()
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as reply:
                return True if reply.status == 200 else None
        except OSError:  # not listening yet, or 503 while starting
            return None

    def query(self, expression: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Instant query: each series' labels (sorted; no name, `job` or `instance`) ->
        its value."""
        self.process.assert_running()
        url = f"{self.base}/api/v1/query?{urllib.parse.urlencode({'query': expression})}"
        with urllib.request.urlopen(url, timeout=5) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return {
            tuple(
                sorted(
                    (key, value)
                    for key, value in series["metric"].items()
                    if key not in ("__name__", "job", "instance")
                )
            ): float(series["value"][1])
            for series in body["data"]["result"]
        }

    def wait_until(
        self, expression: str, expected: dict[tuple[tuple[str, str], ...], float]
    ) -> None:
        seen: list[object] = [None]

        def matches() -> bool | None:
            seen[0] = self.query(expression)
            return True if seen[0] == expected else None

        try:
            wait_for(expression, matches, SCRAPE_TIMEOUT_S)
        except WaitTimedOut:
            raise WaitTimedOut(f"{expression}: {seen[0]}, expected {expected}") from None


def scalar(value: float) -> dict[tuple[tuple[str, str], ...], float]:
    """What a `sum(...)` query returns: one series without labels."""
    return {(): value}


def healthcheck_passes(command: list[str], env: Mapping[str, str], cwd: Path) -> str | None:
    result = subprocess.run(
        command, env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=30
    )
    return result.stdout.strip() if result.returncode == 0 else None


def versions_answering(client: Mnist37Client, images: np.ndarray) -> set[str]:
    return {prediction.model_version for prediction in client.classify(list(images))}


def accuracy(predictions: list[Prediction], labels: np.ndarray) -> float:
    return float(np.mean([p.digit == label for p, label in zip(predictions, labels, strict=True)]))


def test_compose_services_run_as_plain_processes_end_to_end(
    tmp_path: Path, test_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    prometheus_binary = shutil.which("prometheus")
    if prometheus_binary is None:
        pytest.fail(PROMETHEUS_INSTALL_HINT)
    services = compose_services()
    check_compose_has_the_shape_this_test_maps(services)
    images, labels = test_digits
    started_at = time.monotonic()
    timings: dict[str, float] = {}

    with plain_compose(tmp_path, services) as project:
        # train-init: publishes version 1 into the models volume, then exits 0.
        init_env = project.environment("train-init")
        model_name = init_env["MNIST37_MODEL_NAME"]
        models_dir = project.volumes_dir / "models"
        initialised = project.run_job("train-init", init_env)
        assert initialised.returncode == 0, initialised.stdout + initialised.stderr
        assert "training the first" in initialised.stdout, initialised.stdout
        assert sorted(p.name for p in (models_dir / model_name).iterdir() if p.is_dir()) == ["1"]
        assert (models_dir / model_name / "1" / "model.onnx").is_file()
        assert (project.volumes_dir / "runs" / "init" / "metrics.json").is_file()
        timings["train-init"] = time.monotonic() - started_at

        # server: free loopback ports instead of the published container ports.
        server_service = services["server"]
        compose_metrics_port = server_service["environment"]["MNIST37_METRICS_PORT"]
        grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
        server_env = project.environment(
            "server",
            {
                "MNIST37_HOST": LOOPBACK,
                "MNIST37_HTTP_PORT": str(http_port),
                "MNIST37_GRPC_PORT": str(grpc_port),
                "MNIST37_METRICS_PORT": str(metrics_port),
                "MNIST37_POLL_INTERVAL": POLL_INTERVAL_OVERRIDE,
            },
        )
        assert server_env["MNIST37_REPOSITORY"] == str(models_dir)
        server = project.start("server", server_env)
        # The compose healthcheck's own command, run where compose runs it: in the
        # server's container, with its environment; healthy within its start period.
        healthcheck = server_service["healthcheck"]
        healthcheck_command = project.paths("server").arguments(healthcheck["test"][1:])

        def server_healthy() -> str | None:
            server.assert_running()
            return healthcheck_passes(
                healthcheck_command, server_env, project.working_dir("server")
            )

        health_line = wait_for(
            "server healthcheck", server_healthy, seconds(healthcheck["start_period"]), 0.5
        )
        assert health_line.endswith(": SERVING"), health_line
        ready = f"http://{LOOPBACK}:{http_port}/v2/models/{model_name}/versions/1/ready"
        with urllib.request.urlopen(ready, timeout=5) as reply:
            assert reply.status == 200  # HTTP/REST too, on its own port
        timings["server healthy"] = time.monotonic() - started_at

        # prometheus: the mounted configuration, scraping the server on loopback.
        project.bind_sources[PROMETHEUS_BIND_SOURCE] = copy_prometheus_config(
            tmp_path / "binds" / "prometheus",
            scrape_target=f"server:{compose_metrics_port}",
            metrics_port=metrics_port,
        )
        prometheus_port = free_port()
        prometheus = project.start(
            "prometheus",
            project.environment("prometheus"),
            executable=prometheus_binary,
            replace={
                listen_address_argument(services["prometheus"]): (
                    f"--web.listen-address={LOOPBACK}:{prometheus_port}"
                )
            },
        )
        api = PrometheusApi(prometheus_port, prometheus)
        wait_for("prometheus ready", api.ready, READY_TIMEOUT_S)
        assert (project.volumes_dir / "prometheus-data" / "wal").is_dir()

        with Mnist37Client(f"{LOOPBACK}:{grpc_port}") as client:
            for number in range(REQUESTS_BEFORE_RETRAIN):
                batch = slice(number * IMAGES_PER_REQUEST, (number + 1) * IMAGES_PER_REQUEST)
                predictions = client.classify(list(images[batch]))
                assert {p.model_version for p in predictions} == {"1"}
                assert accuracy(predictions, labels[batch]) >= 0.75

            api.wait_until(
                f'mnist37_model_info{{model="{model_name}",version="1"}}',
                {
                    (
                        ("arch", "linear"),
                        ("model", model_name),
                        ("provider", "CPUExecutionProvider"),
                        ("version", "1"),
                    ): 1.0
                },
            )
            api.wait_until(
                'sum(mnist37_requests_total{rpc="Classify",code="OK",version="1"})',
                scalar(REQUESTS_BEFORE_RETRAIN),
            )
            loads_before = api.query('sum(mnist37_model_load_total{result="success"})')
            assert loads_before == scalar(1.0)
            timings["scraped"] = time.monotonic() - started_at

            # retrain: `docker compose run --rm retrain`, against the same volume.
            retrained = project.run_job("retrain", project.environment("retrain"))
            assert retrained.returncode == 0, retrained.stdout + retrained.stderr
            summary = json.loads(retrained.stdout.strip().splitlines()[-1])
            assert (summary["decision"], summary["version"], summary["current_version"]) == (
                "published",
                2,
                1,
            ), summary
            # Its report is in a new run directory on the `runs` volume, not in the
            # container (`--rm` removes that), and the report says what the summary says.
            runs_dir = project.volumes_dir / "runs"
            (report_path,) = runs_dir.glob("retrain-*/retrain-report.json")
            assert summary["report"] == str(report_path.resolve()), summary
            report = json.loads(report_path.read_text())
            assert (report["decision"], report["published"]["version"]) == ("published", 2)
            assert (report_path.parent / "candidate" / "model.onnx").is_file()
            assert not any(project.working_dir("retrain").iterdir())
            timings["retrained"] = time.monotonic() - started_at

            # The running server switches to version 2 by itself, failing no request.
            switch_timeout = 3 * float(POLL_INTERVAL_OVERRIDE) + 2.0
            wait_for(
                "Classify answered by version 2",
                lambda: (
                    True
                    if versions_answering(client, images[:IMAGES_PER_REQUEST]) == {"2"}
                    else None
                ),
                switch_timeout,
                interval=0.05,
            )
            published_card = models_dir / model_name / "2" / "model.json"
            timings["version 2 answering, after its publish"] = (
                time.time() - published_card.stat().st_mtime
            )
            predictions = client.classify(list(images[:256]))
            assert {p.model_version for p in predictions} == {"2"}
            assert accuracy(predictions, labels[:256]) >= 0.97

        api.wait_until(
            f'mnist37_model_info{{model="{model_name}"}}',
            {
                (
                    ("arch", "mlp"),
                    ("model", model_name),
                    ("provider", "CPUExecutionProvider"),
                    ("version", "2"),
                ): 1.0
            },
        )
        api.wait_until('sum(mnist37_model_load_total{result="success"})', scalar(2.0))
        assert api.query('sum(mnist37_model_load_total{result="failure"})') in ({}, scalar(0.0))
        timings["prometheus saw version 2"] = time.monotonic() - started_at

        # docker compose stop: the stop signal, then the grace period.
        stop_signal = signal.Signals[server_service["stop_signal"]]
        server_exit = server.stop(stop_signal, seconds(server_service["stop_grace_period"]))
        assert server_exit == 0, server.log()[-4000:]
        prometheus_exit = prometheus.stop(signal.SIGTERM, grace_s=10.0)
        assert prometheus_exit == 0, prometheus.log()[-4000:]

    server_log = server.log()
    assert f"model {model_name} now serves version(s) [2]" in server_log, server_log[-4000:]
    print("timings (s since start):", {k: round(v, 2) for k, v in timings.items()})

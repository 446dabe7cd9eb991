"""`mnist37-serve --workers N`: N processes behind one gRPC port, one HTTP port and one
metrics port behave as one server. Connections spread over the workers (ServerMetadata
names the worker that answered), every worker serves and retires the same versions, the
metrics are summed, a SIGTERM under load loses nothing, a killed worker is replaced, a
worker that keeps dying stops the server, and busy ports are refused."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import http_call, infer_request, send_until_refused, shipped_digit_files
from prometheus_client.parser import text_string_to_metric_families

from serving.bench.loadgen import ANY_WINDOWS
from serving.catalog import WORKER_KEY
from serving.client import Mnist37Client, main
from serving.generated.inference import grpc_service_pb2 as pb
from serving.generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving.launcher import ServerProcess, free_port, start_server
from serving.synthetic import publish_model, random_linear_model

WORKERS = 2
SERVING = re.compile(r"(\d+) workers serving on 127\.0\.0\.1:(\d+) \(gRPC\)")
STARTED = re.compile(r"started worker (\d+) \(pid (\d+)\)")


def start_workers(
    repository: Path, log_dir: Path, *extra: str, metrics: bool = True
) -> ServerProcess:
    """A server with --workers 2 on gRPC port 0 (the supervisor picks one and says which
    once every worker serves), HTTP on a free port and, with `metrics`, metrics too."""
    metrics_port = str(free_port()) if metrics else "0"
    server = start_server(
        repository,
        log_dir,
        *("--workers", str(WORKERS), "--grpc-port", "0", "--metrics-port", metrics_port),
        *("--log-format", "text", *extra),
        wait=False,
    )
    server.metrics_port = int(metrics_port)  # type: ignore[attr-defined]
    found = wait_for(lambda: SERVING.search(server.log()), server, "every worker serves")
    assert int(found.group(1)) == WORKERS
    server.port = int(found.group(2))
    return server


def wait_for(condition: Callable[[], object], server: ServerProcess, what: str, timeout=60.0):
    """`condition()`'s first true value, polled; fails if the server exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if server.process.poll() is not None:
            pytest.fail(f"server exited {server.process.returncode} before {what}:\n{server.log()}")
        time.sleep(0.05)
    server.terminate()
    pytest.fail(f"no {what} within {timeout} s:\n{server.log()}")


def worker_pids(server: ServerProcess) -> dict[int, int]:
    """Each worker index's latest pid, from the supervisor's log."""
    return {int(index): int(pid) for index, pid in STARTED.findall(server.log())}


def connection(target: str) -> grpc.Channel:
    """A channel with a connection of its own: grpc would otherwise share one connection
    between channels of the same target and arguments."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def worker_of(channel: grpc.Channel) -> str:
    """The worker this channel's connection went to, as ServerMetadata says."""
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    _, call = stub.ServerMetadata.with_call(pb.ServerMetadataRequest(), timeout=20)
    return dict(call.trailing_metadata())[WORKER_KEY]


def metrics(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The supervisor's /metrics: (sample name, sorted labels) -> value."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"  # type: ignore[attr-defined]
    with urllib.request.urlopen(url, timeout=10) as page:
        text = page.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name` over the series that have `labels` (and any others)."""
    return sum(
        found
        for (sample, sample_labels), found in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


@pytest.fixture(scope="module")
def workers(model_repository, tmp_path_factory) -> Iterator[ServerProcess]:
    """One --workers 2 server for the tests that only send requests."""
    server = start_workers(model_repository, tmp_path_factory.mktemp("workers"))
    try:
        yield server
    finally:
        assert server.terminate() == 0, server.log()


def test_connections_spread_over_the_workers_and_each_stays_with_one(workers):
    channels = [connection(workers.target) for _ in range(16)]
    try:
        answered = [worker_of(channel) for channel in channels]
        assert set(answered) == {"0", "1"}, "the kernel spread the 16 connections"
        for channel, first in zip(channels[:4], answered, strict=False):
            assert {worker_of(channel) for _ in range(5)} == {first}, "a connection stays"
    finally:
        for channel in channels:
            channel.close()
    # Channels of the same target and arguments share one connection: one worker.
    shared = [grpc.insecure_channel(workers.target) for _ in range(8)]
    try:
        assert len({worker_of(channel) for channel in shared}) == 1
    finally:
        for channel in shared:
            channel.close()
    # HTTP: each new connection may go to either worker too.
    http_workers = {http_call(workers.http_address, "GET", "/v2")[1][WORKER_KEY] for _ in range(16)}
    assert http_workers == {"0", "1"}


def test_metrics_are_the_sum_over_the_workers(workers):
    before = metrics(workers)
    assert value(before, "mnist37_workers") == WORKERS
    assert value(before, "mnist37_worker_restarts_total") == 0
    one, hundred = np.zeros((1, 28, 28), np.uint8), np.full((100, 28, 28), 200, np.uint8)
    channels = [connection(workers.target) for _ in range(8)]
    sent_requests = sent_images = 0
    try:
        assert {worker_of(channel) for channel in channels} == {"0", "1"}
        for channel in channels:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for images in (one, one, one, hundred):  # 100 images: the vectorised histogram
                assert stub.ModelInfer(infer_request(images), timeout=20).model_version == "2"
                sent_requests += 1
                sent_images += len(images)
    finally:
        for channel in channels:
            channel.close()
    after = metrics(workers)
    ok = {"protocol": "grpc", "rpc": "ModelInfer", "model": "mnist37", "version": "2", "code": "OK"}
    version = {"model": "mnist37", "version": "2"}
    requests = value(after, "mnist37_requests_total", **ok) - value(
        before, "mnist37_requests_total", **ok
    )
    assert requests == sent_requests == 32
    duration = {"protocol": "grpc", "rpc": "ModelInfer", "model": "mnist37"}
    assert (
        value(after, "mnist37_request_duration_seconds_count", **duration)
        - value(before, "mnist37_request_duration_seconds_count", **duration)
        == sent_requests
    )
    for name in ("mnist37_probability_count", "mnist37_images_total"):
        moved = total(after, name, **version) - total(before, name, **version)
        assert moved == sent_images, name
    assert value(after, "mnist37_probability_bucket", le="+Inf", **version) == value(
        after, "mnist37_probability_count", **version
    )
    info = {**version, "arch": "linear", "provider": "CPUExecutionProvider"}
    assert value(after, "mnist37_model_info", **info) == 1, "livemax: any live worker's 1"
    # Each worker copies its in-flight count to its file every 0.1 s: soon 0 again.
    wait_for(lambda: value(metrics(workers), "mnist37_inflight_requests") == 0, workers, "0", 5)


def test_a_client_with_channels_uses_every_worker(workers, test_digits, capsys):
    with Mnist37Client(workers.target, channels=16) as client:
        assert {worker_of(channel) for channel in client.channels} == {"0", "1"}
        # The calls take the channels in turn, from any thread.
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: client.infer(test_digits[0][:4]), range(32)))
        assert all(answer["digit"].shape == (4,) for answer in answers)
    images_path, labels_path = shipped_digit_files()
    arguments = ["--server", workers.target, "--channels", "4", "classify", "--check"]
    arguments += [str(images_path), "--labels", str(labels_path), "--batch-size", "64"]
    assert main([*arguments, "--concurrency", "8"]) == 0
    out = capsys.readouterr().out
    assert "8 at a time over 4 channel(s)" in out
    assert main(arguments) == 0  # one at a time: the same answers
    sequential = capsys.readouterr().out
    accuracy = re.compile(r"accuracy \S+ \(\d+/\d+\)")
    assert accuracy.search(out).group(0) == accuracy.search(sequential).group(0)


def test_perf_analyzer_runs_against_the_workers(workers):
    """perf_analyzer checks that ModelStatistics' queue count rises during its run: it
    reads them from the worker its own connection reached, which counted its requests."""
    command = [sys.executable, "-m", "serving.perf_analyzer", "-m", "mnist37", "-i", "grpc"]
    command += ["-u", workers.target, "--concurrency-range", "16:16", "-p", "500"]
    completed = subprocess.run(
        [*command, "--max-trials", "3", "-s", str(ANY_WINDOWS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Concurrency: 16, throughput:" in completed.stdout


def test_the_benchmark_starts_workers_and_waits_for_every_one(model_repository, tmp_path):
    # The sweep's own start path (servers.start -> launcher.start_server): it returns only
    # once the supervisor says every worker serves, so the load's connections reach both.
    from serving.bench.plan import ServerSpec
    from serving.bench.servers import start

    running = start(ServerSpec("mnist37", "on", str(WORKERS)), model_repository, tmp_path)
    try:
        assert f"{WORKERS} workers serving on" in running.process.log()
        seen = set()
        for _ in range(20):  # bounded: 20 fresh connections reach both workers by far
            with connection(running.target("grpc")) as channel:
                seen.add(worker_of(channel))
            if len(seen) == WORKERS:
                break
        assert len(seen) == WORKERS, seen
    finally:
        assert running.stop() == 0, running.process.log()
    # A level that hides that line would leave the wait blind: refused at once, saying why.
    with pytest.raises(ValueError, match="needs --log-level info or debug"):
        start_server(model_repository, tmp_path, "--workers", "2", "--log-level", "warning")
    with pytest.raises(ValueError, match="needs --log-level info or debug"):
        start_server(
            model_repository,
            tmp_path,
            environment={"MNIST37_WORKERS": "2", "MNIST37_LOG_LEVEL": "error"},
        )


def test_busy_ports_are_refused_in_one_line(workers, model_repository, tmp_path):
    # The workers' port: neither a single server nor other workers may take it.
    for extra in (("--grpc-port", str(workers.port)), ("--workers", "2")):
        refused = start_server(
            model_repository, tmp_path, "--grpc-port", str(workers.port), *extra, wait=False
        )
        assert refused.process.wait(timeout=60) == 1
        assert f"cannot listen on 127.0.0.1:{workers.port}: Address already in use" in (
            refused.log()
        )
    # A single server's port (and its HTTP port): refused by --workers before any worker.
    single = start_server(model_repository, tmp_path)
    try:
        for port_flag, port in (("--grpc-port", single.port), ("--http-port", single.http_port)):
            refused = start_server(
                model_repository, tmp_path, "--workers", "2", port_flag, str(port), wait=False
            )
            assert refused.process.wait(timeout=60) == 1
            log = refused.log()
            assert "refusing to start: cannot listen on 127.0.0.1:" in log
            assert "Address already in use" in log and "started worker" not in log
            assert len(log.strip().splitlines()) == 1, log
    finally:
        assert single.terminate() == 0


def test_every_worker_serves_a_published_version_and_none_a_retired_one(model_repository, tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(model_repository, repository)
    # Scans only on SIGHUP, which the supervisor forwards: each worker follows the
    # repository itself (a poll interval does the same, later).
    server = start_workers(repository, tmp_path, "--poll-interval", "0", metrics=False)
    channels = [connection(server.target) for _ in range(16)]
    try:
        assert {worker_of(channel) for channel in channels} == {"0", "1"}
        stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in channels]
        image = np.zeros((1, 28, 28), np.uint8)

        def versions(version: str = "") -> set[str]:
            answered = set()
            for stub in stubs:
                try:
                    request = infer_request(image, version=version)
                    answered.add(stub.ModelInfer(request, timeout=20).model_version)
                except grpc.RpcError as error:
                    answered.add(error.code().name)
            return answered

        assert versions() == {"2"}
        published = publish_model(repository, "mnist37", random_linear_model(seed=3))
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: versions() == {"3"}, server, "version 3 on every worker", 30)
        shutil.rmtree(published.path)  # retired
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: versions() == {"2"}, server, "version 2 again everywhere", 30)
        assert versions("3") == {"NOT_FOUND"}, "no worker serves the retired version"
    finally:
        for channel in channels:
            channel.close()
        assert server.terminate() == 0, server.log()
    assert server.log().count("SIGHUP received") == 2 + 2 * WORKERS  # supervisor + workers


def keep_sending(
    target: str, outcomes: Counter, workers_seen: set, lock: threading.Lock, stop: threading.Event
) -> None:
    """Send over a connection of its own until refused (UNAVAILABLE: a client behind a load
    balancer would go elsewhere), counting each answer by its code."""
    with connection(target) as channel:
        with lock:
            workers_seen.add(worker_of(channel))
        send_until_refused(channel, outcomes, lock, stop)


def test_sigterm_under_load_drains_every_worker_and_loses_nothing(model_repository, tmp_path):
    server = start_workers(model_repository, tmp_path, "--shutdown-timeout", "20")
    multiprocess_dir = re.search(r"workers' metrics in (\S+)", server.log()).group(1)
    assert Path(multiprocess_dir).is_dir()
    outcomes, workers_seen, lock, stop = Counter(), set(), threading.Lock(), threading.Event()
    clients = [
        threading.Thread(
            target=keep_sending, args=(server.target, outcomes, workers_seen, lock, stop)
        )
        for _ in range(16)
    ]
    for client in clients:
        client.start()
    time.sleep(1.5)
    with lock:
        before = outcomes["OK"]
    server.process.send_signal(signal.SIGTERM)
    try:
        assert server.process.wait(timeout=60) == 0, server.log()
    finally:
        stop.set()
        for client in clients:
            client.join(30)
    print(f"\nanswers under load through a SIGTERM: {dict(outcomes)} ({before} OK before it)")
    assert workers_seen == {"0", "1"}, "both workers had clients"
    assert before > 0 and outcomes["OK"] > before
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes  # nothing CANCELLED or lost
    assert outcomes["UNAVAILABLE"] <= len(clients)
    log = server.log()
    for index in range(WORKERS):
        assert re.search(rf"worker {index} pid \d+ serving: draining", log), log
        assert re.search(rf"worker {index} \(pid \d+\) exited with status 0", log), log
    assert not Path(multiprocess_dir).exists(), "the metrics directory is removed"


def test_a_killed_worker_is_replaced_and_counted(model_repository, tmp_path):
    server = start_workers(model_repository, tmp_path)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(20):
                stub.ModelInfer(infer_request(np.zeros((1, 28, 28), np.uint8)), timeout=20)
        killed = worker_pids(server)[1]
        os.kill(killed, signal.SIGKILL)
        replaced = wait_for(
            lambda: (
                (pid := worker_pids(server)[1]) != killed
                and re.search(rf"worker 1 \(pid {pid}\) serves", server.log())
                and pid
            ),
            server,
            "a new worker 1",
        )
        log = server.log()
        assert f"worker 1 (pid {killed}) was killed by SIGKILL" in log and "restarting" in log
        samples = metrics(server)
        assert value(samples, "mnist37_worker_restarts_total") == 1
        assert value(samples, "mnist37_workers") == WORKERS
        ok = {
            "protocol": "grpc",
            "rpc": "ModelInfer",
            "model": "mnist37",
            "version": "2",
            "code": "OK",
        }
        assert value(samples, "mnist37_requests_total", **ok) == 20, "a dead worker's counts stay"
        wait_for(lambda: value(metrics(server), "mnist37_inflight_requests") == 0, server, "0", 5)
        channels = [connection(server.target) for _ in range(16)]
        try:
            assert {worker_of(channel) for channel in channels} == {"0", "1"}
        finally:
            for channel in channels:
                channel.close()
        assert os.path.exists(f"/proc/{replaced}")
    finally:
        assert server.terminate() == 0, server.log()


def test_a_worker_that_keeps_dying_stops_the_server(model_repository, tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(model_repository, repository)
    server = start_workers(repository, tmp_path, metrics=False)
    repository.rename(tmp_path / "gone")  # a new worker now refuses to start
    os.kill(worker_pids(server)[1], signal.SIGKILL)
    try:
        code = server.process.wait(timeout=60)
    finally:
        server.terminate()
    log = server.log()
    assert code == 1, log
    assert "worker 1 died 5 times in a row" in log
    assert log.count("refusing to start: model repository") == 4
    assert re.search(r"worker 0 \(pid \d+\) exited with status 0", log), "0 drained"


WORKER_OBSERVER_SCRIPT = """
import time
import numpy as np
from serving.metrics import PROBABILITY_BUCKETS, LATENCY_BUCKETS, PrometheusObserver

observer = PrometheusObserver(multiprocess=True)
generator = np.random.default_rng(37)
probability = np.concatenate(
    [generator.random(1000, dtype=np.float32), np.array([0.0, 0.5, 1.0, np.nan], np.float32)]
)
digit = np.where(probability >= 0.5, 7, 3).astype(np.int64)
observer.predictions_made("m", "vectorised", probability, digit)
for item in probability.tolist():
    if item == item:
        observer.probability.labels("m", "one-by-one").observe(item)
waits = (10.0 ** generator.uniform(-5.5, 1.5, 64)).tolist()
observer.batch_executed("m", "1", 64, waits, 0.001)
for wait in waits:
    observer.queue_duration.labels("reference").observe(wait)
observer.model_loaded("m", "1", "linear", "CPU")
observer.model_loaded("m", "2", "linear", "CPU")
observer.model_unloaded("m", "1", "linear", "CPU")
observer.watch_in_flight(lambda: 5)
time.sleep(0.5)
observer.close()
"""


def test_a_workers_metrics_in_multiprocess_files_are_exact(tmp_path):
    """A worker's observer writes prometheus_client's multiprocess files: the vectorised
    histogram updates give what one observation each gives, an unloaded version's info
    turns 0, the in-flight count is sampled, and no startup probe series is left."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", WORKER_OBSERVER_SCRIPT], env=env, check=True, timeout=60)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
    }

    def series(name: str, **labels: str) -> dict[str, float]:
        return {
            dict(sample_labels)["le"]: found
            for (sample, sample_labels), found in samples.items()
            if sample == name and set(labels.items()) <= set(sample_labels)
        }

    vectorised = series("mnist37_probability_bucket", version="vectorised")
    assert len(vectorised) == 15 and vectorised["+Inf"] == 1003  # the NaN is not counted
    assert vectorised == series("mnist37_probability_bucket", version="one-by-one")
    queue = series("mnist37_queue_duration_seconds_bucket", model="m")
    assert queue["+Inf"] == 64 and queue == series(
        "mnist37_queue_duration_seconds_bucket", model="reference"
    )
    info = {"model": "m", "arch": "linear", "provider": "CPU"}
    assert value(samples, "mnist37_model_info", version="1", **info) == 0
    assert value(samples, "mnist37_model_info", version="2", **info) == 1
    assert value(samples, "mnist37_inflight_requests") == 5
    assert not [key for key in samples if ("model", "") in key[1]], "no probe series"


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_second_signal_stops_every_worker_at_once(model_repository, tmp_path):
    environment = {"MNIST37_WORKERS": str(WORKERS)}
    server = start_server(
        model_repository, tmp_path, "--shutdown-timeout", "60", environment=environment
    )
    assert f"{WORKERS} workers serving on" in server.log(), "the launcher waits for every worker"
    # Silent connections (never a byte) hold each worker's drain for up to grpc's 5 s
    # handshake timeout; 16 of them reach both workers but with odds of 2 in 65,536.
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(16)]
    try:
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0, server.log()
        seconds = time.monotonic() - start
    finally:
        for held in silent:
            held.close()
    print(f"\nstopped {seconds:.2f} s after the second SIGTERM")
    log = server.log()
    assert "second SIGTERM: the workers stop without waiting" in log
    assert log.count("second SIGTERM: stopping without waiting") == WORKERS
    assert seconds < 10


def test_workers_whose_supervisor_is_killed_drain_and_exit(model_repository, tmp_path):
    server = start_workers(model_repository, tmp_path, metrics=False)
    pids = list(worker_pids(server).values())
    assert len(pids) == WORKERS and all(alive(pid) for pid in pids)
    server.process.kill()
    server.process.wait(timeout=10)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids), "no worker outlives its supervisor"
    assert server.log().count("the supervisor is gone: draining") == WORKERS


def test_an_error_every_worker_would_hit_is_reported_once(tmp_path):
    refused = start_server(tmp_path / "no-such-repository", tmp_path, "--workers", "2", wait=False)
    assert refused.process.wait(timeout=60) == 1
    log = refused.log()
    assert log.count("refusing to start: model repository") == 1, "by worker 0 alone"
    assert "worker 0 exited with status 1 before it served" in log
    assert "started worker 1" not in log

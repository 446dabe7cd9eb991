"""`python -m serving.healthcheck` against a real gRPC health service started in-process:
the command the Docker HEALTHCHECK and the compose healthcheck run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from helpers import REPO_ROOT

from serving import healthcheck

ROOT = REPO_ROOT
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class HealthServer:
    address: str
    port: int
    servicer: health.HealthServicer


@pytest.fixture
def health_server() -> Iterator[HealthServer]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield HealthServer(f"127.0.0.1:{port}", port, servicer)
    finally:
        server.stop(0)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != healthcheck.PORT_VARIABLE}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "serving.healthcheck", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout + result.stderr
    return lines[0]


def test_serving_server_exits_0(health_server: HealthServer) -> None:
    health_server.servicer.set("", SERVING)
    result = run("--address", health_server.address)
    assert result.returncode == 0, result.stdout + result.stderr
    assert one_line(result) == f"{health_server.address}: SERVING"


def test_not_serving_exits_1(health_server: HealthServer) -> None:
    health_server.servicer.set("", NOT_SERVING)
    result = run("--address", health_server.address)
    assert result.returncode == 1
    assert one_line(result) == f"{health_server.address}: NOT_SERVING"


def test_graceful_shutdown_turns_the_check_unhealthy(health_server: HealthServer) -> None:
    health_server.servicer.set("", SERVING)
    assert healthcheck.check(health_server.address)[0]
    health_server.servicer.enter_graceful_shutdown()
    assert healthcheck.check(health_server.address) == (
        False,
        f"{health_server.address}: NOT_SERVING",
    )


def test_named_service(health_server: HealthServer) -> None:
    health_server.servicer.set("", NOT_SERVING)
    health_server.servicer.set("mnist37", SERVING)
    result = run("--address", health_server.address, "--service", "mnist37")
    assert result.returncode == 0
    assert one_line(result) == f"{health_server.address} service 'mnist37': SERVING"
    unknown = run("--address", health_server.address, "--service", "nope")
    assert unknown.returncode == 1
    assert one_line(unknown) == (
        f"{health_server.address} service 'nope': NOT_FOUND: "
        "the server has no health status for this service name"
    )


def test_port_comes_from_mnist37_grpc_port(health_server: HealthServer) -> None:
    health_server.servicer.set("", SERVING)
    result = run(env={healthcheck.PORT_VARIABLE: str(health_server.port)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert one_line(result) == f"localhost:{health_server.port}: SERVING"
    assert healthcheck.default_address({}) == "localhost:8001"
    assert healthcheck.default_address({"MNIST37_GRPC_PORT": "9001"}) == "localhost:9001"


def test_nobody_listening_exits_1() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nobody listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run("--address", f"127.0.0.1:{port}", "--timeout", "2")
    assert result.returncode == 1
    assert one_line(result).startswith(f"127.0.0.1:{port}: UNAVAILABLE")
    assert result.stderr == ""  # no gRPC C-core lines


class _SlowHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self.release.wait(10)
        return health_pb2.HealthCheckResponse(status=SERVING)


def test_no_answer_within_timeout_exits_1() -> None:
    release = threading.Event()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(_SlowHealth(release), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        started = time.monotonic()
        result = run("--address", f"127.0.0.1:{port}", "--timeout", "0.5")
        elapsed = time.monotonic() - started
    finally:
        release.set()
        server.stop(0)
    assert result.returncode == 1
    assert one_line(result).startswith(f"127.0.0.1:{port}: DEADLINE_EXCEEDED")
    assert elapsed < 8, f"took {elapsed:.1f} s with --timeout 0.5"


def test_usage_errors_exit_2() -> None:
    assert run("--timeout", "0").returncode == 2
    assert run("--bogus").returncode == 2


def test_imports_neither_torch_nor_onnxruntime() -> None:
    code = (
        "import sys, serving.healthcheck; "
        "heavy = sorted({'torch', 'onnxruntime', 'numpy'} & set(sys.modules)); "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr

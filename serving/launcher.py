"""Run `mnist37-serve` as a subprocess on a free loopback port and wait until it is ready:
for the benchmark, the demo-style checks and the tests."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from serving.config import env_var, parse_workers
from serving.cpus import worker_count
from serving.generated.inference import grpc_service_pb2 as oip_pb
from serving.generated.inference import grpc_service_pb2_grpc as oip_grpc

# gRPC metadata: (key, value) pairs, an `authorization` token say.
Metadata = Sequence[tuple[str, str]]


class ServerNotReady(RuntimeError):
    """The server exited or did not become ready in time; the message has its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log_path: Path
    http_port: int = 0  # 0: HTTP off
    tls: bool = False  # started with --tls-cert: gRPC over TLS, HTTPS
    workers: int = 1  # server processes (--workers): above 1, a supervisor's workers

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_address(self) -> str:
        """The HTTP endpoints' `127.0.0.1:PORT`."""
        assert self.http_port, "this server was started without HTTP"
        return f"127.0.0.1:{self.http_port}"

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.http_address}"

    def log(self) -> str:
        return self.log_path.read_text()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (a graceful drain), then the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_server(
    repository: Path,
    log_dir: Path,
    *extra: str,
    wait: bool = True,
    timeout: float = 60.0,
    prefix: Sequence[str] = (),
    http: bool = True,
    environment: Mapping[str, str] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    metadata: Metadata = (),
) -> ServerProcess:
    """Run `python -m serving.server` on a free port, its output in `log_dir`; with `wait`,
    return once ServerReady is true, asked over a channel with `credentials` (for a server
    started with `--tls-cert`: TLS, with a client certificate for mutual TLS) and with
    `metadata` (with `--auth-token-file`: the token; ServerReady is no health check);
    insecure and bare without them. `prefix` runs the server through another command (one
    that puts it into a memory-limited cgroup, say) that ends by exec-ing it. With `http`,
    the HTTP endpoints listen on another free port, else HTTP is off (`--http-port 0`; a
    `--http-port` in `extra` wins). `environment` adds variables to the server's. With
    `--workers` above 1 (in `extra` or `environment`), `wait` also waits for every worker
    to serve: the first one answers ServerReady before the others have loaded. It learns
    that from the supervisor's "N workers serving" line, logged at `info`, so such a
    server must not be started with a quieter `--log-level`."""
    port = free_port()
    http_port = _other_free_port(port) if http else 0
    if (given := _last_value(extra, "--http-port")) is not None:
        http_port = int(given)
    log_path = log_dir / f"server-{port}.log"
    command = [
        *prefix,
        sys.executable,
        "-m",
        "serving.server",
        "--repository",
        str(repository),
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(port),
        "--metrics-port",
        "0",
        "--http-port",
        str(http_port),
        *extra,
    ]
    env = {**os.environ, **(environment or {})}
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    workers = _workers(extra, env)
    if wait and workers > 1 and _log_level(extra, env) not in ("debug", "info"):
        process.kill()
        process.wait()
        raise ValueError(
            "start_server(wait=True) with --workers above 1 needs --log-level info or debug: "
            'it waits for the supervisor\'s "N workers serving" line, logged at info'
        )
    server = ServerProcess(process, port, log_path, http_port, "--tls-cert" in extra, workers)
    if wait:
        wait_ready(server, timeout, credentials, metadata)
    return server


def _workers(extra: Sequence[str], env: Mapping[str, str]) -> int:
    """How many workers a server started with `extra` and `env` runs (0 if unparsable:
    the server will refuse it)."""
    text = _last_value(extra, "--workers") or env.get(env_var("workers"), "") or "1"
    try:
        return worker_count(parse_workers(text))
    except argparse.ArgumentTypeError:
        return 0


def _log_level(extra: Sequence[str], env: Mapping[str, str]) -> str:
    """The logging level a server started with `extra` and `env` runs at."""
    return _last_value(extra, "--log-level") or env.get(env_var("log_level"), "") or "info"


def _last_value(extra: Sequence[str], flag: str) -> str | None:
    """The value of the last `flag` in `extra` (the one the server takes), else None."""
    if flag not in extra:
        return None
    index = len(extra) - 1 - list(extra)[::-1].index(flag)
    return extra[index + 1] if index + 1 < len(extra) else None


def _other_free_port(taken: int) -> int:
    port = free_port()
    while port == taken:
        port = free_port()
    return port


def wait_ready(
    server: ServerProcess,
    timeout: float = 60.0,
    credentials: grpc.ChannelCredentials | None = None,
    metadata: Metadata = (),
) -> None:
    """Until ServerReady is true, asked over a channel with `credentials` (None: insecure)
    and `metadata`; ServerNotReady if the server exits or `timeout` seconds pass first.
    Each attempt opens a new channel: a TLS channel that first tried before the server
    listened was seen never to finish a handshake later (each one timed out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerNotReady(f"server exited {server.process.returncode}:\n{server.log()}")
        if _ready(server.target, credentials, metadata) and _all_workers_serve(server):
            return
        time.sleep(0.1)
    server.terminate()
    raise ServerNotReady(f"server not ready within {timeout}s:\n{server.log()}")


def _all_workers_serve(server: ServerProcess) -> bool:
    """With --workers N, whether the supervisor has said that all N serve."""
    return server.workers <= 1 or f"{server.workers} workers serving on" in server.log()


def _ready(target: str, credentials: grpc.ChannelCredentials | None, metadata: Metadata) -> bool:
    channel = (
        grpc.insecure_channel(target)
        if credentials is None
        else grpc.secure_channel(target, credentials)
    )
    with channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        try:
            request = oip_pb.ServerReadyRequest()
            return stub.ServerReady(request, timeout=1, metadata=tuple(metadata)).ready
        except grpc.RpcError:
            return False

"""Run `mnist37-serve` as a subprocess on a free loopback port and wait until it is ready:
for the benchmark, the demo-style checks and the tests."""

from __future__ import annotations

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

from serving.config import env_var
from serving.generated.inference import grpc_service_pb2 as oip_pb
from serving.generated.inference import grpc_service_pb2_grpc as oip_grpc

# --http-port's variable: the launcher sets it until ServerConfig has the flag.
HTTP_PORT_VARIABLE = env_var("http_port")


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
        return f"http://{self.http_address}"

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
) -> ServerProcess:
    """Run `python -m serving.server` on a free port, its output in `log_dir`; with `wait`,
    return once ServerReady is true. `prefix` runs the server through another command
    (one that puts it into a memory-limited cgroup, say) that ends by exec-ing it. With
    `http`, the HTTP endpoints listen on another free port, else HTTP is off.
    `environment` adds variables to the server's (settings without a flag yet, say)."""
    port = free_port()
    http_port = _other_free_port(port) if http else 0
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
        *extra,
    ]
    env = {**os.environ, HTTP_PORT_VARIABLE: str(http_port), **(environment or {})}
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(process, port, log_path, http_port)
    if wait:
        wait_ready(server, timeout)
    return server


def _other_free_port(taken: int) -> int:
    port = free_port()
    while port == taken:
        port = free_port()
    return port


def wait_ready(server: ServerProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(server.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise ServerNotReady(f"server exited {server.process.returncode}:\n{server.log()}")
            try:
                if stub.ServerReady(oip_pb.ServerReadyRequest(), timeout=1).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    server.terminate()
    raise ServerNotReady(f"server not ready within {timeout}s:\n{server.log()}")

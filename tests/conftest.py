"""Shared fixtures: synthetic contract-conforming models, the shipped test digits, and a
real `mnist37-serve` subprocess on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.generated.inference import grpc_service_pb2 as oip_pb
from serving.generated.inference import grpc_service_pb2_grpc as oip_grpc
from serving.idx import read_images, read_labels
from serving.synthetic import mean_difference_model, publish_model, random_linear_model

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def shipped_digit_files() -> tuple[Path, Path]:
    """The shipped 3s and 7s of MNIST's test set (images, labels)."""
    data = REPO_ROOT / "training" / "data"
    return data / "t10k-images-idx3-ubyte.gz", data / "t10k-labels-idx1-ubyte.gz"


@pytest.fixture(scope="session")
def test_digits() -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = shipped_digit_files()
    images, labels = read_images(images_path), read_labels(labels_path)
    assert set(np.unique(labels).tolist()) == {3, 7}
    return images.astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory, test_digits) -> Path:
    """`mnist37` v1 (random weights) and v2 (a decent mean-difference classifier), plus
    `other` v1."""
    repository = tmp_path_factory.mktemp("repository")
    publish_model(repository, "mnist37", random_linear_model(seed=1))
    publish_model(repository, "mnist37", mean_difference_model(*test_digits))
    publish_model(repository, "other", random_linear_model(seed=2))
    return repository


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def terminate(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_server(repository: Path, log_dir: Path, *extra: str, wait: bool = True) -> ServerProcess:
    """Run `mnist37-serve` on a free port; with `wait`, return once ServerReady is true."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    command = [
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
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=dict(os.environ)
        )
    server = ServerProcess(process, port, log_path)
    if wait:
        wait_ready(server)
    return server


def wait_ready(server: ServerProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(server.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise AssertionError(f"server exited {server.process.returncode}:\n{server.log()}")
            try:
                if stub.ServerReady(oip_pb.ServerReadyRequest(), timeout=1).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    server.terminate()
    raise AssertionError(f"server not ready within {timeout}s:\n{server.log()}")


@pytest.fixture(scope="module")
def server(model_repository, tmp_path_factory) -> Iterator[ServerProcess]:
    """One server per test module."""
    running = start_server(model_repository, tmp_path_factory.mktemp("logs"))
    yield running
    running.terminate()


@pytest.fixture
def channel(server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as opened:
        yield opened


@pytest.fixture
def oip(channel) -> oip_grpc.GRPCInferenceServiceStub:
    return oip_grpc.GRPCInferenceServiceStub(channel)


def infer_request(
    images: np.ndarray, model: str = "mnist37", version: str = "", raw: bool = True
) -> oip_pb.ModelInferRequest:
    request = oip_pb.ModelInferRequest(model_name=model, model_version=version)
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=images.shape)
    if raw:
        request.raw_input_contents.append(images.tobytes())
    else:
        tensor.contents.uint_contents.extend(images.reshape(-1).tolist())
    return request

"""Shared fixtures: synthetic contract-conforming models, the shipped test digits, and a
real `mnist37-serve` subprocess on a free loopback port."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.generated.inference import grpc_service_pb2 as oip_pb
from serving.generated.inference import grpc_service_pb2_grpc as oip_grpc
from serving.idx import read_images, read_labels
from serving.launcher import ServerProcess, start_server
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

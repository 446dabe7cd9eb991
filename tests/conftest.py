"""Shared fixtures: synthetic contract-conforming models, the shipped test digits, and a
real `mnist37-serve` subprocess on free loopback ports (gRPC and HTTP: the launcher passes
`--http-port`, so no test server binds the default 8000). Plain helpers live in
`helpers.py`; `leakcheck.py` fails the session if a process the tests started survives it.

Tests under `tests/integration` are marked `integration` (they start servers, Prometheus
or other processes); `make test-unit` runs the rest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import REPO_ROOT, shipped_digit_files
from leakcheck import pytest_configure as leakcheck_configure
from leakcheck import pytest_sessionfinish  # noqa: F401 (a hook: pytest finds it by name)

from serving.generated.inference import grpc_service_pb2_grpc as oip_grpc
from serving.idx import read_images, read_labels
from serving.launcher import ServerProcess, start_server
from serving.synthetic import (
    linear_explanation_bytes,
    linear_model_bytes,
    mean_difference_weights,
    publish_model,
    random_linear_model,
)

INTEGRATION = REPO_ROOT / "tests" / "integration"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: starts servers or other processes (tests/integration)"
    )
    leakcheck_configure(config)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def test_digits() -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = shipped_digit_files()
    images, labels = read_images(images_path), read_labels(labels_path)
    assert set(np.unique(labels).tolist()) == {3, 7}
    return images.astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory, test_digits) -> Path:
    """`mnist37` v1 (random weights) and v2 (a decent mean-difference classifier, with its
    explanation graph), plus `other` v1 (random, published without an explanation graph, as
    every version was before Explain)."""
    repository = tmp_path_factory.mktemp("repository")
    decent = mean_difference_weights(*test_digits)
    publish_model(repository, "mnist37", random_linear_model(seed=1))
    publish_model(
        repository,
        "mnist37",
        linear_model_bytes(*decent),
        explanation=linear_explanation_bytes(*decent),
    )
    publish_model(repository, "other", random_linear_model(seed=2))
    return repository


@pytest.fixture(scope="module")
def server(model_repository, tmp_path_factory) -> Iterator[ServerProcess]:
    """One server per test module; its batches are of at most 64 images, so that the
    tests' larger requests are split into several calls (the default, 1,024, splits none)."""
    logs = tmp_path_factory.mktemp("logs")
    running = start_server(model_repository, logs, "--max-batch-size", "64")
    try:
        yield running
    finally:
        running.terminate()


@pytest.fixture
def channel(server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as opened:
        yield opened


@pytest.fixture
def oip(channel) -> oip_grpc.GRPCInferenceServiceStub:
    return oip_grpc.GRPCInferenceServiceStub(channel)

"""The KServe Python SDK (`kserve`, its own virtual environment) drives the real server over
HTTP and gRPC: health, readiness, metadata, and inference with binary and typed tensors,
every answer the server's own (Classify's digits and P(7), onnxruntime offline).

The SDK pins a grpcio and protobuf of its own, which the server's environment cannot
share, so it runs as a subprocess (`kserve_client_script.py`) of `.venv-kserve`, which
`make test` builds from tests/kserve-requirements.txt. No environment, no skip: a failure
that says how to build it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import REPO_ROOT

from serving.generated.mnist37.v1 import classifier_pb2, classifier_pb2_grpc
from serving.repository import latest_version
from serving.runtime import ModelRuntime

SCRIPT = Path(__file__).with_name("kserve_client_script.py")
REQUIREMENTS = REPO_ROOT / "tests" / "kserve-requirements.txt"
# Where `make test` puts it; KSERVE_VENV (the Makefile's variable) points elsewhere.
VENV = Path(os.environ.get("KSERVE_VENV", REPO_ROOT / ".venv-kserve"))
IMAGES = 37  # 29 3s and 8 7s of the shipped digits, 37 being this project's number


def kserve_python(venv: Path = VENV) -> Path:
    """`venv`'s python, or a failure saying how to build `venv`: its stamp, written once
    the install finished, tells a whole environment from a half-installed one."""
    stamp = venv / ".installed"
    if not stamp.is_file():
        pytest.fail(
            f"the KServe SDK's virtual environment is missing ({stamp} not found): run "
            "`make test`, which builds it (or `make .venv-kserve/.installed` alone) from "
            f"{REQUIREMENTS.relative_to(REPO_ROOT)}"
        )
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def offline(model_repository):
    return ModelRuntime(latest_version(model_repository, "mnist37").model_path)


@pytest.fixture(scope="module")
def sdk_answers(server, test_digits, tmp_path_factory) -> dict:
    images = test_digits[0][:IMAGES]
    path = tmp_path_factory.mktemp("kserve") / "images.npy"
    np.save(path, images)
    # The SDK's environment only: nothing of the project's (PYTHONPATH) leaks into it.
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    settings = {"http": server.http_url, "grpc": server.target, "images": str(path)}
    completed = subprocess.run(
        [str(kserve_python()), str(SCRIPT)],
        input=json.dumps(settings),
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout)


@pytest.fixture(scope="module")
def classified(server, test_digits) -> tuple[list[int], list[float]]:
    """The server's own answer for the same images: Classify over gRPC."""
    request = classifier_pb2.ClassifyRequest()
    for image in test_digits[0][:IMAGES]:
        request.images.add(pixels=image.tobytes())
    with grpc.insecure_channel(server.target) as channel:
        response = classifier_pb2_grpc.ClassifierStub(channel).Classify(request, timeout=30)
    return (
        [p.digit for p in response.predictions],
        [p.probability_seven for p in response.predictions],
    )


def test_the_sdk_environment_has_the_pinned_kserve(sdk_answers):
    pinned = dict(
        line.split("==")
        for line in REQUIREMENTS.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert sdk_answers["grpcio"] == pinned["grpcio"]  # its own, not the server's 1.67


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_health_readiness_and_metadata(sdk_answers, protocol):
    answers = sdk_answers[protocol]
    assert answers["server_live"] is True
    assert answers["server_ready"] is True
    assert answers["model_ready"] is True
    if protocol == "http":
        assert answers["missing_model_ready"] is False
    server = answers["server_metadata"]
    assert server["name"] == "mnist37" and server["version"]
    assert "binary_tensor_data" in server["extensions"]
    model = answers["model_metadata"]
    assert (model["name"], model["versions"], model["platform"]) == (
        "mnist37",
        ["2"],
        "onnxruntime_onnx",
    )
    assert model["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 28, 28]}]
    assert [(t["name"], t["datatype"]) for t in model["outputs"]] == [
        ("probability", "FP32"),
        ("digit", "INT64"),
    ]


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_infer_answers_what_classify_and_onnxruntime_answer(
    sdk_answers, classified, offline, test_digits, protocol, binary
):
    answer = sdk_answers[protocol][f"infer_binary_{binary}"]
    assert answer["id"] == f"{protocol}-{binary}"
    assert answer["model_name"] == "mnist37"
    if protocol == "grpc":  # the SDK's REST response drops it (from_bytes reads no version)
        assert answer["model_version"] == "2"
    digits, sevens = classified
    assert answer["digit"]["dtype"] == "int64"
    assert answer["digit"]["values"] == digits
    assert answer["probability"]["dtype"] == "float32"
    np.testing.assert_allclose(answer["probability"]["values"], sevens, rtol=1e-6)
    probability, digit = offline.predict(test_digits[0][:IMAGES])
    assert answer["digit"]["values"] == digit.tolist()
    np.testing.assert_array_equal(np.float32(answer["probability"]["values"]), probability)
    assert set(digits) == {3, 7}
    assert answer["binary_outputs"] is binary  # the outputs in the form the input took


def test_a_missing_environment_fails_and_says_how_to_build_it(tmp_path):
    half_installed = tmp_path / ".venv-kserve"
    (half_installed / "bin").mkdir(parents=True)  # created, the install never finished
    with pytest.raises(pytest.fail.Exception) as failed:
        kserve_python(half_installed)
    assert "make test" in str(failed.value)
    assert "tests/kserve-requirements.txt" in str(failed.value)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_error_reaches_the_sdk_user_with_the_servers_message(sdk_answers, protocol):
    status, message = sdk_answers[protocol]["unknown_model"]
    assert status == (404 if protocol == "http" else "NOT_FOUND")
    assert "model 'nope' is not loaded" in message

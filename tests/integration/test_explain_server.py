"""Explain through the real server: real trained models, published the way training
publishes them (training/publish.py), explaining the shipped test digits."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from helpers import TRAINING_SEED, png, train_quickly

from serving.client import Mnist37Client
from serving.config import ServerConfig
from serving.generated.mnist37.v1 import classifier_pb2 as pb
from serving.generated.mnist37.v1 import classifier_pb2_grpc as pb_grpc
from serving.imaging import DEFAULT_PNG_LIMITS, png_to_image
from serving.launcher import ServerProcess, start_server
from serving.registry import BatchingOptions, load_model_version
from serving.repository import EXPLANATION_FILE
from serving.runtime import ExplanationRuntime, RuntimeOptions
from serving.synthetic import (
    linear_explanation_bytes,
    linear_model_bytes,
    random_linear_model,
    random_linear_weights,
)
from serving.synthetic import publish_model as publish_synthetic
from training.explain import gradient_times_input
from training.publish import TrainingRecord, publish_model
from training.train import evaluate, is_seven, to_pixels

ARCHITECTURES = ("linear", "mlp")
MAX_IMAGES = ServerConfig().max_request_images  # the default --max-request-images
WITHOUT_EXPLANATION = "before-explain"  # a version published as every one was before Explain
CREATED_AT = "2026-12-01T00:00:00+00:00"


@pytest.fixture(scope="module")
def trained() -> dict[str, torch.nn.Module]:
    return {arch: train_quickly(arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def repository(tmp_path_factory, trained, test_digits) -> Path:
    """`linear` and `mlp` v1, trained and published for real; `before-explain` v1 without
    an explanation graph."""
    repository = tmp_path_factory.mktemp("explain-repository")
    images, labels = test_digits
    for arch, model in trained.items():
        accuracy = evaluate(model, to_pixels(images), is_seven(labels)).accuracy
        record = TrainingRecord(
            arch,
            30 if arch == "mlp" else None,
            TRAINING_SEED,
            CREATED_AT,
            {},
            {"accuracy": accuracy},
        )
        publish_model(model, record, images, repository, arch)
    publish_synthetic(repository, WITHOUT_EXPLANATION, random_linear_model(seed=4))
    return repository


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory) -> Iterator[ServerProcess]:
    running = start_server(repository, tmp_path_factory.mktemp("logs"))
    try:
        yield running
    finally:
        running.terminate()


@pytest.fixture
def client(server) -> Iterator[Mnist37Client]:
    with Mnist37Client(server.target) as opened:
        yield opened


@pytest.fixture
def stub(server) -> Iterator[pb_grpc.ClassifierStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.ClassifierStub(channel)


def sigmoid(logit: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -np.asarray(logit, np.float64)))


def explained(client: Mnist37Client, model: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every test digit explained through the server, in requests of 512, by field."""
    answers = [
        explanation
        for start in range(0, len(images), 512)
        for explanation in client.explain(list(images[start : start + 512]), model)
    ]
    fields = ("pixels", "contributions", "bias_term", "logit", "probability_seven", "digit")
    return {name: np.array([getattr(answer, name) for answer in answers]) for name in fields}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_votes_add_up_to_the_served_logit_whose_sigmoid_is_classifys_p7(client, arch, test_digits):
    images, labels = test_digits
    served = explained(client, arch, images)
    votes = served["contributions"].astype(np.float64).sum(axis=(1, 2))
    assert np.abs(votes + served["bias_term"] - served["logit"]).max() <= 1e-4
    classified = [
        prediction
        for start in range(0, len(images), 512)
        for prediction in client.classify(list(images[start : start + 512]), arch)
    ]
    p7 = np.array([prediction.probability_seven for prediction in classified])
    assert np.abs(sigmoid(served["logit"]) - p7).max() <= 1e-5
    np.testing.assert_allclose(served["probability_seven"], p7, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(served["digit"], [p.digit for p in classified])
    np.testing.assert_array_equal(served["pixels"], images)
    assert (served["digit"] == labels).mean() > 0.9, "a real, trained model"
    assert np.abs(votes).max() > 1, "the votes carry the decision, not the bias"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_votes_are_torch_autograds_gradient_times_input(client, trained, arch, test_digits):
    images, _ = test_digits
    served = explained(client, arch, images)
    expected = gradient_times_input(trained[arch], to_pixels(images)).numpy()
    assert np.abs(served["contributions"].reshape(len(images), -1) - expected).max() <= 1e-4


def test_a_png_is_explained_as_the_digit_it_converts_to(client, test_digits):
    image = test_digits[0][3]
    drawing = png(np.kron(255 - image, np.ones((3, 3), np.uint8)))  # dark ink on white, 84 px
    (from_png,) = client.explain([drawing], "mlp")
    (from_pixels,) = client.explain([from_png.pixels], "mlp")
    converted = png_to_image(drawing, 0, DEFAULT_PNG_LIMITS.image_pixels)
    np.testing.assert_array_equal(from_png.pixels, converted)
    np.testing.assert_array_equal(from_png.contributions, from_pixels.contributions)
    assert (from_png.logit, from_png.model_name, from_png.model_version) == (
        from_pixels.logit,
        "mlp",
        "1",
    )


def test_an_empty_request_gets_no_explanations(stub):
    assert list(stub.Explain(pb.ClassifyRequest(model_name="linear")).explanations) == []


def _answer(call: Callable[[], object]) -> tuple[grpc.StatusCode, str] | str:
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details()
    return "answered"


def _request(*images: pb.Image, model: str = "linear", version: str = "") -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model_name=model, model_version=version, images=images)


def _bad_requests(digit: np.ndarray) -> dict[str, pb.ClassifyRequest]:
    pixels = pb.Image(pixels=digit.tobytes())
    return {
        "too many images": _request(*[pixels] * 4097),
        "short pixels": _request(pixels, pb.Image(pixels=b"\x00" * 10)),
        "neither pixels nor png": _request(pixels, pb.Image()),
        "a PNG that does not decode": _request(pixels, pb.Image(png=b"\x89PNG\r\n\x1a\nnot")),
        "a blank PNG": _request(pb.Image(png=png(np.zeros((28, 28), np.uint8)))),
        "a PNG over the pixel limit": _request(pb.Image(png=png(np.zeros((1500, 1500), np.uint8)))),
        "an unknown model": _request(pixels, model="nope"),
        "an unknown version": _request(pixels, version="7"),
    }


def test_bad_input_gets_classifys_answer_code_and_message(stub, test_digits):
    for case, request in _bad_requests(test_digits[0][0]).items():
        classified = _answer(lambda r=request: stub.Classify(r))
        assert classified != "answered", case
        assert _answer(lambda r=request: stub.Explain(r)) == classified, case


def test_a_version_without_an_explanation_graph_is_a_failed_precondition(stub, test_digits):
    request = _request(pb.Image(pixels=test_digits[0][0].tobytes()), model=WITHOUT_EXPLANATION)
    code, details = _answer(lambda: stub.Explain(request))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith(
        f"model {WITHOUT_EXPLANATION!r} version 1 was published without an explanation graph "
        "(explanation.onnx: "
    )
    assert "mnist37-retrain" in details
    # Refused before decoding: a bad PNG for that version is still this refusal.
    bad_png = _request(pb.Image(png=b"\x89PNG\r\n\x1a\nnot"), model=WITHOUT_EXPLANATION)
    assert _answer(lambda: stub.Explain(bad_png))[0] == grpc.StatusCode.FAILED_PRECONDITION
    # and the server goes on: the same version classifies, another explains
    assert len(stub.Classify(request).predictions) == 1
    good = _request(pb.Image(pixels=test_digits[0][0].tobytes()), model="linear")
    (explanation,) = stub.Explain(good).explanations
    assert len(explanation.contributions) == 784 * 4 and len(explanation.pixels) == 784


def test_the_largest_request_is_explained(client, test_digits):
    """--max-request-images images answer 3x what their request carries."""
    largest = ServerConfig().max_request_images
    images = np.resize(test_digits[0], (largest, 28, 28))
    answers = client.explain(list(images), "linear")
    assert len(answers) == largest
    np.testing.assert_array_equal(answers[-1].pixels, images[-1])


def test_a_version_loads_with_its_explanation_graph_or_not_at_all(tmp_path):
    weights = random_linear_weights(seed=6)
    model = linear_model_bytes(*weights)
    explanation = linear_explanation_bytes(*weights)
    explainable = publish_synthetic(tmp_path, "m", model, explanation=explanation)
    plain = publish_synthetic(tmp_path, "m", model)
    damaged = publish_synthetic(tmp_path, "m", model, explanation=explanation[:100])
    with ThreadPoolExecutor(1) as executor:

        def load(version):
            return load_model_version(version, RuntimeOptions(), BatchingOptions(), executor)

        loaded = load(explainable).explanation
        assert isinstance(loaded.runtime, ExplanationRuntime)
        # Named by its version, not its path (messages shown to clients name no paths).
        assert loaded.runtime.model_path == Path(explainable.label) / EXPLANATION_FILE
        assert load(plain).explanation is None
        # onnxruntime's own error, naming the file: the reloader keeps what it served
        with pytest.raises(Exception, match=r"explanation\.onnx"):
            load(damaged)

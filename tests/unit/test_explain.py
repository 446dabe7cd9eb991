"""The explanation graph: pixel votes that add up to the logit, proved through onnxruntime."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from helpers import REPO_ROOT, train_quickly
from PIL import Image

from serving.contract import EXPLANATION_OUTPUT_NAMES
from serving.explain_render import VOTE_PANEL_BOX, render_explanation
from training.data import load_dataset
from training.explain import (
    ADDITIVITY_TOLERANCE,
    EXPLANATION_DOC,
    GRADIENT_TOLERANCE,
    SIGMOID_TOLERANCE,
    TORCH_TOLERANCE,
    ExplanationError,
    ExplanationModel,
    check_explanation,
    export_explanation,
    finalize_explanation,
    gradient_times_input,
    measure_explanation,
    relative_gap,
)
from training.export import (
    BATCH_DIMENSION,
    OPSET_VERSION,
    ExportError,
    ModelMetadata,
    export_onnx,
    finalize,
    read_metadata,
)
from training.models import MLP, Linear
from training.parity import RANDOM_BATCH_SIZES

ARCHITECTURES = ("linear", "mlp")
SEED = 37

METADATA = ModelMetadata(
    model_name="mnist37",
    model_version=3,
    architecture="mlp",
    hidden_units=30,
    training_seed=SEED,
    training_data_checksums={"t10k-images-idx3-ubyte": "cd" * 32},
    test_accuracy=0.98,
    created_at="2025-01-02T03:04:05+00:00",
)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {arch: train_quickly(arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def graphs(models) -> dict[str, onnx.ModelProto]:
    return {arch: export_explanation(model) for arch, model in models.items()}


@pytest.fixture(scope="module")
def model(models, arch) -> torch.nn.Module:
    return models[arch]


@pytest.fixture(scope="module")
def graph(graphs, arch) -> onnx.ModelProto:
    return graphs[arch]


@pytest.fixture(scope="module")
def graph_bytes(graph) -> bytes:
    return graph.SerializeToString(deterministic=True)


@pytest.fixture(scope="module")
def session(graph_bytes) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(graph_bytes, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def explained(session, test_digits) -> dict[str, np.ndarray]:
    """The graph's outputs for every shipped test digit, by name."""
    images, _ = test_digits
    return dict(zip(EXPLANATION_OUTPUT_NAMES, session.run(None, {"images": images}), strict=True))


def dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def pixels_of(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).reshape(len(images), -1).float() / 255


# --- the contract ------------------------------------------------------------------------


def test_graph_has_the_explanation_names_dtypes_and_shapes(graph):
    (images,) = graph.graph.input
    assert (images.name, images.type.tensor_type.elem_type) == ("images", onnx.TensorProto.UINT8)
    assert dims(images) == [BATCH_DIMENSION, 28, 28]
    outputs = {
        output.name: (output.type.tensor_type.elem_type, dims(output))
        for output in graph.graph.output
    }
    assert list(outputs) == list(EXPLANATION_OUTPUT_NAMES)
    assert outputs == {
        "contributions": (onnx.TensorProto.FLOAT, [BATCH_DIMENSION, 28, 28]),
        "bias_term": (onnx.TensorProto.FLOAT, [BATCH_DIMENSION]),
        "logit": (onnx.TensorProto.FLOAT, [BATCH_DIMENSION]),
        "probability": (onnx.TensorProto.FLOAT, [BATCH_DIMENSION]),
        "digit": (onnx.TensorProto.INT64, [BATCH_DIMENSION]),
    }


def test_graph_is_exported_like_the_serving_graph(graph):
    assert {opset.domain: opset.version for opset in graph.opset_import}[""] == OPSET_VERSION
    assert graph.graph.initializer, "the weights should be initializers"
    assert not any(
        onnx.external_data_helper.uses_external_data(tensor) for tensor in graph.graph.initializer
    )
    assert graph.doc_string == EXPLANATION_DOC
    onnx.checker.check_model(graph, full_check=True)


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_dynamic_batch(session, batch_size):
    images = np.random.default_rng(batch_size).integers(0, 256, (batch_size, 28, 28), np.uint8)
    contributions, bias, logit, probability, digit = session.run(None, {"images": images})
    assert contributions.shape == (batch_size, 28, 28) and contributions.dtype == np.float32
    for output in (bias, logit, probability):
        assert output.shape == (batch_size,) and output.dtype == np.float32
    assert digit.shape == (batch_size,) and digit.dtype == np.int64
    np.testing.assert_array_equal(digit, np.where(probability >= 0.5, 7, 3))


# --- the three equalities, through onnxruntime -------------------------------------------


def test_votes_plus_bias_term_make_the_logit_and_sigmoid_makes_p7(explained):
    votes = explained["contributions"].astype(np.float64).sum(axis=(1, 2))
    total = votes + explained["bias_term"]
    assert relative_gap(total, explained["logit"]).max() <= ADDITIVITY_TOLERANCE
    sigmoid = 1 / (1 + np.exp(-explained["logit"].astype(np.float64)))
    assert relative_gap(sigmoid, explained["probability"]).max() <= SIGMOID_TOLERANCE
    assert np.abs(votes).max() > 1, "the votes should carry the decision, not the bias"


def test_logit_and_probability_are_the_models_and_the_serving_graphs(model, explained, test_digits):
    images, labels = test_digits
    with torch.no_grad():
        torch_logit = model(pixels_of(images)).numpy()
    assert relative_gap(explained["logit"], torch_logit).max() <= TORCH_TOLERANCE
    serving = onnxruntime.InferenceSession(
        export_onnx(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    probability, digit = serving.run(None, {"images": images})
    assert np.abs(explained["probability"] - probability).max() <= TORCH_TOLERANCE
    np.testing.assert_array_equal(explained["digit"], digit)
    assert (explained["digit"] == labels).mean() > 0.9, "a real, trained model"


def test_contributions_are_gradient_times_input(model, explained, test_digits):
    images, _ = test_digits
    pixels = pixels_of(images).requires_grad_()
    (gradient,) = torch.autograd.grad(model(pixels).sum(), pixels)
    expected = (gradient * pixels).detach().numpy().reshape(-1, 28, 28)
    assert np.abs(explained["contributions"] - expected).max() <= GRADIENT_TOLERANCE
    np.testing.assert_allclose(
        gradient_times_input(model, pixels).numpy().reshape(-1, 28, 28), expected, atol=1e-7
    )


def test_the_votes_are_the_formulas_of_the_issue(model, explained, test_digits):
    images, _ = test_digits
    x = images.reshape(len(images), -1).astype(np.float64) / 255
    params = {name: value.detach().double().numpy() for name, value in model.named_parameters()}
    if isinstance(model, Linear):
        votes, bias = x * params["weights"], np.full(len(x), params["bias"][0])
    else:
        active = (x @ params["w1"] + params["b1"] > 0).astype(np.float64)  # m_j = [h_j > 0]
        votes = x * ((active * params["w2"]) @ params["w1"].T)
        bias = (active * params["w2"]) @ params["b1"] + params["b2"][0]
    np.testing.assert_allclose(explained["contributions"].reshape(len(x), -1), votes, atol=1e-5)
    np.testing.assert_allclose(explained["bias_term"], bias, atol=1e-5)
    assert np.all(explained["contributions"][images == 0] == 0), "no ink, no vote"


def test_check_explanation_passes_on_the_test_set_and_random_batches(
    model, graph_bytes, test_digits
):
    images, _ = test_digits
    report = check_explanation(model, graph_bytes, images)
    assert report.passed
    assert [check.count for check in report.checks] == [len(images), *RANDOM_BATCH_SIZES]
    assert report.images_compared == len(images) + sum(RANDOM_BATCH_SIZES)
    limits = {
        "sum(contributions) + bias_term and logit": ADDITIVITY_TOLERANCE,
        "sigmoid(logit) and probability": SIGMOID_TOLERANCE,
        "logit and torch's logit": TORCH_TOLERANCE,
        "probability and torch's serving probability": TORCH_TOLERANCE,
        "contributions and autograd's gradient x input": GRADIENT_TOLERANCE,
    }
    largest = report.largest()
    assert largest.keys() == limits.keys()
    assert all(largest[what] <= limit for what, limit in limits.items()), largest
    assert report.as_dict()["digit_mismatches"] == 0
    assert report.as_dict()["checks"][0]["images"] == "test set"


# --- reproducible files ------------------------------------------------------------------


def test_same_model_same_bytes(models, graph_bytes, arch):
    assert export_explanation(models[arch]).SerializeToString(deterministic=True) == graph_bytes
    assert str(REPO_ROOT).encode() not in graph_bytes, "bytes must not depend on the install path"


def test_same_bytes_in_a_fresh_process(models, graphs, tmp_path):
    graph_bytes = graphs["mlp"].SerializeToString(deterministic=True)
    state = tmp_path / "state.pt"
    torch.save(models["mlp"].state_dict(), state)
    script = f"""
import hashlib, torch
from training.explain import export_explanation
from training.models import MLP
model = MLP(30)
model.load_state_dict(torch.load({str(state)!r}))
print(hashlib.sha256(export_explanation(model.eval()).SerializeToString(deterministic=True))
      .hexdigest())
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == hashlib.sha256(graph_bytes).hexdigest() + "\n"
    assert result.stderr == "", "the export should print nothing"


def test_finalize_stamps_the_serving_models_metadata(graphs, models, test_digits):
    explanation = finalize_explanation(graphs["mlp"], METADATA)
    assert read_metadata(explanation) == read_metadata(
        finalize(export_onnx(models["mlp"]), METADATA)
    )
    stamped = onnx.load_from_string(explanation)
    assert stamped.model_version == 3
    assert stamped.doc_string == EXPLANATION_DOC
    assert finalize_explanation(graphs["mlp"], METADATA) == explanation
    check_explanation(models["mlp"], explanation, test_digits[0][:100])


# --- failures are loud and clear ---------------------------------------------------------


def test_logits_are_compared_relative_to_the_size_of_their_votes(test_digits):
    """A linear model whose large votes cancel (mean-difference weights x 10, as
    tests/unit/test_export.py publishes; its parity check passes) rounds its logits in
    float32 by more than 1e-5 of |logit|, but not of the votes that add up to them."""
    assert relative_gap(np.array([0.5, 101.0]), np.array([0.0, 100.0])).tolist() == [0.5, 0.01]
    scaled = relative_gap(np.array([101.0]), np.array([100.0]), scale=np.array([400.0]))
    assert scaled.tolist() == [1 / 400]
    data = load_dataset()
    images, labels = data.train_images, data.train_labels
    pixels = images.reshape(len(images), -1).astype(np.float64) / 255
    mean_seven, mean_three = pixels[labels == 7].mean(axis=0), pixels[labels == 3].mean(axis=0)
    model = Linear()
    with torch.no_grad():
        model.weights.copy_(torch.from_numpy(10 * (mean_seven - mean_three)))
        model.bias.fill_(-float(10 * (mean_seven - mean_three) @ (mean_seven + mean_three) / 2))
    graph_bytes = export_explanation(model.eval()).SerializeToString()
    report = check_explanation(model, graph_bytes, test_digits[0])
    assert report.largest()["logit and torch's logit"] <= TORCH_TOLERANCE / 10
    session = onnxruntime.InferenceSession(graph_bytes, providers=["CPUExecutionProvider"])
    (logit,) = session.run(["logit"], {"images": test_digits[0]})
    with torch.no_grad():
        torch_logit = model(pixels_of(test_digits[0])).numpy()
    assert relative_gap(logit, torch_logit).max() > TORCH_TOLERANCE, "the case for the scale"


def test_a_graph_of_another_model_fails_naming_the_logit_difference(models, graphs, test_digits):
    different = Linear()
    different.load_state_dict(models["linear"].state_dict())
    with torch.no_grad():
        different.bias += 1e-3  # every logit moves by 1e-3, measured against its votes' size
    graph_bytes = graphs["linear"].SerializeToString()
    report = measure_explanation(different, graph_bytes, test_digits[0])
    assert not report.passed
    assert 10 * TORCH_TOLERANCE < report.largest()["logit and torch's logit"] <= 1.01e-3
    assert report.largest()["sum(contributions) + bias_term and logit"] <= ADDITIVITY_TOLERANCE
    with pytest.raises(
        ExplanationError,
        match=r"test set: logit and torch's logit differ by up to [\d.e-]+ \(limit 1e-05, image \d",
    ):
        check_explanation(different, graph_bytes, test_digits[0])


def test_votes_that_ignore_the_relus_fail_additivity_and_autograd(models, monkeypatch, test_digits):
    # A plausible bug: every hidden unit's path counted, active or not.
    monkeypatch.setattr(
        "training.explain.active_units", lambda mlp, pixels: torch.ones(len(pixels), mlp.hidden)
    )
    wrong = export_explanation(models["mlp"]).SerializeToString()
    monkeypatch.undo()
    with pytest.raises(ExplanationError) as raised:
        check_explanation(models["mlp"], wrong, test_digits[0])
    message = str(raised.value)
    assert message.startswith("the explanation graph does not explain the model: test set: ")
    assert "sum(contributions) + bias_term and logit differ by up to" in message
    assert "contributions and autograd's gradient x input differ by up to" in message
    assert "logit and torch's logit" not in message, "the logit itself is still right"
    assert isinstance(raised.value, ExportError), "publishing catches it with export errors"


def test_a_graph_without_the_explanation_outputs_is_refused(models, test_digits):
    serving_graph = export_onnx(models["linear"]).SerializeToString()
    with pytest.raises(ExplanationError, match=r"outputs \['probability', 'digit'\]; expected"):
        check_explanation(models["linear"], serving_graph, test_digits[0])
    with pytest.raises(ExplanationError, match=r"onnxruntime cannot load"):
        check_explanation(models["linear"], b"not an onnx model", test_digits[0])


def test_outputs_of_the_wrong_shape_are_refused(graphs, models, test_digits):
    flat = onnx.ModelProto()
    flat.CopyFrom(graphs["linear"])
    (reshape,) = [node for node in flat.graph.node if "contributions" in node.output]
    reshape.output[0] = "contributions_grid"  # leave the votes flat, [N, 784]
    (product,) = [node for node in flat.graph.node if reshape.input[0] in node.output]
    product.output[0] = "contributions"
    del flat.graph.output[0].type.tensor_type.shape.dim[1:]
    flat.graph.output[0].type.tensor_type.shape.dim.add().dim_value = 784
    flat.graph.node.remove(reshape)
    with pytest.raises(
        ExplanationError, match=r"contributions for \d+ images is float32 \[\d+, 784\]"
    ):
        check_explanation(models["linear"], flat.SerializeToString(), test_digits[0])


def test_only_piecewise_linear_models_have_pixel_votes():
    with pytest.raises(ExplanationError, match=r"no pixel-vote explanation for Sequential"):
        export_explanation(torch.nn.Sequential(torch.nn.Linear(784, 1), torch.nn.Flatten(0)))


def test_an_mlp_explanation_model_sees_which_units_are_active():
    mlp = MLP(hidden=2)
    with torch.no_grad():
        mlp.w1.zero_()
        mlp.w1[0] = torch.tensor([1.0, -1.0])  # pixel 0 switches unit 0 on and unit 1 off
        mlp.b1.copy_(torch.tensor([0.0, 0.5]))
        mlp.w2.copy_(torch.tensor([2.0, 3.0]))
        mlp.b2.fill_(-1.0)
    images = torch.zeros(2, 28, 28, dtype=torch.uint8)
    images[1, 0, 0] = 255  # image 1: pixel 0 full on
    explanation = ExplanationModel(mlp)(images)
    # image 0: unit 1 alone is on (h = 0.5), so bias = 3 * 0.5 - 1 and nobody votes.
    assert explanation.contributions[0].abs().sum().item() == 0
    assert explanation.bias_term[0].item() == pytest.approx(0.5)
    # image 1: unit 0 alone is on (h = 1, -0.5), so pixel 0 votes 2 * 1 and bias = -1.
    assert explanation.contributions[1, 0, 0].item() == pytest.approx(2.0)
    assert explanation.bias_term[1].item() == pytest.approx(-1.0)
    assert explanation.logit.tolist() == pytest.approx([0.5, 1.0])


# --- from the graph to a picture ---------------------------------------------------------


def test_an_explained_digit_renders_red_where_it_votes_7(explained, test_digits, tmp_path):
    images, _ = test_digits
    index = int(np.argmax(explained["probability"]))  # the surest 7
    votes = explained["contributions"][index]
    path = render_explanation(
        images[index],
        votes,
        float(explained["logit"][index]),
        float(explained["probability"][index]),
        int(explained["digit"][index]),
        tmp_path / "explanation.png",
    )
    left, top, _, _ = VOTE_PANEL_BOX
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    for row, column in zip(*np.nonzero(np.abs(votes) > 0.5 * np.abs(votes).max()), strict=True):
        red, _, blue = picture[top + 10 * row + 5, left + 10 * column + 5]
        assert (red > blue) == (votes[row, column] > 0), (row, column)

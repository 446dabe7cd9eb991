"""The ONNX serving graph: contract, dynamic batch, parity, metadata, checks, publishing
(with the explanation graph)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from helpers import REPO_ROOT

from serving.contract import BATCH_DIMENSION
from serving.repository import (
    CARD_FILE,
    EXPLANATION_FILE,
    MODEL_FILE,
    Architecture,
    ExplanationFileRecord,
    ModelFileRecord,
    list_versions,
)
from serving.runtime import ExplanationRuntime
from training.data import load_dataset
from training.explain import ExplanationError
from training.export import (
    OPSET_VERSION,
    ExportError,
    ModelMetadata,
    ServingModel,
    check_model,
    export_onnx,
    exporting_versions,
    finalize,
    read_metadata,
)
from training.models import build_model
from training.parity import (
    RANDOM_BATCH_SIZES,
    TOLERANCE,
    ParityError,
    check_parity,
    measure_parity,
)
from training.publish import PublishError, TrainingRecord, publish_model, publish_run
from training.train import save_checkpoint

CREATED_AT = "2025-01-02T03:04:05+00:00"


@pytest.fixture(scope="session")
def data():
    return load_dataset()


@pytest.fixture(scope="session")
def linear_model(data) -> torch.nn.Module:
    """A linear model that really separates 3s from 7s, without training: each pixel weighs
    how much more ink the average 7 has there than the average 3."""
    pixels = data.train_images.reshape(len(data.train_images), -1).astype(np.float64) / 255
    mean_seven = pixels[data.train_labels == 7].mean(axis=0)
    mean_three = pixels[data.train_labels == 3].mean(axis=0)
    weights = 10 * (mean_seven - mean_three)
    model = build_model("linear")
    with torch.no_grad():
        model.weights.copy_(torch.from_numpy(weights))
        model.bias.fill_(-float(weights @ (mean_seven + mean_three) / 2))
    return model.eval()


@pytest.fixture(scope="session")
def exported(linear_model) -> onnx.ModelProto:
    return export_onnx(linear_model)


METADATA_FIELDS = {
    "model_name": "mnist37",
    "model_version": 1,
    "architecture": "linear",
    "hidden_units": None,
    "training_seed": 37,
    "training_data_checksums": {"t10k-images-idx3-ubyte": "ab" * 32},
    "test_accuracy": 0.9563297350343474,
    "created_at": CREATED_AT,
}


def metadata_for(**changes) -> ModelMetadata:
    return ModelMetadata(**{**METADATA_FIELDS, **changes})


@pytest.fixture(scope="session")
def onnx_bytes(exported) -> bytes:
    return finalize(exported, metadata_for())


@pytest.fixture(scope="session")
def session(onnx_bytes) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])


def dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_graph_has_the_contract_names_dtypes_and_shapes(exported):
    (images,) = exported.graph.input
    probability, digit = exported.graph.output
    assert images.name == "images"
    assert images.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims(images) == [BATCH_DIMENSION, 28, 28]
    assert probability.name == "probability"
    assert probability.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(probability) == [BATCH_DIMENSION]
    assert digit.name == "digit"
    assert digit.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert dims(digit) == [BATCH_DIMENSION]


def test_export_uses_the_documented_opset_and_holds_its_weights(exported):
    opsets = {opset.domain: opset.version for opset in exported.opset_import}
    assert opsets[""] == OPSET_VERSION
    assert f"opset {OPSET_VERSION}" in (REPO_ROOT / "docs" / "training.md").read_text()
    assert exported.graph.initializer, "the weights should be initializers"
    assert not any(
        onnx.external_data_helper.uses_external_data(tensor)
        for tensor in exported.graph.initializer
    )


@pytest.mark.parametrize("batch_size", [1, 4096])
def test_dynamic_batch(session, linear_model, batch_size):
    images = np.random.default_rng(batch_size).integers(0, 256, (batch_size, 28, 28), np.uint8)
    probability, digit = session.run(None, {"images": images})
    assert probability.shape == digit.shape == (batch_size,)
    assert probability.dtype == np.float32 and digit.dtype == np.int64
    np.testing.assert_array_equal(digit, np.where(probability >= 0.5, 7, 3))
    with torch.no_grad():
        expected = torch.sigmoid(linear_model(torch.from_numpy(images).reshape(-1, 784) / 255))
    np.testing.assert_allclose(probability, expected.numpy(), atol=TOLERANCE, rtol=0)


def test_graph_scales_raw_pixels_itself(session, linear_model, data):
    blank = np.zeros((1, 28, 28), np.uint8)
    probability, _ = session.run(None, {"images": blank})
    assert probability[0] == pytest.approx(torch.sigmoid(linear_model.bias).item(), abs=1e-6)
    _, digit = session.run(None, {"images": data.test_images})
    assert (digit == data.test_labels).mean() > 0.9


def test_parity_figures_cover_the_test_set_and_random_batches(linear_model, onnx_bytes, data):
    report = check_parity(ServingModel(linear_model).eval(), onnx_bytes, data.test_images)
    counts = [check.count for check in report.checks]
    assert counts == [len(data.test_images), *RANDOM_BATCH_SIZES]
    assert report.images_compared == len(data.test_images) + sum(RANDOM_BATCH_SIZES)
    assert report.max_abs_probability_diff <= TOLERANCE
    assert report.digit_mismatches == 0
    assert report.as_dict()["checks"][0]["images"] == "test set"


def test_parity_fails_loudly_when_the_models_differ(linear_model, onnx_bytes, data):
    different = build_model("linear")
    different.load_state_dict(linear_model.state_dict())
    with torch.no_grad():
        different.bias += 1e-3  # shifts probabilities by up to 2.5e-4: far above tolerance
    report = measure_parity(ServingModel(different).eval(), onnx_bytes, data.test_images)
    assert not report.passed
    assert report.max_abs_probability_diff > TOLERANCE
    with pytest.raises(ParityError, match=r"test set: max \|probability difference\|"):
        check_parity(ServingModel(different).eval(), onnx_bytes, data.test_images)


def test_metadata_is_stamped_into_the_file(onnx_bytes):
    metadata = read_metadata(onnx_bytes)
    assert metadata["model_name"] == "mnist37"
    assert metadata["model_version"] == "1"
    assert metadata["architecture"] == "linear"
    assert "hidden_units" not in metadata
    assert metadata["training_seed"] == "37"
    assert json.loads(metadata["training_data_checksums"]) == {"t10k-images-idx3-ubyte": "ab" * 32}
    assert float(metadata["test_accuracy"]) == 0.9563297350343474
    assert metadata["created_at"] == CREATED_AT
    assert metadata["opset"] == str(OPSET_VERSION)
    for library, version in exporting_versions().items():
        assert metadata[f"{library}_version"] == version
    assert metadata["torch_version"] == torch.__version__
    assert onnx.load_from_string(onnx_bytes).model_version == 1


def test_same_model_same_bytes_even_in_a_fresh_process(linear_model, onnx_bytes, tmp_path):
    assert finalize(export_onnx(linear_model), metadata_for()) == onnx_bytes
    assert str(REPO_ROOT).encode() not in onnx_bytes, "bytes must not depend on the install path"
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(
        checkpoint, {"arch": "linear", "hidden": 30, "state_dict": linear_model.state_dict()}
    )
    script = f"""
import hashlib
from training.export import ModelMetadata, export_onnx, finalize
from training.train import load_checkpoint
model, _ = load_checkpoint({str(checkpoint)!r})
metadata = ModelMetadata(**{METADATA_FIELDS!r})
print(hashlib.sha256(finalize(export_onnx(model), metadata)).hexdigest())
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == hashlib.sha256(onnx_bytes).hexdigest() + "\n"
    assert result.stderr == "", "the export should print nothing"


def broken(model: onnx.ModelProto) -> onnx.ModelProto:
    damaged = onnx.ModelProto()
    damaged.CopyFrom(model)
    damaged.graph.node[0].op_type = "NoSuchOperator"
    return damaged


def test_checker_failure_is_a_clear_export_error(exported):
    with pytest.raises(ExportError, match=r"failed onnx.checker \(full check\).*NoSuchOperator"):
        check_model(broken(exported))
    with pytest.raises(ExportError, match=r"onnx\.checker"):
        finalize(broken(exported), metadata_for())


def test_an_export_that_fails_the_checker_publishes_nothing(
    linear_model, exported, data, tmp_path, monkeypatch
):
    monkeypatch.setattr("training.publish.export_onnx", lambda model: broken(exported))
    record = TrainingRecord("linear", None, 37, CREATED_AT, {}, {"accuracy": 0.9})
    with pytest.raises(ExportError, match=r"onnx\.checker"):
        publish_model(linear_model, record, data.test_images, tmp_path)
    assert list_versions(tmp_path, "mnist37") == []
    assert [p.name for p in (tmp_path / "mnist37").iterdir() if not p.name.startswith(".")] == []


def test_an_explanation_that_fails_its_check_publishes_nothing(
    linear_model, data, tmp_path, monkeypatch
):
    def failing(model, graph_bytes, images):
        raise ExplanationError("the explanation graph does not explain the model: test set")

    monkeypatch.setattr("training.publish.check_explanation", failing)
    record = TrainingRecord("linear", None, 37, CREATED_AT, {}, {"accuracy": 0.9})
    with pytest.raises(ExplanationError, match="does not explain the model"):
        publish_model(linear_model, record, data.test_images, tmp_path)
    assert list_versions(tmp_path, "mnist37") == []
    assert [p.name for p in (tmp_path / "mnist37").iterdir() if not p.name.startswith(".")] == []
    assert not list((tmp_path / "mnist37").glob(".staging-*"))


@pytest.fixture
def run_dir(tmp_path, linear_model, data) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    checkpoint = {
        "arch": "linear",
        "hidden": 30,
        "state_dict": linear_model.state_dict(),
        "seed": 37,
        "created_at": CREATED_AT,
        "data_checksums": data.checksums,
    }
    save_checkpoint(run / "checkpoint.pt", checkpoint)
    metrics = {"test": {"accuracy": 0.95, "loss": 0.2, "confusion_matrix": [[1, 0], [0, 1]]}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_publish_run_publishes_a_complete_self_describing_version(run_dir, tmp_path, data):
    repository = tmp_path / "repository"
    first = publish_run(run_dir, repository, "mnist37")
    second = publish_run(run_dir, repository, "mnist37")
    other = publish_run(run_dir, repository, "candidate")
    assert (first.version, second.version, other.version) == (1, 2, 1)
    assert sorted(p.name for p in first.path.iterdir()) == [EXPLANATION_FILE, CARD_FILE, MODEL_FILE]

    onnx_bytes = first.model_path.read_bytes()
    card = first.read_card()
    assert card.name == "mnist37" and card.version == 1 and card.schema_version == 1
    assert card.architecture == Architecture("linear", hidden_units=None, parameters=785)
    assert card.created_at == CREATED_AT
    assert card.test_accuracy == 0.95
    assert card.training["data_checksums"] == data.checksums
    assert card.model_file == ModelFileRecord(
        sha256=hashlib.sha256(onnx_bytes).hexdigest(), bytes=len(onnx_bytes), name=MODEL_FILE
    )
    assert card.parity["max_abs_probability_diff"] <= TOLERANCE
    assert card.parity["digit_mismatches"] == 0
    assert card.parity["images_compared"] == len(data.test_images) + 1008
    assert card.onnx["metadata"] == read_metadata(onnx_bytes)
    # The explanation graph, stamped like the model and checked on the same test images.
    explanation_bytes = first.explanation_path.read_bytes()
    assert card.explanation_file == ExplanationFileRecord.of(
        explanation_bytes, card.explanation_file.check
    )
    check = card.explanation_file.check
    assert check["images_compared"] == len(data.test_images) + 1008
    assert check["digit_mismatches"] == 0 and check["checks"][0]["images"] == "test set"
    assert check["largest_differences"]["sum(contributions) + bias_term and logit"] <= 1e-4
    assert read_metadata(explanation_bytes) == read_metadata(onnx_bytes)
    ExplanationRuntime(first.explanation_path)  # the server's contract check takes it
    # The file keeps the schema it has always had: every key, only explanation_file added.
    assert sorted(json.loads(first.card_path.read_text())) == [
        "architecture", "created_at", "explanation_file", "libraries", "metrics", "model_file",
        "name", "onnx", "parity", "published_at", "schema_version", "training", "version",
    ]  # fmt: skip
    assert json.loads(first.card_path.read_text())["onnx"]["inputs"] == [
        {"name": "images", "datatype": "UINT8", "shape": [-1, 28, 28]}
    ]
    assert read_metadata(onnx_bytes)["model_version"] == "1"
    assert read_metadata(other.model_path.read_bytes())["model_name"] == "candidate"
    assert read_metadata(other.model_path) == read_metadata(str(other.model_path))
    assert read_metadata(other.model_path) == read_metadata(other.model_path.read_bytes())

    # Same checkpoint, same bytes: the versions differ only in their version stamp.
    def without_version(path: Path) -> bytes:
        model = onnx.load(path)
        model.model_version = 0
        model.doc_string = ""
        for prop in model.metadata_props:
            if prop.key == "model_version":
                prop.value = ""
        return model.SerializeToString(deterministic=True)

    assert without_version(first.model_path) == without_version(second.model_path)
    assert first.model_path.read_bytes() != second.model_path.read_bytes()


def test_publish_run_names_what_is_missing(run_dir, tmp_path):
    with pytest.raises(PublishError, match=r"has no checkpoint\.pt"):
        publish_run(tmp_path / "nowhere", tmp_path / "repository", "mnist37")
    (run_dir / "metrics.json").write_text(json.dumps({"validation": {}}))
    with pytest.raises(PublishError, match=r"metrics.json with test.accuracy.*KeyError"):
        publish_run(run_dir, tmp_path / "repository", "mnist37")
    assert not (tmp_path / "repository").exists()


def test_an_mlp_exports_with_parity(data):
    torch.manual_seed(3)
    mlp = build_model("mlp", hidden=16).eval()
    onnx_bytes = finalize(export_onnx(mlp), metadata_for(architecture="mlp", hidden_units=16))
    assert read_metadata(onnx_bytes)["hidden_units"] == "16"
    report = check_parity(ServingModel(mlp).eval(), onnx_bytes, data.test_images[:500])
    assert report.max_abs_probability_diff <= TOLERANCE

"""Publish a training run into the model repository as its next version.

A version is `model.onnx` (the serving graph, stamped with its metadata), `explanation.onnx`
(the explanation graph, training/explain.py, stamped alike) and `model.json` (the model
card). Every publish exports both, runs onnx.checker's full check, the parity check and
the explanation check on the exact bytes it ships; any failure leaves the repository
untouched.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from torch import nn

from serving.contract import BATCH_DIMENSION, IMAGES, OUTPUTS
from serving.repository import (
    CARD_FILE,
    DEFAULT_MODEL_NAME,
    EXPLANATION_FILE,
    MODEL_FILE,
    Architecture,
    ExplanationFileRecord,
    ModelCard,
    ModelFileRecord,
    ModelVersion,
    publish,
)
from training.explain import check_explanation, export_explanation, finalize_explanation
from training.export import (
    OPSET_VERSION,
    ModelMetadata,
    ServingModel,
    export_onnx,
    exporting_versions,
    finalize,
)
from training.parity import check_parity

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"


class PublishError(ValueError):
    """A training run cannot be published: its files are missing or malformed."""


@dataclass(frozen=True)
class TrainingRecord:
    """What a training run says about the model it produced."""

    architecture: str
    hidden_units: int | None
    seed: int | None
    created_at: str
    data_checksums: Mapping[str, str]
    test_metrics: Mapping[str, object]
    run_dir: Path | None = None

    @property
    def test_accuracy(self) -> float:
        return float(self.test_metrics["accuracy"])

    def metadata(self, model_name: str, version: int) -> ModelMetadata:
        """The ONNX metadata of this run published as `model_name` at `version`."""
        return ModelMetadata(
            model_name=model_name,
            model_version=version,
            architecture=self.architecture,
            hidden_units=self.hidden_units,
            training_seed=self.seed,
            training_data_checksums=self.data_checksums,
            test_accuracy=self.test_accuracy,
            created_at=self.created_at,
        )


def publish_run(
    run_dir: Path, repository: Path, model_name: str = DEFAULT_MODEL_NAME
) -> ModelVersion:
    """Export a run's checkpoint, prove it, and publish it as the next version."""
    from training.data import load_dataset
    from training.train import load_checkpoint

    run_dir = Path(run_dir)
    checkpoint_path = run_dir / CHECKPOINT_FILE
    if not checkpoint_path.is_file():
        raise PublishError(f"{run_dir} is not a training run: it has no {CHECKPOINT_FILE}")
    try:
        model, checkpoint = load_checkpoint(checkpoint_path)
    except Exception as error:
        raise PublishError(f"cannot load {checkpoint_path}: {error}") from error
    record = read_training_record(run_dir, checkpoint)
    test_images = load_dataset().test_images
    return publish_model(model, record, test_images, Path(repository), model_name)


def read_training_record(run_dir: Path, checkpoint: Mapping[str, object]) -> TrainingRecord:
    """A run's provenance and test metrics, from its checkpoint and `metrics.json`."""
    metrics_path = run_dir / METRICS_FILE
    try:
        test_metrics = json.loads(metrics_path.read_text())["test"]
        float(test_metrics["accuracy"])
        architecture = str(checkpoint["arch"])
        record = TrainingRecord(
            architecture=architecture,
            hidden_units=int(checkpoint["hidden"]) if architecture == "mlp" else None,
            seed=int(checkpoint["seed"]) if checkpoint.get("seed") is not None else None,
            created_at=str(checkpoint["created_at"]),
            data_checksums=dict(checkpoint["data_checksums"]),
            test_metrics=test_metrics,
            run_dir=run_dir.resolve(),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PublishError(
            f"{run_dir}: cannot read the run's record ({METRICS_FILE} with test.accuracy; "
            f"checkpoint with arch, hidden, seed, created_at, data_checksums): "
            f"{type(error).__name__}: {error}"
        ) from error
    return record


def publish_model(
    model: nn.Module,
    record: TrainingRecord,
    test_images: np.ndarray,
    repository: Path,
    model_name: str = DEFAULT_MODEL_NAME,
    *,
    exported: onnx.ModelProto | None = None,
    before_write: Callable[[int], None] | None = None,
) -> ModelVersion:
    """Export `model` and its explanation once, then stamp, check, prove and write both as
    the next version.

    `exported`: `export_onnx(model)` if the caller already has it. `before_write(version)`
    runs under the repository's publish lock before anything is written; if it raises,
    nothing is published.
    """
    exported = exported if exported is not None else export_onnx(model)
    explanation = export_explanation(model)
    serving_model = ServingModel(model).eval()

    def write_version(staging: Path, version: int) -> None:
        if before_write is not None:
            before_write(version)
        metadata = record.metadata(model_name, version)
        onnx_bytes = finalize(exported, metadata)
        parity = check_parity(serving_model, onnx_bytes, test_images)
        explanation_bytes = finalize_explanation(explanation, metadata)
        explained = check_explanation(model, explanation_bytes, test_images)
        # Into the same staging directory: the explanation appears with its version or not
        # at all, so a server never loads a version half explainable.
        (staging / MODEL_FILE).write_bytes(onnx_bytes)
        (staging / EXPLANATION_FILE).write_bytes(explanation_bytes)
        explanation_file = ExplanationFileRecord.of(explanation_bytes, explained.as_dict())
        card = model_card(metadata, record, model, onnx_bytes, parity.as_dict(), explanation_file)
        card.write(staging / CARD_FILE)

    return publish(repository, model_name, write_version)


def model_card(
    metadata: ModelMetadata,
    record: TrainingRecord,
    model: nn.Module,
    onnx_bytes: bytes,
    parity: Mapping[str, object],
    explanation_file: ExplanationFileRecord | None = None,
) -> ModelCard:
    """The model card of a version (schema in the README)."""
    return ModelCard(
        name=metadata.model_name,
        version=metadata.model_version,
        architecture=Architecture(
            name=record.architecture,
            hidden_units=record.hidden_units,
            parameters=sum(p.numel() for p in model.parameters()),
        ),
        created_at=record.created_at,
        published_at=datetime.now(UTC).isoformat(timespec="seconds"),
        training={
            "run_dir": str(record.run_dir) if record.run_dir else None,
            "seed": record.seed,
            "data_checksums": dict(record.data_checksums),
        },
        metrics={"test": dict(record.test_metrics)},
        model_file=ModelFileRecord.of(onnx_bytes),
        explanation_file=explanation_file,
        onnx={
            "opset": OPSET_VERSION,
            "inputs": [IMAGES.as_json()],
            "outputs": [output.as_json() for output in OUTPUTS],
            "batch_dimension": BATCH_DIMENSION,
            "metadata": metadata.as_properties(),
        },
        parity=dict(parity),
        libraries={**exporting_versions(), "onnxruntime": onnxruntime.__version__},
    )

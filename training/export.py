"""Export a trained 3-vs-7 classifier as the self-describing ONNX serving graph.

The graph takes raw pixels and does its own preprocessing, so clients send bytes: it has
the inputs and outputs of the model contract (`serving.contract`), with
probability = sigmoid(core(images / 255)).

Exports use torch's current exporter (`dynamo=True`) at `OPSET_VERSION`, hold their weights
inside the one `.onnx` file, and are reproducible: the same model and metadata give the same
bytes wherever the code is installed.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from serving.contract import (
    BATCH_DIMENSION,
    DECISION_THRESHOLD,
    DIGIT,
    IMAGE_SIDE,
    IMAGES,
    NEGATIVE_DIGIT,
    PIXELS,
    POSITIVE_DIGIT,
    PROBABILITY,
)

OPSET_VERSION = 20
"""ONNX opset of every export: torch 2.13's default, run by onnxruntime >= 1.17."""

EXPORTING_LIBRARIES = ("torch", "onnx", "onnxscript")

# Node metadata the exporter records that names source files: dropping it keeps the bytes
# independent of where the code is installed.
_LOCATION_DEPENDENT_NODE_METADATA = frozenset({"pkg.torch.onnx.stack_trace"})
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")

_log = logging.getLogger(__name__)


class ExportError(ValueError):
    """The model could not be exported, or the exported ONNX model is invalid."""


class ServingModel(nn.Module):
    """The graph that ships: uint8 images in, P(7) and the predicted digit out."""

    def __init__(self, core: nn.Module) -> None:
        super().__init__()
        self.core = core

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = images.flatten(1).to(torch.float32) / 255.0
        probability = torch.sigmoid(self.core(pixels))
        digit = torch.where(probability >= DECISION_THRESHOLD, POSITIVE_DIGIT, NEGATIVE_DIGIT)
        return probability, digit.to(torch.int64)


def exporting_versions() -> dict[str, str]:
    """Versions of the libraries that build the ONNX file."""
    return {library: importlib.metadata.version(library) for library in EXPORTING_LIBRARIES}


@dataclass(frozen=True)
class ModelMetadata:
    """What an exported model says about itself, stored as ONNX `metadata_props`."""

    model_name: str
    model_version: int
    architecture: str
    hidden_units: int | None
    training_seed: int | None
    training_data_checksums: Mapping[str, str]
    test_accuracy: float
    created_at: str
    exported_with: Mapping[str, str] = field(default_factory=exporting_versions)

    def as_properties(self) -> dict[str, str]:
        """The metadata as ONNX metadata properties: string keys to string values."""
        properties = {
            "model_name": self.model_name,
            "model_version": str(self.model_version),
            "architecture": self.architecture,
            "training_data_checksums": json.dumps(
                dict(self.training_data_checksums), sort_keys=True
            ),
            "test_accuracy": repr(float(self.test_accuracy)),
            "created_at": self.created_at,
            "opset": str(OPSET_VERSION),
        }
        if self.hidden_units is not None:
            properties["hidden_units"] = str(self.hidden_units)
        if self.training_seed is not None:
            properties["training_seed"] = str(self.training_seed)
        for library, version in self.exported_with.items():
            properties[f"{library}_version"] = version
        return properties


def export_onnx(core: nn.Module) -> onnx.ModelProto:
    """Export `core` (float [N, 784] in [0, 1] -> logit [N]) as the checked serving graph.

    The result carries no metadata yet: `finalize` stamps it (with the version, known only
    when publishing) and serializes it.
    """
    try:
        return export_graph(ServingModel(core), [PROBABILITY.name, DIGIT.name])
    except ExportError as error:
        raise ExportError(
            f"{error} ({type(core).__name__}: expects float [N, {PIXELS}] -> logit [N])"
        ) from error


def export_graph(module: nn.Module, output_names: list[str]) -> onnx.ModelProto:
    """`module` (uint8 `images` [N, 28, 28] -> `output_names`) as a checked ONNX graph: the
    dynamo exporter at OPSET_VERSION, dynamic N, weights inside the one file, no install
    paths in it, nothing printed. The serving and the explanation graph are both made so."""
    example = torch.zeros(2, IMAGE_SIDE, IMAGE_SIDE, dtype=torch.uint8)
    try:
        with quiet_exporter():
            program = torch.onnx.export(
                module.eval(),
                (example,),
                dynamo=True,
                external_data=False,
                verbose=False,
                opset_version=OPSET_VERSION,
                input_names=[IMAGES.name],
                output_names=output_names,
                dynamic_shapes=({0: BATCH_DIMENSION},),
            )
    except Exception as error:
        raise ExportError(f"torch.onnx.export failed: {error}") from error
    if program is None:
        raise ExportError("torch.onnx.export returned no ONNX program")
    model = program.model_proto
    drop_location_metadata(model)
    check_model(model)
    return model


def finalize(model: onnx.ModelProto, metadata: ModelMetadata) -> bytes:
    """The model's file contents: a copy stamped with `metadata`, fully checked."""
    stamped = onnx.ModelProto()
    stamped.CopyFrom(model)
    del stamped.metadata_props[:]
    for key, value in sorted(metadata.as_properties().items()):
        stamped.metadata_props.add(key=key, value=value)
    stamped.model_version = metadata.model_version
    stamped.doc_string = (
        f"mnist37 {metadata.model_name} v{metadata.model_version} ({metadata.architecture}): "
        f"{IMAGES.name} {IMAGES.datatype} [N,{IMAGE_SIDE},{IMAGE_SIDE}] raw pixels -> "
        f"{PROBABILITY.name} FLOAT [N] P({POSITIVE_DIGIT}), "
        f"{DIGIT.name} {DIGIT.datatype} [N] {NEGATIVE_DIGIT} or {POSITIVE_DIGIT}"
    )
    check_model(stamped)
    return stamped.SerializeToString(deterministic=True)


def check_model(model: onnx.ModelProto) -> None:
    """Run onnx.checker's full check (with shape inference); raise ExportError on failure."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(
            f"the exported ONNX model failed onnx.checker (full check): {error}"
        ) from error


def read_metadata(model: onnx.ModelProto | bytes | str | Path) -> dict[str, str]:
    """The metadata properties of an ONNX model: a ModelProto, a file's bytes or its path."""
    if isinstance(model, str | Path):
        model = onnx.load(model, load_external_data=False)
    elif isinstance(model, bytes):
        model = onnx.load_from_string(model)
    return {prop.key: prop.value for prop in model.metadata_props}


def drop_location_metadata(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key not in _LOCATION_DEPENDENT_NODE_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Keep the exporter's logs and warnings out of the user's terminal (debug log only)."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    for warning in caught:
        _log.debug("exporter warning: %s: %s", warning.category.__name__, warning.message)

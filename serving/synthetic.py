"""Contract-conforming ONNX models built without training, for tests and benchmarks.

The graph is the linear 3-vs-7 model: Cast -> Reshape [N, 784] -> Div 255 -> MatMul ->
Add -> Sigmoid, and `digit` = Where(probability >= 0.5, 7, 3). Its explanation graph
(`linear_explanation_bytes`: the outputs of training/explain.py's) is the same graph plus
each pixel's vote, pixels / 255 x weights, and the bias term. Needs the `onnx` package (in
the `train` and `dev` extras, not in `serve`).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from serving.contract import (
    BATCH_DIMENSION,
    BIAS_TERM,
    CONTRIBUTIONS,
    DECISION_THRESHOLD,
    DIGIT,
    EXPLANATION_OUTPUTS,
    IMAGE_SIDE,
    IMAGES,
    LOGIT,
    NEGATIVE_DIGIT,
    OUTPUTS,
    PIXELS,
    POSITIVE_DIGIT,
    PROBABILITY,
    TensorSpec,
)
from serving.repository import (
    CARD_FILE,
    EXPLANATION_FILE,
    MODEL_FILE,
    Architecture,
    ExplanationFileRecord,
    ModelCard,
    ModelFileRecord,
    ModelVersion,
    publish,
)


class LinearWeights(NamedTuple):
    """A linear model: logit = pixels / 255 @ weights + bias."""

    weights: np.ndarray  # [784]
    bias: float


def linear_model_bytes(weights: np.ndarray, bias: float) -> bytes:
    """A serialized ONNX model computing sigmoid(pixels / 255 @ weights + bias)."""
    nodes, initializers = _linear_nodes(weights, bias)
    return _serialized("mnist37_linear", nodes, initializers, OUTPUTS)


def linear_explanation_bytes(weights: np.ndarray, bias: float) -> bytes:
    """The explanation graph of `linear_model_bytes(weights, bias)`: the same nodes, so the
    same logit and P(7), plus contributions (pixels / 255 x weights, [N, 28, 28]) and the
    bias term (the bias, once per image)."""
    from onnx import helper, numpy_helper

    nodes, initializers = _linear_nodes(weights, bias)
    initializers += [
        numpy_helper.from_array(np.asarray(weights, np.float32).reshape(PIXELS), "weight_row"),
        numpy_helper.from_array(np.array([-1, IMAGE_SIDE, IMAGE_SIDE], np.int64), "image_shape"),
    ]
    nodes += [
        helper.make_node("Mul", ["pixels", "weight_row"], ["votes"]),
        helper.make_node("Reshape", ["votes", "image_shape"], [CONTRIBUTIONS.name]),
        helper.make_node("Shape", [LOGIT.name], ["batch"]),
        helper.make_node("Expand", ["bias", "batch"], [BIAS_TERM.name]),
    ]
    return _serialized("mnist37_linear_explanation", nodes, initializers, EXPLANATION_OUTPUTS)


def _linear_nodes(weights: np.ndarray, bias: float) -> tuple[list, list]:
    """The serving graph's nodes and initializers (onnx protos), `logit` among the values."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = [
        numpy_helper.from_array(np.array([-1, PIXELS], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
        numpy_helper.from_array(weights.astype(np.float32).reshape(PIXELS, 1), "weights"),
        numpy_helper.from_array(np.array([bias], dtype=np.float32), "bias"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "vector_shape"),
        numpy_helper.from_array(np.array(DECISION_THRESHOLD, dtype=np.float32), "threshold"),
        numpy_helper.from_array(np.array(POSITIVE_DIGIT, dtype=np.int64), "seven"),
        numpy_helper.from_array(np.array(NEGATIVE_DIGIT, dtype=np.int64), "three"),
    ]
    nodes = [
        helper.make_node("Cast", [IMAGES.name], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["as_float", "flat_shape"], ["flat"]),
        helper.make_node("Div", ["flat", "scale"], ["pixels"]),
        helper.make_node("MatMul", ["pixels", "weights"], ["product"]),
        helper.make_node("Add", ["product", "bias"], ["logit_column"]),
        helper.make_node("Reshape", ["logit_column", "vector_shape"], [LOGIT.name]),
        helper.make_node("Sigmoid", [LOGIT.name], [PROBABILITY.name]),
        helper.make_node("GreaterOrEqual", [PROBABILITY.name, "threshold"], ["is_seven"]),
        helper.make_node("Where", ["is_seven", "seven", "three"], [DIGIT.name]),
    ]
    return nodes, initializers


# onnx.TensorProto's name for each contract datatype
_ONNX_TYPES = {"UINT8": "UINT8", "FP32": "FLOAT", "INT64": "INT64"}


def _serialized(
    name: str, nodes: list, initializers: list, outputs: tuple[TensorSpec, ...]
) -> bytes:
    """The checked, serialized model of `nodes` with `images` in and `outputs` out."""
    import onnx
    from onnx import TensorProto, helper

    def value_info(spec: TensorSpec) -> onnx.ValueInfoProto:
        element_type = getattr(TensorProto, _ONNX_TYPES[spec.datatype])
        shape = [BATCH_DIMENSION, *spec.shape[1:]]
        return helper.make_tensor_value_info(spec.name, element_type, shape)

    graph = helper.make_graph(
        nodes, name, [value_info(IMAGES)], [value_info(spec) for spec in outputs], initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def random_linear_weights(seed: int = 0) -> LinearWeights:
    generator = np.random.default_rng(seed)
    return LinearWeights(generator.normal(0.0, 0.05, PIXELS), float(generator.normal()))


def random_linear_model(seed: int = 0) -> bytes:
    return linear_model_bytes(*random_linear_weights(seed))


def mean_difference_weights(images: np.ndarray, labels: np.ndarray) -> LinearWeights:
    """A decent 3-vs-7 classifier without training: weights = mean(7s) - mean(3s), the bias
    puts the boundary halfway between the two class means."""
    pixels = images.reshape(len(images), PIXELS).astype(np.float64) / 255.0
    mean_three = pixels[labels == NEGATIVE_DIGIT].mean(axis=0)
    mean_seven = pixels[labels == POSITIVE_DIGIT].mean(axis=0)
    weights = (mean_seven - mean_three) * 10.0
    bias = -float(weights @ (mean_three + mean_seven) / 2.0)
    return LinearWeights(weights, bias)


def mean_difference_model(images: np.ndarray, labels: np.ndarray) -> bytes:
    return linear_model_bytes(*mean_difference_weights(images, labels))


LINEAR = Architecture("linear", parameters=PIXELS + 1)


def publish_model(
    repository: Path,
    name: str,
    model: bytes,
    explanation: bytes | None = None,
    architecture: Architecture = LINEAR,
) -> ModelVersion:
    """Publish `model` (a linear model from this module) as the next version of `name` in
    `repository`, with a card that says it is synthetic and names `architecture` (another
    one than linear lets tests stand in for what a card of that architecture says); with
    `explanation` (`linear_explanation_bytes` of the same weights) it can explain."""

    def write(directory: Path, version: int) -> None:
        (directory / MODEL_FILE).write_bytes(model)
        if explanation is not None:
            (directory / EXPLANATION_FILE).write_bytes(explanation)
        card = ModelCard(
            name=name,
            version=version,
            architecture=architecture,
            model_file=ModelFileRecord.of(model),
            # Unchecked: without torch there is nothing to check it against.
            explanation_file=ExplanationFileRecord.of(explanation) if explanation else None,
            synthetic=True,
        )
        card.write(directory / CARD_FILE)

    return publish(repository, name, write)

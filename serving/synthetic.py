"""Contract-conforming ONNX models built without training, for tests and benchmarks.

The graph is the linear 3-vs-7 model: Cast -> Reshape [N, 784] -> Div 255 -> MatMul ->
Add -> Sigmoid, and `digit` = Where(probability >= 0.5, 7, 3). Needs the `onnx` package
(in the `train` and `dev` extras, not in `serve`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
from serving.repository import (
    CARD_FILE,
    MODEL_FILE,
    Architecture,
    ModelCard,
    ModelFileRecord,
    ModelVersion,
    publish,
)


def linear_model_bytes(weights: np.ndarray, bias: float) -> bytes:
    """A serialized ONNX model computing sigmoid(pixels / 255 @ weights + bias)."""
    import onnx
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
        helper.make_node("Reshape", ["logit_column", "vector_shape"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], [PROBABILITY.name]),
        helper.make_node("GreaterOrEqual", [PROBABILITY.name, "threshold"], ["is_seven"]),
        helper.make_node("Where", ["is_seven", "seven", "three"], [DIGIT.name]),
    ]
    image_shape = [BATCH_DIMENSION, IMAGE_SIDE, IMAGE_SIDE]
    graph = helper.make_graph(
        nodes,
        "mnist37_linear",
        [helper.make_tensor_value_info(IMAGES.name, TensorProto.UINT8, image_shape)],
        [
            helper.make_tensor_value_info(PROBABILITY.name, TensorProto.FLOAT, [BATCH_DIMENSION]),
            helper.make_tensor_value_info(DIGIT.name, TensorProto.INT64, [BATCH_DIMENSION]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def random_linear_model(seed: int = 0) -> bytes:
    generator = np.random.default_rng(seed)
    return linear_model_bytes(generator.normal(0.0, 0.05, PIXELS), float(generator.normal()))


def mean_difference_model(images: np.ndarray, labels: np.ndarray) -> bytes:
    """A decent 3-vs-7 classifier without training: weights = mean(7s) - mean(3s), the bias
    puts the boundary halfway between the two class means."""
    pixels = images.reshape(len(images), PIXELS).astype(np.float64) / 255.0
    mean_three = pixels[labels == NEGATIVE_DIGIT].mean(axis=0)
    mean_seven = pixels[labels == POSITIVE_DIGIT].mean(axis=0)
    weights = (mean_seven - mean_three) * 10.0
    bias = -float(weights @ (mean_three + mean_seven) / 2.0)
    return linear_model_bytes(weights, bias)


LINEAR = Architecture("linear", parameters=PIXELS + 1)


def publish_model(
    repository: Path,
    name: str,
    model: bytes,
    architecture: Architecture = LINEAR,
) -> ModelVersion:
    """Publish `model` (a linear model from this module) as the next version of `name` in
    `repository`, with a card that says it is synthetic and names `architecture` (another
    one than linear lets tests stand in for what a card of that architecture says)."""

    def write(directory: Path, version: int) -> None:
        (directory / MODEL_FILE).write_bytes(model)
        card = ModelCard(
            name=name,
            version=version,
            architecture=architecture,
            model_file=ModelFileRecord.of(model),
            synthetic=True,
        )
        card.write(directory / CARD_FILE)

    return publish(repository, name, write)

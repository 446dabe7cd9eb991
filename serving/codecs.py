"""Open Inference Protocol tensors <-> numpy, with every check made before inference.

Requests carry the `images` tensor either typed (`inputs[0].contents.uint_contents`) or
raw (`raw_input_contents[0]`, never both). Responses are raw when the request was raw
(tritonclient decodes only raw outputs) and typed otherwise.

No tensor parameter is supported (Triton's `classification`, shared memory, ...): a request
with one is refused rather than answered as if it were absent. Request-level `parameters`
(`priority`, `timeout`, `sequence_id`, ...; tritonclient and perf_analyzer send none by
default) are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from serving.contract import IMAGE_SIDE, IMAGES, OUTPUT_DATATYPES, OUTPUT_NAMES, PIXELS, PROBABILITY
from serving.errors import InvalidInput, shown
from serving.generated.inference import grpc_service_pb2 as pb

_CONTENT_FIELDS = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
)


# How many of a client's names or dimensions a message lists.
MAX_NAMED = 5

# (image count, the field it came from): raises InvalidInput if the count is too large
ImageCountCheck = Callable[[int, str], None]


@dataclass(frozen=True, slots=True)
class DecodedRequest:
    images: np.ndarray
    raw: bool
    outputs: tuple[str, ...]


def decode_infer_request(
    request: pb.ModelInferRequest, check_image_count: ImageCountCheck
) -> DecodedRequest:
    """The request's images as uint8 [N, 28, 28], or InvalidInput naming the bad field.
    `check_image_count` runs once the shape is known, before any content is decoded."""
    inputs = request.inputs
    if len(inputs) != 1:
        raise InvalidInput(
            f"inputs: expected exactly one input tensor named {IMAGES.name!r}, got {len(inputs)}"
        )
    tensor = inputs[0]
    if tensor.name != IMAGES.name:
        raise InvalidInput(
            f"inputs[0].name: unknown input {shown(tensor.name)}, expected {IMAGES.name!r}"
        )
    if tensor.datatype != IMAGES.datatype:
        raise InvalidInput(
            f"inputs[0].datatype: {shown(tensor.datatype)} is not accepted, "
            f"expected {IMAGES.datatype!r}"
        )
    shape = list(tensor.shape)
    if len(shape) != 3 or shape[1:] != [IMAGE_SIDE, IMAGE_SIDE] or shape[0] < 0:
        raise InvalidInput(
            f"inputs[0].shape: {_shape_text(shape)} is not [N, {IMAGE_SIDE}, {IMAGE_SIDE}]"
        )
    if tensor.parameters:
        raise InvalidInput(f"inputs[0].parameters: {_names(tensor.parameters)} not supported")
    count = shape[0]
    check_image_count(count, "inputs[0].shape")
    has_contents = tensor.HasField("contents")
    raw_contents = request.raw_input_contents
    if raw_contents:
        if has_contents:
            raise InvalidInput(
                "inputs[0].contents: must be empty when raw_input_contents is used (not both)"
            )
        if len(raw_contents) != 1:
            raise InvalidInput(
                f"raw_input_contents: expected one entry per input (1), got {len(raw_contents)}"
            )
        data = raw_contents[0]
        expected = count * PIXELS
        if len(data) != expected:
            raise InvalidInput(
                f"raw_input_contents[0]: {len(data)} bytes, expected {expected} "
                f"for shape {shape} of {IMAGES.datatype}"
            )
        images = np.frombuffer(data, dtype=np.uint8).reshape(count, IMAGE_SIDE, IMAGE_SIDE)
        return DecodedRequest(images, True, _requested_outputs(request))
    images = _decode_typed(tensor, count, shape)
    return DecodedRequest(images, False, _requested_outputs(request))


def _decode_typed(
    tensor: pb.ModelInferRequest.InferInputTensor, count: int, shape: list[int]
) -> np.ndarray:
    contents = tensor.contents
    for field_name in _CONTENT_FIELDS:
        if field_name != "uint_contents" and len(getattr(contents, field_name)):
            raise InvalidInput(
                f"inputs[0].contents.{field_name}: {IMAGES.datatype} data goes in uint_contents"
            )
    values = contents.uint_contents
    expected = count * PIXELS
    if len(values) != expected:
        raise InvalidInput(
            f"inputs[0].contents.uint_contents: {len(values)} elements, expected {expected} "
            f"for shape {shape}"
        )
    wide = np.array(values, dtype=np.uint32)
    if expected and int(wide.max()) > 255:
        raise InvalidInput("inputs[0].contents.uint_contents: values above 255 do not fit UINT8")
    return wide.astype(np.uint8).reshape(count, IMAGE_SIDE, IMAGE_SIDE)


def _requested_outputs(request: pb.ModelInferRequest) -> tuple[str, ...]:
    if not request.outputs:
        return OUTPUT_NAMES
    names: list[str] = []
    for index, output in enumerate(request.outputs):
        if output.name not in OUTPUT_DATATYPES:
            raise InvalidInput(
                f"outputs[{index}].name: unknown output {shown(output.name)}, "
                f"expected one of {list(OUTPUT_NAMES)}"
            )
        if output.name in names:
            raise InvalidInput(f"outputs[{index}].name: {shown(output.name)} is requested twice")
        if output.parameters:
            raise InvalidInput(
                f"outputs[{index}].parameters: {_names(output.parameters)} not supported"
            )
        names.append(output.name)
    return tuple(names)


def _names(parameters: Mapping[str, pb.InferParameter]) -> str:
    """`'classification' is` or `'a', 'b' are`: the parameters an error message names (the
    first few, each cut short: a client's map can be large)."""
    keys = sorted(parameters)
    named = ", ".join(shown(key, 40) for key in keys[:MAX_NAMED])
    more = f" and {len(keys) - MAX_NAMED} more" if len(keys) > MAX_NAMED else ""
    return f"{named}{more} {'is' if len(keys) == 1 else 'are'}"


def _shape_text(shape: list[int]) -> str:
    """A client's shape for a message: its first dimensions, if it has many."""
    if len(shape) <= MAX_NAMED:
        return str(shape)
    return f"[{', '.join(map(str, shape[:MAX_NAMED]))}, ...] ({len(shape)} dimensions)"


def encode_infer_response(
    response: pb.ModelInferResponse,
    outputs: tuple[str, ...],
    probability: np.ndarray,
    digit: np.ndarray,
    raw: bool,
) -> pb.ModelInferResponse:
    """Fill `response.outputs` (and `raw_output_contents` when raw) with the requested outputs."""
    count = len(probability)
    for name in outputs:
        values = probability if name == PROBABILITY.name else digit
        tensor = response.outputs.add(name=name, datatype=OUTPUT_DATATYPES[name], shape=(count,))
        if raw:
            response.raw_output_contents.append(
                values.astype("<f4" if name == PROBABILITY.name else "<i8", copy=False).tobytes()
            )
        elif name == PROBABILITY.name:
            tensor.contents.fp32_contents.extend(values.tolist())
        else:
            tensor.contents.int64_contents.extend(values.tolist())
    return response


def decode_infer_response(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The response's outputs by name, raw or typed (used by our client and tests)."""
    decoded = {}
    for index, tensor in enumerate(response.outputs):
        dtype = np.float32 if tensor.datatype == PROBABILITY.datatype else np.int64
        if response.raw_output_contents:
            values = np.frombuffer(response.raw_output_contents[index], dtype=dtype)
        elif tensor.datatype == PROBABILITY.datatype:
            values = np.array(tensor.contents.fp32_contents, dtype=np.float32)
        else:
            values = np.array(tensor.contents.int64_contents, dtype=np.int64)
        decoded[tensor.name] = values.reshape(tuple(tensor.shape))
    return decoded

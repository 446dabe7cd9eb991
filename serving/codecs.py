"""Open Inference Protocol tensors <-> numpy, with every check made before inference.

The checks are protocol-neutral functions (`check_images_tensor`, `images_from_bytes`,
`images_from_integers`, `requested_outputs`) that the gRPC decoder here and the HTTP one
(`serving.rest.tensors`) both call, each naming the fields of its own protocol.

gRPC requests carry the `images` tensor either typed (`inputs[0].contents.uint_contents`)
or raw (`raw_input_contents[0]`, never both). Responses are raw when the request was raw
(tritonclient decodes only raw outputs) and typed otherwise.

Tensor parameters that real clients send and that mean nothing here are accepted:
`binary_data_size` on an input (the KServe SDK and tritonclient set it: HTTP's binary
extension says how many bytes follow; over gRPC the bytes are the raw contents) and
`binary_data` on an output (whether HTTP answers it in binary). Every other one (Triton's
`classification`, shared memory, ...) could change what the request means, so a request
with one is refused rather than answered as if it were absent. Request-level `parameters`
(`priority`, `timeout`, `sequence_id`, ...; tritonclient and perf_analyzer send none by
default) are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
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
IGNORED_INPUT_PARAMETERS = frozenset({"binary_data_size"})
IGNORED_OUTPUT_PARAMETERS = frozenset({"binary_data"})
# A message lists this many refused parameter names (or dimensions of a shape) at most.
MAX_LISTED = 8

# (image count, the field it came from): raises InvalidInput if the count is too large
ImageCountCheck = Callable[[int, str], None]


@dataclass(frozen=True, slots=True)
class DecodedRequest:
    images: np.ndarray
    raw: bool
    outputs: tuple[str, ...]


def check_images_tensor(
    name: str,
    datatype: str,
    shape: Sequence[int],
    parameters: Iterable[str],
    check_image_count: ImageCountCheck,
    field: str = "inputs[0]",
) -> int:
    """The image count of the `images` tensor described by `name`, `datatype`, `shape` and
    its parameters' names, or InvalidInput naming the bad part of `field`."""
    if name != IMAGES.name:
        raise InvalidInput(f"{field}.name: unknown input {shown(name)}, expected {IMAGES.name!r}")
    if datatype != IMAGES.datatype:
        raise InvalidInput(
            f"{field}.datatype: {shown(datatype)} is not accepted, expected {IMAGES.datatype!r}"
        )
    shape = list(shape)
    if len(shape) != 3 or shape[1:] != [IMAGE_SIDE, IMAGE_SIDE] or shape[0] < 0:
        raise InvalidInput(
            f"{field}.shape: {shape_text(shape)} is not [N, {IMAGE_SIDE}, {IMAGE_SIDE}]"
        )
    check_parameters(parameters, IGNORED_INPUT_PARAMETERS, f"{field}.parameters")
    count = shape[0]
    check_image_count(count, f"{field}.shape")
    return count


def check_parameters(names: Iterable[str], ignored: Collection[str], field: str) -> None:
    """Refuse the parameters in `names` that are not in `ignored` (see the module doc)."""
    refused = sorted(set(names) - set(ignored))
    if refused:
        raise InvalidInput(f"{field}: {_names(refused)} not supported")


def images_from_bytes(data: bytes, count: int, shape: Sequence[int], field: str) -> np.ndarray:
    """`count` images from raw UINT8 bytes, without a copy."""
    expected = count * PIXELS
    if len(data) != expected:
        raise InvalidInput(
            f"{field}: {len(data)} bytes, expected {expected} "
            f"for shape {shape_text(shape)} of {IMAGES.datatype}"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(count, IMAGE_SIDE, IMAGE_SIDE)


def images_from_integers(
    values: np.ndarray, count: int, shape: Sequence[int], field: str
) -> np.ndarray:
    """`count` images from a flat array of integers, each of which must fit UINT8."""
    expected = count * PIXELS
    if values.size != expected:
        raise InvalidInput(
            f"{field}: {values.size} elements, expected {expected} for shape {shape_text(shape)}"
        )
    if expected and int(values.max()) > 255:
        raise InvalidInput(f"{field}: values above 255 do not fit {IMAGES.datatype}")
    if expected and int(values.min()) < 0:
        raise InvalidInput(f"{field}: negative values do not fit {IMAGES.datatype}")
    return values.astype(np.uint8).reshape(count, IMAGE_SIDE, IMAGE_SIDE)


def requested_outputs(outputs: Sequence[tuple[str, Iterable[str]]]) -> tuple[str, ...]:
    """The names of the outputs asked for as (name, parameter names), all when none is."""
    if not outputs:
        return OUTPUT_NAMES
    names: list[str] = []
    for index, (name, parameters) in enumerate(outputs):
        if name not in OUTPUT_DATATYPES:
            raise InvalidInput(
                f"outputs[{index}].name: unknown output {shown(name)}, "
                f"expected one of {list(OUTPUT_NAMES)}"
            )
        if name in names:
            raise InvalidInput(f"outputs[{index}].name: {shown(name)} is requested twice")
        check_parameters(parameters, IGNORED_OUTPUT_PARAMETERS, f"outputs[{index}].parameters")
        names.append(name)
    return tuple(names)


def shape_text(shape: Sequence[int]) -> str:
    """`shape` for a message, its first dimensions only when it has many."""
    if len(shape) <= MAX_LISTED:
        return str(list(shape))
    return f"{str(list(shape[:MAX_LISTED]))[:-1]}, ... ({len(shape)} dimensions)]"


def _names(keys: Sequence[str]) -> str:
    """`'classification' is` or `'a', 'b' are`: the parameters an error message names (the
    first few, each cut short: a client's map can be large)."""
    listed = ", ".join(shown(key, 40) for key in keys[:MAX_LISTED])
    more = len(keys) - MAX_LISTED
    text = listed + (f" and {more} more" if more > 0 else "")
    return f"{text} {'is' if len(keys) == 1 else 'are'}"


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
    shape = list(tensor.shape)
    count = check_images_tensor(
        tensor.name, tensor.datatype, shape, tensor.parameters, check_image_count
    )
    outputs = requested_outputs([(output.name, output.parameters) for output in request.outputs])
    raw_contents = request.raw_input_contents
    if raw_contents:
        if tensor.HasField("contents"):
            raise InvalidInput(
                "inputs[0].contents: must be empty when raw_input_contents is used (not both)"
            )
        if len(raw_contents) != 1:
            raise InvalidInput(
                f"raw_input_contents: expected one entry per input (1), got {len(raw_contents)}"
            )
        images = images_from_bytes(raw_contents[0], count, shape, "raw_input_contents[0]")
        return DecodedRequest(images, True, outputs)
    return DecodedRequest(_decode_typed(tensor, count, shape), False, outputs)


def _decode_typed(
    tensor: pb.ModelInferRequest.InferInputTensor, count: int, shape: list[int]
) -> np.ndarray:
    contents = tensor.contents
    for field_name in _CONTENT_FIELDS:
        if field_name != "uint_contents" and len(getattr(contents, field_name)):
            raise InvalidInput(
                f"inputs[0].contents.{field_name}: {IMAGES.datatype} data goes in uint_contents"
            )
    wide = np.array(contents.uint_contents, dtype=np.uint32)
    return images_from_integers(wide, count, shape, "inputs[0].contents.uint_contents")


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
            response.raw_output_contents.append(raw_output(name, values))
        elif name == PROBABILITY.name:
            tensor.contents.fp32_contents.extend(values.tolist())
        else:
            tensor.contents.int64_contents.extend(values.tolist())
    return response


def raw_output(name: str, values: np.ndarray) -> bytes:
    """Output `name`'s values as the protocol's raw bytes (little-endian, both protocols)."""
    return values.astype("<f4" if name == PROBABILITY.name else "<i8", copy=False).tobytes()


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

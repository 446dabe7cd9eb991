"""The REST infer request and response: JSON tensors and Triton's binary tensor extension,
checked by the same protocol-neutral functions as gRPC's (`serving.codecs`).

JSON: `inputs[0].data` holds the `images` tensor's integers, flat (row-major) or nested as
its shape. Binary: the body is the JSON header (`Inference-Header-Content-Length` bytes),
then the raw bytes of the input whose `parameters.binary_data_size` says how many. Outputs
come back binary when their `parameters.binary_data` is true, or, for those without it,
when the request's `parameters.binary_data_output` is; the response then has the same
layout and header. Request-level parameters other than `binary_data_output` are ignored,
as over gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from serving.codecs import (
    ImageCountCheck,
    check_images_tensor,
    images_from_bytes,
    images_from_integers,
    raw_output,
    requested_outputs,
    shape_text,
)
from serving.contract import IMAGES, OUTPUT_DATATYPES, OUTPUT_NAMES, PROBABILITY
from serving.dataplane import InferenceResult
from serving.errors import InvalidInput, shown
from serving.rest.fields import (
    expect_object,
    integers,
    is_integer,
    json_type,
    member,
    parse_json,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
_BINARY_SIZE = "binary_data_size"


@dataclass(frozen=True, slots=True)
class RestInferRequest:
    images: np.ndarray
    outputs: tuple[str, ...]
    binary_outputs: frozenset[str]
    id: str | None


@dataclass(frozen=True, slots=True)
class RestInferResponse:
    body: bytes
    header_length: int | None  # the JSON header's length when binary outputs follow it


def decode_infer_request(
    body: bytes | bytearray, header_length: str | None, check_image_count: ImageCountCheck
) -> RestInferRequest:
    """The request's images as uint8 [N, 28, 28] and what to answer, or InvalidInput
    naming the bad field. `header_length` is the Inference-Header-Content-Length header."""
    header, binary = _split(body, header_length)
    request = expect_object(parse_json(header), "the request body")
    inputs = member(request, "inputs", list, "inputs")
    if len(inputs) != 1:
        raise InvalidInput(
            f"inputs: expected exactly one input tensor named {IMAGES.name!r}, got {len(inputs)}"
        )
    tensor = expect_object(inputs[0], "inputs[0]")
    name = member(tensor, "name", str, "inputs[0].name")
    datatype = member(tensor, "datatype", str, "inputs[0].datatype")
    shape = integers(member(tensor, "shape", list, "inputs[0].shape"), "inputs[0].shape")
    parameters = member(tensor, "parameters", dict, "inputs[0].parameters", {})
    count = check_images_tensor(name, datatype, shape, parameters, check_image_count)
    outputs, binary_outputs = _outputs(request)
    if _BINARY_SIZE in parameters:
        data = _binary_input(tensor, parameters[_BINARY_SIZE], binary, header_length)
        images = images_from_bytes(data, count, shape, f"inputs[0].parameters.{_BINARY_SIZE}")
    else:
        if binary:
            raise InvalidInput(
                f"{HEADER_LENGTH}: {len(binary)} bytes follow the JSON header, but no input "
                f"has parameters.{_BINARY_SIZE}"
            )
        images = _json_images(member(tensor, "data", list, "inputs[0].data"), count, shape)
    request_id = member(request, "id", str, "id", None)
    return RestInferRequest(images, outputs, binary_outputs, request_id)


def _split(body: bytes | bytearray, header_length: str | None) -> tuple[memoryview, memoryview]:
    """The JSON header and the binary data after it (views of `body`, not copies)."""
    view = memoryview(body)
    if header_length is None:
        return view, view[:0]
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()):
        raise InvalidInput(f"{HEADER_LENGTH}: {shown(header_length)} is not a byte count")
    length = int(text)
    if length > len(body):
        raise InvalidInput(
            f"{HEADER_LENGTH}: a JSON header of {length} bytes, but the body has only {len(body)}"
        )
    return view[:length], view[length:]


def _binary_input(
    tensor: dict[str, Any], size: object, binary: memoryview, header_length: str | None
) -> memoryview:
    field = f"inputs[0].parameters.{_BINARY_SIZE}"
    if not is_integer(size) or size < 0:  # type: ignore[operator]
        raise InvalidInput(f"{field}: expected a byte count, got {json_type(size)}")
    if header_length is None:
        raise InvalidInput(f"{field}: binary data needs the {HEADER_LENGTH} header")
    if "data" in tensor:
        raise InvalidInput(f"inputs[0]: data and parameters.{_BINARY_SIZE} both given (not both)")
    if size != len(binary):
        raise InvalidInput(
            f"{field}: {size} bytes, but {len(binary)} bytes follow the JSON header "
            f"({HEADER_LENGTH})"
        )
    return binary


def _json_images(data: list[Any], count: int, shape: list[int]) -> np.ndarray:
    """The images from JSON integers, flat or nested as `shape`."""
    try:
        values = np.array(data)
    except (ValueError, TypeError):  # ragged nesting, too deep
        raise InvalidInput(
            f"inputs[0].data: not a flat array nor nested as the shape {shape_text(shape)}"
        ) from None
    if values.size and values.dtype.kind not in "iu":
        raise InvalidInput(
            f"inputs[0].data: expected integers for {IMAGES.datatype}, got {_kind(values)}"
        )
    if values.ndim != 1 and list(values.shape) != shape:
        raise InvalidInput(
            f"inputs[0].data: nested as {shape_text(values.shape)}, expected a flat array "
            f"or the shape {shape_text(shape)}"
        )
    return images_from_integers(values.reshape(-1), count, shape, "inputs[0].data")


def _kind(values: np.ndarray) -> str:
    kinds = {"b": "true or false", "f": "numbers with a fraction", "U": "strings"}
    return kinds.get(values.dtype.kind, "values of mixed or other types")


def _outputs(request: dict[str, Any]) -> tuple[tuple[str, ...], frozenset[str]]:
    """The outputs asked for, and those of them to answer in binary."""
    parameters = member(request, "parameters", dict, "parameters", {})
    default = _flag(parameters, "binary_data_output", False, "parameters.binary_data_output")
    entries, flags = [], []
    for index, entry in enumerate(member(request, "outputs", list, "outputs", [])):
        path = f"outputs[{index}]"
        output = expect_object(entry, path)
        output_parameters = member(output, "parameters", dict, f"{path}.parameters", {})
        entries.append((member(output, "name", str, f"{path}.name"), output_parameters))
        flags.append(
            _flag(output_parameters, "binary_data", default, f"{path}.parameters.binary_data")
        )
    names = requested_outputs(entries)
    if not entries:
        return names, frozenset(OUTPUT_NAMES if default else ())
    return names, frozenset(name for name, binary in zip(names, flags, strict=True) if binary)


def _flag(parameters: dict[str, Any], key: str, default: bool, path: str) -> bool:
    return member(parameters, key, bool, path, default)


def encode_infer_response(request: RestInferRequest, result: InferenceResult) -> RestInferResponse:
    """The response: JSON, or the JSON header then the binary outputs in their order."""
    header: dict[str, object] = {
        "model_name": result.model_name,
        "model_version": result.model_version,
    }
    if request.id is not None:
        header["id"] = request.id
    outputs, blobs = [], []
    for name in request.outputs:
        values = result.probability if name == PROBABILITY.name else result.digit
        tensor: dict[str, object] = {
            "name": name,
            "datatype": OUTPUT_DATATYPES[name],
            "shape": [len(values)],
        }
        if name in request.binary_outputs:
            blob = raw_output(name, values)
            tensor["parameters"] = {_BINARY_SIZE: len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = np.ascontiguousarray(values)  # orjson writes C-order arrays only
        outputs.append(tensor)
    header["outputs"] = outputs
    encoded = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return RestInferResponse(encoded, None)
    return RestInferResponse(b"".join((encoded, *blobs)), len(encoded))

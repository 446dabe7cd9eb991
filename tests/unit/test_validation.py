from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import infer_request

from serving.codecs import decode_infer_request, decode_infer_response, encode_infer_response
from serving.dataplane import DataPlane
from serving.errors import InvalidInput
from serving.generated.inference import grpc_service_pb2 as pb
from serving.registry import ModelRegistry

IMAGES = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
AT_MOST_10 = DataPlane(ModelRegistry(), max_request_images=10).check_image_count


def test_raw_request_decodes_without_copy_and_typed_request_decodes_equal():
    raw = decode_infer_request(infer_request(IMAGES), AT_MOST_10)
    typed = decode_infer_request(infer_request(IMAGES, raw=False), AT_MOST_10)
    assert raw.raw and not typed.raw
    np.testing.assert_array_equal(raw.images, IMAGES)
    np.testing.assert_array_equal(typed.images, IMAGES)
    assert raw.outputs == ("probability", "digit")
    assert not raw.images.flags.owndata


def _with(mutate):
    request = infer_request(IMAGES)
    mutate(request)
    return request


def _set_shape(request, shape):
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend(shape)


def _request_outputs(*names):
    def mutate(request):
        for name in names:
            request.outputs.add(name=name)

    return mutate


def _classification_of(name):
    """What tritonclient's `InferRequestedOutput(name, class_count=2)` sends."""

    def mutate(request):
        request.outputs.add(name=name).parameters["classification"].int64_param = 2

    return mutate


def _shared_memory_input(request):
    """What tritonclient's `InferInput.set_shared_memory` sends."""
    request.inputs[0].parameters["shared_memory_region"].string_param = "region"
    request.inputs[0].parameters["shared_memory_byte_size"].int64_param = IMAGES.size


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: setattr(r.inputs[0], "name", "pixels"), "inputs[0].name"),
        (lambda r: setattr(r.inputs[0], "datatype", "FP32"), "inputs[0].datatype"),
        (lambda r: _set_shape(r, [3, 784]), "inputs[0].shape"),
        (lambda r: _set_shape(r, [3, 28, 27]), "inputs[0].shape"),
        (lambda r: _set_shape(r, [11, 28, 28]), "--max-request-images"),
        (lambda r: _set_shape(r, [2, 28, 28]), "raw_input_contents[0]"),
        (lambda r: r.raw_input_contents.append(b"x"), "raw_input_contents"),
        (lambda r: r.inputs.add(name="images", datatype="UINT8"), "inputs"),
        (lambda r: r.inputs[0].contents.uint_contents.append(1), "not both"),
        (lambda r: r.outputs.add(name="logit"), "outputs[0].name"),
        (_request_outputs("digit", "digit"), "outputs[1].name: 'digit' is requested twice"),
        (
            _classification_of("probability"),
            "outputs[0].parameters: 'classification' is not supported",
        ),
        (
            _shared_memory_input,
            "inputs[0].parameters: 'shared_memory_byte_size', 'shared_memory_region' are not",
        ),
    ],
)
def test_each_malformed_field_is_named(mutate, field):
    with pytest.raises(InvalidInput, match=re.escape(field)):
        decode_infer_request(_with(mutate), AT_MOST_10)


def test_the_image_limit_is_checked_before_any_content_is_decoded():
    seen: list[tuple[int, str]] = []

    def check(count: int, field: str) -> None:
        seen.append((count, field))
        raise InvalidInput("too many")

    request = infer_request(IMAGES)
    request.raw_input_contents[0] = b"not 2352 bytes"
    with pytest.raises(InvalidInput, match="too many"):
        decode_infer_request(request, check)
    assert seen == [(3, "inputs[0].shape")]


def test_request_level_parameters_are_ignored():
    request = infer_request(IMAGES)
    request.parameters["priority"].uint64_param = 1
    request.parameters["timeout"].int64_param = 1000
    request.outputs.add(name="digit")
    decoded = decode_infer_request(request, AT_MOST_10)
    assert decoded.outputs == ("digit",)
    np.testing.assert_array_equal(decoded.images, IMAGES)


def test_typed_contents_errors():
    request = infer_request(IMAGES, raw=False)
    request.inputs[0].contents.uint_contents.append(7)
    with pytest.raises(InvalidInput, match="uint_contents: 2353 elements, expected 2352"):
        decode_infer_request(request, AT_MOST_10)
    request = infer_request(IMAGES, raw=False)
    request.inputs[0].contents.uint_contents[5] = 256
    with pytest.raises(InvalidInput, match="above 255"):
        decode_infer_request(request, AT_MOST_10)
    request = infer_request(IMAGES, raw=False)
    request.inputs[0].contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInput, match=r"contents\.fp32_contents"):
        decode_infer_request(request, AT_MOST_10)


def test_empty_batch_is_valid():
    decoded = decode_infer_request(infer_request(np.zeros((0, 28, 28), np.uint8)), AT_MOST_10)
    assert decoded.images.shape == (0, 28, 28)


@pytest.mark.parametrize("raw", [True, False])
def test_encoding_round_trips_and_honours_requested_outputs(raw):
    probability = np.array([0.25, 0.75], np.float32)
    digit = np.array([3, 7], np.int64)
    response = encode_infer_response(pb.ModelInferResponse(), ("digit",), probability, digit, raw)
    assert [output.name for output in response.outputs] == ["digit"]
    assert bool(response.raw_output_contents) == raw
    decoded = decode_infer_response(response)
    assert list(decoded) == ["digit"]
    np.testing.assert_array_equal(decoded["digit"], digit)
    both = encode_infer_response(
        pb.ModelInferResponse(), ("probability", "digit"), probability, digit, raw
    )
    np.testing.assert_array_equal(decode_infer_response(both)["probability"], probability)


def test_parameters_clients_send_that_change_nothing_are_accepted():
    """The KServe SDK and tritonclient set `binary_data_size` on an input and `binary_data`
    on an output; neither changes what a gRPC request means."""
    request = infer_request(IMAGES)
    request.inputs[0].parameters["binary_data_size"].int64_param = IMAGES.size
    request.outputs.add(name="digit").parameters["binary_data"].bool_param = True
    decoded = decode_infer_request(request, AT_MOST_10)
    assert decoded.outputs == ("digit",)
    np.testing.assert_array_equal(decoded.images, IMAGES)


def test_refused_parameters_are_named_within_a_bound():
    request = infer_request(IMAGES)
    request.inputs[0].parameters["binary_data_size"].int64_param = IMAGES.size
    for index in range(20):
        request.inputs[0].parameters[f"p{index:02d}"].bool_param = True
    request.inputs[0].parameters["x" * 5000].bool_param = True
    with pytest.raises(InvalidInput) as raised:
        decode_infer_request(request, AT_MOST_10)
    message = str(raised.value)
    assert message.startswith(
        "inputs[0].parameters: 'p00', 'p01', 'p02', 'p03', 'p04', 'p05', 'p06', 'p07' and"
    )
    assert message.endswith("13 more are not supported") and "binary_data_size" not in message
    assert len(message) < 200

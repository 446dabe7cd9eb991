from __future__ import annotations

import numpy as np
import pytest
from conftest import infer_request

from serving.codecs import decode_infer_request, decode_infer_response, encode_infer_response
from serving.errors import InvalidInput
from serving.generated.inference import grpc_service_pb2 as pb

IMAGES = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)


def test_raw_request_decodes_without_copy_and_typed_request_decodes_equal():
    raw = decode_infer_request(infer_request(IMAGES), max_images=10)
    typed = decode_infer_request(infer_request(IMAGES, raw=False), max_images=10)
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
    ],
)
def test_each_malformed_field_is_named(mutate, field):
    with pytest.raises(InvalidInput, match=field.replace("[", r"\[").replace("]", r"\]")):
        decode_infer_request(_with(mutate), max_images=10)


def test_typed_contents_errors():
    request = infer_request(IMAGES, raw=False)
    request.inputs[0].contents.uint_contents.append(7)
    with pytest.raises(InvalidInput, match="uint_contents: 2353 elements, expected 2352"):
        decode_infer_request(request, max_images=10)
    request = infer_request(IMAGES, raw=False)
    request.inputs[0].contents.uint_contents[5] = 256
    with pytest.raises(InvalidInput, match="above 255"):
        decode_infer_request(request, max_images=10)
    request = infer_request(IMAGES, raw=False)
    request.inputs[0].contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInput, match=r"contents\.fp32_contents"):
        decode_infer_request(request, max_images=10)


def test_empty_batch_is_valid():
    decoded = decode_infer_request(infer_request(np.zeros((0, 28, 28), np.uint8)), 10)
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

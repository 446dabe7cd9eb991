"""The REST edge's pure parts: OIP messages as JSON, and infer requests and responses in
JSON and binary."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import rest_infer_body, rest_infer_outputs

from serving.dataplane import DataPlane, InferenceResult
from serving.errors import InvalidInput
from serving.generated.inference import grpc_service_pb2 as pb
from serving.generated.inference import model_config_pb2 as config_pb
from serving.generated.mnist37.v1 import classifier_pb2
from serving.registry import ModelRegistry
from serving.rest.messages import message_json
from serving.rest.tensors import (
    HEADER_LENGTH,
    decode_infer_request,
    encode_infer_response,
)

IMAGES = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
AT_MOST_10 = DataPlane(ModelRegistry(), max_request_images=10).check_image_count


def test_message_json_writes_what_triton_writes():
    config = config_pb.ModelConfig(name="m", max_batch_size=4096)
    config.input.add(name="images", data_type=config_pb.TYPE_UINT8, dims=[28, 28])
    config.parameters["provider"].string_value = "CPU"
    written = message_json(config)
    assert written["max_batch_size"] == 4096 and written["input"][0]["dims"] == [28, 28]
    assert written["input"][0]["data_type"] == "TYPE_UINT8"  # enums by name
    assert written["parameters"] == {"provider": {"string_value": "CPU"}}
    assert written["platform"] == ""  # scalars with their default are written
    assert "dynamic_batching" not in written  # unset message fields (a oneof) are not
    statistics = pb.StatisticDuration(count=2**40, ns=3)
    assert message_json(statistics) == {"count": 2**40, "ns": 3}  # numbers, not strings
    prediction = classifier_pb2.Prediction(digit=7, probability_seven=0.9)
    assert message_json(prediction)["probability_seven"] == 0.9  # float32's shortest form
    assert json.loads(json.dumps(message_json(config))) == written


def _decode(body: bytes, headers: dict[str, str]):
    return decode_infer_request(body, headers.get(HEADER_LENGTH), AT_MOST_10)


@pytest.mark.parametrize(
    ("binary", "nested"), [(True, False), (False, False), (False, True)], ids=str
)
def test_binary_flat_and_nested_requests_decode_alike(binary, nested):
    decoded = _decode(*rest_infer_body(IMAGES, binary=binary, nested=nested))
    np.testing.assert_array_equal(decoded.images, IMAGES)
    assert decoded.outputs == ("probability", "digit")
    assert decoded.binary_outputs == (frozenset({"probability", "digit"}) if binary else set())


def test_outputs_chosen_and_answered_binary_or_json_each():
    outputs = [{"name": "digit", "parameters": {"binary_data": True}}, {"name": "probability"}]
    decoded = _decode(*rest_infer_body(IMAGES, binary=False, outputs=outputs, id="r1"))
    assert decoded.outputs == ("digit", "probability") and decoded.binary_outputs == {"digit"}
    result = InferenceResult(
        "mnist37", "2", np.array([0.25, 0.5, 0.9], np.float32), np.array([3, 7, 7], np.int64)
    )
    encoded = encode_infer_response(decoded, result)
    header, values = rest_infer_outputs(
        encoded.body, {HEADER_LENGTH.lower(): encoded.header_length}
    )
    assert (header["id"], header["model_name"], header["model_version"]) == ("r1", "mnist37", "2")
    assert [tensor["name"] for tensor in header["outputs"]] == ["digit", "probability"]
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 24}
    np.testing.assert_array_equal(values["digit"], [3, 7, 7])
    np.testing.assert_array_equal(values["probability"], result.probability)


def test_a_json_only_response_has_no_header_length():
    decoded = _decode(*rest_infer_body(IMAGES, binary=False))
    result = InferenceResult("m", "1", np.zeros(3, np.float32), np.full(3, 3, np.int64))
    encoded = encode_infer_response(decoded, result)
    assert encoded.header_length is None
    assert json.loads(encoded.body)["outputs"][1] == {
        "name": "digit",
        "datatype": "INT64",
        "shape": [3],
        "data": [3, 3, 3],
    }


def test_an_empty_request_decodes_to_no_images():
    decoded = _decode(*rest_infer_body(np.zeros((0, 28, 28), np.uint8), binary=False))
    assert decoded.images.shape == (0, 28, 28)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"shape": [11, 28, 28]}, "--max-request-images"),
        ({"shape": [True, 28, 28]}, "inputs[0].shape: expected an array of integers"),
        ({"name": 7}, "inputs[0].name: expected a string, got an integer"),
        ({"parameters": {"shared_memory_region": "r"}}, "'shared_memory_region' is not supported"),
        ({"data": [[[True] * 28] * 28] * 3}, "got true or false"),
        ({"data": [[0] * 784] * 3}, "nested as [3, 784], expected a flat array"),
        ({"data": [0] * 2351 + [None]}, "got values of mixed or other types"),
    ],
)
def test_json_tensor_errors_name_the_field(change, message):
    body, headers = rest_infer_body(IMAGES, binary=False)
    request = json.loads(body)
    request["inputs"][0].update(change)
    with pytest.raises(InvalidInput) as raised:
        _decode(json.dumps(request).encode(), headers)
    assert message in str(raised.value)


def test_binary_data_needs_its_header_and_not_data_too():
    body, headers = rest_infer_body(IMAGES)
    header = body[: int(headers[HEADER_LENGTH])]
    with pytest.raises(InvalidInput, match="binary data needs the Inference-Header-Content-Length"):
        decode_infer_request(header, None, AT_MOST_10)
    request = json.loads(header)
    request["inputs"][0]["data"] = [0]
    header = json.dumps(request).encode()
    with pytest.raises(InvalidInput, match=r"data and parameters\.binary_data_size both given"):
        decode_infer_request(header + IMAGES.tobytes(), str(len(header)), AT_MOST_10)

"""Property-based: requests with every field wrong in every way, against a real server.

Each test takes a valid request, breaks it one way (hypothesis picks the way and the
values), and checks the answer's status code and message; then a valid request must still
be served. A last test sends requests with every field random and checks only what must
hold for any input: no INTERNAL or UNKNOWN, a message of bounded size, the server still
serving.

Examples per test: 60 (`ci` profile, derandomized so CI is repeatable). For a long run:
`MNIST37_HYPOTHESIS_PROFILE=long make test` (2,000 examples a test, random seeds).
"""

from __future__ import annotations

import os

import grpc
import numpy as np
import pytest
from helpers import infer_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.generated.inference import grpc_service_pb2 as pb
from serving.generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving.generated.mnist37.v1 import classifier_pb2 as cpb
from serving.generated.mnist37.v1 import classifier_pb2_grpc as cpb_grpc

settings.register_profile(
    "ci",
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("MNIST37_HYPOTHESIS_PROFILE", "ci"))

# A message a client can always read: well under grpc's 8 KiB default metadata limit.
MAX_DETAILS = 1000
TIMEOUT = 10
LOADED_VERSIONS = {"1", "2"}  # tests/conftest.py's model_repository: mnist37 v1 and v2
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

text = st.text(max_size=300)
long_text = st.one_of(text, st.builds(lambda c, n: c * n, st.characters(), st.integers(0, 5000)))
int64 = st.integers(-(2**63), 2**63 - 1)


@pytest.fixture(scope="module")
def stubs(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel), cpb_grpc.ClassifierStub(channel)


def status_of(call, request) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, timeout=TIMEOUT)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def assert_refused(answer: tuple[grpc.StatusCode, str], *codes: grpc.StatusCode) -> None:
    code, details = answer
    assert code in codes, (code, details)
    assert details.strip(), f"{code.name} without a message"
    assert len(details) <= MAX_DETAILS, f"a {len(details)}-character message"


def assert_still_serving(oip) -> None:
    reply = oip.ModelInfer(infer_request(np.zeros((2, 28, 28), np.uint8)), timeout=TIMEOUT)
    assert reply.model_version == "2" and len(reply.raw_output_contents) == 2


def valid_request() -> pb.ModelInferRequest:
    return infer_request(np.zeros((1, 28, 28), np.uint8))


# Each breaks a valid request one way; the server must say INVALID_ARGUMENT.
def _rename_input(request, name):
    request.inputs[0].name = name if name != "images" else name + "x"


def _retype_input(request, datatype):
    request.inputs[0].datatype = datatype if datatype != "UINT8" else "FP32"


def _reshape_input(request, shape):
    if shape[1:] == [28, 28] and len(shape) == 3 and 0 <= shape[0] <= 4096:
        shape = [*shape, 1]  # that one would be valid (with contents to match)
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend(shape)


def _resize_raw(request, size):
    request.raw_input_contents[0] = bytes(size if size != 784 else 785)


def _extra_inputs(request, count):
    for _ in range(count):
        request.inputs.add().CopyFrom(request.inputs[0])


def _unknown_parameter(request, key):
    request.inputs[0].parameters[key or "x"].string_param = "y"


def _unknown_output(request, name):
    request.outputs.add(name=name if name not in ("probability", "digit") else name + "x")


def _typed_and_raw(request, values):
    request.inputs[0].contents.uint_contents.extend(values or [0])


def _typed_too_large(request, value):
    request.ClearField("raw_input_contents")
    request.inputs[0].contents.uint_contents.extend([0] * 783 + [value])


def _wrong_typed_field(request, values):
    request.ClearField("raw_input_contents")
    request.inputs[0].contents.fp32_contents.extend(values or [1.0])


INVALID = st.one_of(
    st.tuples(st.just(_rename_input), long_text),
    st.tuples(st.just(_retype_input), long_text),
    st.tuples(st.just(_reshape_input), st.lists(int64, max_size=8)),
    st.tuples(st.just(_resize_raw), st.integers(0, 20_000)),
    st.tuples(st.just(_extra_inputs), st.integers(1, 3)),
    st.tuples(st.just(_unknown_parameter), long_text.filter(lambda k: k != "binary_data_size")),
    st.tuples(st.just(_unknown_output), long_text),
    st.tuples(st.just(_typed_and_raw), st.lists(st.integers(0, 2**32 - 1), max_size=10)),
    st.tuples(st.just(_typed_too_large), st.integers(256, 2**32 - 1)),
    st.tuples(st.just(_wrong_typed_field), st.lists(st.floats(width=32), max_size=10)),
)


@given(breakage=INVALID)
def test_an_invalid_infer_request_gets_invalid_argument_and_the_next_is_served(stubs, breakage):
    oip, _ = stubs
    request = valid_request()
    breakage[0](request, breakage[1])
    assert_refused(status_of(oip.ModelInfer, request), grpc.StatusCode.INVALID_ARGUMENT)
    assert_still_serving(oip)


@given(name=long_text.filter(lambda n: n not in ("mnist37", "other")), version=long_text)
def test_an_unknown_model_gets_not_found_with_a_bounded_message(stubs, name, version):
    oip, _ = stubs
    request = valid_request()
    request.model_name, request.model_version = name, version
    assert_refused(status_of(oip.ModelInfer, request), grpc.StatusCode.NOT_FOUND)
    lookups = [
        (oip.ModelMetadata, pb.ModelMetadataRequest(name=name, version=version)),
        (oip.ModelConfig, pb.ModelConfigRequest(name=name, version=version)),
    ]
    if name:  # an empty name asks for every model's statistics: valid
        lookups.append((oip.ModelStatistics, pb.ModelStatisticsRequest(name=name, version=version)))
    for call, message in lookups:
        assert_refused(status_of(call, message), grpc.StatusCode.NOT_FOUND)
    assert_still_serving(oip)


@given(
    version=st.one_of(
        long_text,
        st.integers().map(str),
        st.integers(0, 10**30).map(lambda n: f"0{n}"),
        st.sampled_from(["\u0661", "\u00b2", "1_0", " 1", "1 ", "+1", "-0", "1e3", "0x1"]),
    ).filter(lambda v: v not in LOADED_VERSIONS and v != "")
)
def test_a_version_that_is_not_loaded_gets_not_found(stubs, version):
    oip, _ = stubs
    request = valid_request()
    request.model_version = version
    assert_refused(status_of(oip.ModelInfer, request), grpc.StatusCode.NOT_FOUND)
    ready = oip.ModelReady(pb.ModelReadyRequest(name="mnist37", version=version), timeout=TIMEOUT)
    assert not ready.ready
    assert_still_serving(oip)


def _pixels(image, size):
    image.pixels = bytes(size if size != 784 else 783)


def _not_png(image, data):
    image.png = b"\x89PNG\r\n\x1a\n" + data  # a PNG signature, then anything


def _neither(image, _):
    image.Clear()


CLASSIFY_INVALID = st.one_of(
    st.tuples(st.just(_pixels), st.integers(0, 10_000)),
    st.tuples(st.just(_not_png), st.binary(max_size=2000)),
    st.tuples(st.just(_neither), st.none()),
)


@given(breakage=CLASSIFY_INVALID, position=st.integers(0, 3))
def test_an_invalid_image_gets_invalid_argument_naming_it(stubs, breakage, position):
    oip, classifier = stubs
    request = cpb.ClassifyRequest()
    for _ in range(4):
        request.images.add(pixels=bytes(784))
    breakage[0](request.images[position], breakage[1])
    answer = status_of(classifier.Classify, request)
    assert_refused(answer, grpc.StatusCode.INVALID_ARGUMENT)
    assert f"images[{position}]" in answer[1]
    assert_still_serving(oip)


@given(
    model_name=long_text,
    model_version=long_text,
    id_=long_text,
    inputs=st.lists(
        st.builds(
            pb.ModelInferRequest.InferInputTensor,
            name=long_text,
            datatype=st.sampled_from(["UINT8", "FP32", "BYTES", "", "INT64"]) | text,
            shape=st.lists(int64, max_size=5),
        ),
        max_size=3,
    ),
    raw=st.lists(st.binary(max_size=5000), max_size=3),
    parameters=st.dictionaries(text, text, max_size=20),
)
def test_random_infer_requests_never_get_internal_and_never_stop_the_server(
    stubs, model_name, model_version, id_, inputs, raw, parameters
):
    oip, _ = stubs
    request = pb.ModelInferRequest(
        model_name=model_name, model_version=model_version, id=id_, inputs=inputs
    )
    request.raw_input_contents.extend(raw)
    for key, value in parameters.items():
        request.parameters[key].string_param = value
    code, details = status_of(oip.ModelInfer, request)
    assert code not in NEVER, details
    assert len(details) <= MAX_DETAILS
    assert_still_serving(oip)

"""The HTTP/REST edge of the real server (a subprocess): every endpoint with the real curl,
the same answers and predictions as gRPC, bad requests refused with their status and
message (and the next request served), HTTP and gRPC requests in the same batches.

Requests are built here as tritonclient.http builds them (tests/helpers.py), to control
every byte; tritonclient.http itself classifies the whole test set in
test_tritonclient_http.py, and the KServe SDK drives both protocols in test_kserve_client.py."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from helpers import (
    REPO_ROOT,
    http_call,
    infer_request,
    png,
    rest_infer_body,
    rest_infer_outputs,
)

from serving.codecs import decode_infer_response
from serving.generated.inference import grpc_service_pb2 as pb
from serving.generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving.generated.mnist37.v1 import classifier_pb2, classifier_pb2_grpc
from serving.launcher import ServerProcess, start_server
from serving.rest.messages import message_json

# The 2,038 shipped digits in one request: more images than the default 1,024, and about
# 6 MB as JSON (the default body limit, 8 MiB, set here all the same).
MAX_IMAGES = 4096
BODY_LIMIT = 8 * 1024 * 1024
BODY_TIMEOUT = 1.0
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.png"))
INFER = "/v2/models/mnist37/infer"


@pytest.fixture(scope="module")
def http_server(model_repository, tmp_path_factory) -> Iterator[ServerProcess]:
    running = start_server(
        model_repository,
        tmp_path_factory.mktemp("logs"),
        "--max-request-images",
        str(MAX_IMAGES),
        "--http-max-body-bytes",
        str(BODY_LIMIT),
        "--http-body-timeout",
        str(BODY_TIMEOUT),
    )
    try:
        yield running
    finally:
        running.terminate()


@pytest.fixture
def stubs(http_server) -> Iterator[tuple[pb_grpc.GRPCInferenceServiceStub, object]]:
    with grpc.insecure_channel(http_server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel), classifier_pb2_grpc.ClassifierStub(channel)


def curl(server: ServerProcess, path: str, *options: str) -> tuple[int, dict[str, str], bytes]:
    """The real curl: status, headers (lower-case names) and body."""
    completed = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-D", "-", "-o", "-", *options, server.http_url + path],
        capture_output=True,
        timeout=60,
        check=True,
    )
    head, _, body = completed.stdout.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}, body


def test_curl_health_and_readiness(http_server):
    """The status says it (Triton's clients read it), and so does a JSON body (the KServe
    SDK reads that)."""
    for path, status, body in (
        ("/v2/health/live", 200, {"live": True}),
        ("/v2/health/ready", 200, {"ready": True}),
        ("/v2/models/mnist37/ready", 200, {"name": "mnist37", "ready": True}),
        ("/v2/models/mnist37/versions/2/ready", 200, {"name": "mnist37", "ready": True}),
        # on disk, outside the version policy
        ("/v2/models/mnist37/versions/1/ready", 400, {"name": "mnist37", "ready": False}),
        ("/v2/models/nope/ready", 400, {"name": "nope", "ready": False}),
    ):
        answer = curl(http_server, path)
        assert answer[0] == status and json.loads(answer[2]) == body, (path, answer)
        assert answer[1]["content-type"] == "application/json", path
        head = http_call(http_server.http_address, "HEAD", path)  # a probe's: no body
        assert head[0] == status and head[2] == b"", (path, head)


def test_curl_metadata_config_statistics_and_index_state_the_grpc_facts(http_server, stubs):
    oip, _ = stubs
    expected = {
        "/v2": oip.ServerMetadata(pb.ServerMetadataRequest()),
        "/v2/models/mnist37": oip.ModelMetadata(pb.ModelMetadataRequest(name="mnist37")),
        "/v2/models/mnist37/versions/2": oip.ModelMetadata(
            pb.ModelMetadataRequest(name="mnist37", version="2")
        ),
        "/v2/models/mnist37/config": oip.ModelConfig(pb.ModelConfigRequest(name="mnist37")).config,
        "/v2/models/other/versions/1/config": oip.ModelConfig(
            pb.ModelConfigRequest(name="other", version="1")
        ).config,
        "/v2/models/stats": oip.ModelStatistics(pb.ModelStatisticsRequest()),
        "/v2/models/mnist37/stats": oip.ModelStatistics(pb.ModelStatisticsRequest(name="mnist37")),
        "/v2/models/mnist37/versions/2/stats": oip.ModelStatistics(
            pb.ModelStatisticsRequest(name="mnist37", version="2")
        ),
    }
    for path, message in expected.items():
        status, headers, body = curl(http_server, path)
        assert status == 200 and headers["content-type"] == "application/json", path
        assert json.loads(body) == message_json(message), path
    metadata = json.loads(curl(http_server, "/v2")[2])
    assert metadata["name"] == "mnist37" and "binary_tensor_data" in metadata["extensions"]
    model = json.loads(curl(http_server, "/v2/models/mnist37")[2])
    assert model["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 28, 28]}]
    config = json.loads(curl(http_server, "/v2/models/mnist37/config")[2])
    assert config["max_batch_size"] == MAX_IMAGES  # a JSON number, as perf_analyzer reads it
    stats = json.loads(curl(http_server, "/v2/models/mnist37/stats")[2])["model_stats"][0]
    assert isinstance(stats["inference_stats"]["success"]["count"], int)

    index = oip.RepositoryIndex(pb.RepositoryIndexRequest()).models
    ready = oip.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
    for options, entries in (
        ([], index),
        (["-H", "Content-Type: application/json", "-d", '{"ready": true}'], ready),
    ):
        status, _, body = curl(http_server, "/v2/repository/index", "-X", "POST", *options)
        assert status == 200 and json.loads(body) == [message_json(entry) for entry in entries]
    assert {entry["state"] for entry in json.loads(body)} == {"READY"}


def test_curl_infers_in_json_and_binary_and_classifies(http_server, test_digits, tmp_path):
    images = test_digits[0][:5]
    for binary in (False, True):
        body, headers = rest_infer_body(images, binary=binary, id="curl-1")
        (tmp_path / "request").write_bytes(body)
        options = [f"-H{name}: {value}" for name, value in headers.items()]
        status, answer_headers, answer = curl(
            http_server, INFER, "--data-binary", f"@{tmp_path / 'request'}", *options
        )
        assert status == 200
        header, outputs = rest_infer_outputs(answer, answer_headers)
        assert (header["id"], header["model_version"]) == ("curl-1", "2")
        assert outputs["digit"].shape == (5,) and set(outputs["digit"].tolist()) <= {3, 7}
        assert ("inference-header-content-length" in answer_headers) == binary

    for example in EXAMPLES:
        status, _, answer = curl(
            http_server,
            "/v1/classify",
            "--data-binary",
            f"@{example}",
            "-H",
            "Content-Type: image/png",
        )
        (prediction,) = json.loads(answer)["predictions"]
        assert (
            status == 200
            and prediction["digit"] == {"three": 3, "seven": 7}[example.stem.split("-")[0]]
        )
        assert set(prediction) == {"digit", "probability_seven", "model_name", "model_version"}
    pixels = json.dumps({"images": [{"pixels": images[0].reshape(-1).tolist()}]})
    status, _, answer = curl(
        http_server, "/v1/classify", "-H", "Content-Type: application/json", "-d", pixels
    )
    assert status == 200 and json.loads(answer)["predictions"][0]["model_version"] == "2"


def test_curl_unknown_paths_and_methods(http_server):
    status, _, body = curl(http_server, "/v3/anything")
    assert status == 404 and json.loads(body) == {"error": "no endpoint at '/v3/anything'"}
    status, headers, body = curl(http_server, "/v2/health/live", "-X", "POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert json.loads(body)["error"].startswith("'POST' is not allowed on '/v2/health/live'")


def test_every_shipped_digit_gets_the_same_prediction_over_http_and_grpc(
    http_server, stubs, test_digits
):
    images = test_digits[0]
    assert len(images) == 2038
    oip, classifier = stubs
    expected = decode_infer_response(oip.ModelInfer(infer_request(images), timeout=60))
    variants = {
        "binary": rest_infer_body(images, binary=True),
        "json": rest_infer_body(images, binary=False),
        "nested json": rest_infer_body(images, binary=False, nested=True),
        "binary in, json out": rest_infer_body(images, binary=True, binary_outputs=False),
        "json in, binary out": rest_infer_body(images, binary=False, binary_outputs=True),
    }
    for name, (body, headers) in variants.items():
        status, answer_headers, answer = http_call(
            http_server.http_address, "POST", INFER, body, headers
        )
        assert status == 200, (name, answer[:300])
        _, outputs = rest_infer_outputs(answer, answer_headers)
        np.testing.assert_array_equal(outputs["digit"], expected["digit"], err_msg=name)
        np.testing.assert_array_equal(outputs["probability"], expected["probability"], err_msg=name)

    # The domain API: the same predictions over HTTP (JSON pixels) as over gRPC.
    some = images[:64]
    grpc_answer = classifier.Classify(
        classifier_pb2.ClassifyRequest(
            images=[classifier_pb2.Image(pixels=image.tobytes()) for image in some]
        )
    )
    body = json.dumps({"images": [{"pixels": image.reshape(-1).tolist()} for image in some]})
    status, _, answer = http_call(
        http_server.http_address,
        "POST",
        "/v1/classify",
        body.encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200
    predictions = json.loads(answer)["predictions"]
    assert [p["digit"] for p in predictions] == [p.digit for p in grpc_answer.predictions]
    assert [np.float32(p["probability_seven"]) for p in predictions] == [
        np.float32(p.probability_seven) for p in grpc_answer.predictions
    ]


def _tensor_request(**changes: object) -> dict[str, object]:
    tensor: dict[str, object] = {
        "name": "images",
        "datatype": "UINT8",
        "shape": [1, 28, 28],
        "data": [0] * 784,
    }
    tensor.update(changes)
    return {"inputs": [tensor]}


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


JSON_TYPE = {"Content-Type": "application/json"}
ONE_IMAGE = np.zeros((1, 28, 28), np.uint8)
TRITON_HEADER = json.dumps(
    {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28],
                 "parameters": {"binary_data_size": 784}}]},
    separators=(",", ":"),
).encode()  # fmt: skip


def _binary(header: bytes, data: bytes, length: str | None = None) -> tuple[bytes, dict]:
    headers = {"Content-Type": "application/octet-stream"}
    headers["Inference-Header-Content-Length"] = length or str(len(header))
    return header + data, headers


# (case, path, body, headers, status, message the answer's "error" holds)
BAD_REQUESTS = [
    ("malformed JSON", INFER, b'{"inputs": [', JSON_TYPE, 400, "not valid JSON"),
    ("not an object", INFER, b"[1]", JSON_TYPE, 400, "the request body: expected an object"),
    ("no inputs", INFER, b"{}", JSON_TYPE, 400, "inputs: missing"),
    (
        "shape of the wrong type",
        INFER,
        _json(_tensor_request(shape="1,28,28")),
        JSON_TYPE,
        400,
        "inputs[0].shape: expected an array, got a string",
    ),
    (
        "shape of strings",
        INFER,
        _json(_tensor_request(shape=["1", 28, 28])),
        JSON_TYPE,
        400,
        "inputs[0].shape: expected an array of integers, got a string",
    ),
    (
        "wrong datatype",
        INFER,
        _json(_tensor_request(datatype="FP32")),
        JSON_TYPE,
        400,
        "inputs[0].datatype: 'FP32' is not accepted, expected 'UINT8'",
    ),
    (
        "fractions",
        INFER,
        _json(_tensor_request(data=[0.5] * 784)),
        JSON_TYPE,
        400,
        "inputs[0].data: expected integers for UINT8, got numbers with a fraction",
    ),
    (
        "strings as data",
        INFER,
        _json(_tensor_request(data=["0"] * 784)),
        JSON_TYPE,
        400,
        "inputs[0].data: expected integers for UINT8, got strings",
    ),
    (
        "a value over 255",
        INFER,
        _json(_tensor_request(data=[256] * 784)),
        JSON_TYPE,
        400,
        "inputs[0].data: values above 255 do not fit UINT8",
    ),
    (
        "a negative value",
        INFER,
        _json(_tensor_request(data=[-1] * 784)),
        JSON_TYPE,
        400,
        "inputs[0].data: negative values do not fit UINT8",
    ),
    (
        "too few values",
        INFER,
        _json(_tensor_request(data=[0] * 783)),
        JSON_TYPE,
        400,
        "inputs[0].data: 783 elements, expected 784 for shape [1, 28, 28]",
    ),
    (
        "ragged nesting",
        INFER,
        _json(_tensor_request(data=[[0] * 28] * 27 + [[0] * 27])),
        JSON_TYPE,
        400,
        "inputs[0].data: not a flat array nor nested as the shape [1, 28, 28]",
    ),
    (
        "too many images",
        INFER,
        _json(_tensor_request(shape=[5000, 28, 28])),
        JSON_TYPE,
        400,
        f"5000 images exceed the limit of {MAX_IMAGES} per request (--max-request-images)",
    ),
    (
        "classification asked",
        INFER,
        _json(
            {
                **_tensor_request(),
                "outputs": [{"name": "digit", "parameters": {"classification": 2}}],
            }
        ),
        JSON_TYPE,
        400,
        "outputs[0].parameters: 'classification' is not supported",
    ),
    (
        "binary_data not a flag",
        INFER,
        _json(
            {**_tensor_request(), "outputs": [{"name": "digit", "parameters": {"binary_data": 1}}]}
        ),
        JSON_TYPE,
        400,
        "outputs[0].parameters.binary_data: expected true or false, got an integer",
    ),
    (
        "binary size over the bytes sent",
        INFER,
        *_binary(TRITON_HEADER, bytes(700)),
        400,
        "inputs[0].parameters.binary_data_size: 784 bytes, but 700 bytes follow the JSON header",
    ),
    (
        "binary size not the shape's",
        INFER,
        *_binary(TRITON_HEADER.replace(b"784", b"700"), bytes(700)),
        400,
        "inputs[0].parameters.binary_data_size: 700 bytes, expected 784 for shape [1, 28, 28]",
    ),
    (
        "header length not a number",
        INFER,
        *_binary(TRITON_HEADER, bytes(784), length="12a"),
        400,
        "Inference-Header-Content-Length: '12a' is not a byte count",
    ),
    (
        "header length past the body",
        INFER,
        *_binary(TRITON_HEADER, bytes(784), length="99999"),
        400,
        "Inference-Header-Content-Length: a JSON header of 99999 bytes, but the body has only",
    ),
    (
        "bytes after JSON without binary_data_size",
        INFER,
        *_binary(_json(_tensor_request()), bytes(10)),
        400,
        "10 bytes follow the JSON header, but no input has parameters.binary_data_size",
    ),
    (
        "wrong content type",
        INFER,
        _json(_tensor_request()),
        {"Content-Type": "text/plain"},
        415,
        "Content-Type 'text/plain' is not accepted here",
    ),
    (
        "compressed",
        INFER,
        _json(_tensor_request()),
        {**JSON_TYPE, "Content-Encoding": "gzip"},
        415,
        "Content-Encoding 'gzip' is not supported",
    ),
    ("unknown model", "/v2/models/nope/infer", b"", JSON_TYPE, 404, "'nope'"),
    ("unknown version", "/v2/models/mnist37/versions/9/infer", b"", JSON_TYPE, 404, "'9'"),
    (
        "a long model name, echoed cut",
        "/v2/models/" + "m" * 5000 + "/infer",
        b"",
        JSON_TYPE,
        404,
        "... (5000 characters)",
    ),
    ("classify: no content type", "/v1/classify", b"{}", {}, 415, "Content-Type is missing"),
    (
        "classify: not base64",
        "/v1/classify",
        _json({"images": [{"png": "not base64!"}]}),
        JSON_TYPE,
        400,
        "images[0].png: not valid base64",
    ),
    (
        "classify: not a PNG",
        "/v1/classify",
        b"GIF89a",
        {"Content-Type": "image/png"},
        400,
        "images[0].png: not a PNG (bad signature)",
    ),
    (
        "classify: no ink",
        "/v1/classify",
        png(np.zeros((28, 28), np.uint8)),
        {"Content-Type": "image/png"},
        400,
        "images[0]: no ink found",
    ),
    (
        "classify: a misspelt field",
        "/v1/classify",
        _json({"image": []}),
        JSON_TYPE,
        400,
        "the request body: unknown field 'image'",
    ),
    (
        "classify: both kinds of image",
        "/v1/classify",
        _json({"images": [{"png": "", "pixels": []}]}),
        JSON_TYPE,
        400,
        "images[0]: set either pixels or png",
    ),
    (
        "classify: pixels too few",
        "/v1/classify",
        _json({"images": [{"pixels": [0] * 783}]}),
        JSON_TYPE,
        400,
        "images[0].pixels: 783 values, expected 784",
    ),
    (
        "classify: a pixel over 255",
        "/v1/classify",
        _json({"images": [{"pixels": [300] * 784}]}),
        JSON_TYPE,
        400,
        "images[0].pixels: expected integers 0-255, got 300",
    ),
    (
        "classify: an unknown model",
        "/v1/classify?model_name=nope",
        png(np.eye(28, dtype=np.uint8) * 255),
        {"Content-Type": "image/png"},
        404,
        "'nope'",
    ),
    (
        "repository index: ready not a flag",
        "/v2/repository/index",
        b'{"ready": "yes"}',
        JSON_TYPE,
        400,
        "ready: expected true or false, got a string",
    ),
]


def _served(server: ServerProcess) -> None:
    """A good request is answered after whatever came before."""
    body, headers = rest_infer_body(ONE_IMAGE)
    status, answer_headers, answer = http_call(server.http_address, "POST", INFER, body, headers)
    assert status == 200, answer
    assert rest_infer_outputs(answer, answer_headers)[1]["digit"].shape == (1,)


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_a_bad_request_gets_its_status_and_message_then_a_good_one_is_served(
    http_server, path, body, headers, status, message
):
    answer = http_call(http_server.http_address, "POST", path, body, headers)
    assert answer[0] == status, answer
    assert answer[1]["content-type"] == "application/json"
    error = json.loads(answer[2])["error"]
    assert message in error and len(error) < 400, error
    _served(http_server)


def _raw(server: ServerProcess, request: bytes, timeout: float = 15.0) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", server.http_port), timeout=timeout)
    connection.sendall(request)
    return connection


def _answer(connection: socket.socket) -> tuple[int, bytes]:
    """The status and body of the response on `connection` (it has a Content-Length)."""
    received = b""
    with connection:
        while b"\r\n\r\n" not in received or len(_body(received)) < _length(received):
            chunk = connection.recv(65536)
            assert chunk, f"closed before the whole response: {received[:300]!r}"
            received += chunk
    return int(received.split()[1]), _body(received)


def _body(received: bytes) -> bytes:
    return received.partition(b"\r\n\r\n")[2]


def _length(received: bytes) -> int:
    for line in received.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            return int(value)
    raise AssertionError(f"no Content-Length: {received[:300]!r}")


def _headers(length: str | None, extra: str = "") -> bytes:
    framing = f"Content-Length: {length}" if length else "Transfer-Encoding: chunked"
    return (
        f"POST {INFER} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"{framing}\r\n{extra}\r\n"
    ).encode()


def test_a_body_over_the_limit_is_refused_from_its_content_length_before_it_is_sent(
    http_server,
):
    for expect in ("", "Expect: 100-continue\r\n"):
        connection = _raw(http_server, _headers(str(BODY_LIMIT + 1), expect))
        status, body = _answer(connection)  # nothing of the body was sent
        assert status == 413, body
        assert f"is {BODY_LIMIT + 1} bytes (Content-Length), more than the limit" in str(body)
    _served(http_server)


def test_a_chunked_body_is_counted_and_cut_off_at_the_limit(http_server):
    connection = _raw(http_server, _headers(None))
    chunk = b"x" * 65536
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    for _ in range(BODY_LIMIT // len(chunk) + 2):  # just past the limit, then no more
        connection.sendall(framed)
    status, body = _answer(connection)
    assert status == 413 and b"more than the limit of 8388608 bytes" in body
    _served(http_server)


def test_a_truncated_or_stalled_body_times_out_and_the_server_goes_on(http_server):
    started = time.monotonic()
    connection = _raw(http_server, _headers("1000") + b"{" * 500)
    status, body = _answer(connection)
    assert status == 408 and time.monotonic() - started >= BODY_TIMEOUT
    assert b"did not arrive within 1 s (--http-body-timeout): 500 bytes of 1000 read" in body
    _served(http_server)


def _wait_for_log(server: ServerProcess, text: str) -> str:
    deadline = time.monotonic() + 5
    while text not in (log := server.log()):
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.05)
    return log


def test_a_client_leaving_mid_body_or_sending_broken_http_fails_as_the_clients_fault(
    http_server,
):
    # Leaves in the middle of its body: nothing to answer; CANCELLED, like a gRPC cancel.
    _raw(http_server, _headers("1000") + b"{" * 500).close()
    _wait_for_log(http_server, "ModelInfer failed: CANCELLED (HTTP 499): the client closed")
    # Not HTTP at all (broken chunked framing): aiohttp answers 400 before any route.
    connection = _raw(http_server, _headers(None) + b"zz\r\nabc\r\n")
    status, _ = _answer(connection)
    assert status == 400
    log = _wait_for_log(http_server, "_unknown failed: INVALID_ARGUMENT (HTTP 400): the request")
    assert "internal error" not in log and '"level": "error"' not in log
    _served(http_server)


def test_http_and_grpc_requests_join_the_same_batches(model_repository, tmp_path, test_digits):
    # Requests wait up to 1.5 s for others: the two below share one onnxruntime call.
    server = start_server(model_repository, tmp_path, "--max-queue-delay-us", "1500000")
    try:
        with grpc.insecure_channel(server.target) as channel:
            oip = pb_grpc.GRPCInferenceServiceStub(channel)
            body, headers = rest_infer_body(test_digits[0][:3])
            answers: list[tuple[int, dict[str, str], bytes]] = []
            thread = threading.Thread(
                target=lambda: answers.append(
                    http_call(server.http_address, "POST", INFER, body, headers)
                )
            )
            thread.start()
            reply = oip.ModelInfer(infer_request(test_digits[0][3:8]), timeout=30)
            thread.join(timeout=30)
            assert answers and answers[0][0] == 200 and len(reply.raw_output_contents[1]) == 40
            stats = oip.ModelStatistics(pb.ModelStatisticsRequest(name="mnist37")).model_stats[0]
        assert stats.execution_count == 1 and stats.inference_count == 8
        assert [(batch.batch_size, batch.compute_infer.count) for batch in stats.batch_stats] == [
            (8, 1)
        ]
    finally:
        assert server.terminate() == 0


def test_base64_pngs_classify_like_grpc_pngs(http_server, stubs):
    _, classifier = stubs
    pngs = [example.read_bytes() for example in EXAMPLES]
    grpc_answer = classifier.Classify(
        classifier_pb2.ClassifyRequest(images=[classifier_pb2.Image(png=data) for data in pngs])
    )
    body = {"images": [{"png": base64.b64encode(data).decode()} for data in pngs]}
    status, _, answer = http_call(
        http_server.http_address, "POST", "/v1/classify", _json(body), JSON_TYPE
    )
    assert status == 200
    assert json.loads(answer) == message_json(grpc_answer)


def test_explain_over_http_answers_what_grpc_explain_does(http_server, stubs, test_digits):
    """`/v1/explain` shares Classify's request and decoding (PNGs as base64, pixels, one
    PNG body) and answers gRPC Explain's numbers, the votes as 784 JSON floats."""
    _, classifier = stubs
    pngs = [example.read_bytes() for example in EXAMPLES]
    pixels = test_digits[0][:3]
    request = classifier_pb2.ClassifyRequest(
        images=[classifier_pb2.Image(png=data) for data in pngs]
        + [classifier_pb2.Image(pixels=image.tobytes()) for image in pixels]
    )
    expected = classifier.Explain(request).explanations
    body = {
        "images": [{"png": base64.b64encode(data).decode()} for data in pngs]
        + [{"pixels": image.reshape(-1).tolist()} for image in pixels]
    }
    status, _, answer = http_call(
        http_server.http_address, "POST", "/v1/explain", _json(body), JSON_TYPE
    )
    assert status == 200, answer
    explanations = json.loads(answer)["explanations"]
    assert len(explanations) == len(expected) == len(pngs) + len(pixels)
    for got, want in zip(explanations, expected, strict=True):
        assert set(got) == {
            "contributions",
            "bias_term",
            "logit",
            "probability_seven",
            "digit",
            "model_name",
            "model_version",
            "pixels",
        }
        assert got["pixels"] == list(want.pixels)  # a PNG as the server converted it
        votes = np.array(got["contributions"], np.float32)
        np.testing.assert_array_equal(votes, np.frombuffer(want.contributions, "<f4"))
        for name in ("bias_term", "logit", "probability_seven"):
            assert np.float32(got[name]) == np.float32(getattr(want, name)), name
        assert (got["digit"], got["model_name"], got["model_version"]) == (
            want.digit,
            "mnist37",
            "2",
        )
        assert abs(float(votes.astype(np.float64).sum()) + got["bias_term"] - got["logit"]) < 1e-4
    # One PNG as the body, like /v1/classify.
    status, _, answer = http_call(
        http_server.http_address,
        "POST",
        "/v1/explain?model_version=2",
        pngs[0],
        {"Content-Type": "image/png"},
    )
    assert status == 200
    assert json.loads(answer)["explanations"][0]["digit"] == expected[0].digit
    # A version without an explanation graph: 409 (gRPC's FAILED_PRECONDITION).
    refused = {**body, "model_name": "other"}
    status, _, answer = http_call(
        http_server.http_address, "POST", "/v1/explain", _json(refused), JSON_TYPE
    )
    assert status == 409
    assert "without an explanation graph" in json.loads(answer)["error"]
    status, headers, _ = http_call(http_server.http_address, "GET", "/v1/explain")
    assert status == 405 and headers["allow"] == "POST"


def test_a_log_line_names_the_http_status(http_server):
    http_call(http_server.http_address, "POST", INFER, b"{", JSON_TYPE)
    _wait_for_log(http_server, "INVALID_ARGUMENT (HTTP 400): the request body is not valid JSON")

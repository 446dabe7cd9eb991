"""Every Prometheus metric moves as it should: the real server in this process (gRPC on a
free port, HTTP too where a test needs it), driven by aio clients, read through the
observer's registry."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
from helpers import FakeContext, infer_request, rest_infer_body
from prometheus_client import CollectorRegistry, Histogram

from serving.config import ServerConfig
from serving.dataplane import DataPlane
from serving.edge import EdgeState, RpcCall
from serving.errors import DeadlineExpired, InvalidInput
from serving.generated.inference import grpc_service_pb2 as pb
from serving.generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving.generated.mnist37.v1 import classifier_pb2, classifier_pb2_grpc
from serving.launcher import free_port
from serving.metrics import (
    LATENCY_BUCKETS,
    PROBABILITY_BUCKETS,
    VECTORISE_FROM,
    PrometheusObserver,
)
from serving.registry import ModelRegistry
from serving.repository import latest_version
from serving.runtime import ModelRuntime
from serving.server import InferenceServer

INFER = "/v2/models/mnist37/infer"


@asynccontextmanager
async def running_server(repository: Path, **settings: object) -> AsyncIterator[InferenceServer]:
    defaults: dict[str, object] = {"http_port": 0}  # HTTP off unless a test turns it on
    config = ServerConfig(
        repository=repository,
        host="127.0.0.1",
        grpc_port=0,
        metrics_port=free_port(),
        poll_interval=0.0,
        drain_quiet_period=0.0,
        **{**defaults, **settings},
    )
    server = InferenceServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.drain_and_stop()


@asynccontextmanager
async def stubs(server: InferenceServer):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel), classifier_pb2_grpc.ClassifierStub(channel)


def value(server: InferenceServer, name: str, **labels: str) -> float:
    found = server.observer.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def label_sets(server: InferenceServer, family: str) -> list[dict[str, str]]:
    return label_sets_of(server.observer.registry, family)


async def status_of(call: Awaitable[object]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value.code()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


@pytest.fixture(scope="module")
def offline(model_repository):
    return ModelRuntime(latest_version(model_repository, "mnist37").model_path)


def test_a_successful_inference_moves_every_metric(model_repository, test_digits, offline):
    images = test_digits[0][:100]
    probability, digit = offline.predict(images)

    async def scenario() -> None:
        # Batches of at most 64: the 100-image request below runs as two calls.
        batches = running_server(model_repository, max_batch_size=64)
        async with batches as server, stubs(server) as (oip, classify):
            assert value(server, "mnist37_model_info", **model_info("mnist37", "2")) == 1
            assert value(server, "mnist37_model_info", **model_info("other", "1")) == 1
            assert value(server, "mnist37_model_load_total", model="mnist37", result="success")
            assert value(server, "mnist37_inflight_requests") == 0

            response = await oip.ModelInfer(infer_request(images))
            assert response.model_version == "2"
            ok = {
                "protocol": "grpc",
                "rpc": "ModelInfer",
                "model": "mnist37",
                "version": "2",
                "code": "OK",
            }
            assert value(server, "mnist37_requests_total", **ok) == 1
            duration = {"protocol": "grpc", "rpc": "ModelInfer", "model": "mnist37"}
            assert value(server, "mnist37_request_duration_seconds_count", **duration) == 1
            assert 0 < value(server, "mnist37_request_duration_seconds_sum", **duration) < 5
            version = {"model": "mnist37", "version": "2"}
            for number in (3, 7):
                expected = int((digit == number).sum())
                assert value(server, "mnist37_images_total", digit=str(number), **version) == (
                    expected
                )
            assert value(server, "mnist37_images_total", digit="other", **version) == 0
            assert value(server, "mnist37_probability_count", **version) == 100
            assert value(server, "mnist37_probability_sum", **version) == pytest.approx(
                float(probability.sum()), rel=1e-5
            )
            for bound in PROBABILITY_BUCKETS:
                assert value(server, "mnist37_probability_bucket", le=str(bound), **version) == int(
                    (probability <= bound).sum()
                ), bound
            assert value(server, "mnist37_batch_size_count", model="mnist37") == 2  # 64 + 36
            assert value(server, "mnist37_batch_size_sum", model="mnist37") == 100
            assert value(server, "mnist37_queue_duration_seconds_count", model="mnist37") == 2
            assert value(server, "mnist37_inference_duration_seconds_count", **version) == 2
            assert value(server, "mnist37_inference_duration_seconds_sum", **version) > 0

            request = classifier_pb2.ClassifyRequest()
            request.images.add(pixels=images[0].tobytes())
            await classify.Classify(request)
            classify_ok = {**ok, "rpc": "Classify"}
            assert value(server, "mnist37_requests_total", **classify_ok) == 1
            assert value(server, "mnist37_probability_count", **version) == 101
            assert value(server, "mnist37_inflight_requests") == 0

            await oip.ServerLive(pb.ServerLiveRequest())
            live = {
                "protocol": "grpc",
                "rpc": "ServerLive",
                "model": "",
                "version": "",
                "code": "OK",
            }
            assert value(server, "mnist37_requests_total", **live) == 1
            await oip.ModelReady(pb.ModelReadyRequest(name="other"))
            ready = {
                "protocol": "grpc",
                "rpc": "ModelReady",
                "model": "other",
                "version": "1",
                "code": "OK",
            }
            assert value(server, "mnist37_requests_total", **ready) == 1
            # nothing but the edge moved anything for the other model
            assert value(server, "mnist37_probability_count", model="other", version="1") == 0

            with urllib.request.urlopen(
                f"http://127.0.0.1:{server.config.metrics_port}/metrics", timeout=5
            ) as page:
                exposition = page.read().decode()
            series = 'mnist37_requests_total{code="OK",model="mnist37",protocol="grpc",'
            assert series + 'rpc="ModelInfer",' in exposition

    run(scenario)


def test_an_explain_counts_like_a_classify_and_a_refusal_as_a_failure(
    model_repository, test_digits, offline
):
    """Explained images are classified images (digits, P(7)), the explanation graph's calls
    are the version's batches and executions, and an Explain of a version published without
    an explanation graph is a FAILED_PRECONDITION that counts as a failed request."""
    images = test_digits[0][:10]
    _, digit = offline.predict(images)

    async def scenario() -> None:
        async with running_server(model_repository) as server, stubs(server) as (_, classify):
            request = classifier_pb2.ClassifyRequest(
                images=[classifier_pb2.Image(pixels=image.tobytes()) for image in images]
            )
            await classify.Explain(request)
            ok = {
                "protocol": "grpc",
                "rpc": "Explain",
                "model": "mnist37",
                "version": "2",
                "code": "OK",
            }
            assert value(server, "mnist37_requests_total", **ok) == 1
            version = {"model": "mnist37", "version": "2"}
            for number in (3, 7):
                expected = int((digit == number).sum())
                assert value(server, "mnist37_images_total", digit=str(number), **version) == (
                    expected
                )
            assert value(server, "mnist37_probability_count", **version) == 10
            assert value(server, "mnist37_batch_size_sum", model="mnist37") == 10
            stats = server.registry.resolve("mnist37").stats
            assert (stats.success.count, stats.inference_count, stats.fail.count) == (1, 10, 0)

            request.model_name = "other"
            call = classify.Explain(request)
            assert await status_of(call) == grpc.StatusCode.FAILED_PRECONDITION
            refused = {"protocol": "grpc", "rpc": "Explain", "model": "other", "version": "1"}
            assert value(server, "mnist37_requests_total", **refused, code="FAILED_PRECONDITION")
            assert server.registry.resolve("other").stats.fail.count == 1
            assert value(server, "mnist37_inflight_requests") == 0

    run(scenario)


def test_each_protocol_counts_its_own_requests_under_the_same_rpc(model_repository, test_digits):
    """The same ModelInfer over gRPC and over HTTP: one `protocol="grpc"` and one
    `protocol="http"` series of the one rpc name; failures and unknown paths too."""
    images = test_digits[0][:3]
    body, headers = rest_infer_body(images)

    async def scenario() -> None:
        async with (
            running_server(model_repository, http_port=free_port()) as server,
            stubs(server) as (oip, _),
            aiohttp.ClientSession(f"http://127.0.0.1:{server.http.port}") as http,
        ):
            await oip.ModelInfer(infer_request(images))
            for _ in range(2):
                async with http.post(INFER, data=body, headers=headers) as answer:
                    assert answer.status == 200, await answer.text()
            async with http.get("/v2/health/live") as answer:
                assert answer.status == 200
            async with http.post("/v2/models/nope/infer", data=body, headers=headers) as answer:
                assert answer.status == 404
            async with http.get("/no/such/path") as answer:
                assert answer.status == 404
            await oip.ServerLive(pb.ServerLiveRequest())

            def requests(protocol: str, rpc: str, model: str, version: str, code: str) -> float:
                labels = {"protocol": protocol, "rpc": rpc, "model": model, "version": version}
                return value(server, "mnist37_requests_total", **labels, code=code)

            assert requests("grpc", "ModelInfer", "mnist37", "2", "OK") == 1
            assert requests("http", "ModelInfer", "mnist37", "2", "OK") == 2
            assert requests("http", "ModelInfer", "_unknown", "", "NOT_FOUND") == 1
            assert requests("grpc", "ModelInfer", "_unknown", "", "NOT_FOUND") == 0
            assert requests("http", "ServerLive", "", "", "OK") == 1
            assert requests("grpc", "ServerLive", "", "", "OK") == 1
            assert requests("http", "_unknown", "", "", "UNIMPLEMENTED") == 1
            for protocol, count in (("grpc", 1), ("http", 2)):
                duration = {"protocol": protocol, "rpc": "ModelInfer", "model": "mnist37"}
                assert value(server, "mnist37_request_duration_seconds_count", **duration) == (
                    count
                )
            protocols = {labels["protocol"] for labels in label_sets(server, "mnist37_requests")}
            assert protocols == {"grpc", "http"}  # bounded: the two edges, nothing else
            # the model's own metrics do not tell protocols apart
            version = {"model": "mnist37", "version": "2"}
            assert value(server, "mnist37_probability_count", **version) == 3 * 3

    run(scenario)


def model_info(model: str, version: str) -> dict[str, str]:
    return {
        "model": model,
        "version": version,
        "arch": "linear",
        "provider": "CPUExecutionProvider",
    }


def test_every_error_kind_is_counted_with_bounded_labels(model_repository, test_digits, caplog):
    images = test_digits[0][:2]
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    async def scenario() -> None:
        async with (
            running_server(model_repository, log_failures_per_second=0) as server,
            stubs(server) as (oip, classify),
        ):
            for number in range(50):  # clients cannot mint label values
                request = infer_request(images, model=f"no-such-model-{number}")
                assert await status_of(oip.ModelInfer(request)) == grpc.StatusCode.NOT_FOUND
            bad_version = infer_request(images, version="9")
            assert await status_of(oip.ModelInfer(bad_version)) == grpc.StatusCode.NOT_FOUND
            metadata = oip.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
            assert await status_of(metadata) == grpc.StatusCode.NOT_FOUND
            wrong_type = infer_request(images)
            wrong_type.inputs[0].datatype = "FP32"
            assert await status_of(oip.ModelInfer(wrong_type)) == invalid
            bad_png = classifier_pb2.ClassifyRequest()
            bad_png.images.add(png=b"\x89PNG\r\n\x1a\nnot really")
            assert await status_of(classify.Classify(bad_png)) == invalid

            def boom(*_: object, **__: object) -> None:
                raise RuntimeError("onnxruntime fell over")

            server.dataplane.infer = boom
            assert await status_of(oip.ModelInfer(infer_request(images))) == (
                grpc.StatusCode.INTERNAL
            )
            del server.dataplane.infer
            server.edge.accepting = False
            assert await status_of(oip.ModelInfer(infer_request(images))) == (
                grpc.StatusCode.UNAVAILABLE
            )
            server.edge.accepting = True

            def requests(rpc: str, model: str, version: str, code: str) -> float:
                labels = {
                    "protocol": "grpc",
                    "rpc": rpc,
                    "model": model,
                    "version": version,
                    "code": code,
                }
                return value(server, "mnist37_requests_total", **labels)

            assert requests("ModelInfer", "_unknown", "", "NOT_FOUND") == 50
            assert requests("ModelInfer", "mnist37", "", "NOT_FOUND") == 1
            assert requests("ModelMetadata", "_unknown", "", "NOT_FOUND") == 1
            assert requests("ModelInfer", "mnist37", "2", "INVALID_ARGUMENT") == 1
            assert requests("Classify", "mnist37", "2", "INVALID_ARGUMENT") == 1
            assert requests("ModelInfer", "mnist37", "2", "INTERNAL") == 1
            assert requests("ModelInfer", "mnist37", "2", "UNAVAILABLE") == 1
            models = {labels["model"] for labels in label_sets(server, "mnist37_requests")}
            assert models == {"_unknown", "mnist37"}
            durations = {"protocol": "grpc", "rpc": "ModelInfer", "model": "_unknown"}
            assert value(server, "mnist37_request_duration_seconds_count", **durations) == 50
            # failed requests classified nothing and left nothing in flight
            assert value(server, "mnist37_probability_count", model="mnist37", version="2") == 0
            assert value(server, "mnist37_batch_size_count", model="mnist37") == 0
            assert value(server, "mnist37_inflight_requests") == 0
            assert server.edge.in_flight == 0
            # the Triton statistics count both APIs' requests refused after resolving (the
            # wrong datatype, the bad PNG), nothing else
            statistics = await oip.ModelStatistics(pb.ModelStatisticsRequest(name="mnist37"))
            assert statistics.model_stats[0].inference_stats.fail.count == 2

    with caplog.at_level(logging.WARNING, logger="serving.rpc"):
        run(scenario)
    failures = [record for record in caplog.records if record.name == "serving.rpc"]
    assert len(failures) == 50 + 6  # one line per failed request, none for successes
    internal = [record for record in failures if record.code == "INTERNAL"]
    assert len(internal) == 1 and internal[0].levelno == logging.ERROR
    assert internal[0].exc_info and "onnxruntime fell over" in str(internal[0].exc_info[1])
    unknown = failures[0]
    assert unknown.levelno == logging.WARNING
    assert (unknown.rpc, unknown.model, unknown.version, unknown.code) == (
        "ModelInfer",
        "no-such-model-0",
        "",
        "NOT_FOUND",
    )
    assert unknown.peer.startswith("ipv4:127.0.0.1:")
    bad_version = failures[50]
    assert (bad_version.model, bad_version.version) == ("mnist37", "9")


def test_sixteen_concurrent_single_images_form_batches(model_repository, test_digits):
    images = test_digits[0]

    async def scenario() -> None:
        async with (
            running_server(model_repository, max_queue_delay_us=50_000) as server,
            stubs(server) as (oip, _),
        ):
            calls = [
                asyncio.ensure_future(oip.ModelInfer(infer_request(images[i : i + 1])))
                for i in range(16)
            ]
            in_flight_seen = 0.0
            deadline = asyncio.get_running_loop().time() + 10
            while not all(call.done() for call in calls):
                in_flight_seen = max(in_flight_seen, value(server, "mnist37_inflight_requests"))
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.001)
            await asyncio.gather(*calls)
            ok = {
                "protocol": "grpc",
                "rpc": "ModelInfer",
                "model": "mnist37",
                "version": "2",
                "code": "OK",
            }
            assert value(server, "mnist37_requests_total", **ok) == 16
            batches = value(server, "mnist37_batch_size_count", model="mnist37")
            single = value(server, "mnist37_batch_size_bucket", model="mnist37", le="1.0")
            assert value(server, "mnist37_batch_size_sum", model="mnist37") == 16
            assert batches - single >= 1, "no batch held more than one image"
            assert batches < 16
            assert in_flight_seen > 1
            assert value(server, "mnist37_inflight_requests") == 0
            # one wait per request, not per batch; each waited for company
            queue = {"model": "mnist37"}
            assert value(server, "mnist37_queue_duration_seconds_count", **queue) == 16
            waited = value(server, "mnist37_queue_duration_seconds_sum", **queue)
            assert waited >= 0.01 * batches
            statistics = await oip.ModelStatistics(pb.ModelStatisticsRequest(name="mnist37"))
            triton_queue = statistics.model_stats[0].inference_stats.queue
            assert triton_queue.count == 16
            assert triton_queue.ns / 1e9 == pytest.approx(waited, rel=1e-6)

    run(scenario)


@pytest.mark.parametrize(
    ("raised", "remaining", "code"),
    [
        (asyncio.CancelledError(), None, "CANCELLED"),
        (asyncio.CancelledError(), 5.0, "CANCELLED"),
        # grpc.aio cancels the handler when the deadline passes: time_remaining() is 0
        (asyncio.CancelledError(), 0.0, "DEADLINE_EXCEEDED"),
        (DeadlineExpired("deadline passed while queued"), 5.0, "DEADLINE_EXCEEDED"),
        (InvalidInput("inputs[0].shape: no"), None, "INVALID_ARGUMENT"),
        (ValueError("a bug"), None, "INTERNAL"),
    ],
)
def test_rpc_edge_maps_every_exception_to_one_counted_code(raised, remaining, code):
    observer = PrometheusObserver()
    dataplane, edge = DataPlane(ModelRegistry(), 10, observer), EdgeState()
    context = FakeContext(remaining)

    async def scenario() -> None:
        async with RpcCall(dataplane, edge, "ModelInfer", context, inference=True) as call:
            call.name_model("anything")
            assert edge.in_flight == 1
            raise raised

    with pytest.raises((asyncio.CancelledError, grpc.aio.AbortError)):
        run(scenario)
    labels = {
        "protocol": "grpc",
        "rpc": "ModelInfer",
        "model": "_unknown",
        "version": "",
        "code": code,
    }
    assert observer.registry.get_sample_value("mnist37_requests_total", labels) == 1
    assert edge.in_flight == 0
    if not isinstance(raised, asyncio.CancelledError):
        assert context.aborted is not None and context.aborted[0].name == code


@pytest.mark.parametrize(
    ("accepting", "details"),
    [(True, "cancelled by the client"), (False, "cancelled while the server was stopping")],
)
def test_a_cancellation_is_logged_with_who_cancelled(accepting, details, caplog):
    dataplane, edge = DataPlane(ModelRegistry(), 10), EdgeState(accepting=accepting)

    async def scenario() -> None:
        async with RpcCall(dataplane, edge, "ModelInfer", FakeContext(5.0), inference=True):
            raise asyncio.CancelledError()

    with (
        caplog.at_level(logging.WARNING, logger="serving.rpc"),
        pytest.raises(asyncio.CancelledError),
    ):
        run(scenario)
    assert [record.getMessage() for record in caplog.records] == [
        f"ModelInfer failed: CANCELLED: {details}"
    ]


def test_inference_rpcs_are_refused_once_the_drain_stops_accepting(model_repository):
    async def scenario() -> None:
        async with running_server(model_repository) as server:
            edge, context = EdgeState(accepting=False), FakeContext()
            with pytest.raises(grpc.aio.AbortError):
                async with RpcCall(
                    server.dataplane, edge, "ModelInfer", context, inference=True
                ) as call:
                    call.resolve("mnist37")
            assert context.aborted == (grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            assert edge.in_flight == 0
            async with RpcCall(server.dataplane, edge, "ModelReady", FakeContext()) as call:
                assert call.resolve("mnist37").name == "mnist37"  # not an inference RPC

    run(scenario)


def test_a_request_whose_deadline_passes_while_computing_counts_as_deadline_exceeded(
    model_repository, test_digits
):
    async def scenario() -> None:
        async with running_server(model_repository) as server, stubs(server) as (oip, _):
            model = server.registry.resolve("mnist37")
            predict = model.batcher._predict

            def slow_predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                time.sleep(0.3)
                return predict(images)

            model.batcher._predict = slow_predict
            call = oip.ModelInfer(infer_request(test_digits[0][:1]), timeout=0.05)
            assert await status_of(call) == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.sleep(0.05)  # the handler's cancellation is recorded
            labels = {"protocol": "grpc", "rpc": "ModelInfer", "model": "mnist37", "version": "2"}
            assert value(server, "mnist37_requests_total", **labels, code="DEADLINE_EXCEEDED") == 1
            assert value(server, "mnist37_requests_total", **labels, code="CANCELLED") == 0
            model.batcher._predict = predict

    run(scenario)


def test_an_invalid_request_counts_as_failed_once_for_a_resolved_model(model_repository):
    registry = ModelRegistry()

    async def scenario() -> None:
        async with running_server(model_repository) as server:
            model = server.registry.resolve("mnist37")
            registry.swap([model])
            dataplane, edge = DataPlane(registry, 10), EdgeState()
            before = model.stats.fail.count
            for inference, resolve in [(True, True), (True, False), (False, True)]:
                with pytest.raises(grpc.aio.AbortError):
                    async with RpcCall(
                        dataplane, edge, "ModelInfer", FakeContext(), inference=inference
                    ) as call:
                        if resolve:
                            call.resolve("mnist37")
                        raise InvalidInput("inputs[0].name: no")
            # counted only for the inference RPC that had resolved its model
            assert model.stats.fail.count - before == 1

    run(scenario)


def test_vectorised_probabilities_equal_one_observation_each():
    generator = np.random.default_rng(7)
    edges = np.array([0.0, 0.5, 1.0, 0.01, 0.99, np.nan], dtype=np.float32)
    for size in (1, VECTORISE_FROM - 1, VECTORISE_FROM, 1000):
        probability = np.concatenate([generator.random(size, dtype=np.float32), edges])[:size]
        if size >= VECTORISE_FROM:
            probability = np.concatenate([probability, edges])
        digit = np.where(probability >= 0.5, 7, 3).astype(np.int64)
        digit[:1] = 5  # a broken model's digit is counted as "other", not as a new label
        observer = PrometheusObserver()
        observer.predictions_made("m", "1", probability, digit)
        reference = Histogram("p", "", buckets=PROBABILITY_BUCKETS, registry=CollectorRegistry())
        for item in probability.tolist():
            if item == item:
                reference.observe(item)
        expected = {
            sample.labels["le"]: sample.value
            for sample in next(iter(reference.collect())).samples
            if sample.name == "p_bucket"
        }
        registry = observer.registry
        for le, count in expected.items():
            labels = {"model": "m", "version": "1", "le": le}
            assert registry.get_sample_value("mnist37_probability_bucket", labels) == count
        finite = probability[~np.isnan(probability)]
        observed_sum = registry.get_sample_value(
            "mnist37_probability_sum", {"model": "m", "version": "1"}
        )
        assert observed_sum == pytest.approx(float(finite.sum(dtype=np.float64)), rel=1e-6)
        images = {
            name: registry.get_sample_value(
                "mnist37_images_total", {"model": "m", "version": "1", "digit": name}
            )
            for name in ("3", "7", "other")
        }
        assert images["other"] == 1
        assert sum(images.values()) == len(probability)


def test_model_lifecycle_metrics():
    observer = PrometheusObserver()
    registry = observer.registry
    info = {"model": "m", "version": "3", "arch": "mlp", "provider": "CPUExecutionProvider"}
    observer.model_loaded("m", "3", "mlp", "CPUExecutionProvider")
    observer.model_load_failed("m")
    observer.model_load_failed("m")
    assert registry.get_sample_value("mnist37_model_info", info) == 1
    loads = "mnist37_model_load_total"
    assert registry.get_sample_value(loads, {"model": "m", "result": "success"}) == 1
    assert registry.get_sample_value(loads, {"model": "m", "result": "failure"}) == 2
    observer.model_unloaded("m", "3", "mlp", "CPUExecutionProvider")
    assert registry.get_sample_value("mnist37_model_info", info) is None
    observer.model_unloaded("m", "3", "mlp", "CPUExecutionProvider")  # twice is harmless


@pytest.mark.parametrize("requests", [1, VECTORISE_FROM - 1, VECTORISE_FROM, 64])
def test_every_queue_wait_of_a_batch_is_observed(requests):
    generator = np.random.default_rng(requests)
    waits = (10.0 ** generator.uniform(-5.5, 1.5, requests)).tolist()  # 3 us to 30 s
    observer = PrometheusObserver()
    observer.batch_executed("m", "1", requests, waits, 0.001)
    reference = Histogram("q", "", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    for wait in waits:
        reference.observe(wait)
    registry = observer.registry
    for sample in next(iter(reference.collect())).samples:
        if sample.name == "q_bucket":
            labels = {"model": "m", "le": sample.labels["le"]}
            found = registry.get_sample_value("mnist37_queue_duration_seconds_bucket", labels)
            assert found == sample.value, sample.labels["le"]
    model = {"model": "m"}
    assert registry.get_sample_value("mnist37_queue_duration_seconds_count", model) == requests
    assert registry.get_sample_value("mnist37_queue_duration_seconds_sum", model) == (
        pytest.approx(sum(waits), rel=1e-9)
    )
    assert registry.get_sample_value("mnist37_batch_size_count", model) == 1


def test_unloading_a_version_removes_its_series_and_keeps_the_others():
    observer = PrometheusObserver()
    registry = observer.registry
    probability = np.array([0.1, 0.9], dtype=np.float32)
    digit = np.array([3, 7], dtype=np.int64)
    for version in ("1", "2"):
        observer.model_loaded("m", version, "linear", "CPUExecutionProvider")
        observer.rpc_finished("grpc", "ModelInfer", "m", version, "OK", 0.001)
        observer.rpc_finished("grpc", "Classify", "m", version, "INVALID_ARGUMENT", 0.001)
        observer.rpc_finished("http", "ModelInfer", "m", version, "OK", 0.001)
        observer.predictions_made("m", version, probability, digit)
        observer.batch_executed("m", version, 2, [0.0001], 0.0002)
    observer.rpc_finished("grpc", "ModelInfer", "m", "", "NOT_FOUND", 0.001)  # version 9 asked for

    observer.model_unloaded("m", "1", "linear", "CPUExecutionProvider")

    def versions(family: str) -> set[str | None]:
        return {labels.get("version") for labels in label_sets_of(registry, family)}

    for family in ("mnist37_requests", "mnist37_images", "mnist37_probability"):
        assert versions(family) >= {"2"} and "1" not in versions(family), family
    assert versions("mnist37_inference_duration_seconds") == {"2"}
    assert versions("mnist37_model_info") == {"2"}
    assert versions("mnist37_requests") == {"2", ""}  # unresolved versions stay
    # per-model series are not per version: they stay
    assert registry.get_sample_value("mnist37_batch_size_count", {"model": "m"}) == 2
    duration = {"protocol": "grpc", "rpc": "ModelInfer", "model": "m"}
    assert registry.get_sample_value("mnist37_request_duration_seconds_count", duration) == 3
    duration = {**duration, "protocol": "http"}
    assert registry.get_sample_value("mnist37_request_duration_seconds_count", duration) == 2
    loads = {"model": "m", "result": "success"}
    assert registry.get_sample_value("mnist37_model_load_total", loads) == 2

    # a version loaded again starts from zero, through fresh (not orphaned) children
    observer.model_loaded("m", "1", "linear", "CPUExecutionProvider")
    observer.rpc_finished("grpc", "ModelInfer", "m", "1", "OK", 0.001)
    observer.predictions_made("m", "1", probability, digit)
    observer.batch_executed("m", "1", 2, [0.0001], 0.0002)
    ok = {"protocol": "grpc", "rpc": "ModelInfer", "model": "m", "version": "1", "code": "OK"}
    assert registry.get_sample_value("mnist37_requests_total", ok) == 1
    one = {"model": "m", "version": "1"}
    assert registry.get_sample_value("mnist37_probability_count", one) == 2
    assert registry.get_sample_value("mnist37_images_total", {**one, "digit": "7"}) == 1
    assert registry.get_sample_value("mnist37_inference_duration_seconds_count", one) == 1


def label_sets_of(registry: CollectorRegistry, family: str) -> list[dict[str, str]]:
    for metric in registry.collect():
        if metric.name == family:
            return [sample.labels for sample in metric.samples]
    return []

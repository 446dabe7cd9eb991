"""Hot reload: the reloader's decisions in process, then the real server under load while
versions are published, broken and deleted."""

from __future__ import annotations

import asyncio
import gc
import io
import os
import re
import shutil
import signal
import threading
import time
import urllib.request
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import FakeContext, infer_request, run
from PIL import Image

from serving import classifier
from serving.client import Mnist37Client
from serving.config import ServerConfig
from serving.dataplane import DataPlane
from serving.edge import EdgeState
from serving.errors import ModelNotFound
from serving.generated.inference import grpc_service_pb2 as pb
from serving.generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving.generated.mnist37.v1 import classifier_pb2
from serving.launcher import free_port, start_server
from serving.registry import BatchingOptions, LoadedModel, ModelRegistry, load_model_version
from serving.reloader import ModelReloader
from serving.repository import (
    CARD_FILE,
    MODEL_FILE,
    ModelCard,
    ModelFileRecord,
    ModelVersion,
)
from serving.runtime import RuntimeOptions
from serving.server import InferenceServer
from serving.synthetic import (
    linear_explanation_bytes,
    linear_model_bytes,
    mean_difference_model,
    publish_model,
    random_linear_model,
    random_linear_weights,
)

MODEL = "mnist37"
GARBAGE = b"this is not an ONNX model"


def wrong_input_name_model() -> bytes:
    """A valid ONNX model whose input is called `image_batch` instead of the contract's `images`."""
    import onnx

    model = onnx.load_model_from_string(random_linear_model(seed=9))
    model.graph.input[0].name = "image_batch"
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name == "images":
                node.input[index] = "image_batch"
    return model.SerializeToString()


@dataclass
class RecordingObserver:
    loaded: list[tuple[str, str, str, str]] = field(default_factory=list)
    unloaded: list[tuple[str, str, str, str]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def model_loaded(self, model: str, version: str, arch: str, provider: str) -> None:
        self.loaded.append((model, version, arch, provider))

    def model_unloaded(self, model: str, version: str, arch: str, provider: str) -> None:
        self.unloaded.append((model, version, arch, provider))

    def model_load_failed(self, model: str) -> None:
        self.failed.append(model)


@dataclass
class Harness:
    repository: Path
    registry: ModelRegistry
    observer: RecordingObserver
    reloader: ModelReloader
    loads: list[tuple[str, int]]

    def served(self, name: str = MODEL) -> list[int]:
        return [model.version for model in self.registry.versions(name)]

    def publish(self, model: bytes, name: str = MODEL) -> ModelVersion:
        return publish_model(self.repository, name, model)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="onnxruntime") as pool:
        yield pool


@pytest.fixture
def make_harness(tmp_path, executor) -> Callable[..., Harness]:
    def make(keep_versions: int = 1, poll_interval: float = 0.0, on_change=None) -> Harness:
        repository = tmp_path / "repository"
        repository.mkdir(exist_ok=True)
        registry = ModelRegistry()
        observer = RecordingObserver()
        loads: list[tuple[str, int]] = []

        def loader(model_version: ModelVersion) -> LoadedModel:
            loads.append((model_version.name, model_version.version))
            return load_model_version(model_version, RuntimeOptions(), BatchingOptions(), executor)

        reloader = ModelReloader(
            repository,
            registry,
            loader,
            observer,
            keep_versions=keep_versions,
            poll_interval=poll_interval,
            on_change=on_change,
        )
        return Harness(repository, registry, observer, reloader, loads)

    return make


async def settle() -> None:
    """Lets the tasks that unload versions run as far as they can."""
    for _ in range(10):
        await asyncio.sleep(0)


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until `condition()` held; fails after `timeout`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def test_a_new_version_replaces_the_served_one_and_the_old_one_is_unloaded(make_harness):
    harness = make_harness()
    harness.publish(random_linear_model(seed=1))
    harness.publish(random_linear_model(seed=2))

    async def scenario():
        await harness.reloader.reload()
        assert harness.served() == [2]
        assert harness.loads == [(MODEL, 2)]  # only the newest is loaded with keep_versions 1
        first = harness.registry.resolve(MODEL)
        first_session = weakref.ref(first.runtime.session)
        await harness.reloader.reload()
        await harness.reloader.reload()
        assert harness.loads == [(MODEL, 2)], "an unchanged repository loads nothing"

        harness.publish(random_linear_model(seed=3))
        await harness.reloader.reload()
        assert harness.served() == [3]
        assert harness.registry.resolve(MODEL).version == 3
        await settle()
        assert harness.observer.unloaded == [(MODEL, "2", "linear", first.provider)]
        del first
        return first_session

    first_session = run(scenario())
    provider = "CPUExecutionProvider"
    assert harness.observer.loaded == [
        (MODEL, "2", "linear", provider),
        (MODEL, "3", "linear", provider),
    ]
    assert harness.observer.unloaded == [(MODEL, "2", "linear", provider)]
    gc.collect()
    assert first_session() is None, "the unloaded version's onnxruntime session was freed"


def test_keep_versions_serves_the_newest_k_and_exact_versions_resolve(make_harness):
    harness = make_harness(keep_versions=2)
    for seed in (1, 2, 3):
        harness.publish(random_linear_model(seed=seed))

    async def scenario():
        await harness.reloader.reload()
        assert harness.served() == [2, 3]
        assert harness.registry.resolve(MODEL).version == 3
        assert harness.registry.resolve(MODEL, "2").version == 2
        with pytest.raises(ModelNotFound):
            harness.registry.resolve(MODEL, "1")
        harness.publish(random_linear_model(seed=4))
        await harness.reloader.reload()
        assert harness.served() == [3, 4]
        await settle()

    run(scenario())
    assert [version for _, version, _, _ in harness.observer.unloaded] == ["2"]
    assert sorted(harness.loads) == [(MODEL, 2), (MODEL, 3), (MODEL, 4)]


def test_model_config_reports_keep_versions_as_the_version_policy(model_repository):
    config = ServerConfig(
        repository=model_repository,
        host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        poll_interval=0.0,
        drain_quiet_period=0.0,
        keep_versions=2,
    )

    async def scenario() -> tuple[pb.ModelConfigResponse, pb.ModelMetadataResponse]:
        server = InferenceServer(config)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                model_config = await stub.ModelConfig(pb.ModelConfigRequest(name=MODEL))
                metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL))
                return model_config, metadata
        finally:
            await server.drain_and_stop()

    model_config, metadata = run(scenario())
    assert model_config.config.version_policy.latest.num_versions == 2
    assert list(metadata.versions) == ["1", "2"]


def test_classify_never_uses_a_version_retired_while_its_pngs_decode(
    make_harness, test_digits, monkeypatch
):
    harness = make_harness()
    harness.publish(random_linear_model(seed=1))
    decoding, release = threading.Event(), threading.Event()
    real_decode = classifier.decode_images

    def slow_decode(*arguments):
        decoding.set()
        assert release.wait(10)
        return real_decode(*arguments)

    monkeypatch.setattr(classifier, "decode_images", slow_decode)
    png = io.BytesIO()
    Image.fromarray(255 - test_digits[0][0]).save(png, format="PNG")
    request = classifier_pb2.ClassifyRequest()
    request.images.add(png=png.getvalue())

    async def scenario():
        await harness.reloader.reload()
        first = harness.registry.resolve(MODEL)
        dataplane = DataPlane(harness.registry, 64)
        servicer = classifier.ClassifierServicer(
            dataplane, EdgeState(), classifier.Classification(dataplane)
        )
        answer = asyncio.create_task(servicer.Classify(request, FakeContext()))
        assert await asyncio.to_thread(decoding.wait, 10)
        harness.publish(random_linear_model(seed=2))
        await harness.reloader.reload()  # version 1 is idle: it retires at once
        await settle()
        assert [version for _, version, _, _ in harness.observer.unloaded] == ["1"]
        release.set()
        return first, await answer

    first, response = run(scenario())
    assert [prediction.model_version for prediction in response.predictions] == ["2"]
    assert first.stats.success.count == first.stats.fail.count == 0
    assert first.stats.execution_count == 0


def test_a_broken_version_is_skipped_and_retried_only_when_its_files_change(make_harness):
    changes: list[bool] = []
    harness = make_harness(on_change=lambda: _record(changes, harness))
    harness.publish(random_linear_model(seed=1))
    corrupt = harness.publish(GARBAGE)
    harness.publish(wrong_input_name_model())
    harness.publish(random_linear_model(seed=4), name="other")

    async def scenario():
        await harness.reloader.reload()
        assert harness.served() == [1], "the newest loadable version serves"
        assert harness.served("other") == [1]
        failures = harness.registry.load_failures
        assert set(failures) == {(MODEL, 2), (MODEL, 3)}
        assert "INVALID_PROTOBUF" in failures[(MODEL, 2)]
        assert "ContractViolation" in failures[(MODEL, 3)] and "images" in failures[(MODEL, 3)]
        attempts = len(harness.loads)
        assert attempts == 4
        for _ in range(3):
            await harness.reloader.reload()
        assert len(harness.loads) == attempts, "unchanged broken versions are not retried"
        assert harness.observer.failed == [MODEL, MODEL]

        # Replacing only version 2's file changes its fingerprint, so it is tried again, but
        # its card still describes the broken bytes: refused as not what was published.
        good = random_linear_model(seed=2)
        fixed = corrupt.path / "fixed.tmp"
        fixed.write_bytes(good)
        os.replace(fixed, corrupt.model_path)
        await harness.reloader.reload()
        assert harness.served() == [1]
        assert "differs from the card's" in harness.registry.load_failures[(MODEL, 2)]
        assert str(harness.repository) not in harness.registry.load_failures[(MODEL, 2)]
        # Fixing the card too (a republished version, as a person would) lets it load.
        card = corrupt.read_card()
        replace(card, model_file=ModelFileRecord.of(good)).write(corrupt.card_path)
        await harness.reloader.reload()
        assert harness.served() == [2]
        assert set(harness.registry.load_failures) == {(MODEL, 3)}
        assert harness.loads[attempts:] == [(MODEL, 2), (MODEL, 2)]

    run(scenario())
    assert changes, "health was told about the changes"
    assert changes[-1] is True


def test_a_version_with_a_broken_explanation_graph_waits_for_it_to_be_fixed(make_harness):
    harness = make_harness()
    harness.publish(random_linear_model(seed=1))
    weights = random_linear_weights(seed=2)
    explanation = linear_explanation_bytes(*weights)
    broken = publish_model(
        harness.repository, MODEL, linear_model_bytes(*weights), explanation=explanation
    )

    def replace_graph(graph: bytes) -> None:
        staged = broken.path / "graph.tmp"
        staged.write_bytes(graph)
        os.replace(staged, broken.explanation_path)

    replace_graph(explanation[:50])  # damaged after publishing: not what the card says

    async def scenario():
        await harness.reloader.reload()
        assert harness.served() == [1], "a version loads with its explanation graph or not"
        assert "explanation.onnx" in harness.registry.load_failures[(MODEL, 2)]
        attempts = len(harness.loads)
        await harness.reloader.reload()
        assert len(harness.loads) == attempts
        # The explanation graph is part of the version's fingerprint: fixing it retries.
        replace_graph(explanation)
        await harness.reloader.reload()
        assert harness.served() == [2]
        assert harness.registry.resolve(MODEL).explanation is not None

    run(scenario())


async def _record(changes: list[bool], harness: Harness) -> None:
    changes.append(harness.registry.is_ready())


def test_a_deleted_version_is_unloaded_only_after_its_requests_finish(make_harness):
    harness = make_harness(keep_versions=2)
    first = harness.publish(random_linear_model(seed=1))
    harness.publish(random_linear_model(seed=2))
    images = np.zeros((3, 28, 28), np.uint8)

    async def scenario():
        await harness.reloader.reload()
        assert harness.served() == [1, 2]
        in_use = harness.registry.resolve(MODEL, "1")
        in_use.request_started()
        shutil.rmtree(first.path)
        await harness.reloader.reload()
        assert harness.served() == [2]
        with pytest.raises(ModelNotFound):
            harness.registry.resolve(MODEL, "1")
        await asyncio.sleep(0.05)
        assert harness.observer.unloaded == []
        probability, digit = await in_use.batcher.infer(images)
        assert len(probability) == len(digit) == 3, "the leaving version still answers"
        another_waiter = asyncio.create_task(in_use.wait_idle())
        await settle()
        assert not another_waiter.done()
        in_use.request_finished()
        await settle()
        assert another_waiter.done(), "every waiter wakes"
        assert [version for _, version, _, _ in harness.observer.unloaded] == ["1"]
        # A request that resolved the version just before it left still gets an answer.
        late = await DataPlane(harness.registry, 64).infer(in_use, images)
        assert late.model_version == "1" and late.digit.tolist() == digit.tolist()

    run(scenario())


def test_trigger_scans_at_once_with_polling_off(make_harness):
    harness = make_harness(poll_interval=0.0)
    harness.publish(random_linear_model(seed=1))

    async def scenario():
        await harness.reloader.start()
        assert harness.served() == [1]
        harness.publish(random_linear_model(seed=2))
        await asyncio.sleep(0.5)
        assert harness.served() == [1], "no polling: nothing happens without a trigger"
        harness.reloader.trigger()
        seconds = await eventually(lambda: harness.served() == [2], timeout=5.0)
        await harness.reloader.stop()
        return seconds

    assert run(scenario()) < 1.0


def test_polling_finds_new_and_removed_models_and_health_follows(make_harness):
    readiness: list[bool] = []
    harness = make_harness(poll_interval=0.05, on_change=lambda: _record(readiness, harness))

    async def scenario():
        await harness.reloader.start()
        assert not harness.registry.is_ready(), "an empty repository: live but not ready"
        published = harness.publish(random_linear_model(seed=1))
        await eventually(harness.registry.is_ready, timeout=5.0)
        assert harness.reloader.known_models == [MODEL]
        shutil.rmtree(published.path.parent)
        await eventually(lambda: not harness.registry.is_ready(), timeout=5.0)
        assert harness.reloader.known_models == [MODEL], "still known, so NOT_SERVING"
        await harness.reloader.stop()

    run(scenario())
    assert readiness[-2:] == [True, False]


def test_odd_entries_and_a_missing_repository_never_stop_serving(make_harness):
    harness = make_harness()
    harness.publish(random_linear_model(seed=1))
    model_dir = harness.repository / MODEL
    (model_dir / ".staging-abc").mkdir()
    (model_dir / "01").mkdir()
    (model_dir / "latest").mkdir()
    (model_dir / "5").write_text("a file, not a version directory")
    (model_dir / "7").mkdir()  # a version directory without model.onnx
    (harness.repository / "stray-file").write_text("not a model")

    async def scenario():
        await harness.reloader.reload()
        assert harness.served() == [1]
        assert set(harness.registry.load_failures) == {(MODEL, 7)}
        moved = harness.repository.with_name("moved-away")
        harness.repository.rename(moved)
        await harness.reloader.reload()
        assert harness.served() == [1], "a vanished repository keeps what was loaded"
        moved.rename(harness.repository)
        (model_dir / "7" / MODEL_FILE).write_bytes(random_linear_model(seed=7))
        await harness.reloader.reload()
        assert harness.served() == [1], "a model.onnx without a card is not served"
        model = (model_dir / "7" / MODEL_FILE).read_bytes()
        ModelCard(version=7, model_file=ModelFileRecord.of(model)).write(
            model_dir / "7" / CARD_FILE
        )
        await harness.reloader.reload()
        assert harness.served() == [7]

    run(scenario())


# The real server under load.


@dataclass(frozen=True)
class Outcome:
    client: str
    started: float
    finished: float
    version: str | None
    error: str | None


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(255 - image).resize((56, 56)).save(buffer, "PNG")
    return buffer.getvalue()


def _drive(
    client_name: str,
    target: str,
    images: np.ndarray,
    stop: threading.Event,
    outcomes: list[Outcome],
    version: str = "",
) -> None:
    """Sends requests back to back until `stop`; records what answered each one."""
    pngs = [_png(image) for image in images[:2]]
    with Mnist37Client(target, timeout=20) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                if client_name.startswith("classify"):
                    sent = pngs if client_name == "classify-png" else list(images)
                    predictions = client.classify(sent, model_version=version)
                    answered = {prediction.model_version for prediction in predictions}
                    assert len(answered) == 1 and len(predictions) == len(sent)
                    answered_version = answered.pop()
                else:
                    request = infer_request(images, version=version)
                    answered_version = client.inference.ModelInfer(
                        request, timeout=20
                    ).model_version
                outcomes.append(
                    Outcome(client_name, started, time.monotonic(), answered_version, None)
                )
            except grpc.RpcError as error:
                outcomes.append(
                    Outcome(client_name, started, time.monotonic(), None, error.code().name)
                )
                time.sleep(0.02)


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)
    return time.monotonic()


def _first_answer(outcomes: list[Outcome], version: str) -> float | None:
    finished = [o.finished for o in list(outcomes) if o.version == version]
    return min(finished) if finished else None


def test_hot_reload_under_load_fails_no_request(tmp_path, test_digits):
    poll_interval = 0.2
    images, labels = test_digits
    good = mean_difference_model(images, labels)
    repository = tmp_path / "repository"
    first = publish_model(repository, MODEL, good)
    metrics_port = free_port()
    server = start_server(
        repository,
        tmp_path,
        "--poll-interval",
        str(poll_interval),
        "--keep-versions",
        "2",
        "--metrics-port",
        str(metrics_port),
    )
    stop = threading.Event()
    outcomes: list[Outcome] = []
    pinned: list[Outcome] = []
    batch = images[:8]
    drivers = [
        threading.Thread(target=_drive, args=(name, server.target, batch, stop, outcomes))
        for name in ("classify", "classify-png", "infer", "infer-2")
    ]
    drivers.append(
        threading.Thread(
            target=_drive, args=("infer-pinned", server.target, batch, stop, pinned, "1")
        )
    )
    try:
        for driver in drivers:
            driver.start()
        _wait_until(
            lambda: (
                {o.client for o in list(outcomes)}
                == {"classify", "classify-png", "infer", "infer-2"}
            ),
            30,
            "every client's first answer",
        )

        published_2 = time.monotonic()
        publish_model(repository, MODEL, good)
        _wait_until(lambda: _first_answer(outcomes, "2") is not None, 10, "version 2")
        to_version_2 = _first_answer(outcomes, "2") - published_2

        deleted_1 = time.monotonic()
        shutil.rmtree(first.path)
        _wait_until(
            lambda: any(o.error == "NOT_FOUND" for o in list(pinned)), 10, "version 1 to go"
        )

        publish_model(repository, MODEL, GARBAGE)  # version 3
        publish_model(repository, MODEL, wrong_input_name_model())  # version 4
        time.sleep(8 * poll_interval)
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for version in ("3", "4"):
                assert not stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version=version)).ready
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest())
            reasons = {m.version: (m.state, m.reason) for m in index.models}
        assert reasons["2"] == ("READY", "")
        assert reasons["3"][0] == "UNAVAILABLE" and "INVALID_PROTOBUF" in reasons["3"][1]
        assert reasons["4"][0] == "UNAVAILABLE" and "ContractViolation" in reasons["4"][1]

        published_5 = time.monotonic()
        publish_model(repository, MODEL, good)
        _wait_until(lambda: _first_answer(outcomes, "5") is not None, 10, "version 5")
        to_version_5 = _first_answer(outcomes, "5") - published_5
        time.sleep(0.5)
    finally:
        stop.set()
        for driver in drivers:
            driver.join(timeout=30)

    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL))
            ready_5 = stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version="5")).ready
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=MODEL)
            )
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    finally:
        exit_code = server.terminate()
    log = server.log()

    failed = [o for o in outcomes if o.error is not None]
    assert failed == [], f"{len(failed)} of {len(outcomes)} requests failed: {failed[:5]}"
    answered = {o.version for o in outcomes}
    assert answered <= {"1", "2", "5"}, answered
    for client in ("classify", "classify-png", "infer", "infer-2"):
        assert {"1", "2", "5"} <= {o.version for o in outcomes if o.client == client}, client
    first_5 = _first_answer(outcomes, "5")
    after_switch = [o.version for o in outcomes if o.started > first_5]
    assert after_switch and set(after_switch) == {"5"}, "traffic stays on the newest version"
    first_2 = _first_answer(outcomes, "2")
    between = [o.version for o in outcomes if first_2 < o.started and o.finished < published_5]
    assert between and set(between) == {"2"}, "broken versions 3 and 4 never took traffic"
    assert to_version_2 < 10 * poll_interval and to_version_5 < 10 * poll_interval

    assert {o.version for o in pinned if o.error is None} == {"1"}
    assert {o.error for o in pinned if o.error is not None} == {"NOT_FOUND"}
    gone = min(o.finished for o in pinned if o.error is not None)
    assert all(o.error == "NOT_FOUND" for o in pinned if o.started > gone)
    assert all(o.version == "1" for o in pinned if o.finished < deleted_1)

    assert list(metadata.versions) == ["2", "5"] and ready_5
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert re.search(r'mnist37_model_load_total\{model="mnist37",result="failure"\} 2\.0', metrics)
    assert re.search(r'mnist37_model_load_total\{model="mnist37",result="success"\} 3\.0', metrics)
    for version in (3, 4):
        assert len(re.findall(f"model mnist37 version {version} failed to load", log)) == 1
    assert "unloaded model mnist37 version 1" in log
    assert exit_code == 0
    print(
        f"\n{len(outcomes)} requests, 0 failed; publish -> first answer from the new version: "
        f"v2 {to_version_2 * 1000:.0f} ms, v5 {to_version_5 * 1000:.0f} ms "
        f"(poll interval {poll_interval * 1000:.0f} ms)"
    )


def test_sighup_reloads_at_once_with_polling_off_and_an_empty_start(tmp_path):
    repository = tmp_path / "repository"
    repository.mkdir()
    server = start_server(repository, tmp_path, "--poll-interval", "0", wait=False)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            _wait_until(lambda: _live(stub), 60, "the server to be live")
            assert not stub.ServerReady(pb.ServerReadyRequest()).ready
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            assert health.Check(health_pb2.HealthCheckRequest()).status == not_serving

            publish_model(repository, MODEL, random_linear_model(seed=1))
            time.sleep(1.0)
            assert not stub.ServerReady(pb.ServerReadyRequest()).ready, "polling is off"
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGHUP)
            ready = _wait_until(
                lambda: stub.ServerReady(pb.ServerReadyRequest()).ready, 10, "SIGHUP's reload"
            )
            serving = health_pb2.HealthCheckResponse.SERVING
            assert health.Check(health_pb2.HealthCheckRequest()).status == serving
            assert health.Check(health_pb2.HealthCheckRequest(service=MODEL)).status == serving
            response = stub.ModelInfer(infer_request(np.zeros((1, 28, 28), np.uint8)))
            assert response.model_version == "1"
    finally:
        exit_code = server.terminate()
    assert exit_code == 0
    assert ready - signalled < 2.0
    assert "SIGHUP received" in server.log()
    print(f"\nSIGHUP -> ready in {(ready - signalled) * 1000:.0f} ms")


def _live(stub: pb_grpc.GRPCInferenceServiceStub) -> bool:
    try:
        return stub.ServerLive(pb.ServerLiveRequest(), timeout=1).live
    except grpc.RpcError:
        return False

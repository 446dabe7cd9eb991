"""The real server as a subprocess, driven by the generated stubs, tritonclient, health
checking and reflection."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import REPO_ROOT, infer_request
from PIL import Image

from serving.codecs import decode_infer_response
from serving.config import ServerConfig
from serving.generated.inference import grpc_service_pb2 as pb
from serving.generated.mnist37.v1 import classifier_pb2, classifier_pb2_grpc
from serving.healthcheck import LIVENESS_SERVICE
from serving.launcher import start_server
from serving.repository import latest_version
from serving.runtime import ModelRuntime

MAX_IMAGES = ServerConfig().max_request_images  # the default --max-request-images


@pytest.fixture(scope="module")
def offline(model_repository):
    """onnxruntime directly on the newest mnist37 version: the reference answers."""
    return ModelRuntime(latest_version(model_repository, "mnist37").model_path)


@pytest.fixture
def classifier(channel):
    return classifier_pb2_grpc.ClassifierStub(channel)


def test_liveness_readiness_and_metadata(oip):
    assert oip.ServerLive(pb.ServerLiveRequest()).live
    assert oip.ServerReady(pb.ServerReadyRequest()).ready
    assert oip.ModelReady(pb.ModelReadyRequest(name="mnist37")).ready
    assert oip.ModelReady(pb.ModelReadyRequest(name="mnist37", version="2")).ready
    assert not oip.ModelReady(pb.ModelReadyRequest(name="mnist37", version="1")).ready
    assert not oip.ModelReady(pb.ModelReadyRequest(name="nope")).ready
    server = oip.ServerMetadata(pb.ServerMetadataRequest())
    assert server.name == "mnist37" and "statistics" in server.extensions
    metadata = oip.ModelMetadata(pb.ModelMetadataRequest(name="mnist37"))
    assert metadata.versions == ["2"] and metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("images", "UINT8", [-1, 28, 28])
    ]
    assert [(t.name, t.datatype) for t in metadata.outputs] == [
        ("probability", "FP32"),
        ("digit", "INT64"),
    ]


def test_model_config_reports_batching_and_the_real_provider(oip):
    config = oip.ModelConfig(pb.ModelConfigRequest(name="mnist37")).config
    assert config.max_batch_size == MAX_IMAGES
    assert list(config.input[0].dims) == [28, 28]
    assert config.parameters["execution_provider"].string_value == "CPUExecutionProvider"
    assert config.parameters["architecture"].string_value == "linear"  # the model card's
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.preferred_batch_size == [64]


def test_repository_index_shows_what_is_loaded(oip):
    index = oip.RepositoryIndex(pb.RepositoryIndexRequest())
    states = {(m.name, m.version): m.state for m in index.models}
    assert states == {
        ("mnist37", "1"): "UNAVAILABLE",
        ("mnist37", "2"): "READY",
        ("other", "1"): "READY",
    }
    ready = oip.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert {(m.name, m.version) for m in ready.models} == {("mnist37", "2"), ("other", "1")}


def test_infer_raw_and_typed_match_offline_and_echo_the_id(oip, test_digits, offline):
    images = test_digits[0][:37]
    probability, digit = offline.predict(images)
    for raw in (True, False):
        request = infer_request(images, raw=raw)
        request.id = f"request-{raw}"
        response = oip.ModelInfer(request)
        assert response.id == f"request-{raw}"
        assert (response.model_name, response.model_version) == ("mnist37", "2")
        assert bool(response.raw_output_contents) == raw
        outputs = decode_infer_response(response)
        np.testing.assert_array_equal(outputs["digit"], digit)
        np.testing.assert_allclose(outputs["probability"], probability, rtol=1e-6)


def test_only_the_requested_outputs_come_back(oip, test_digits):
    request = infer_request(test_digits[0][:3])
    request.outputs.add(name="digit")
    response = oip.ModelInfer(request)
    assert [output.name for output in response.outputs] == ["digit"]
    assert len(response.raw_output_contents) == 1


def test_explicit_versions_and_models(oip, test_digits):
    images = test_digits[0][:5]
    assert oip.ModelInfer(infer_request(images, version="2")).model_version == "2"
    other = oip.ModelInfer(infer_request(images, model="other"))
    assert (other.model_name, other.model_version) == ("other", "1")


def test_classify_pixels_and_pngs(classifier, test_digits, offline):
    images = test_digits[0][:4]
    request = classifier_pb2.ClassifyRequest()
    for image in images[:2]:
        request.images.add(pixels=image.tobytes())
    for image in images[2:]:
        buffer = io.BytesIO()
        Image.fromarray(255 - image).resize((112, 112)).convert("RGB").save(buffer, "PNG")
        request.images.add(png=buffer.getvalue())
    response = classifier.Classify(request)
    digits = [prediction.digit for prediction in response.predictions]
    assert digits[:2] == offline.predict(images[:2])[1].tolist()
    assert {(p.model_name, p.model_version) for p in response.predictions} == {("mnist37", "2")}
    assert all(0.0 <= p.probability_seven <= 1.0 for p in response.predictions)
    assert all(d in (3, 7) for d in digits)


def test_accuracy_through_the_server_equals_offline(oip, classifier, test_digits, offline):
    images, labels = test_digits
    offline_accuracy = float((offline.predict(images)[1] == labels).mean())
    served = np.concatenate(
        [
            decode_infer_response(oip.ModelInfer(infer_request(images[start : start + 500])))[
                "digit"
            ]
            for start in range(0, len(images), 500)
        ]
    )
    assert float((served == labels).mean()) == offline_accuracy
    classified = []
    for start in range(0, len(images), 500):
        request = classifier_pb2.ClassifyRequest()
        for image in images[start : start + 500]:
            request.images.add(pixels=image.tobytes())
        classified += [p.digit for p in classifier.Classify(request).predictions]
    classified = np.array(classified)
    assert float((classified == labels).mean()) == offline_accuracy
    assert offline_accuracy > 0.9


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


def test_every_error_kind_then_a_good_request_is_still_served(oip, classifier, test_digits):
    images = test_digits[0][:2]
    not_found = grpc.StatusCode.NOT_FOUND
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: oip.ModelInfer(infer_request(images, model="nope")))[0] == not_found
    assert _code(lambda: oip.ModelInfer(infer_request(images, version="9")))[0] == not_found
    assert _code(lambda: oip.ModelInfer(infer_request(images, version="x")))[0] == not_found
    # Only the repository's version names ([1-9][0-9]*) resolve: no other digits, no "02".
    for version in ["\u00b2", "\u0662", "02", "+2", " 2"]:
        code, details = _code(lambda v=version: oip.ModelInfer(infer_request(images, version=v)))
        assert code == not_found and f"no loaded version {version!r}" in details, details
        ready = oip.ModelReady(pb.ModelReadyRequest(name="mnist37", version=version))
        assert not ready.ready
    assert _code(lambda: oip.ModelMetadata(pb.ModelMetadataRequest(name="nope")))[0] == not_found
    assert _code(lambda: oip.ModelConfig(pb.ModelConfigRequest(name="nope")))[0] == not_found

    def broken(mutate):
        request = infer_request(images)
        mutate(request)
        return _code(lambda: oip.ModelInfer(request))

    cases = {
        "inputs[0].name": lambda r: setattr(r.inputs[0], "name", "x"),
        "inputs[0].datatype": lambda r: setattr(r.inputs[0], "datatype", "FP32"),
        "inputs[0].shape": lambda r: r.inputs[0].shape.append(1),
        "raw_input_contents[0]": lambda r: r.raw_input_contents.__setitem__(0, b"abc"),
        "not both": lambda r: r.inputs[0].contents.uint_contents.append(1),
        "outputs[0].name": lambda r: r.outputs.add(name="logit"),
        "outputs[1].name": lambda r: [r.outputs.add(name="digit") for _ in range(2)],
    }
    for field, mutate in cases.items():
        code, details = broken(mutate)
        assert code == invalid and field in details, (field, details)
    too_many = np.zeros((MAX_IMAGES + 1, 28, 28), np.uint8)
    code, details = _code(lambda: oip.ModelInfer(infer_request(too_many)))
    assert code == invalid and "--max-request-images" in details
    typed = infer_request(images, raw=False)
    typed.inputs[0].contents.uint_contents.append(0)
    code, details = _code(lambda: oip.ModelInfer(typed))
    assert code == invalid and "uint_contents" in details

    bad_png = classifier_pb2.ClassifyRequest()
    bad_png.images.add(pixels=images[0].tobytes())
    bad_png.images.add(png=b"\x89PNG\r\n\x1a\nnot really")
    code, details = _code(lambda: classifier.Classify(bad_png))
    assert code == invalid and "images[1]" in details
    short = classifier_pb2.ClassifyRequest()
    short.images.add(pixels=b"\x00" * 10)
    assert _code(lambda: classifier.Classify(short))[0] == invalid
    too_many_pixels = classifier_pb2.ClassifyRequest(
        images=[classifier_pb2.Image(pixels=images[0].tobytes())] * (MAX_IMAGES + 1)
    )
    code, details = _code(lambda: classifier.Classify(too_many_pixels))
    assert code == invalid and details.startswith(
        f"images: {MAX_IMAGES + 1} images exceed the limit of {MAX_IMAGES}"
    )
    unknown = classifier_pb2.ClassifyRequest(model_name="nope")
    assert _code(lambda: classifier.Classify(unknown))[0] == not_found

    assert oip.ModelInfer(infer_request(images)).model_version == "2"
    assert (
        len(
            classifier.Classify(
                classifier_pb2.ClassifyRequest(
                    images=[classifier_pb2.Image(pixels=images[0].tobytes())]
                )
            ).predictions
        )
        == 1
    )


def test_rpcs_not_implemented_answer_unimplemented(channel):
    load = channel.unary_unary("/inference.GRPCInferenceService/RepositoryModelLoad")
    code, _ = _code(lambda: load(b""))
    assert code == grpc.StatusCode.UNIMPLEMENTED


def test_statistics_count_real_requests(oip, test_digits):
    def stats():
        reply = oip.ModelStatistics(pb.ModelStatisticsRequest(name="mnist37", version="2"))
        return reply.model_stats[0]

    before = stats()
    for _ in range(3):
        oip.ModelInfer(infer_request(test_digits[0][:10]))
    after = stats()
    assert after.inference_count - before.inference_count == 30
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.inference_stats.queue.count - before.inference_stats.queue.count == 3
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert after.execution_count > before.execution_count
    assert after.last_inference >= before.last_inference > 0
    everything = oip.ModelStatistics(pb.ModelStatisticsRequest())
    assert {(s.name, s.version) for s in everything.model_stats} == {
        ("mnist37", "2"),
        ("other", "1"),
    }
    assert _code(lambda: oip.ModelStatistics(pb.ModelStatisticsRequest(name="nope")))[0] == (
        grpc.StatusCode.NOT_FOUND
    )


def test_a_split_request_counts_once_in_the_request_statistics(oip, test_digits):
    """200 images with --max-batch-size 64 run as chunks of 64, 64, 64 and 8: four
    executions, but one request in success, queue and compute_*."""

    def stats():
        reply = oip.ModelStatistics(pb.ModelStatisticsRequest(name="mnist37", version="2"))
        return reply.model_stats[0]

    before = stats()
    oip.ModelInfer(infer_request(test_digits[0][:200]))
    after = stats()
    requests = {
        kind: getattr(after.inference_stats, kind).count
        - getattr(before.inference_stats, kind).count
        for kind in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
    }
    assert requests == {
        "success": 1,
        "fail": 0,
        "queue": 1,
        "compute_input": 1,
        "compute_infer": 1,
        "compute_output": 1,
    }
    assert after.execution_count - before.execution_count == 4
    assert after.inference_count - before.inference_count == 200
    executions = {batch.batch_size: batch.compute_infer.count for batch in after.batch_stats}
    executions_before = {b.batch_size: b.compute_infer.count for b in before.batch_stats}
    added = {size: count - executions_before.get(size, 0) for size, count in executions.items()}
    assert {size: count for size, count in added.items() if count} == {64: 3, 8: 1}
    # the one request's compute time is its four executions' time, summed
    infer_ns = after.inference_stats.compute_infer.ns - before.inference_stats.compute_infer.ns
    batch_infer_ns = sum(b.compute_infer.ns for b in after.batch_stats) - sum(
        b.compute_infer.ns for b in before.batch_stats
    )
    assert infer_ns == batch_infer_ns > 0


def test_health_overall_per_service_and_per_model(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in (
        "",
        "inference.GRPCInferenceService",
        "mnist37.v1.Classifier",
        "mnist37",
        "other",
        LIVENESS_SERVICE,
    ):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == serving
    code, _ = _code(lambda: stub.Check(health_pb2.HealthCheckRequest(service="nope")))
    assert code == grpc.StatusCode.NOT_FOUND


def test_liveness_is_serving_without_a_model_until_the_drain(tmp_path):
    """An empty repository: not ready ("" NOT_SERVING) but live (`liveness` SERVING), so
    Kubernetes' livenessProbe leaves the pod alone; the SIGTERM drain ends liveness too."""
    repository = tmp_path / "empty"
    repository.mkdir()
    server = start_server(repository, tmp_path, "--drain-quiet-period", "1", wait=False)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def status(service):
                request = health_pb2.HealthCheckRequest(service=service)
                return stub.Check(request, timeout=5).status

            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                assert server.process.poll() is None, server.log()
                try:
                    if status(LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            assert status(LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING
            assert status("") == not_serving
            assert status("inference.GRPCInferenceService") == not_serving
            # The container probe's own command agrees with both.
            for service, expected in ((LIVENESS_SERVICE, 0), ("", 1)):
                command = ["-m", "serving.healthcheck", "--address", server.target]
                checked = subprocess.run(
                    [sys.executable, *command, "--service", service],
                    cwd=REPO_ROOT,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert checked.returncode == expected, (service, checked.stdout)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            server.process.send_signal(signal.SIGTERM)
            assert next(watch).status == not_serving
    finally:
        server.terminate()
    assert server.process.returncode == 0, server.log()
    assert "live but not ready" in server.log()


def test_reflection_lists_and_describes_the_services(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(
        stub.ServerReflectionInfo(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="mnist37.v1.Classifier"
                    ),
                ]
            )
        )
    )
    names = {service.name for service in replies[0].list_services_response.service}
    assert {
        "inference.GRPCInferenceService",
        "mnist37.v1.Classifier",
        "grpc.health.v1.Health",
    } <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto


_TRITON_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton
images = np.load(sys.argv[2])
client = triton.InferenceServerClient(sys.argv[1])
assert client.is_server_live() and client.is_server_ready()
assert client.is_model_ready("mnist37")
metadata = client.get_model_metadata("mnist37", as_json=True)
config = client.get_model_config("mnist37", as_json=True)
tensor = triton.InferInput("images", list(images.shape), "UINT8")
tensor.set_data_from_numpy(images)
result = client.infer("mnist37", [tensor], request_id="triton-1",
                      outputs=[triton.InferRequestedOutput("probability"),
                               triton.InferRequestedOutput("digit")])
only_digit = client.infer("mnist37", [tensor], outputs=[triton.InferRequestedOutput("digit")])
try:
    client.infer("mnist37", [tensor], outputs=[triton.InferRequestedOutput("digit", class_count=2)])
    top_classes = "answered"
except triton.InferenceServerException as error:
    top_classes = f"{error.status()} {error.message()}"
statistics = client.get_inference_statistics("mnist37", as_json=True)
print(json.dumps({
    "id": result.get_response().id,
    "probability": result.as_numpy("probability").tolist(),
    "digit": result.as_numpy("digit").tolist(),
    "only_digit_outputs": [o.name for o in only_digit.get_response().outputs],
    "top_classes": top_classes,
    "metadata_inputs": metadata["inputs"],
    "max_batch_size": config["config"]["max_batch_size"],
    "statistics_models": [s["name"] for s in statistics["model_stats"]],
}))
"""


def test_tritonclient_works_unchanged(server, test_digits, offline, tmp_path):
    images = test_digits[0][:9]
    np.save(tmp_path / "images.npy", images)
    completed = subprocess.run(
        [sys.executable, "-c", _TRITON_CLIENT, server.target, str(tmp_path / "images.npy")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    probability, digit = offline.predict(images)
    assert result["id"] == "triton-1"
    assert result["digit"] == digit.tolist()
    np.testing.assert_allclose(result["probability"], probability, rtol=1e-6)
    assert result["only_digit_outputs"] == ["digit"]
    assert result["top_classes"] == (
        "StatusCode.INVALID_ARGUMENT outputs[0].parameters: 'classification' is not supported"
    )
    assert result["metadata_inputs"][0]["datatype"] == "UINT8"
    assert result["max_batch_size"] == MAX_IMAGES
    assert result["statistics_models"] == ["mnist37"]


def test_sigterm_drains_every_accepted_request_and_exits_0(model_repository, tmp_path):
    # Queue bounds high enough for the whole burst: this is about the drain, not admission.
    server = start_server(
        model_repository,
        tmp_path,
        "--max-batch-size",
        "64",
        "--max-queued-images",
        "100000",
        "--max-queued-requests",
        "2000",
    )
    images = np.random.default_rng(1).integers(0, 256, (1000, 28, 28), dtype=np.uint8)
    with grpc.insecure_channel(server.target) as channel:
        from serving.generated.inference import grpc_service_pb2_grpc

        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(infer_request(images[:1]))  # connected
        pending = [stub.ModelInfer.future(infer_request(images), timeout=60) for _ in range(24)]
        time.sleep(0.03)
        server.process.send_signal(signal.SIGTERM)
        results = [future.result() for future in pending]
        assert all(len(result.raw_output_contents[1]) == 1000 * 8 for result in results)
    assert server.process.wait(timeout=60) == 0
    log = server.log()
    assert "SIGTERM received" in log and "stopped" in log


@pytest.mark.parametrize("repository", ["with a model", "empty"])
def test_cuda_device_without_cuda_refuses_to_start(model_repository, tmp_path, repository):
    from serving.runtime import cuda_usable

    if repository == "empty":
        model_repository = tmp_path / "empty"
        model_repository.mkdir()

    if cuda_usable():  # a GPU machine: the same flag must start on CUDA and say so
        if repository == "empty":
            return  # nothing to load, nothing to check the provider of
        server = start_server(model_repository, tmp_path, "--device", "cuda")
        with grpc.insecure_channel(server.target) as channel:
            from serving.generated.inference import grpc_service_pb2_grpc

            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            config = stub.ModelConfig(pb.ModelConfigRequest(name="mnist37")).config
        assert config.parameters["execution_provider"].string_value == "CUDAExecutionProvider"
        assert server.terminate() == 0
        return
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.server",
            "--repository",
            str(model_repository),
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            "--device",
            "cuda",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert completed.returncode == 1
    assert "refusing to start" in completed.stderr and "onnxruntime-gpu" in completed.stderr


def test_missing_repository_refuses_to_start(tmp_path):
    server = start_server(tmp_path / "missing", tmp_path, wait=False)
    assert server.process.wait(timeout=60) == 1
    assert "is not a directory" in server.log()

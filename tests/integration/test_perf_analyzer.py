"""perf_analyzer (the C++ load generator bundled with tritonclient) runs against the server."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
from helpers import infer_request

from serving.bench import perf_analyzer_command
from serving.bench.loadgen import ANY_WINDOWS
from serving.generated.inference import grpc_service_pb2 as pb
from serving.generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving.perf_analyzer import (
    PerfAnalyzerUnavailable,
    check_libraries,
    find_perf_analyzer,
    missing_libraries,
    perf_analyzer_env,
)


def test_perf_analyzer_measures_batched_load_and_statistics_rise(server, tmp_path):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelStatisticsRequest(name="mnist37", version="2")
        before = stub.ModelStatistics(request).model_stats[0]
        csv = tmp_path / "perf.csv"
        # A test of function, not speed: any three windows do (on a busy machine no three
        # agreed within perf_analyzer's 60% once, and it exits 2).
        command, env = perf_analyzer_command(
            server.target,
            concurrency=4,
            batch_size=8,
            csv=csv,
            measurement_ms=500,
            stability_percent=ANY_WINDOWS,
        )
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert completed.returncode == 0, completed.stdout + completed.stderr
        assert "Throughput:" in completed.stdout
        rows = csv.read_text().splitlines()
        assert rows[0].startswith("Concurrency,Inferences/Second")
        concurrency, throughput = rows[1].split(",")[:2]
        assert concurrency == "4" and float(throughput) > 100
        after = stub.ModelStatistics(request).model_stats[0]
        assert after.inference_stats.queue.count > before.inference_stats.queue.count
        assert after.inference_count - before.inference_count >= 8 * 100
        # The server is still healthy after the load.
        reply = stub.ModelInfer(infer_request(np.zeros((1, 28, 28), np.uint8)))
        assert reply.model_version == "2"


@pytest.mark.parametrize("protocol", ["http", "http-json"])
@pytest.mark.parametrize("batch_size", [1, 64])
def test_perf_analyzer_over_http(server, tmp_path, protocol, batch_size):
    """perf_analyzer's HTTP client (binary or JSON tensors) reads the model config and the
    statistics as JSON and gets every answer it asks for."""
    csv = tmp_path / "perf.csv"
    command, env = perf_analyzer_command(
        server.http_address,
        4,
        batch_size,
        csv=csv,
        measurement_ms=300,
        protocol=protocol,
        stability_percent=ANY_WINDOWS,
    )
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Throughput:" in completed.stdout and "Server:" in completed.stdout
    concurrency, throughput = csv.read_text().splitlines()[1].split(",")[:2]
    assert concurrency == "4" and float(throughput) > 0


def test_mnist37_perf_analyzer_passes_its_arguments_to_perf_analyzer(server):
    """The console script (`python -m serving.perf_analyzer`, its module) finds the bundled
    binary and its libraries itself: no LD_LIBRARY_PATH from the caller."""
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    command = [sys.executable, "-m", "serving.perf_analyzer", "-m", "mnist37", "-i", "grpc"]
    command += ["-u", server.target, "-b", "2", "--concurrency-range", "2:2", "-p", "300"]
    # Any windows count as stable: this checks the wiring, not the figures.
    completed = subprocess.run(
        [*command, "--max-trials", "3", "-s", str(ANY_WINDOWS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Concurrency: 2, throughput:" in completed.stdout


def test_what_is_missing_is_named_with_what_to_install():
    with pytest.raises(PerfAnalyzerUnavailable, match=r"pip install -e '\.\[dev\]'"):
        find_perf_analyzer("no-such-distribution")
    binary = find_perf_analyzer()
    assert binary.name == "perf_analyzer" and os.access(binary, os.X_OK)
    assert missing_libraries(binary, perf_analyzer_env()) == []
    # Without the pip package's directory, the loader finds no libcudart.so.12: CUDA is
    # not installed system-wide on the machines these tests run on.
    bare = {"PATH": os.environ["PATH"], "LD_LIBRARY_PATH": ""}
    hint = r"libcudart\.so\.12: pip install nvidia-cuda-runtime-cu12"
    with pytest.raises(PerfAnalyzerUnavailable, match=hint):
        check_libraries(binary, bare)

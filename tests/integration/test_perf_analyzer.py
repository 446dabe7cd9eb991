"""perf_analyzer (the C++ load generator bundled with tritonclient) runs against the server."""

from __future__ import annotations

import subprocess

import grpc
import numpy as np
import pytest
from helpers import infer_request

from serving.bench import perf_analyzer_command
from serving.generated.inference import grpc_service_pb2 as pb
from serving.generated.inference import grpc_service_pb2_grpc as pb_grpc


def test_perf_analyzer_measures_batched_load_and_statistics_rise(server, tmp_path):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelStatisticsRequest(name="mnist37", version="2")
        before = stub.ModelStatistics(request).model_stats[0]
        csv = tmp_path / "perf.csv"
        command, env = perf_analyzer_command(
            server.target, concurrency=4, batch_size=8, csv=csv, measurement_ms=500
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
        server.http_address, 4, batch_size, csv=csv, measurement_ms=300, protocol=protocol
    )
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Throughput:" in completed.stdout and "Server:" in completed.stdout
    concurrency, throughput = csv.read_text().splitlines()[1].split(",")[:2]
    assert concurrency == "4" and float(throughput) > 0

"""The benchmark's smoke test: `python -m serving.bench --quick` starts its servers, measures
a few points in short windows and writes a well-formed report. Its speed is not checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO_ROOT
from PIL import Image

from serving.bench.plots import LATENCY_FILE, THROUGHPUT_FILE
from serving.bench.report import JSON_FILE, MARKDOWN_FILE

FIGURES = ("requests_per_s", "images_per_s", "p50_ms", "p90_ms", "p99_ms", "wall_s")
COSTS = ("server_cpu_s", "client_cpu_s", "server_peak_rss_mib", "server_cpu_us_per_request")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    completed = subprocess.run(
        [sys.executable, "-m", "serving.bench", "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr[-3000:]
    return out, completed


def test_quick_sweep_measures_every_point_of_its_plan(quick_run):
    out, _ = quick_run
    report = json.loads((out / JSON_FILE).read_text())
    points = report["points"]
    kinds = {point["server_kind"] for point in points}
    assert kinds == {"mnist37", "bare", "echo"}
    assert {point["protocol"] for point in points} == {"grpc", "http"}
    assert {point["generator"] for point in points} == {"perf_analyzer", "python 1ch"}
    for point in points:
        assert point["status"] == "ok", point
        for name in FIGURES + COSTS:
            assert point[name] > 0, (name, point)
        assert point["p50_ms"] <= point["p90_ms"] <= point["p99_ms"]
        assert point["images_per_s"] == pytest.approx(point["requests_per_s"] * point["batch"])
        assert point["ratios"]["onnxruntime"] > 0
    mnist37 = [point for point in points if point["server_kind"] == "mnist37"]
    # Each mnist37 point over gRPC with perf_analyzer has its references from the same run.
    assert any("echo" in point["ratios"] and "bare" in point["ratios"] for point in mnist37)
    assert report["meta"]["plan"] == "quick" and report["meta"]["points"] == len(points)


def test_quick_sweep_reports_references_memory_and_targets(quick_run):
    out, completed = quick_run
    report = json.loads((out / JSON_FILE).read_text())
    assert {entry["threading"] for entry in report["in_process"]} == {
        "single thread",
        "onnxruntime default",
    }
    assert all(entry["images_per_s"] > 0 for entry in report["in_process"])
    for server in report["servers"]:
        assert server["status"] == "ok"
        assert server["rss_after_warmup_mib"] > 0 and server["rss_at_end_mib"] > 0
        assert server["rss_growth"] > 0 and server["rss_drift"] > 0
    targets = {target["name"]: target for target in report["targets"]}
    assert len(targets) == 7
    # The quick plan has what these two need; the others say what they miss.
    assert targets["b1 c1 p50 vs echo"]["met"] in (True, False)
    assert targets["b1 c1 p50 vs echo"]["ratio"] > 0
    assert targets["RSS flat"]["met"] in (True, False)
    assert targets["b64 c4 vs bare"]["met"] is None
    assert "not in this sweep's plan" in targets["b64 c4 vs bare"]["detail"]
    markdown = (out / MARKDOWN_FILE).read_text()
    for heading in ("## Targets", "## Points", "## Memory", "## Plots"):
        assert heading in markdown
    for name in targets:
        assert f"| {name} |" in markdown
    assert "b1 c1 p50 vs echo:" in completed.stdout


def test_quick_sweep_draws_both_plots(quick_run):
    out, _ = quick_run
    for name in (THROUGHPUT_FILE, LATENCY_FILE):
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            width, height = image.size
            assert width > 300 and height > 200

"""The benchmark's plan, ratios and targets, from made-up figures (no server runs)."""

from __future__ import annotations

import pytest

from serving.bench import plan as plans
from serving.bench import sweep
from serving.bench.reference import InProcess
from serving.bench.report import (
    Figures,
    attach_memory_drift,
    attach_ratios,
    evaluate_targets,
    markdown,
)
from serving.bench.servers import NotStarted, _reason, mnist37_flags, server_has_flag


def point(kind, batch, concurrency, images_per_s, p50=1.0, p99=2.0, **where) -> dict:
    batching = where.get("batching", "on") if kind == "mnist37" else ""
    workers = where.get("workers", "1") if kind == "mnist37" else ""
    return {
        "server": f"{kind} {batching} {workers}",
        "server_kind": kind,
        "server_batching": batching,
        "server_workers": workers,
        "protocol": where.get("protocol", "grpc"),
        "generator": where.get("generator", "perf_analyzer"),
        "batch": batch,
        "concurrency": concurrency,
        "status": "ok",
        "requests_per_s": images_per_s / batch,
        "images_per_s": images_per_s,
        "p50_ms": p50,
        "p90_ms": p50,
        "p99_ms": p99,
        "server_rss_mib": 100.0,
        "server_peak_rss_mib": 110.0,
        "server_cpu_us_per_request": 500.0,
        "client_cpu_us_per_request": 300.0,
    }


IN_PROCESS = [
    InProcess("single thread", 1, 1000, 0.02),  # 50,000 images/s
    InProcess("onnxruntime default", 1, 1000, 0.01),  # 100,000: the best
    InProcess("single thread", 1024, 100, 0.1),  # 1,024,000
]


def test_ratios_use_the_same_batch_concurrency_and_generator():
    points = [
        point("mnist37", 1, 16, 2000.0, p50=0.6),
        point("bare", 1, 16, 1000.0, p50=0.5),
        point("echo", 1, 16, 4000.0, p50=0.3),
        point("echo", 1, 16, 8000.0, generator="python 8ch"),
    ]
    attach_ratios(points, IN_PROCESS)
    ratios = points[0]["ratios"]
    assert ratios["onnxruntime"] == pytest.approx(0.02)  # the faster threading
    assert ratios["bare"] == pytest.approx(2.0) and ratios["echo"] == pytest.approx(0.5)
    assert ratios["echo_p50"] == pytest.approx(2.0)
    assert "bare" not in points[1]["ratios"]  # not its own reference
    assert "bare" not in points[3]["ratios"]  # no bare point with the Python generator


def targets_by_name(points, servers=()) -> dict:
    servers = list(servers)
    attach_memory_drift(points, servers)
    return {target.name: target for target in evaluate_targets(points, servers, IN_PROCESS)}


def test_targets_met_and_not_met_with_their_ratios():
    points = [
        point("mnist37", 1, 16, 1400.0),
        point("bare", 1, 16, 1000.0),
        point("mnist37", 64, 4, 64 * 900.0),
        point("bare", 64, 4, 64 * 1000.0),
        point("mnist37", 1024, 1, 100_000.0),
        point("mnist37", 1024, 4, 200_000.0),
        point("mnist37", 1, 1, 1000.0, p50=0.5, p99=1.0),
        point("echo", 1, 1, 2000.0, p50=0.4),
        point("mnist37", 1, 1, 1000.0, p99=0.95, batching="off"),
        point("mnist37", 1, 64, 3000.0),
        point("mnist37", 1, 64, 1000.0, batching="off"),
    ]
    servers = [
        {
            "server": points[0]["server"],
            "server_kind": "mnist37",
            "status": "ok",
            "rss_after_warmup_mib": 100.0,
            "rss_at_end_mib": 112.0,
        }
    ]
    targets = targets_by_name(points, servers)
    assert targets["b1 c16 vs bare"].met is True
    assert targets["b1 c16 vs bare"].ratio == pytest.approx(1.4)
    assert targets["b64 c4 vs bare"].met is False
    assert targets["b64 c4 vs bare"].ratio == pytest.approx(0.9)
    # The best concurrency against the faster in-process threading at that batch.
    assert targets["b1024 vs onnxruntime"].ratio == pytest.approx(200_000 / 1_024_000)
    assert targets["b1024 vs onnxruntime"].met is True
    assert targets["b1 c1 p50 vs echo"].ratio == pytest.approx(1.25)
    assert targets["b1 c1 p50 vs echo"].met is True
    assert targets["dynamic batching"].met is True  # p99 x1.05: within the noise margin
    assert targets["dynamic batching"].ratio == pytest.approx(3.0)
    assert targets["RSS flat"].met is False and targets["RSS flat"].ratio == pytest.approx(1.12)
    assert "112.0 MiB at the end" in targets["RSS flat"].detail
    assert targets["b1 c16 workers auto"].met is None


def test_a_server_that_refuses_to_start_is_recorded_as_not_run(monkeypatch, tmp_path):
    """Its points say why; the targets that needed them are not evaluated and say why too."""
    refusal = "mnist37-serve: error: unrecognized arguments: --workers auto"

    def refuse(spec, repository, log_dir):
        raise NotStarted(refusal)

    monkeypatch.setattr(sweep, "start", refuse)
    run = plans.ServerRun(plans.WORKERS_AUTO, [plans.Load("grpc", "perf_analyzer", 1, 16)])
    steps = []
    settings = sweep.Settings(sweep.Window(), 0.1)
    points, servers = sweep.run_plan([run], tmp_path, tmp_path, settings, steps.append)
    assert points[0]["status"] == "not run" and points[0]["reason"] == refusal
    assert servers[0]["status"] == "not run" and servers[0]["server_workers"] == "auto"
    assert len(steps) == 2  # the start, then its one point
    ours = point("mnist37", 1, 16, 1000.0)
    targets = targets_by_name([ours, *points], servers)
    assert targets["b1 c16 workers auto"].met is None
    assert refusal in targets["b1 c16 workers auto"].detail
    report = {
        "meta": {
            "started": "now",
            "command": "python -m serving.bench",
            "plan": "default",
            "points": 2,
            "duration_s": 1.0,
            "cpus": 2,
            "load_average": "0",
            "python": "3.11",
            "onnxruntime": "1",
            "grpcio": "1",
        },
        "in_process": [],
        "points": [ours, *points],
        "servers": servers,
        "targets": [target.as_json() for target in targets.values()],
    }
    text = markdown(report)
    assert "## Not run or failed" in text and refusal in text


def test_the_reason_of_a_refused_start_is_its_error_line():
    log = "server exited 2:\nusage: mnist37-serve [-h] ...\nmnist37-serve: error: no such flag\n"
    assert _reason(log) == "mnist37-serve: error: no such flag"
    assert _reason("server exited 1:\nsomething else\n") == "something else"


def test_workers_flag_is_passed_only_where_it_means_something():
    one = mnist37_flags(plans.MNIST37, 9999)
    assert ("--workers" in one) == server_has_flag("--workers")
    assert one[-2:] == ["--workers", "1"] or "--workers" not in one
    auto = mnist37_flags(plans.WORKERS_AUTO, 9999)
    assert auto[-2:] == ["--workers", "auto"]  # a server without it must refuse, not ignore
    assert "--metrics-port" in one and one[one.index("--metrics-port") + 1] == "9999"


def test_plans_cover_the_grid_and_subsets_select():
    default = plans.default_plan()
    mnist37 = next(run for run in default if run.server == plans.MNIST37)
    grid = {
        (load.batch, load.concurrency)
        for load in mnist37.loads
        if load.protocol == "grpc" and load.generator == "perf_analyzer"
    }
    assert grid == {(b, c) for b in plans.BATCHES for c in plans.CONCURRENCIES}
    full = plans.full_plan()
    servers = {run.server for run in full}
    assert len([server for server in servers if server.kind == "mnist37"]) == 4
    chosen = plans.select(default, plans.Selection(kinds=("mnist37",), batches=(64,)))
    assert chosen and all(run.server.kind == "mnist37" for run in chosen)
    assert all(load.batch == 64 for run in chosen for load in run.loads)
    assert plans.select(default, plans.Selection(batches=(3,))) == []
    assert Figures([]).why_missing("mnist37", 1, 1) == "not in this sweep's plan"


def test_the_p50_target_falls_back_on_the_python_generator():
    points = [
        point("mnist37", 1, 1, 1000.0, p50=0.6, generator="python 1ch"),
        point("echo", 1, 1, 2000.0, p50=0.4, generator="python 1ch"),
    ]
    target = targets_by_name(points)["b1 c1 p50 vs echo"]
    assert target.met is False and target.ratio == pytest.approx(1.5)
    assert "Python generator" in target.detail

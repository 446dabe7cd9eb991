"""`make bench` (`python -m serving.bench`): one command, one bounded sweep, one report.

Starts every server of the plan on loopback (mnist37 as configured, the bare grpc.aio +
onnxruntime server and the echo server of `serving.bench.bare`), measures in-process
onnxruntime first, then each load with perf_analyzer or the Python generator, and writes
bench.json, bench.md and two PNGs into `--out` (default runs/bench/<timestamp>/).
Progress goes to stderr; the targets' verdicts to stdout at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from serving.bench import plan as plans
from serving.bench.loadgen import Window
from serving.bench.plots import draw
from serving.bench.reference import measure_in_process
from serving.bench.report import (
    attach_memory_drift,
    attach_ratios,
    evaluate_targets,
    write_report,
)
from serving.bench.servers import MODEL_NAME, model_file
from serving.bench.sweep import Settings, run_plan

REPO_ROOT = Path(__file__).resolve().parents[2]
# (window, warm-up seconds per batch size and protocol, in-process seconds per batch)
PROFILES = {
    "quick": (Window(300, 3, 100, 0.1, 0.5), 0.1, 0.1),
    "default": (Window(750, 4, 25, 0.3, 1.5), 0.3, 0.4),
    "full": (Window(1000, 5, 20, 0.5, 2.0), 0.5, 0.5),
}


def _model_repository(directory: Path) -> Path:
    """A repository with a synthetic linear mnist37 (mean-difference weights from the
    shipped test digits): the trained linear model's graph, without training."""
    from serving.idx import read_images, read_labels
    from serving.synthetic import mean_difference_model, publish_model

    data = REPO_ROOT / "training" / "data"
    images = read_images(data / "t10k-images-idx3-ubyte.gz")
    labels = read_labels(data / "t10k-labels-idx1-ubyte.gz")
    publish_model(directory, MODEL_NAME, mean_difference_model(images, labels))
    return directory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.bench", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few points in short windows")
    size.add_argument(
        "--full", action="store_true", help="every batch x concurrency x protocol x setting"
    )
    parser.add_argument(
        "--out", type=Path, help="where the report goes (default: runs/bench/<timestamp>/)"
    )
    parser.add_argument(
        "--repository",
        type=Path,
        help="serve this repository's mnist37 (default: a synthetic linear model)",
    )
    subsets = parser.add_argument_group("subsets (default: all the plan has)")
    subsets.add_argument("--servers", nargs="+", choices=plans.KINDS, default=())
    subsets.add_argument("--batches", nargs="+", type=int, default=())
    subsets.add_argument("--concurrency", nargs="+", type=int, default=())
    subsets.add_argument("--protocols", nargs="+", choices=plans.PROTOCOLS, default=())
    subsets.add_argument("--batching", nargs="+", choices=plans.BATCHINGS, default=())
    subsets.add_argument("--workers", nargs="+", choices=plans.WORKERS, default=())
    subsets.add_argument("--generators", nargs="+", choices=plans.GENERATORS, default=())
    parser.add_argument(
        "--measurement-ms", type=int, help="perf_analyzer's window (default: the plan's)"
    )
    return parser


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("onnxruntime", "grpcio"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "?"
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    profile = "quick" if args.quick else "full" if args.full else "default"
    plan = {"quick": plans.quick_plan, "full": plans.full_plan, "default": plans.default_plan}
    selection = plans.Selection(
        tuple(args.servers),
        tuple(args.batches),
        tuple(args.concurrency),
        tuple(args.protocols),
        tuple(args.batching),
        tuple(args.workers),
        tuple(args.generators),
    )
    chosen = plans.select(plan[profile](), selection)
    if not chosen:
        print("python -m serving.bench: the subsets leave nothing to measure", file=sys.stderr)
        return 2
    window, warmup_s, in_process_s = PROFILES[profile]
    if args.measurement_ms:
        window = replace(window, measurement_ms=args.measurement_ms)
    started = datetime.now(UTC)
    out = args.out or REPO_ROOT / "runs" / "bench" / started.strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    return _run(args, profile, chosen, window, warmup_s, in_process_s, started, out)


def _run(args, profile, chosen, window, warmup_s, in_process_s, started, out) -> int:
    from tqdm import tqdm

    begin = time.perf_counter()
    load_average = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    steps = sum(len(run.loads) + 1 for run in chosen) + 1
    with (
        tempfile.TemporaryDirectory() as scratch,
        tqdm(total=steps, file=sys.stderr, unit="step", dynamic_ncols=True) as progress,
    ):
        repository = args.repository or _model_repository(Path(scratch) / "repository")
        batches = sorted({load.batch for run in chosen for load in run.loads})
        progress.set_description("in-process onnxruntime")
        in_process = measure_in_process(model_file(repository), batches, in_process_s)
        progress.update()

        def advance(what: str) -> None:
            progress.set_description(what[:60])
            progress.update()

        log_dir = out / "logs"
        log_dir.mkdir(exist_ok=True)
        points, servers = run_plan(chosen, repository, log_dir, Settings(window, warmup_s), advance)
    attach_ratios(points, in_process)
    attach_memory_drift(points, servers)
    targets = evaluate_targets(points, servers, in_process)
    plots = draw(out, points, in_process)
    report = {
        "meta": {
            "started": started.isoformat(timespec="seconds"),
            "command": "python -m serving.bench " + " ".join(sys.argv[1:]),
            "plan": profile,
            "points": len(points),
            "duration_s": time.perf_counter() - begin,
            "cpus": os.cpu_count(),
            "load_average": load_average,
            "python": platform.python_version(),
            **_versions(),
            "window": vars(window),
        },
        "in_process": [
            {**vars(entry), "images_per_s": entry.images_per_s, "run_us": entry.run_us}
            for entry in in_process
        ],
        "points": points,
        "servers": servers,
        "targets": [target.as_json() for target in targets],
        "plots": [plot.name for plot in plots],
    }
    json_path, markdown_path = write_report(out, report)
    for target in targets:
        verdict = {True: "met", False: "NOT MET", None: "not evaluated"}[target.met]
        ratio = f" x{target.ratio:.2f}" if target.ratio is not None else ""
        print(f"{target.name}: {verdict}{ratio} ({target.detail})")
    print(f"report: {markdown_path}\nfigures: {json_path}")
    return 0

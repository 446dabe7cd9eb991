"""`make bench`: throughput and latency of the server under perf_analyzer.

Runs the real server (a subprocess on a free loopback port) with dynamic batching off
(`--max-batch-size 1`), on (the default), and on with a queue delay, and drives each with
perf_analyzer (C++, so the load generator is not the bottleneck) at concurrency 1 and 16
with 1 and 64 images per request, over gRPC and, with `--protocols`, over HTTP with binary
or JSON tensors. Figures move up to 40% between runs on a shared machine: compare the
ratios printed from one run. Needs the `dev` extra (onnx, tritonclient).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from serving.launcher import start_server
from serving.perf_analyzer import ready_perf_analyzer

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_SETTINGS = {
    "batching off": ["--max-batch-size", "1"],
    "batching on": ["--max-batch-size", "64", "--max-queue-delay-us", "0"],
    "batching + 500us delay": ["--max-batch-size", "64", "--max-queue-delay-us", "500"],
}
LOADS = [(1, 1), (16, 1), (1, 64), (16, 64)]
# What perf_analyzer can drive: its -i, and over HTTP the tensor format (binary or JSON).
PROTOCOLS = {"grpc": ("grpc", None), "http": ("http", "binary"), "http-json": ("http", "json")}


def perf_analyzer_command(
    target: str,
    concurrency: int,
    batch_size: int,
    csv: Path | None = None,
    measurement_ms: int = 1500,
    model: str = "mnist37",
    protocol: str = "grpc",
) -> tuple[list[str], dict[str, str]]:
    """perf_analyzer against `target` (gRPC's address, or HTTP's for an HTTP `protocol`)
    in one of `PROTOCOLS`, and its environment."""
    interface, tensor_format = PROTOCOLS[protocol]
    binary, env = ready_perf_analyzer()
    command = [
        str(binary),
        "-m",
        model,
        "-i",
        interface,
        "-u",
        target,
        "-b",
        str(batch_size),
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "-p",
        str(measurement_ms),
        "--max-trials",
        "6",
        "-s",
        "60",
    ]
    if tensor_format is not None:
        command += ["--input-tensor-format", tensor_format, "--output-tensor-format", tensor_format]
    if csv is not None:
        command += ["-f", str(csv)]
    return command, env


def _measure(
    target: str, concurrency: int, batch: int, measurement_ms: int, protocol: str
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "perf.csv"
        command, env = perf_analyzer_command(
            target, concurrency, batch, report, measurement_ms, protocol=protocol
        )
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if completed.returncode != 0 or not report.exists():
            tail = (completed.stdout + completed.stderr)[-400:]
            return {"error": 1.0, "message": tail}  # type: ignore[dict-item]
        row = next(csv.DictReader(report.read_text().splitlines()))
    return {
        "requests_per_s": float(row["Inferences/Second"]) / batch,
        "images_per_s": float(row["Inferences/Second"]),
        "p50_us": float(row["p50 latency"]),
        "p99_us": float(row["p99 latency"]),
    }


def _model_repository(directory: Path) -> Path:
    from serving.idx import read_images, read_labels
    from serving.synthetic import mean_difference_model, publish_model

    data = REPO_ROOT / "training" / "data"
    images = read_images(data / "t10k-images-idx3-ubyte.gz")
    labels = read_labels(data / "t10k-labels-idx1-ubyte.gz")
    publish_model(directory, "mnist37", mean_difference_model(images, labels))
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.bench", description=__doc__)
    parser.add_argument(
        "--repository",
        type=Path,
        help="serve this repository's models "
        "(default: a synthetic linear model in a temporary repository)",
    )
    parser.add_argument("--measurement-ms", type=int, default=2000)
    parser.add_argument(
        "--settings", nargs="*", choices=list(SERVER_SETTINGS), default=list(SERVER_SETTINGS)
    )
    parser.add_argument(
        "--protocols",
        nargs="*",
        choices=list(PROTOCOLS),
        default=["grpc"],
        help="gRPC, HTTP with binary tensors, HTTP with JSON tensors (default: grpc)",
    )
    args = parser.parse_args(argv)
    results: dict[tuple[str, str, int, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        repository = args.repository or _model_repository(Path(scratch))
        print(
            f"{'server':<24}{'protocol':<10}{'conc':>5}{'batch':>6}{'req/s':>10}{'images/s':>11}"
            f"{'p50 us':>9}{'p99 us':>9}"
        )
        for setting in args.settings:
            server = start_server(
                repository, Path(scratch), "--log-level", "warning", *SERVER_SETTINGS[setting]
            )
            try:
                for protocol in args.protocols:
                    target = server.target if protocol == "grpc" else server.http_address
                    for concurrency, batch in LOADS:
                        figures = _measure(
                            target, concurrency, batch, args.measurement_ms, protocol
                        )
                        results[(setting, protocol, concurrency, batch)] = figures
                        _print_row(setting, protocol, concurrency, batch, figures)
            finally:
                server.terminate(timeout=60)
    if "batching off" in args.settings:
        for protocol in args.protocols:
            others = [(setting, protocol) for setting in args.settings if setting != "batching off"]
            _print_ratios(results, ("batching off", protocol), others)
    if "grpc" in args.protocols:
        for setting in args.settings:
            others = [(setting, protocol) for protocol in args.protocols if protocol != "grpc"]
            _print_ratios(results, (setting, "grpc"), others)
    return 0


def _print_row(
    setting: str, protocol: str, concurrency: int, batch: int, figures: dict[str, float]
) -> None:
    start = f"{setting:<24}{protocol:<10}{concurrency:>5}{batch:>6}"
    if "error" in figures:
        print(f"{start}  failed: {figures['message']}", flush=True)
        return
    print(
        f"{start}{figures['requests_per_s']:>10.0f}{figures['images_per_s']:>11.0f}"
        f"{figures['p50_us']:>9.0f}{figures['p99_us']:>9.0f}",
        flush=True,
    )


def _print_ratios(
    results: dict[tuple[str, str, int, int], dict[str, float]],
    base: tuple[str, str],
    others: list[tuple[str, str]],
) -> None:
    """images/s of each (setting, protocol) in `others` relative to `base`'s, same run."""
    if not others:
        return
    print(f"\nimages/s relative to {base[0]} over {base[1]} (same run):")
    for other in others:
        ratios = []
        for concurrency, batch in LOADS:
            reference = results.get((*base, concurrency, batch), {})
            figures = results.get((*other, concurrency, batch), {})
            if "images_per_s" in reference and "images_per_s" in figures:
                ratio = figures["images_per_s"] / reference["images_per_s"]
                ratios.append(f"c{concurrency}/b{batch} x{ratio:.2f}")
        print(f"  {other[0]} over {other[1]}: " + ", ".join(ratios))


if __name__ == "__main__":
    sys.exit(main())

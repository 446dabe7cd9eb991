"""The benchmark's load generators, each run as a child process so that its CPU time is
its own (the kernel's rusage of the child, from `wait4`):

- perf_analyzer (Triton's C++ load generator, bundled with tritonclient): over gRPC or HTTP
  (binary tensors), the figures anyone can compare with Triton-style ones;
- a Python grpc.aio closed loop (`python -m serving.bench.loadgen`): `concurrency` callers
  on `channels` channels, each sending the same pre-serialized ModelInfer as soon as its
  last answer came back; the echo floor and single-caller latency without perf_analyzer's
  own machinery in the way.

Both report requests/s, images/s and p50/p90/p99 latency of one measurement window.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from serving.perf_analyzer import ready_perf_analyzer

# What perf_analyzer can drive: its -i, and over HTTP the tensor format (binary or JSON).
PROTOCOLS = {"grpc": ("grpc", None), "http": ("http", "binary"), "http-json": ("http", "json")}
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


class LoadFailed(Exception):
    """The load generator failed; the message has the end of its output."""


@dataclass(frozen=True)
class Window:
    """How long a load generator measures: perf_analyzer's window, trials and stability
    threshold; the Python generator's warm-up and measured seconds."""

    measurement_ms: int = 750
    max_trials: int = 4
    stability_percent: int = 25
    python_warmup_s: float = 0.3
    python_seconds: float = 1.5


@dataclass(frozen=True)
class LoadResult:
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    client_cpu_s: float  # the load generator's user + system CPU seconds, its whole run
    wall_s: float  # its whole run, start to exit
    stable: bool = True  # perf_analyzer: windows agreed within the stability threshold


def perf_analyzer_command(
    target: str,
    concurrency: int,
    batch_size: int,
    csv: Path | None = None,
    measurement_ms: int = 1500,
    model: str = "mnist37",
    protocol: str = "grpc",
    max_trials: int = 6,
    stability_percent: int = 60,
    async_mode: bool = False,
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
        str(max_trials),
        "-s",
        str(stability_percent),
    ]
    if async_mode:
        # One thread drives every outstanding request (the default, sync, takes a thread
        # for each): what the figures of the benchmark's issue were measured with.
        command.append("--async")
    if tensor_format is not None:
        command += ["--input-tensor-format", tensor_format, "--output-tensor-format", tensor_format]
    if csv is not None:
        command += ["-f", str(csv)]
    return command, env


# Told the load generator's process id once it runs (the sweep samples its CPU).
Watch = Callable[[int], None]


def run_measured(
    command: Sequence[str],
    env: dict[str, str],
    output: Path,
    timeout: float,
    watch: Watch | None = None,
) -> tuple[int, float, float]:
    """Run `command` with its output in `output`: (exit status, its CPU seconds, wall
    seconds). Killed (status -9) past `timeout`."""
    start = time.perf_counter()
    with open(output, "wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    if watch is not None:
        watch(process.pid)
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            process.send_signal(signal.SIGKILL)
        time.sleep(0.02)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return process.returncode, usage.ru_utime + usage.ru_stime, time.perf_counter() - start


UNSTABLE = "Failed to obtain stable measurement"
# Past any deviation: the last three windows count, whatever they read.
ANY_WINDOWS = 1000


def run_perf_analyzer(
    target: str,
    protocol: str,
    batch: int,
    concurrency: int,
    window: Window,
    model: str,
    watch: Watch | None = None,
) -> LoadResult:
    """perf_analyzer's figures once three windows agree within the window's stability
    threshold; when none do within its trials (a busy shared machine), those of three
    more windows, whatever they read, marked `stable=False`."""
    try:
        return _perf_analyzer_once(target, protocol, batch, concurrency, window, model, watch)
    except LoadFailed as error:
        if UNSTABLE not in str(error):
            raise
    anything = replace(window, max_trials=3, stability_percent=ANY_WINDOWS)
    result = _perf_analyzer_once(target, protocol, batch, concurrency, anything, model, watch)
    return replace(result, stable=False)


def _perf_analyzer_once(
    target: str,
    protocol: str,
    batch: int,
    concurrency: int,
    window: Window,
    model: str,
    watch: Watch | None,
) -> LoadResult:
    with tempfile.TemporaryDirectory() as scratch:
        report, log = Path(scratch) / "perf.csv", Path(scratch) / "perf.log"
        command, env = perf_analyzer_command(
            target,
            concurrency,
            batch,
            report,
            window.measurement_ms,
            model=model,
            protocol=protocol,
            max_trials=window.max_trials,
            stability_percent=window.stability_percent,
            async_mode=True,
        )
        timeout = 30 + window.max_trials * window.measurement_ms / 1000 * 4
        status, cpu_s, wall_s = run_measured(command, env, log, timeout, watch)
        if status != 0 or not report.exists():
            tail = " ".join(log.read_text(errors="replace").split())[-300:]
            raise LoadFailed(f"perf_analyzer exited {status}: {tail}")
        row = next(csv.DictReader(report.read_text().splitlines()))
    images_per_s = float(row["Inferences/Second"])
    return LoadResult(
        requests_per_s=images_per_s / batch,
        images_per_s=images_per_s,
        p50_ms=float(row["p50 latency"]) / 1000,
        p90_ms=float(row["p90 latency"]) / 1000,
        p99_ms=float(row["p99 latency"]) / 1000,
        client_cpu_s=cpu_s,
        wall_s=wall_s,
    )


def run_python(
    target: str,
    batch: int,
    concurrency: int,
    channels: int,
    window: Window,
    model: str,
    watch: Watch | None = None,
) -> LoadResult:
    """The Python generator below, as a child process."""
    with tempfile.TemporaryDirectory() as scratch:
        result, log = Path(scratch) / "result.json", Path(scratch) / "loadgen.log"
        command = [
            sys.executable,
            "-m",
            "serving.bench.loadgen",
            "--target",
            target,
            "--model",
            model,
            "--batch",
            str(batch),
            "--concurrency",
            str(concurrency),
            "--channels",
            str(channels),
            "--warmup",
            str(window.python_warmup_s),
            "--seconds",
            str(window.python_seconds),
            "--output",
            str(result),
        ]
        timeout = 60 + window.python_warmup_s + window.python_seconds
        status, cpu_s, wall_s = run_measured(command, dict(os.environ), log, timeout, watch)
        if status != 0 or not result.exists():
            tail = " ".join(log.read_text(errors="replace").split())[-300:]
            raise LoadFailed(f"the Python load generator exited {status}: {tail}")
        figures = json.loads(result.read_text())
    return LoadResult(**figures, client_cpu_s=cpu_s, wall_s=wall_s)


def infer_request_bytes(model: str, batch: int, seed: int = 0) -> bytes:
    """A serialized raw ModelInfer request of `batch` random images."""
    from serving.generated.inference import grpc_service_pb2 as pb

    images = np.random.default_rng(seed).integers(0, 256, (batch, 28, 28), dtype=np.uint8)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="images", datatype="UINT8", shape=images.shape)
    request.raw_input_contents.append(images.tobytes())
    return request.SerializeToString()


async def closed_loop(
    target: str,
    payload: bytes,
    concurrency: int,
    channels: int,
    warmup_s: float,
    seconds: float,
) -> tuple[float, list[float]]:
    """`concurrency` callers on `channels` channels, each sending `payload` again as soon as
    its answer came: (measured seconds, each answered request's latency in seconds) for
    the requests sent after the warm-up and answered within the window."""
    import grpc

    opened = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    # Bytes in, bytes out: the client parses and serializes nothing.
    calls = [channel.unary_unary(MODEL_INFER) for channel in opened]
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup_s
    end = start + seconds
    latencies: list[float] = []

    async def caller(index: int) -> None:
        call = calls[index % channels]
        while True:
            sent = loop.time()
            if sent >= end:
                return
            answer = await call(payload)
            if not answer:
                raise RuntimeError("empty answer")
            done = loop.time()
            if sent >= start and done <= end:
                latencies.append(done - sent)

    try:
        await asyncio.gather(*(caller(index) for index in range(concurrency)))
    finally:
        for channel in opened:
            await channel.close()
    return seconds, latencies


def summarize(seconds: float, latencies: list[float], batch: int) -> dict[str, float]:
    if not latencies:
        raise LoadFailed("no request was answered within the window")
    values = np.array(latencies) * 1000
    p50, p90, p99 = np.percentile(values, [50, 90, 99]).tolist()
    rate = len(latencies) / seconds
    return {
        "requests_per_s": rate,
        "images_per_s": rate * batch,
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.bench.loadgen",
        description="A closed-loop grpc.aio ModelInfer load: figures as JSON.",
    )
    parser.add_argument("--target", required=True)
    parser.add_argument("--model", default="mnist37")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    payload = infer_request_bytes(args.model, args.batch)
    seconds, latencies = asyncio.run(
        closed_loop(
            args.target,
            payload,
            args.concurrency,
            max(1, min(args.channels, args.concurrency)),
            args.warmup,
            args.seconds,
        )
    )
    args.output.write_text(json.dumps(summarize(seconds, latencies, args.batch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

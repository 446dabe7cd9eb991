"""Run a plan (`serving.bench.plan`): start each server, warm it up, measure each load,
and record every figure, the references' included, as one list of points.

While a load generator runs, a sampler thread reads the CPU time of the server's process
tree and of the generator every 100 ms; CPU per request comes from the steady part of
that (the first quarter of the run, perf_analyzer's start-up and first window, left out).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serving.bench.loadgen import (
    LoadFailed,
    LoadResult,
    Window,
    closed_loop,
    infer_request_bytes,
    run_perf_analyzer,
    run_python,
)
from serving.bench.plan import Load, ServerRun
from serving.bench.procfs import sample_tree
from serving.bench.servers import MODEL_NAME, NotStarted, Running, start

MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    window: Window
    warmup_s: float  # per batch size and protocol, before a server's first point


class Sampler(threading.Thread):
    """(seconds, server CPU s, client CPU s) every `interval` while the load generator
    whose pid it is told (`client_pid`) runs, until `stop`."""

    def __init__(self, server_pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.server_pid = server_pid
        self.client_pid: int | None = None
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []
        self._finished = threading.Event()

    def run(self) -> None:
        while not self._finished.is_set():
            self._sample()
            self._finished.wait(self.interval)
        self._sample()

    def watch(self, pid: int) -> None:
        """Sample load generator `pid` from now on (a retried perf_analyzer is a new one:
        the samples of the one before are dropped)."""
        self.samples = []
        self.client_pid = pid

    def _sample(self) -> None:
        """One sample while the load generator runs (not before it started, nor once it
        has exited: its CPU time then reads as nothing)."""
        if self.client_pid is None:
            return
        client = sample_tree(self.client_pid)
        if not client.processes:
            return
        server = sample_tree(self.server_pid).cpu_s
        self.samples.append((time.perf_counter(), server, client.cpu_s))

    def stop(self) -> None:
        self._finished.set()
        self.join()

    @property
    def server_cpu_s(self) -> float:
        """The server's CPU seconds while the load generator ran."""
        return self.samples[-1][1] - self.samples[0][1] if self.samples else 0.0

    def steady_rates(self) -> tuple[float, float]:
        """CPU cores busy (server, client) over the run's last three quarters."""
        if len(self.samples) < 2:
            return 0.0, 0.0
        first, last = self.samples[0][0], self.samples[-1][0]
        steady = [s for s in self.samples if s[0] >= first + (last - first) / 4] or self.samples
        if len(steady) < 2:
            steady = self.samples
        (t0, server0, client0), (t1, server1, client1) = steady[0], steady[-1]
        seconds = max(t1 - t0, 1e-9)
        return (server1 - server0) / seconds, (client1 - client0) / seconds


def warm_up(server: Running, loads: list[Load], seconds: float) -> None:
    """A short load at each batch size and protocol the server will see, so that its
    memory (allocator arenas, buffers, metric series) reaches its working size first."""
    for protocol, batch in sorted({(load.protocol, load.batch) for load in loads}):
        target = server.target(protocol)
        if protocol == "grpc":
            # At the highest concurrency it will see: as many requests in memory at once.
            concurrency = max(load.concurrency for load in loads if load.batch == batch)
            payload = infer_request_bytes(MODEL_NAME, batch)
            asyncio.run(closed_loop(target, payload, concurrency, 1, 0.0, seconds))
        else:
            _http_warm_up(target, batch, seconds)


def _http_warm_up(address: str, batch: int, seconds: float) -> None:
    """Binary-tensor infer requests over one HTTP connection for `seconds`."""
    pixels = bytes(batch * 784)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": [batch, 28, 28],
                    "parameters": {"binary_data_size": len(pixels)},
                }
            ]
        }
    ).encode()
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            connection.request("POST", f"/v2/models/{MODEL_NAME}/infer", header + pixels, headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise LoadFailed(f"HTTP warm-up: status {response.status}")
    finally:
        connection.close()


def measure(server: Running, load: Load, window: Window) -> tuple[LoadResult, Sampler]:
    sampler = Sampler(server.pid)
    target = server.target(load.protocol)

    def watch(pid: int) -> None:
        sampler.watch(pid)

    sampler.start()
    try:
        if load.generator == "perf_analyzer":
            result = run_perf_analyzer(
                target, load.protocol, load.batch, load.concurrency, window, MODEL_NAME, watch
            )
        else:
            result = run_python(
                target, load.batch, load.concurrency, load.channels, window, MODEL_NAME, watch
            )
    finally:
        sampler.stop()
    return result, sampler


def _server_record(run: ServerRun) -> dict[str, object]:
    return {
        "server": run.server.label,
        **{f"server_{key}": value for key, value in run.server.as_json().items()},
    }


def point_record(run: ServerRun, load: Load) -> dict[str, object]:
    return {**_server_record(run), **load.as_json()}


def figures(result: LoadResult, sampler: Sampler, server: Running) -> dict[str, object]:
    server_cores, client_cores = sampler.steady_rates()
    memory = sample_tree(server.pid)
    rate = result.requests_per_s
    return {
        "status": "ok",
        "requests_per_s": rate,
        "images_per_s": result.images_per_s,
        "p50_ms": result.p50_ms,
        "p90_ms": result.p90_ms,
        "p99_ms": result.p99_ms,
        "stable": result.stable,
        "wall_s": result.wall_s,
        "server_cpu_s": sampler.server_cpu_s,
        "client_cpu_s": result.client_cpu_s,
        "server_cores": server_cores,
        "client_cores": client_cores,
        "server_cpu_us_per_request": server_cores / rate * 1e6 if rate else None,
        "client_cpu_us_per_request": client_cores / rate * 1e6 if rate else None,
        "server_rss_mib": memory.rss_bytes / MIB,
        "server_peak_rss_mib": memory.peak_rss_bytes / MIB,
    }


def run_plan(
    plan: list[ServerRun],
    repository: Path,
    log_dir: Path,
    settings: Settings,
    advance: Callable[[str], None],
) -> tuple[list[dict], list[dict]]:
    """Every point of `plan` (measured, failed or not run, with the reason) and, for each
    server started, its memory: at the end of its warm-up and of its last point."""
    points: list[dict] = []
    servers: list[dict] = []
    for run in plan:
        advance(f"starting {run.server.label}")
        try:
            server = start(run.server, repository, log_dir)
        except NotStarted as error:
            refusal = {"status": "not run", "reason": str(error)}
            for load in run.loads:
                points.append({**point_record(run, load), **refusal})
                advance(f"{run.server.label}: not run")
            servers.append({**_server_record(run), **refusal})
            continue
        try:
            warm_up(server, run.loads, settings.warmup_s)
            warm = sample_tree(server.pid)
            for load in run.loads:
                record = point_record(run, load)
                advance(f"{run.server.label}: {load.protocol} b{load.batch} c{load.concurrency}")
                try:
                    result, sampler = measure(server, load, settings.window)
                    record.update(figures(result, sampler, server))
                except LoadFailed as error:
                    record.update({"status": "failed", "reason": str(error)})
                points.append(record)
            end = sample_tree(server.pid)
            servers.append(
                {
                    **_server_record(run),
                    "status": "ok",
                    "flags": server.flags,
                    "processes": end.processes,
                    "rss_after_warmup_mib": warm.rss_bytes / MIB,
                    "rss_at_end_mib": end.rss_bytes / MIB,
                    "peak_rss_mib": end.peak_rss_bytes / MIB,
                    "rss_growth": end.rss_bytes / warm.rss_bytes if warm.rss_bytes else None,
                }
            )
        finally:
            server.stop()
    return points, servers

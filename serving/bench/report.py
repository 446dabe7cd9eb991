"""A sweep's figures as ratios, targets, JSON and Markdown.

Every measured point gets its ratios to the references measured in the same run: the
in-process onnxruntime images/s for its batch (the faster of the two threadings), the
echo server's and the bare server's images/s and p50 at the same batch, concurrency and
load generator (over gRPC: the bare servers speak nothing else).

The targets are those of the benchmark's issue, each evaluated from this run's figures
(`evaluate_targets`): met, not met, or not evaluated with what was missing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from serving.atomic import write_bytes_atomically, write_json_atomically
from serving.bench.reference import InProcess

JSON_FILE = "bench.json"
MARKDOWN_FILE = "bench.md"
# A p99 within this much of another is "not raised": two runs of one setting differ by
# more than 10% at p99 on a shared 2-core machine.
P99_NOISE = 1.10


def _key(point: dict) -> tuple:
    return (
        point["server_kind"],
        point["server_batching"],
        point["server_workers"],
        point["protocol"],
        point["generator"],
        point["batch"],
        point["concurrency"],
    )


class Figures:
    """The measured points of one run, found by what they measured."""

    def __init__(self, points: Iterable[dict]) -> None:
        self.points = list(points)
        self._ok = {_key(point): point for point in self.points if point["status"] == "ok"}
        self._all = {_key(point): point for point in self.points}

    def find(
        self,
        kind: str,
        batch: int,
        concurrency: int,
        batching: str = "on",
        workers: str = "1",
        protocol: str = "grpc",
        generator: str = "perf_analyzer",
    ) -> dict | None:
        if kind != "mnist37":
            batching = workers = ""
        return self._ok.get((kind, batching, workers, protocol, generator, batch, concurrency))

    def why_missing(self, kind: str, batch: int, concurrency: int, **where: str) -> str:
        """Why `find` found nothing: the point's failure or not-run reason, or not planned."""
        batching, workers = where.get("batching", "on"), where.get("workers", "1")
        if kind != "mnist37":
            batching = workers = ""
        key = (
            kind,
            batching,
            workers,
            where.get("protocol", "grpc"),
            where.get("generator", "perf_analyzer"),
            batch,
            concurrency,
        )
        point = self._all.get(key)
        if point is None:
            return "not in this sweep's plan"
        return f"{point['status']}: {point.get('reason', '')}"


def best_in_process(in_process: list[InProcess], batch: int) -> InProcess | None:
    candidates = [entry for entry in in_process if entry.batch == batch]
    return max(candidates, key=lambda entry: entry.images_per_s, default=None)


def attach_ratios(points: list[dict], in_process: list[InProcess]) -> None:
    """Add each measured point's `ratios` (see the module docstring)."""
    figures = Figures(points)
    for point in points:
        if point["status"] != "ok":
            continue
        ratios: dict[str, float] = {}
        reference = best_in_process(in_process, point["batch"])
        if reference is not None:
            ratios["onnxruntime"] = point["images_per_s"] / reference.images_per_s
        for kind in ("echo", "bare"):
            other = figures.find(
                kind, point["batch"], point["concurrency"], generator=point["generator"]
            )
            if other is None or other is point:
                continue
            ratios[kind] = point["images_per_s"] / other["images_per_s"]
            ratios[f"{kind}_p50"] = point["p50_ms"] / other["p50_ms"]
        point["ratios"] = ratios


@dataclass
class Target:
    name: str
    requirement: str
    met: bool | None = None  # None: not evaluated
    ratio: float | None = None
    detail: str = ""

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "requirement": self.requirement,
            "met": self.met,
            "ratio": self.ratio,
            "detail": self.detail,
        }


def _at_least(target: Target, ratio: float, needed: float, detail: str) -> Target:
    target.ratio, target.met, target.detail = ratio, ratio >= needed, detail
    return target


def evaluate_targets(
    points: list[dict], servers: list[dict], in_process: list[InProcess]
) -> list[Target]:
    figures = Figures(points)
    targets = []

    # 1. Batch 1, concurrency 16 over gRPC: against the bare server, and workers auto.
    target = Target("b1 c16 vs bare", "batch 1, concurrency 16, gRPC: >= 1.3x the bare server")
    ours, bare = figures.find("mnist37", 1, 16), figures.find("bare", 1, 16)
    if ours and bare:
        ratio = ours["images_per_s"] / bare["images_per_s"]
        detail = f"{ours['images_per_s']:,.0f} vs {bare['images_per_s']:,.0f} infer/s"
        _at_least(target, ratio, 1.3, detail)
    else:
        target.detail = _missing(figures, (ours, "mnist37", 1, 16), (bare, "bare", 1, 16))
    targets.append(target)

    target = Target(
        "b1 c16 workers auto", "batch 1, concurrency 16, gRPC: workers auto >= 1.3x one worker"
    )
    many = figures.find("mnist37", 1, 16, workers="auto")
    if ours and many:
        ratio = many["images_per_s"] / ours["images_per_s"]
        detail = f"{many['images_per_s']:,.0f} vs {ours['images_per_s']:,.0f} infer/s"
        _at_least(target, ratio, 1.3, detail)
    else:
        target.detail = _missing(
            figures, (ours, "mnist37", 1, 16), (many, "mnist37", 1, 16, {"workers": "auto"})
        )
    targets.append(target)

    # 2. Batch 1, concurrency 1: p50 against the echo floor.
    target = Target("b1 c1 p50 vs echo", "batch 1, concurrency 1: p50 <= 1.3x the echo server's")
    ours, echo = figures.find("mnist37", 1, 1), figures.find("echo", 1, 1)
    if ours and echo:
        ratio = ours["p50_ms"] / echo["p50_ms"]
        target.ratio, target.met = ratio, ratio <= 1.3
        target.detail = f"p50 {ours['p50_ms']:.3f} vs {echo['p50_ms']:.3f} ms"
        python_ours = figures.find("mnist37", 1, 1, generator="python 1ch")
        python_echo = figures.find("echo", 1, 1, generator="python 1ch")
        if python_ours and python_echo:
            python_ratio = python_ours["p50_ms"] / python_echo["p50_ms"]
            target.detail += (
                f" (Python generator: {python_ours['p50_ms']:.3f} vs "
                f"{python_echo['p50_ms']:.3f} ms, x{python_ratio:.2f})"
            )
    else:
        python_ours = figures.find("mnist37", 1, 1, generator="python 1ch")
        python_echo = figures.find("echo", 1, 1, generator="python 1ch")
        if python_ours and python_echo:  # a sweep without perf_analyzer: the Python figures
            ratio = python_ours["p50_ms"] / python_echo["p50_ms"]
            target.ratio, target.met = ratio, ratio <= 1.3
            target.detail = (
                f"Python generator: p50 {python_ours['p50_ms']:.3f} vs "
                f"{python_echo['p50_ms']:.3f} ms"
            )
        else:
            target.detail = _missing(figures, (ours, "mnist37", 1, 1), (echo, "echo", 1, 1))
    targets.append(target)

    # 3. Batch 64, concurrency 4 against the bare server; batch 1,024 against onnxruntime.
    target = Target("b64 c4 vs bare", "batch 64, concurrency 4, gRPC: >= 0.95x the bare server")
    ours, bare = figures.find("mnist37", 64, 4), figures.find("bare", 64, 4)
    if ours and bare:
        ratio = ours["requests_per_s"] / bare["requests_per_s"]
        detail = f"{ours['requests_per_s']:,.0f} vs {bare['requests_per_s']:,.0f} req/s"
        _at_least(target, ratio, 0.95, detail)
    else:
        target.detail = _missing(figures, (ours, "mnist37", 64, 4), (bare, "bare", 64, 4))
    targets.append(target)

    target = Target(
        "b1024 vs onnxruntime",
        "batch 1,024, gRPC: >= 15% of in-process onnxruntime images/s (best concurrency)",
    )
    candidates = [
        point
        for point in points
        if point["status"] == "ok"
        and point["server_kind"] == "mnist37"
        and point["server_batching"] == "on"
        and point["server_workers"] == "1"
        and point["protocol"] == "grpc"
        and point["generator"] == "perf_analyzer"
        and point["batch"] == 1024
    ]
    reference = best_in_process(in_process, 1024)
    if candidates and reference:
        best = max(candidates, key=lambda point: point["images_per_s"])
        ratio = best["images_per_s"] / reference.images_per_s
        detail = (
            f"{best['images_per_s']:,.0f} images/s at concurrency {best['concurrency']} vs "
            f"{reference.images_per_s:,.0f} in process ({reference.threading})"
        )
        _at_least(target, ratio, 0.15, detail)
    else:
        target.detail = "missing: " + (
            "no batch 1,024 point over gRPC" if not candidates else "no in-process reference"
        )
    targets.append(target)

    # 4. Dynamic batching: more throughput at concurrency 64, no worse p99 at concurrency 1.
    target = Target(
        "dynamic batching",
        "batch 1: batching on raises images/s at concurrency 64 over batching off, and its "
        f"p99 at concurrency 1 is not raised (<= {P99_NOISE:.2f}x, the noise margin)",
    )
    on64, off64 = figures.find("mnist37", 1, 64), figures.find("mnist37", 1, 64, batching="off")
    on1, off1 = figures.find("mnist37", 1, 1), figures.find("mnist37", 1, 1, batching="off")
    if on64 and off64 and on1 and off1:
        gain = on64["images_per_s"] / off64["images_per_s"]
        p99 = on1["p99_ms"] / off1["p99_ms"]
        target.ratio, target.met = gain, gain > 1.0 and p99 <= P99_NOISE
        target.detail = (
            f"c64: {on64['images_per_s']:,.0f} vs {off64['images_per_s']:,.0f} infer/s "
            f"(x{gain:.2f}); c1 p99: {on1['p99_ms']:.3f} vs {off1['p99_ms']:.3f} ms (x{p99:.2f})"
        )
    else:
        target.detail = _missing(
            figures,
            (on64, "mnist37", 1, 64),
            (off64, "mnist37", 1, 64, {"batching": "off"}),
            (on1, "mnist37", 1, 1),
            (off1, "mnist37", 1, 1, {"batching": "off"}),
        )
    targets.append(target)

    # 5. Memory: flat within 10% from the end of the warm-up through the sweep.
    target = Target(
        "RSS flat",
        "every mnist37 server's RSS at the end of its sweep is within 10% of its RSS at the "
        "end of its warm-up",
    )
    measured = [
        server
        for server in servers
        if server["status"] == "ok" and server["server_kind"] == "mnist37"
    ]
    if measured:
        worst = max(measured, key=lambda server: abs(server["rss_growth"] - 1))
        target.ratio = worst["rss_growth"]
        target.met = all(abs(server["rss_growth"] - 1) <= 0.10 for server in measured)
        target.detail = (
            f"worst: {worst['server']}, {worst['rss_after_warmup_mib']:.1f} MiB after warm-up, "
            f"{worst['rss_at_end_mib']:.1f} MiB at the end "
            f"({worst['rss_extreme_mib']:.1f} MiB at its farthest, after a point)"
        )
    else:
        target.detail = "missing: no mnist37 server ran"
    targets.append(target)
    return targets


def _missing(figures: Figures, *wanted: tuple) -> str:
    """Why the points of `wanted` ((found, kind, batch, concurrency[, where])) that were not
    found are missing."""
    reasons = []
    for found, kind, batch, concurrency, *where in wanted:
        if found is None:
            conditions = where[0] if where else {}
            why = figures.why_missing(kind, batch, concurrency, **conditions)
            settings = "".join(f", {key} {value}" for key, value in conditions.items())
            reasons.append(f"{kind} b{batch} c{concurrency}{settings}: {why}")
    return "missing: " + "; ".join(reasons)


def attach_memory_drift(points: list[dict], servers: list[dict]) -> None:
    """Each server's RSS at its farthest from the end of its warm-up, over its points and
    its end (`rss_extreme_mib`), and that as a ratio (`rss_drift`)."""
    for server in servers:
        if server["status"] != "ok":
            continue
        seen = [
            point["server_rss_mib"]
            for point in points
            if point["server"] == server["server"] and point["status"] == "ok"
        ]
        seen.append(server["rss_at_end_mib"])
        base = server["rss_after_warmup_mib"]
        extreme = max(seen, key=lambda rss: abs(rss - base))
        server["rss_extreme_mib"] = extreme
        server["rss_drift"] = extreme / base if base else 1.0
        server["rss_growth"] = server["rss_at_end_mib"] / base if base else 1.0


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return ""
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"x{value:.2f}"


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"# mnist37 benchmark: {meta['started']}",
        "",
        f"`{meta['command']}`, plan `{meta['plan']}`, {meta['points']} points in "
        f"{meta['duration_s']:.0f} s. Machine: {meta['cpus']} CPUs, load average "
        f"{meta['load_average']} at the start; Python {meta['python']}, onnxruntime "
        f"{meta['onnxruntime']}, grpcio {meta['grpcio']}. Figures move between runs on a shared "
        "machine: compare the ratios, each from this one run.",
        "",
        "## Targets",
        "",
        "| target | requirement | ratio | met | figures |",
        "| --- | --- | --- | --- | --- |",
    ]
    for target in report["targets"]:
        met = {True: "met", False: "**not met**", None: "not evaluated"}[target["met"]]
        lines.append(
            f"| {target['name']} | {target['requirement']} | {_ratio(target['ratio'])} | "
            f"{met} | {target['detail']} |"
        )
    lines += [
        "",
        "## In-process onnxruntime (the reference)",
        "",
        "| batch | threading | images/s | us per run |",
        "| ---: | --- | ---: | ---: |",
    ]
    for entry in report["in_process"]:
        lines.append(
            f"| {entry['batch']} | {entry['threading']} | {_number(entry['images_per_s'])} | "
            f"{entry['run_us']:.1f} |"
        )
    lines += [
        "",
        "## Points",
        "",
        "Ratios of images/s to in-process onnxruntime (x ort), the echo server (x echo) and "
        "the bare grpc.aio + onnxruntime server (x bare), same batch, concurrency and load "
        "generator over gRPC. CPU per request: cores busy in the steady part of the run / "
        "requests per second; server CPU counts its whole process tree. `~`: perf_analyzer "
        "found no three windows within its stability threshold, so the figures are those of "
        "three more windows, whatever they read.",
        "",
        "| server | proto | generator | batch | conc | req/s | images/s | p50 ms | p90 ms | "
        "p99 ms | server us/req | client us/req | peak RSS MiB | x ort | x echo | x bare |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
        "---: | ---: | ---: | ---: |",
    ]
    for point in report["points"]:
        if point["status"] != "ok":
            continue
        ratios = point.get("ratios", {})
        lines.append(
            f"| {point['server']} | {point['protocol']} | {point['generator']} | "
            f"{point['batch']} | {point['concurrency']} | "
            f"{'' if point.get('stable', True) else '~'}{_number(point['requests_per_s'])} | "
            f"{_number(point['images_per_s'])} | {point['p50_ms']:.3f} | {point['p90_ms']:.3f} | "
            f"{point['p99_ms']:.3f} | {_number(point['server_cpu_us_per_request'])} | "
            f"{_number(point['client_cpu_us_per_request'])} | "
            f"{point['server_peak_rss_mib']:.0f} | {_ratio(ratios.get('onnxruntime'))} | "
            f"{_ratio(ratios.get('echo'))} | {_ratio(ratios.get('bare'))} |"
        )
    skipped = [point for point in report["points"] if point["status"] != "ok"]
    if skipped:
        lines += ["", "## Not run or failed", ""]
        for point in skipped:
            lines.append(
                f"- {point['server']}, {point['protocol']}, {point['generator']}, batch "
                f"{point['batch']}, concurrency {point['concurrency']}: **{point['status']}**: "
                f"{point.get('reason', '')}"
            )
    lines += [
        "",
        "## Memory",
        "",
        "RSS summed over the server's process tree; peak: the sum of each process's VmHWM.",
        "",
        "| server | after warm-up MiB | at end MiB | growth | farthest MiB (after a point) | "
        "peak MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for server in report["servers"]:
        if server["status"] != "ok":
            lines.append(f"| {server['server']} | not run: {server['reason']} | | | | |")
            continue
        lines.append(
            f"| {server['server']} | {server['rss_after_warmup_mib']:.1f} | "
            f"{server['rss_at_end_mib']:.1f} | {_ratio(server['rss_growth'])} | "
            f"{server['rss_extreme_mib']:.1f} | {server['peak_rss_mib']:.1f} |"
        )
    if report.get("plots"):
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(plot).stem}]({plot})" for plot in report["plots"]]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> tuple[Path, Path]:
    """bench.json and bench.md in `out`, each written atomically."""
    json_path, markdown_path = out / JSON_FILE, out / MARKDOWN_FILE
    write_json_atomically(json_path, report)
    write_bytes_atomically(markdown_path, markdown(report).encode())
    return json_path, markdown_path

"""A sweep's figures as two PNGs: throughput against concurrency and latency against
throughput, one panel per batch size, one line per server, protocol and load generator.
matplotlib (the `train` extra, which `dev` includes) draws them off-screen (Agg)."""

from __future__ import annotations

import io
from pathlib import Path

from serving.atomic import write_bytes_atomically
from serving.bench.reference import InProcess

THROUGHPUT_FILE = "throughput_vs_concurrency.png"
LATENCY_FILE = "latency_vs_throughput.png"


def _series(points: list[dict]) -> dict[str, list[dict]]:
    """Measured points by line label, each line in concurrency order."""
    lines: dict[str, list[dict]] = {}
    for point in points:
        if point["status"] != "ok":
            continue
        label = f"{point['server']} | {point['protocol']} | {point['generator']}"
        lines.setdefault(label, []).append(point)
    for line in lines.values():
        line.sort(key=lambda point: point["concurrency"])
    return lines


def _legend(figure, lines: dict[str, list[dict]], colors: dict[str, str]) -> None:
    """One legend below the panels, every line in it once."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[label], marker="o") for label in lines]
    figure.legend(
        handles, list(lines), loc="upper center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, 0.0)
    )


def _save(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    write_bytes_atomically(path, buffer.getvalue())


def draw(out: Path, points: list[dict], in_process: list[InProcess]) -> list[Path]:
    """The two PNGs in `out`; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    lines = _series(points)
    # 20 distinct colours: a full sweep draws up to 14 lines.
    palette = [matplotlib.colors.to_hex(colour) for colour in matplotlib.colormaps["tab20"].colors]
    colors = {label: palette[index % len(palette)] for index, label in enumerate(lines)}
    batches = sorted({point["batch"] for line in lines.values() for point in line})
    if not batches:
        return []
    width = 5.5 * len(batches)
    figure, axes = pyplot.subplots(1, len(batches), figsize=(width, 4.8), squeeze=False)
    for axis, batch in zip(axes[0], batches, strict=True):
        for label, line in lines.items():
            line = [point for point in line if point["batch"] == batch]
            if line:
                axis.plot(
                    [point["concurrency"] for point in line],
                    [point["images_per_s"] for point in line],
                    marker="o",
                    color=colors[label],
                )
        for entry in in_process:
            if entry.batch == batch:
                axis.axhline(entry.images_per_s, linestyle=":", color="grey")
                axis.annotate(
                    f"onnxruntime in process, {entry.threading}",
                    (1, entry.images_per_s),
                    fontsize=7,
                    color="grey",
                    va="bottom",
                )
        axis.set(
            title=f"{batch} image{'s' if batch > 1 else ''} a request",
            xlabel="concurrent requests",
            ylabel="images/s",
            yscale="log",
        )
        axis.set_xscale("log", base=2)
        concurrencies = sorted({point["concurrency"] for line in lines.values() for point in line})
        axis.set_xticks(concurrencies, [str(value) for value in concurrencies])
        axis.grid(True, which="both", alpha=0.3)
    _legend(figure, lines, colors)
    throughput = out / THROUGHPUT_FILE
    _save(figure, throughput)
    pyplot.close(figure)

    figure, axes = pyplot.subplots(2, len(batches), figsize=(width, 8), squeeze=False)
    for column, batch in enumerate(batches):
        for row, (field, name) in enumerate((("p50_ms", "p50"), ("p99_ms", "p99"))):
            axis = axes[row][column]
            for label, line in lines.items():
                line = [point for point in line if point["batch"] == batch]
                if line:
                    axis.plot(
                        [point["images_per_s"] for point in line],
                        [point[field] for point in line],
                        marker="o",
                        color=colors[label],
                    )
            axis.set(
                title=f"{name}, {batch} image{'s' if batch > 1 else ''} a request",
                xlabel="images/s",
                ylabel=f"{name} latency (ms)",
                xscale="log",
                yscale="log",
            )
            axis.grid(True, which="both", alpha=0.3)
    _legend(figure, lines, colors)
    latency = out / LATENCY_FILE
    _save(figure, latency)
    pyplot.close(figure)
    return [throughput, latency]

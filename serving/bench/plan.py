"""What a sweep runs: the servers it starts and, on each, the loads it measures.

A server is one of three kinds: mnist37 itself (with dynamic batching on or off, one worker
or `--workers auto`), the bare grpc.aio + onnxruntime server and the echo server
(`serving.bench.bare`). A load is a protocol, a load generator, images per request and
concurrent requests. Three plans:

- `quick`: a handful of points in short windows (the smoke test of `make test`);
- the default: every batch x concurrency on gRPC for mnist37 (batching on), the bare
  server and the echo server; HTTP, batching off and `--workers auto` at the points the
  targets need (about 4 minutes on a 2-core machine);
- `full`: every batch x concurrency x protocol x batching x workers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from itertools import product

BATCHES = (1, 64, 1024)
CONCURRENCIES = (1, 4, 16, 64)
PROTOCOLS = ("grpc", "http")
BATCHINGS = ("on", "off")
WORKERS = ("1", "auto")
KINDS = ("mnist37", "bare", "echo")
GENERATORS = ("perf_analyzer", "python")
# The Python generator's channels when it opens more than one (mnist37 allows 64
# connections by default and perf_analyzer's one more for its metadata calls).
MULTI_CHANNEL = 8

# What each setting of mnist37 passes to the server.
BATCHING_FLAGS = {
    "on": [],  # the server's defaults (serving/config.py)
    "off": ["--max-batch-size", "1"],
}
KIND_LABELS = {
    "mnist37": "mnist37",
    "bare": "bare grpc.aio + onnxruntime",
    "echo": "bare grpc.aio echo",
}


@dataclass(frozen=True, order=True)
class ServerSpec:
    kind: str  # one of KINDS
    batching: str = ""  # mnist37: one of BATCHINGS
    workers: str = ""  # mnist37: one of WORKERS

    @property
    def label(self) -> str:
        if self.kind != "mnist37":
            return KIND_LABELS[self.kind]
        workers = "1 worker" if self.workers == "1" else f"workers {self.workers}"
        return f"mnist37, batching {self.batching}, {workers}"

    def as_json(self) -> dict[str, str]:
        return {"kind": self.kind, "batching": self.batching, "workers": self.workers}


@dataclass(frozen=True, order=True)
class Load:
    protocol: str  # one of PROTOCOLS (the bare servers speak gRPC only)
    generator: str  # one of GENERATORS (python: gRPC only)
    batch: int
    concurrency: int
    channels: int = 1  # the Python generator's

    @property
    def generator_label(self) -> str:
        if self.generator == "python":
            return f"python {self.channels}ch"
        return self.generator

    def as_json(self) -> dict[str, object]:
        return {
            "protocol": self.protocol,
            "generator": self.generator_label,
            "batch": self.batch,
            "concurrency": self.concurrency,
        }


@dataclass
class ServerRun:
    server: ServerSpec
    loads: list[Load] = field(default_factory=list)


MNIST37 = ServerSpec("mnist37", "on", "1")
BATCHING_OFF = ServerSpec("mnist37", "off", "1")
WORKERS_AUTO = ServerSpec("mnist37", "on", "auto")
BARE = ServerSpec("bare")
ECHO = ServerSpec("echo")


def _grid(protocol: str, batches: Iterable[int], concurrencies: Iterable[int]) -> list[Load]:
    return [
        Load(protocol, "perf_analyzer", batch, concurrency)
        for batch, concurrency in product(batches, concurrencies)
    ]


def _python_loads() -> list[Load]:
    """Single-caller latency on one channel, and concurrency 16 over several channels."""
    return [
        Load("grpc", "python", 1, 1, 1),
        Load("grpc", "python", 1, 16, MULTI_CHANNEL),
    ]


def default_plan() -> list[ServerRun]:
    everything = _grid("grpc", BATCHES, CONCURRENCIES)
    return [
        ServerRun(ECHO, everything + _python_loads()),
        ServerRun(BARE, everything + _python_loads()),
        ServerRun(
            MNIST37,
            everything + _grid("http", BATCHES, (1, 16)) + _python_loads(),
        ),
        ServerRun(BATCHING_OFF, _grid("grpc", (1,), (1, 16, 64)) + _grid("grpc", (64,), (4,))),
        ServerRun(
            WORKERS_AUTO,
            [
                *_grid("grpc", (1,), (16,)),
                *_grid("grpc", (64,), (4,)),
                Load("grpc", "python", 1, 16, MULTI_CHANNEL),
            ],
        ),
    ]


def full_plan() -> list[ServerRun]:
    everything = _grid("grpc", BATCHES, CONCURRENCIES)
    runs = [
        ServerRun(ECHO, everything + _python_loads()),
        ServerRun(BARE, everything + _python_loads()),
    ]
    for batching, workers in product(BATCHINGS, WORKERS):
        server = ServerSpec("mnist37", batching, workers)
        loads = [load for protocol in PROTOCOLS for load in _grid(protocol, BATCHES, CONCURRENCIES)]
        runs.append(ServerRun(server, loads + _python_loads()))
    return runs


def quick_plan() -> list[ServerRun]:
    return [
        ServerRun(ECHO, _grid("grpc", (1,), (1,))),
        ServerRun(BARE, _grid("grpc", (1, 64), (1,))),
        ServerRun(
            MNIST37,
            [
                *_grid("grpc", (1, 64), (1,)),
                *_grid("http", (1,), (1,)),
                Load("grpc", "python", 1, 1, 1),
            ],
        ),
    ]


@dataclass(frozen=True)
class Selection:
    """Subsets to keep; an empty tuple keeps everything of that kind."""

    kinds: tuple[str, ...] = ()
    batches: tuple[int, ...] = ()
    concurrencies: tuple[int, ...] = ()
    protocols: tuple[str, ...] = ()
    batchings: tuple[str, ...] = ()
    workers: tuple[str, ...] = ()
    generators: tuple[str, ...] = ()

    def keeps_server(self, server: ServerSpec) -> bool:
        if self.kinds and server.kind not in self.kinds:
            return False
        if server.kind != "mnist37":
            return True
        return (not self.batchings or server.batching in self.batchings) and (
            not self.workers or server.workers in self.workers
        )

    def keeps_load(self, load: Load) -> bool:
        return (
            (not self.batches or load.batch in self.batches)
            and (not self.concurrencies or load.concurrency in self.concurrencies)
            and (not self.protocols or load.protocol in self.protocols)
            and (not self.generators or load.generator in self.generators)
        )


def select(plan: list[ServerRun], selection: Selection) -> list[ServerRun]:
    """`plan` with only the servers and loads `selection` keeps (servers left with no load
    are dropped)."""
    kept = []
    for run in plan:
        if not selection.keeps_server(run.server):
            continue
        loads = [load for load in run.loads if selection.keeps_load(load)]
        if loads:
            kept.append(replace(run, loads=loads))
    return kept

"""What the server measures: per-model-version statistics (Triton's ModelStatistics) and
the observer interface through which metrics exporters see the same events.

The statistics are updated on the event loop thread only, so no locks are needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class Duration:
    """How many times something happened and how long it took in total."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchStats:
    """Executions of one batch size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class SplitRequestDurations:
    """One request split into chunks: its chunks' queue waits and their executions'
    compute durations, summed, to count as one request once every chunk is answered."""

    queue_ns: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0


@dataclass
class InferenceStats:
    """Cumulative figures for one model version, in Triton's terms: the request-level
    durations (`queue`, `compute_*`) count each answered request once, a request split into
    chunks with its chunks' durations summed; `execution_count` and `batches` count
    onnxruntime calls."""

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)

    def record_execution(
        self, batch_size: int, requests: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One onnxruntime call of `batch_size` images; `requests` whole (unsplit) requests
        in it take its compute durations as theirs."""
        self.execution_count += 1
        self.inference_count += batch_size
        self.last_inference_ms = time.time_ns() // 1_000_000
        batch = self.batches.get(batch_size)
        if batch is None:
            batch = self.batches[batch_size] = BatchStats()
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)

    def record_split_request(self, durations: SplitRequestDurations) -> None:
        """A request split into chunks was answered: count it once."""
        self.queue.add(durations.queue_ns)
        self.compute_input.add(durations.input_ns)
        self.compute_infer.add(durations.infer_ns)
        self.compute_output.add(durations.output_ns)


class InferenceObserver(Protocol):
    """Receives what happens at the service's edges (a metrics exporter implements it).

    Label values passed in are already bounded by the caller: `protocol` is "grpc" or "http"
    (`serving.edge.GRPC`, `HTTP`), `model` a loaded model's name, "_unknown" or "" (no model
    involved), `version` a loaded version or "", `code` a `grpc.StatusCode` name. Called on
    the event loop thread, except `model_*`, which a loader may call from any thread."""

    def rpc_finished(
        self, protocol: str, rpc: str, model: str, version: str, code: str, seconds: float
    ) -> None:
        """One request ended with status `code` after `seconds` on the server; `rpc` names
        the RPC it answers like over `protocol`."""

    def predictions_made(
        self, model: str, version: str, probability: np.ndarray, digit: np.ndarray
    ) -> None:
        """A request's images were classified: P(7) and the digit of each."""

    def batch_executed(
        self,
        model: str,
        version: str,
        batch_size: int,
        queue_seconds: Sequence[float],
        infer_seconds: float,
    ) -> None:
        """One onnxruntime call ran `batch_size` images; `queue_seconds` holds how long each
        request in it waited in the batcher (each chunk, for a request split into chunks)."""

    def model_loaded(self, model: str, version: str, arch: str, provider: str) -> None:
        """A model version was loaded (at startup or by a reload) and now serves."""

    def model_unloaded(self, model: str, version: str, arch: str, provider: str) -> None:
        """A model version stopped serving and will report nothing more."""

    def model_load_failed(self, model: str) -> None:
        """Loading a version of `model` failed; it is not served."""

    def watch_in_flight(self, read: Callable[[], int]) -> None:
        """`read()` returns the number of inference requests in flight, whenever asked."""


class NullObserver(InferenceObserver):
    """Observes nothing: every method is the protocol's no-op."""

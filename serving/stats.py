"""What the server measures: per-model-version statistics (Triton's ModelStatistics) and
the observer interface through which metrics exporters see the same events.

Everything here is updated on the event loop thread only, so no locks are needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol


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


@dataclass
class InferenceStats:
    """Cumulative figures for one model version, in Triton's terms: the request-level
    durations count each request once; `batches` counts executions per batch size."""

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


class InferenceObserver(Protocol):
    """Receives what happens to requests and batches (a metrics exporter implements it)."""

    def request_finished(self, model: str, version: str, outcome: str, seconds: float) -> None:
        """One request ended; outcome is "success" or an error kind (e.g. "invalid_argument")."""

    def batch_executed(
        self, model: str, version: str, batch_size: int, queue_seconds: float, infer_seconds: float
    ) -> None:
        """One onnxruntime call ran `batch_size` images; `queue_seconds` is its oldest
        request's wait."""


class NullObserver:
    def request_finished(self, model: str, version: str, outcome: str, seconds: float) -> None:
        pass

    def batch_executed(
        self, model: str, version: str, batch_size: int, queue_seconds: float, infer_seconds: float
    ) -> None:
        pass

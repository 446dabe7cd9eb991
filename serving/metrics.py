"""Prometheus metrics: `PrometheusObserver` implements `serving.stats.InferenceObserver`.

It keeps its own registry (no process-global state) and serves it over HTTP on
--metrics-port. Label values arrive already bounded (see the protocol's docstring); the
label children are cached per label tuple, so the hot path is a dict lookup, a counter
increment and a histogram observation, with no `labels()` call.

With `--workers N` (`serving.workers`) each worker's observer is `multiprocess`: its
values live in prometheus_client's per-process files (PROMETHEUS_MULTIPROC_DIR, which the
supervisor sets for its workers), and the supervisor's `SupervisorMetrics` serves their
sum on the one metrics port. Counters and histograms add up; each gauge says how its
workers' values combine (`multiprocess_mode`). What the files cannot do is delete a
series: an unloaded version's series stay at their last values (its `mnist37_model_info`
turns 0) until the server restarts.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from serving.contract import DIGITS

# Seconds, 25 us to 10 s in 1-2.5-5 steps: onnxruntime takes 10-30 us for one image, a
# request about 0.1-0.5 ms, a 4096-image request or an overloaded queue tens of ms.
LATENCY_BUCKETS = (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# P(7): finer near 0 and 1, where a confident model puts most images.
PROBABILITY_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# From this many images on, a response's P(7) values are observed in one vectorised pass;
# below it one by one (about 1 us each; the numpy pass costs about 8 us, measured).
VECTORISE_FROM = 8
OTHER_DIGIT = "other"
# With --workers, how often each worker copies its in-flight count into its metrics file:
# a worker is never scraped itself, so nothing could ask it at scrape time.
IN_FLIGHT_SAMPLE_SECONDS = 0.1


@dataclass(slots=True)
class _VersionSeries:
    """The per-model-version children that every successful request touches."""

    images: dict[int, Counter]
    other_images: Counter
    probability: Histogram


@dataclass(slots=True)
class _RpcSeries:
    requests: Counter
    duration: Histogram


class PrometheusObserver:
    def __init__(
        self, registry: CollectorRegistry | None = None, multiprocess: bool = False
    ) -> None:
        """`multiprocess`: a worker of `--workers N` (see the module docstring)."""
        self.registry = registry or CollectorRegistry()
        self.multiprocess = multiprocess
        self.requests = Counter(
            "mnist37_requests",
            "Requests answered (gRPC and HTTP), by gRPC status code",
            ["protocol", "rpc", "model", "version", "code"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "mnist37_request_duration_seconds",
            "Server-side time from receiving a request to answering it, errors included",
            ["protocol", "rpc", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_duration = Histogram(
            "mnist37_queue_duration_seconds",
            "Time each request (each chunk of a split request) waited in the batcher",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_duration = Histogram(
            "mnist37_inference_duration_seconds",
            "Duration of one onnxruntime call (one batch)",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "mnist37_batch_size",
            "Images per onnxruntime call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.images = Counter(
            "mnist37_images",
            "Images classified, by predicted digit",
            ["model", "version", "digit"],
            registry=self.registry,
        )
        self.probability = Histogram(
            "mnist37_probability",
            "P(7) of each classified image: a shift in this distribution is input drift",
            ["model", "version"],
            buckets=PROBABILITY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "mnist37_inflight_requests",
            "Inference requests (ModelInfer, Classify) being handled",
            registry=self.registry,
            multiprocess_mode="livesum",  # workers: the live workers' counts added up
        )
        self.model_info = Gauge(
            "mnist37_model_info",
            "1 for each loaded model version, with its architecture and onnxruntime provider",
            ["model", "version", "arch", "provider"],
            registry=self.registry,
            multiprocess_mode="livemax",  # workers: 1 while any live worker serves it
        )
        self.model_loads = Counter(
            "mnist37_model_load",
            "Model version loads (startup and reloads), by result",
            ["model", "result"],
            registry=self.registry,
        )
        self._probability_bounds = np.array([*PROBABILITY_BUCKETS, float("inf")], dtype=np.float64)
        self._latency_bounds = np.array([*LATENCY_BUCKETS, float("inf")], dtype=np.float64)
        self._rpc_series: dict[tuple[str, str, str, str, str], _RpcSeries] = {}
        self._version_series: dict[tuple[str, str], _VersionSeries] = {}
        self._batch_series: dict[tuple[str, str], tuple[Histogram, Histogram, Histogram]] = {}
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._sampler: threading.Thread | None = None
        self._closed = threading.Event()
        if not multiprocess:
            # A worker's probe would stay in its metrics file for good (a multiprocess series
            # cannot be removed): the supervisor checks the same library instead.
            _check_histogram_internals(self.probability.labels("", ""))
            self.probability.remove("", "")

    def watch_in_flight(self, read: Callable[[], int]) -> None:
        if not self.multiprocess:
            self.in_flight.set_function(read)
            return

        def sample() -> None:
            while not self._closed.wait(IN_FLIGHT_SAMPLE_SECONDS):
                self.in_flight.set(read())

        self._sampler = threading.Thread(target=sample, name="in-flight-sampler", daemon=True)
        self._sampler.start()

    def rpc_finished(
        self, protocol: str, rpc: str, model: str, version: str, code: str, seconds: float
    ) -> None:
        key = (protocol, rpc, model, version, code)
        series = self._rpc_series.get(key)
        if series is None:
            series = self._rpc_series[key] = _RpcSeries(
                self.requests.labels(protocol, rpc, model, version, code),
                self.request_duration.labels(protocol, rpc, model),
            )
        series.requests.inc()
        series.duration.observe(seconds)

    def predictions_made(
        self, model: str, version: str, probability: np.ndarray, digit: np.ndarray
    ) -> None:
        series = self._version_series.get((model, version))
        if series is None:
            series = self._version_series[(model, version)] = _VersionSeries(
                {number: self.images.labels(model, version, str(number)) for number in DIGITS},
                self.images.labels(model, version, OTHER_DIGIT),
                self.probability.labels(model, version),
            )
        count = len(digit)
        if count < VECTORISE_FROM:
            observe = series.probability.observe
            for value in probability.tolist():
                if value == value:  # a NaN would turn the histogram's sum into NaN for good
                    observe(value)
            for number in digit.tolist():
                series.images.get(number, series.other_images).inc()
            return
        _observe_many(series.probability, self._probability_bounds, probability)
        counted = 0
        for number, counter in series.images.items():
            found = int(np.count_nonzero(digit == number))
            if found:
                counter.inc(found)
                counted += found
        if counted < count:
            series.other_images.inc(count - counted)

    def batch_executed(
        self,
        model: str,
        version: str,
        batch_size: int,
        queue_seconds: Sequence[float],
        infer_seconds: float,
    ) -> None:
        children = self._batch_series.get((model, version))
        if children is None:
            children = self._batch_series[(model, version)] = (
                self.batch_size.labels(model),
                self.queue_duration.labels(model),
                self.inference_duration.labels(model, version),
            )
        sizes, queue, inference = children
        sizes.observe(batch_size)
        if len(queue_seconds) < VECTORISE_FROM:
            for seconds in queue_seconds:
                queue.observe(seconds)
        else:
            _observe_many(queue, self._latency_bounds, np.array(queue_seconds, dtype=np.float64))
        inference.observe(infer_seconds)

    def model_loaded(self, model: str, version: str, arch: str, provider: str) -> None:
        self.model_info.labels(model, version, arch, provider).set(1)
        self.model_loads.labels(model, "success").inc()

    def model_unloaded(self, model: str, version: str, arch: str, provider: str) -> None:
        """Removes the version's series: `model_info`, and the per-version counters and
        histograms, which would otherwise pile up with every reload (for rate() a series
        that ends is no problem; one that is re-created later starts again from 0).
        A worker's files cannot drop a series: its `model_info` turns 0, the rest stay."""
        if self.multiprocess:
            self.model_info.labels(model, version, arch, provider).set(0)
            return
        with contextlib.suppress(KeyError):  # never reported as loaded
            self.model_info.remove(model, version, arch, provider)
        for key in [key for key in list(self._rpc_series) if key[2:4] == (model, version)]:
            del self._rpc_series[key]
            self.requests.remove(*key)
        if self._version_series.pop((model, version), None) is not None:
            for digit in (*DIGITS, OTHER_DIGIT):
                self.images.remove(model, version, str(digit))
            self.probability.remove(model, version)
        if self._batch_series.pop((model, version), None) is not None:
            self.inference_duration.remove(model, version)

    def model_load_failed(self, model: str) -> None:
        self.model_loads.labels(model, "failure").inc()

    def serve(self, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        self._closed.set()
        if self._sampler is not None:
            self._sampler.join()
            self._sampler = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class SupervisorMetrics:
    """The one /metrics of `--workers N`, served by the supervisor: the sum of its workers'
    metrics, read from `multiprocess_dir` at each scrape, and its own (`None`: metrics are
    off, only its own are kept)."""

    def __init__(self, multiprocess_dir: str | os.PathLike[str] | None) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir
        if multiprocess_dir is not None:
            MultiProcessCollector(self.registry, path=os.fspath(multiprocess_dir))
        self.workers = Gauge("mnist37_workers", "Worker processes running", registry=self.registry)
        self.restarts = Counter(
            "mnist37_worker_restarts",
            "Workers restarted after they died (crashed, killed) while the server ran",
            registry=self.registry,
        )
        self._server: WSGIServer | None = None
        # The workers write the same library's histograms: check its internals here, once.
        _check_histogram_internals(Histogram("probe", "", registry=None))

    def worker_exited(self, pid: int) -> None:
        """A worker is gone: its live gauges (in-flight, model info) no longer count; its
        counters and histograms still do, so the totals never go back."""
        if self.multiprocess_dir is not None:
            mark_process_dead(pid, os.fspath(self.multiprocess_dir))

    def serve(self, host: str, port: int) -> None:
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _check_histogram_internals(child: Histogram) -> None:
    """`_observe_many` writes prometheus_client's per-bucket values directly; fail at
    startup, not on the first large request, if a new release changes them."""
    buckets = getattr(child, "_buckets", None)
    upper_bounds = getattr(child, "_upper_bounds", None)
    if (
        not isinstance(buckets, list)
        or upper_bounds is None
        or len(buckets) != len(upper_bounds)
        or not hasattr(buckets[0], "inc")
        or not hasattr(getattr(child, "_sum", None), "inc")
    ):
        raise RuntimeError("prometheus_client's Histogram internals changed: update metrics.py")


def _observe_many(child: Histogram, upper_bounds: np.ndarray, values: np.ndarray) -> None:
    """The same as `child.observe(v)` for every non-NaN v, in one pass: prometheus_client
    stores per-bucket (not cumulative) counts and puts v in the first bucket with v <= bound,
    which is what `searchsorted(side="left")` finds. NaN sorts past +Inf, into the extra
    last slot, which is dropped."""
    counts = np.bincount(np.searchsorted(upper_bounds, values), minlength=len(upper_bounds) + 1)
    # A Python loop over the ~15 counts as ints costs a third of np.flatnonzero's.
    for bucket, count in zip(child._buckets, counts.tolist()[:-1], strict=True):
        if count:
            bucket.inc(count)
    total = float(values.sum(dtype=np.float64))
    if total != total:
        total = float(np.nansum(values, dtype=np.float64))
    child._sum.inc(total)

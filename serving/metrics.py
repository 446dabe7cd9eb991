"""A small Prometheus exporter: the edge where the metrics issue plugs in.

`PrometheusObserver` implements `serving.stats.InferenceObserver`; it keeps its own
registry (no process-global state) and serves it over HTTP on --metrics-port.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class PrometheusObserver:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "mnist37_requests",
            "Inference requests by model, version and outcome",
            ["model", "version", "outcome"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "mnist37_request_duration_seconds",
            "Time from accepting an inference to answering it",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "mnist37_batch_size",
            "Images per onnxruntime call",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "mnist37_queue_duration_seconds",
            "Wait of a batch's oldest request before its onnxruntime call",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.infer_seconds = Histogram(
            "mnist37_inference_duration_seconds",
            "Duration of one onnxruntime call",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.model_info = Gauge(
            "mnist37_model_loaded",
            "1 for each loaded model version, labelled with its onnxruntime provider",
            ["model", "version", "provider"],
            registry=self.registry,
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def model_loaded(self, model: str, version: str, provider: str) -> None:
        self.model_info.labels(model, version, provider).set(1)

    def model_unloaded(self, model: str, version: str, provider: str) -> None:
        self.model_info.remove(model, version, provider)

    def request_finished(self, model: str, version: str, outcome: str, seconds: float) -> None:
        self.requests.labels(model, version, outcome).inc()
        if outcome == "success":
            self.request_seconds.labels(model, version).observe(seconds)

    def batch_executed(
        self, model: str, version: str, batch_size: int, queue_seconds: float, infer_seconds: float
    ) -> None:
        self.batch_size.labels(model, version).observe(batch_size)
        self.queue_seconds.labels(model, version).observe(queue_seconds)
        self.infer_seconds.labels(model, version).observe(infer_seconds)

    def serve(self, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

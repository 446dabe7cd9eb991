"""`mnist37-serve`: wires the model registry, data plane, edge, gRPC services and HTTP
endpoints together. gRPC and HTTP (aiohttp, `serving.rest`) run in the same event loop on
the same data plane, so their requests join the same batches, and share one edge state.

Health: the overall service "" (and each gRPC service) is readiness, SERVING while a model
is loaded; `liveness` is SERVING from the moment the server answers, model or not.

Shutdown on SIGTERM/SIGINT is a drain: every health service, `liveness` included, turns
NOT_SERVING (load balancers stop sending), every request that reaches the server is still
served until none has been in flight for --drain-quiet-period, and only then do the gRPC
and HTTP servers stop, with nothing left to cancel. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.batcher import BatchListener
from serving.catalog import Catalog
from serving.classifier import Classification, ClassifierServicer
from serving.config import ServerConfig, load_config
from serving.contract import PIXELS
from serving.dataplane import DataPlane
from serving.edge import EdgeState
from serving.generated.inference import grpc_service_pb2 as oip_pb
from serving.generated.inference import grpc_service_pb2_grpc as oip_grpc
from serving.generated.mnist37.v1 import classifier_pb2 as classifier_pb
from serving.generated.mnist37.v1 import classifier_pb2_grpc as classifier_grpc
from serving.healthcheck import LIVENESS_SERVICE
from serving.imaging import PngLimits
from serving.logs import FailureLogLimiter, configure_logging
from serving.metrics import PrometheusObserver
from serving.oip import InferenceServicer
from serving.registry import BatchingOptions, LoadedModel, ModelRegistry, load_model_version
from serving.reloader import ModelReloader
from serving.repository import ModelVersion
from serving.rest.classify import ClassifyEndpoint
from serving.rest.edge import Route
from serving.rest.oip import InferenceEndpoints
from serving.rest.server import HttpServer, HttpSettings
from serving.runtime import DeviceUnavailable, RuntimeOptions, requested_providers

log = logging.getLogger("serving")

OIP_SERVICE = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
CLASSIFIER_SERVICE = classifier_pb.DESCRIPTOR.services_by_name["Classifier"].full_name
# Health service names that are the server's own; a model of the same name gets no status.
SERVER_HEALTH_SERVICES = ("", OIP_SERVICE, CLASSIFIER_SERVICE, LIVENESS_SERVICE)


class StartupError(Exception):
    """The server cannot start; the message says why."""


class InferenceServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.registry = ModelRegistry()
        self.observer = PrometheusObserver() if config.metrics_port else None
        self.dataplane = DataPlane(self.registry, config.max_request_images, self.observer)
        # One edge state for both servicers: the drain counts and stops them together.
        self.edge = EdgeState(FailureLogLimiter(config.log_failures_per_second))
        self.dataplane.observer.watch_in_flight(lambda: self.edge.in_flight)
        self.executor = ThreadPoolExecutor(
            max_workers=config.inference_threads, thread_name_prefix="onnxruntime"
        )
        self.png_executor = ThreadPoolExecutor(
            max_workers=config.png_threads, thread_name_prefix="png"
        )
        self.catalog = Catalog(
            self.dataplane,
            self.edge,
            config.repository,
            config.max_queue_delay_us,
            config.keep_versions,
        )
        self.classification = Classification(
            self.dataplane,
            PngLimits(config.max_png_pixels, config.max_request_png_pixels),
            self.png_executor,
        )
        try:
            self.http_settings = HttpSettings.from_config(config)
        except ValueError as error:
            raise StartupError(str(error)) from error
        self.health = health.aio.HealthServicer()
        self.reloader = ModelReloader(
            config.repository,
            self.registry,
            self._load_version,
            self.dataplane.observer,
            keep_versions=config.keep_versions,
            poll_interval=config.poll_interval,
            on_change=self._update_health,
        )
        self.grpc_server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.http: HttpServer | None = None

    async def start(self) -> None:
        config = self.config
        if not config.repository.is_dir():
            raise StartupError(f"model repository {config.repository} is not a directory")
        requested_providers(config.device)  # --device cuda without CUDA: refuse, model or not
        await self.reloader.start()
        if not self.registry.is_ready():
            log.warning(
                "no loadable model in %s: the server is live but not ready", config.repository
            )
        self._build_grpc_server()
        # Live from the first answer on, whether or not a model is loaded: a restart would
        # not load one. Only the drain (enter_graceful_shutdown) turns it NOT_SERVING.
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.grpc_server.start()
        await self._start_http()
        if self.observer is not None:
            try:
                self.observer.serve(config.host, config.metrics_port)
            except OSError as error:
                raise StartupError(
                    f"cannot serve metrics on {config.host}:{config.metrics_port}: {error.strerror}"
                ) from error
        await self._update_health()
        log.info(
            "serving %d model version(s) on %s (gRPC), %s (HTTP), metrics on %s",
            len(self.registry.all()),
            f"{config.host}:{self.port}",
            f"{config.host}:{self.http.port}" if self.http else "off",
            config.metrics_port or "off",
        )

    async def _start_http(self) -> None:
        """The HTTP endpoints on --http-port, unless it is 0."""
        settings = self.http_settings
        if not settings.port:
            return
        self.http = HttpServer(
            settings,
            self.config.host,
            self.dataplane,
            self.edge,
            self.http_routes(),
            shutdown_timeout=self.config.shutdown_timeout,
        )
        try:
            await self.http.start()
        except OSError as error:
            self.http = None
            raise StartupError(
                f"cannot listen on {self.config.host}:{settings.port} (HTTP): {error.strerror}"
            ) from error

    def http_routes(self) -> list[Route]:
        """Every HTTP endpoint, on this server's data plane, catalog and classification."""
        limits = self.http_settings.body_limits
        return [
            *InferenceEndpoints(self.dataplane, self.catalog, limits).routes(),
            *ClassifyEndpoint(self.classification, limits).routes(),
        ]

    def _load_version(self, model_version: ModelVersion) -> LoadedModel:
        """Load, check and warm up one version (blocking: the reloader runs it in a thread)."""
        config = self.config
        return load_model_version(
            model_version,
            RuntimeOptions(
                config.device,
                config.intra_op_threads,
                config.inter_op_threads,
                config.graph_optimization,
            ),
            BatchingOptions(config.max_batch_size, config.max_queue_delay_us / 1e6),
            self.executor,
            self._batch_listener(model_version),
        )

    def _batch_listener(self, model_version: ModelVersion) -> BatchListener:
        name, version = model_version.name, str(model_version.version)
        dataplane = self.dataplane

        def on_batch(batch_size: int, queue_seconds: list[float], infer_seconds: float) -> None:
            dataplane.observer.batch_executed(
                name, version, batch_size, queue_seconds, infer_seconds
            )

        return on_batch

    def _build_grpc_server(self) -> None:
        config = self.config
        message_limit = config.max_request_images * PIXELS * 2 + 1024 * 1024
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", message_limit),
                ("grpc.max_send_message_length", message_limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.dataplane, self.edge, self.catalog), server
        )
        classifier = ClassifierServicer(self.dataplane, self.edge, self.classification)
        classifier_grpc.add_ClassifierServicer_to_server(classifier, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                OIP_SERVICE,
                CLASSIFIER_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            self.port = server.add_insecure_port(config.grpc_address)
        except RuntimeError as error:
            raise StartupError(f"cannot listen on {config.grpc_address}: {error}") from error
        if not self.port:
            raise StartupError(f"cannot listen on {config.grpc_address}")
        self.grpc_server = server

    async def _update_health(self) -> None:
        """SERVING for each model with a loaded version, NOT_SERVING for the other models
        seen; the server and its services are SERVING while any model is. `liveness` is
        not touched here (see start)."""
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        overall = serving if self.registry.is_ready() else not_serving
        for service in ("", OIP_SERVICE, CLASSIFIER_SERVICE):
            await self.health.set(service, overall)
        for name in self.reloader.known_models:
            if name in SERVER_HEALTH_SERVICES:
                continue
            await self.health.set(name, serving if self.registry.versions(name) else not_serving)

    async def drain_and_stop(self, force: asyncio.Event | None = None) -> None:
        """Stop taking traffic gracefully: see the module docstring."""
        loop = asyncio.get_running_loop()
        config = self.config
        deadline = loop.time() + config.shutdown_timeout
        log.info("draining: health NOT_SERVING, finishing requests in flight")
        await self.health.enter_graceful_shutdown()
        quiet_since: float | None = None
        while loop.time() < deadline and not (force and force.is_set()):
            now = loop.time()
            if self.edge.in_flight:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= config.drain_quiet_period:
                break
            await asyncio.sleep(0.005)
        self.edge.accepting = False
        if self.grpc_server is not None:
            grace = 0.0 if force and force.is_set() else max(0.0, deadline - loop.time())
            await self.grpc_server.stop(grace)
        if self.http is not None:
            await self.http.stop()
        await self.reloader.stop()
        for model in self.registry.swap([]):
            await model.wait_idle()
        self.executor.shutdown(wait=True)
        self.png_executor.shutdown(wait=True)
        if self.observer is not None:
            self.observer.close()
        log.info("stopped")


async def serve(config: ServerConfig) -> int:
    server = InferenceServer(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    force = asyncio.Event()

    def on_signal(number: int) -> None:
        if stop.is_set():
            log.warning("second %s: stopping without waiting", signal.Signals(number).name)
            force.set()
        else:
            log.info("%s received", signal.Signals(number).name)
            stop.set()

    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, on_signal, number)

    def on_sighup() -> None:
        log.info("SIGHUP received: scanning the model repository")
        server.reloader.trigger()

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    try:
        await server.start()
    except BaseException:
        server.executor.shutdown(wait=False)
        server.png_executor.shutdown(wait=False)
        if server.grpc_server is not None:
            await server.grpc_server.stop(0)
        if server.http is not None:
            await server.http.stop()
        raise
    await stop.wait()
    await server.drain_and_stop(force)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    config = load_config(argv)
    configure_logging(config.log_level, config.log_format)
    try:
        return asyncio.run(serve(config))
    except (StartupError, DeviceUnavailable) as error:
        log.error("refusing to start: %s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())

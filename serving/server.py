"""`mnist37-serve`: wires the model registry, data plane, edge, gRPC services and HTTP
endpoints together. gRPC and HTTP (aiohttp, `serving.rest`) run in the same event loop on
the same data plane, so their requests join the same batches, and share one edge state.

Health: the overall service "" (and each gRPC service) is readiness, SERVING while a model
is loaded; `liveness` is SERVING from the moment the server answers, model or not.

Shutdown on SIGTERM/SIGINT is a drain: every health service, `liveness` included, turns
NOT_SERVING (load balancers stop sending) and requests are served as before until none has
been in flight for --drain-quiet-period (half of --shutdown-timeout at most, for clients
that keep sending). Then new inference requests are refused with UNAVAILABLE (a client
retries elsewhere) while those in flight finish, and only once no request has arrived for
the quiet period does the gRPC server stop: nothing is left for it to cancel. A second
signal skips every wait and stops at once.

With `--workers N` (N > 1; `serving.workers`) this process is a supervisor: it starts N
worker processes that each run everything above, on the same gRPC and HTTP ports
(SO_REUSEPORT), and forwards its signals to them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.access import (
    AccessConfigError,
    AuthInterceptor,
    TokenFile,
    server_credentials,
    server_ssl_context,
)
from serving.batcher import BatchListener
from serving.catalog import Catalog
from serving.classifier import MAX_EXPLANATION_BYTES, Classification, ClassifierServicer
from serving.config import ServerConfig, load_config
from serving.console import console_script
from serving.contract import PIXELS
from serving.cpus import worker_count
from serving.dataplane import DataPlane
from serving.edge import GRPC, EdgeState
from serving.generated.inference import grpc_service_pb2 as oip_pb
from serving.generated.mnist37.v1 import classifier_pb2 as classifier_pb
from serving.handlers import add_service
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
from serving.rest.web import WebPage
from serving.runtime import DeviceUnavailable, RuntimeOptions, requested_providers

if TYPE_CHECKING:
    from serving.workers import SupervisorLink

log = logging.getLogger("serving")

OIP_DESCRIPTOR = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
CLASSIFIER_DESCRIPTOR = classifier_pb.DESCRIPTOR.services_by_name["Classifier"]
OIP_SERVICE = OIP_DESCRIPTOR.full_name
CLASSIFIER_SERVICE = CLASSIFIER_DESCRIPTOR.full_name
# What stays open to probes when tokens are required (unless --protect-health).
HEALTH_METHODS = tuple(
    f"/{method.full_name.rsplit('.', 1)[0]}/{method.name}"
    for method in health_pb2.DESCRIPTOR.services_by_name["Health"].methods
)
# Health service names that are the server's own; a model of the same name gets no status.
SERVER_HEALTH_SERVICES = ("", OIP_SERVICE, CLASSIFIER_SERVICE, LIVENESS_SERVICE)


class StartupError(Exception):
    """The server cannot start; the message says why."""


class InferenceServer:
    def __init__(self, config: ServerConfig, worker: int | None = None) -> None:
        """`worker`: this process's index among the workers of `--workers N`, which share
        its ports (SO_REUSEPORT) and whose metrics the supervisor sums and serves; None
        for the only process."""
        self.config = config
        self.worker = worker
        self.registry = ModelRegistry()
        self.observer = (
            PrometheusObserver(multiprocess=worker is not None) if config.metrics_port else None
        )
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
        # Requests large enough to stall the event loop while parsed are parsed here.
        self.parse_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="parse")
        self.catalog = Catalog(
            self.dataplane,
            self.edge,
            config.repository,
            config.max_queue_delay_us,
            config.keep_versions,
            worker,
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
        # Every port (gRPC, HTTP, metrics) listens: only then may readiness say SERVING, so
        # a health check over gRPC (compose, Kubernetes) also vouches for the HTTP port.
        self._listening = False
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
        # Read at construction, so a bad TLS file or token file refuses to start at once.
        # gRPC and HTTP take the same certificate, client CA and tokens.
        try:
            self.credentials = server_credentials(
                config.tls_cert, config.tls_key, config.tls_client_ca
            )
            self.ssl_context = server_ssl_context(
                config.tls_cert, config.tls_key, config.tls_client_ca
            )
            self.tokens = (
                TokenFile(config.auth_token_file) if config.auth_token_file is not None else None
            )
        except AccessConfigError as error:
            raise StartupError(str(error)) from error

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
        # Not ready until every port listens (grpcio's servicer starts "" as SERVING).
        await self._update_health()
        await self.grpc_server.start()
        await self._start_http()
        if self.observer is not None and self.worker is None:  # a worker's: the supervisor's
            try:
                self.observer.serve(config.metrics_host, config.metrics_port)
            except OSError as error:
                raise StartupError(
                    f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: "
                    f"{error.strerror}"
                ) from error
        self._listening = True
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
            tokens=self.tokens,
            open_health=not self.config.protect_health,
            ssl_context=self.ssl_context,
            shutdown_timeout=self.config.shutdown_timeout,
            reuse_port=self.worker is not None,
        )
        try:
            await self.http.start()
        except OSError as error:
            self.http = None
            raise StartupError(
                f"cannot listen on {self.config.host}:{settings.port} (HTTP): {error.strerror}"
            ) from error

    def http_routes(self) -> list[Route]:
        """Every HTTP endpoint, on this server's data plane, catalog and classification,
        and the web page that calls them."""
        limits = self.http_settings.body_limits
        return [
            *InferenceEndpoints(self.dataplane, self.catalog, limits).routes(),
            *ClassifyEndpoint(self.classification, limits).routes(),
            *WebPage().routes(),
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
            BatchingOptions(
                config.max_batch_size,
                config.max_queue_delay_us / 1e6,
                config.max_queued_images,
                config.max_queued_requests,
            ),
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

    @property
    def executors(self) -> tuple[ThreadPoolExecutor, ...]:
        return (self.executor, self.png_executor, self.parse_executor)

    def _grpc_options(self) -> list[tuple[str, int]]:
        """The channel arguments that bound what one client can make the server spend."""
        config = self.config
        # The largest valid request (typed contents: up to 2 bytes a pixel), and the largest
        # answer, Explain's: each image's votes and pixels, 3x its request.
        message_limit = config.max_request_images * PIXELS * 2 + 1024 * 1024
        answer_limit = config.max_request_images * MAX_EXPLANATION_BYTES + 1024 * 1024
        return [
            ("grpc.max_receive_message_length", message_limit),
            ("grpc.max_send_message_length", answer_limit),
            # gzip/deflate would be inflated before the size check (1 MB on the wire can
            # become 1 GB): identity only, so a compressed request is refused unread.
            ("grpc.compression_enabled_algorithms_bitset", 1),
            # Streams per connection: with connections, what bounds the bytes received at
            # once (gRPC reads a whole message before any handler can refuse it). Without
            # "overload protection" the limit is plain HTTP/2 flow control: a client queues
            # its extra streams instead of having them reset (REFUSED_STREAM, UNAVAILABLE).
            ("grpc.max_concurrent_streams", config.max_streams_per_connection),
            ("grpc.http.overload_protection", 0),
            ("grpc.max_allowed_incoming_connections", config.max_connections),
            ("grpc.max_connection_idle_ms", int(config.idle_timeout * 1000)),
            # A connection that never finishes its handshake (or never sends a byte) is
            # dropped after 5 s instead of 20, so it cannot hold up a shutdown.
            ("grpc.server_handshake_timeout_ms", 5000),
            # Ping idle-looking clients, drop those that do not answer within 20 s.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            # Off, so that a port another server holds is refused, not silently shared
            # (grpc's default on Linux is on); on for the workers of --workers N, which share
            # it on purpose, the supervisor having checked that no one else holds it.
            ("grpc.so_reuseport", int(self.worker is not None)),
        ]

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if self.tokens is None:
            return []
        observer = self.dataplane.observer

        def refused(rpc: str) -> None:
            observer.rpc_finished(GRPC, rpc, "", "", grpc.StatusCode.UNAUTHENTICATED.name, 0.0)

        open_methods = () if self.config.protect_health else HEALTH_METHODS
        return [AuthInterceptor(self.tokens, open_methods, refused)]

    def _build_grpc_server(self) -> None:
        config = self.config
        # No maximum_concurrent_rpcs: grpc.aio makes the calls past it wait unseen, not
        # fail; admission is the model queue's bound, which refuses at once.
        server = grpc.aio.server(interceptors=self._interceptors(), options=self._grpc_options())
        observer = self.dataplane.observer

        def malformed(rpc: str, seconds: float) -> None:
            observer.rpc_finished(GRPC, rpc, "", "", grpc.StatusCode.INVALID_ARGUMENT.name, seconds)

        inference = InferenceServicer(self.dataplane, self.edge, self.catalog)
        classifier = ClassifierServicer(self.dataplane, self.edge, self.classification)
        for service, servicer in ((OIP_DESCRIPTOR, inference), (CLASSIFIER_DESCRIPTOR, classifier)):
            add_service(server, service, servicer, self.parse_executor, on_malformed=malformed)
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
            if self.credentials is None:
                self.port = server.add_insecure_port(config.grpc_address)
            else:
                self.port = server.add_secure_port(config.grpc_address, self.credentials)
        except RuntimeError as error:
            raise StartupError(f"cannot listen on {config.grpc_address}: {error}") from error
        if not self.port:
            raise StartupError(f"cannot listen on {config.grpc_address}")
        self.grpc_server = server

    async def _update_health(self) -> None:
        """SERVING for each model with a loaded version, NOT_SERVING for the other models
        seen; the server and its services are SERVING while any model is, once every port
        listens. `liveness` is not touched here (see start)."""
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        overall = serving if self._listening and self.registry.is_ready() else not_serving
        for service in ("", OIP_SERVICE, CLASSIFIER_SERVICE):
            await self.health.set(service, overall)
        for name in self.reloader.known_models:
            if name in SERVER_HEALTH_SERVICES:
                continue
            loaded = self._listening and self.registry.versions(name)
            await self.health.set(name, serving if loaded else not_serving)

    async def _until_quiet(
        self, quiet: Callable[[], bool], until: float, force: asyncio.Event
    ) -> None:
        """Returns once `quiet()` has held for --drain-quiet-period, at `until` (event-loop
        time), or when a second signal sets `force`."""
        loop = asyncio.get_running_loop()
        quiet_since: float | None = None
        while loop.time() < until and not force.is_set():
            now = loop.time()
            if not quiet():
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= self.config.drain_quiet_period:
                return
            await asyncio.sleep(0.005)

    async def _stop_grpc(self, grace: float, force: asyncio.Event) -> None:
        """grpc's stop with `grace`, cut short to none by a second signal; after that, at
        most a second more: a connection still in its handshake must not keep the process."""
        stopping = asyncio.ensure_future(self.grpc_server.stop(grace))
        forced = asyncio.ensure_future(force.wait())
        await asyncio.wait((stopping, forced), return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if not stopping.done():
            await self.grpc_server.stop(0)
            await asyncio.wait((stopping,), timeout=1.0)

    async def drain_and_stop(self, force: asyncio.Event | None = None) -> None:
        """Stop taking traffic gracefully: see the module docstring."""
        loop = asyncio.get_running_loop()
        config = self.config
        force = force or asyncio.Event()
        deadline = loop.time() + config.shutdown_timeout
        log.info("draining: health NOT_SERVING, finishing requests in flight")
        await self.health.enter_graceful_shutdown()
        # 1. Serve as before while load balancers notice NOT_SERVING: until nothing is in
        # flight for the quiet period, for half the time allowed at most.
        announce_until = loop.time() + config.shutdown_timeout / 2
        await self._until_quiet(lambda: self.edge.in_flight == 0, announce_until, force)
        # 2. Refuse new requests (UNAVAILABLE: clients retry elsewhere), finish the ones in
        # flight, and wait until clients stop sending, so that stopping the transport below
        # finds no request it would have to cancel.
        self.edge.accepting = False

        def settled() -> bool:
            since = time.monotonic() - self.edge.last_arrival
            return self.edge.in_flight == 0 and since >= config.drain_quiet_period

        await self._until_quiet(settled, deadline, force)
        if self.grpc_server is not None:
            grace = 0.0 if force.is_set() else max(0.0, deadline - loop.time())
            await self._stop_grpc(grace, force)
        if self.http is not None:
            await self.http.stop()
        await self.reloader.stop()
        for model in self.registry.swap([]):
            await model.wait_idle()
        for executor in self.executors:
            executor.shutdown(wait=True)
        if self.observer is not None:
            self.observer.close()
        log.info("stopped")


async def serve(config: ServerConfig, supervisor: SupervisorLink | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain; a worker of --workers N (with `supervisor`,
    its link to the supervisor) also drains when the supervisor is gone."""
    server = InferenceServer(config, None if supervisor is None else supervisor.index)
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
        for executor in server.executors:
            executor.shutdown(wait=False)
        if server.grpc_server is not None:
            await server.grpc_server.stop(0)
        if server.http is not None:
            await server.http.stop()
        raise
    if supervisor is not None:
        supervisor.started(loop, stop.set)
    await stop.wait()
    await server.drain_and_stop(force)
    return 0


def refuse_busy_ports(config: ServerConfig) -> None:
    """Raise StartupError if the gRPC, the HTTP or the metrics port cannot be bound, before
    any model is loaded. gRPC's C-core writes its own lines to stderr (absl's "All log messages
    before absl::InitializeLog()", chttp2_server.cc's "No address added") before
    add_insecure_port fails, so a busy port is found here first and refused in one line.
    The real binds stay the authority: a port taken in between is still refused."""
    if config.grpc_port:  # 0: any free port
        _check_bindable(config.host, config.grpc_port, f"cannot listen on {config.grpc_address}")
    if config.http_port:
        where = f"cannot listen on {config.host}:{config.http_port} (HTTP)"
        _check_bindable(config.host, config.http_port, where)
    if config.metrics_port:
        where = f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}"
        _check_bindable(config.metrics_host, config.metrics_port, where)


def _check_bindable(host: str, port: int, what: str) -> None:
    """Bind each address `host` resolves to as gRPC and prometheus_client do (SO_REUSEADDR,
    no SO_REUSEPORT: see "grpc.so_reuseport" above); like them, one that binds is enough."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise StartupError(f"{what}: {error.strerror}") from error
    problem = "no address"
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                problem = error.strerror or str(error)
            else:
                return
    raise StartupError(f"{what}: {problem}")


@console_script
def main(argv: Sequence[str] | None = None) -> int:
    config = load_config(argv)
    configure_logging(config.log_level, config.log_format)
    try:
        refuse_busy_ports(config)
        workers = worker_count(config.workers)
        if workers > 1:
            # Imported here: serving.workers imports this module (its workers run serve()).
            from serving.workers import supervise

            return supervise(config, workers)
        return asyncio.run(serve(config))
    except (StartupError, DeviceUnavailable) as error:
        log.error("refusing to start: %s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The HTTP server: aiohttp in the running event loop (grpc.aio's), serving routes.

Every request runs in an `HttpCall` (metrics, logs, in-flight count and drain, error
answers); a path or method no route has is answered 404 or 405 the same way (by catch-all
routes), under the one rpc name "_unknown" so that clients cannot create label values.
With a `TokenFile`, every endpoint but the health ones (when `open_health`) and the web
page's files (`Route.public`: they carry no secret, and a browser cannot send a token when
it opens a page) needs `Authorization: Bearer <token>` and answers 401 without it, before
reading any body.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from serving.access import TokenFile
from serving.config import HTTP_MAX_BODY_BYTES, ServerConfig
from serving.dataplane import DataPlane
from serving.edge import HTTP, EdgeState
from serving.errors import MethodNotAllowed, Unauthenticated, UnknownEndpoint, shown
from serving.logs import bounded
from serving.rest.edge import BodyLimits, Handler, HttpCall, Route, expect_later

rpc_log = logging.getLogger("serving.rpc")  # where serving.edge logs failed requests

UNKNOWN_RPC = "_unknown"
# aiohttp's parser messages quote the bytes it could not parse: this much of them is logged.
MAX_PARSER_MESSAGE = 200
UNAUTHENTICATED_MESSAGE = (
    "missing or invalid bearer token: send the header `Authorization: Bearer <token>`"
)


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP edge's settings: ServerConfig's `http_<name>` fields (`--http-port`, ...)."""

    port: int = 8000  # Triton's and KServe's HTTP port; 0 turns HTTP off
    max_body_bytes: int = HTTP_MAX_BODY_BYTES  # see serving.config
    body_timeout: float = 30.0  # seconds for a whole body to arrive, against slow clients

    @property
    def body_limits(self) -> BodyLimits:
        return BodyLimits(self.max_body_bytes, self.body_timeout)

    @classmethod
    def from_config(cls, config: ServerConfig) -> HttpSettings:
        """`config`'s `http_<name>` fields; ValueError if one is out of range."""
        settings = cls(config.http_port, config.http_max_body_bytes, config.http_body_timeout)
        settings.check()
        return settings

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"the HTTP port {self.port} is not 0-65535")
        if self.max_body_bytes <= 0 or self.body_timeout <= 0:
            raise ValueError("the HTTP body limit and timeout must be positive")


class HttpServer:
    """`routes` on host:`settings.port`, with an optional token file and TLS context (the
    caller builds both), sharing `dataplane` and `edge` with the gRPC servicers."""

    def __init__(
        self,
        settings: HttpSettings,
        host: str,
        dataplane: DataPlane,
        edge: EdgeState,
        routes: Iterable[Route],
        tokens: TokenFile | None = None,
        open_health: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        shutdown_timeout: float = 30.0,
        reuse_port: bool = False,
    ) -> None:
        """`reuse_port`: listen with SO_REUSEPORT, beside the other workers of
        `--workers N` on the same port (the kernel spreads connections between them)."""
        self.settings = settings
        self.reuse_port = reuse_port
        self.host = host
        self.dataplane = dataplane
        self.edge = edge
        self.tokens = tokens
        self.open_health = open_health
        self.ssl_context = ssl_context
        # No middleware: aiohttp caches middleware-wrapped handlers in a process-wide
        # cache, which would keep a stopped server (and its gRPC server) alive.
        self.app = web.Application()
        self._add_routes(routes)
        # No access log: only failed requests are logged (see serving.logs). The body is
        # read as it arrives, undecoded, so that limits count what the client sent.
        self._runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            auto_decompress=False,
            logger=_UnparsedRequests(dataplane, edge),
            shutdown_timeout=shutdown_timeout,
        )
        self.port: int | None = None

    async def start(self) -> None:
        """Listen on host:port; OSError if it cannot."""
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self.host,
            self.settings.port,
            ssl_context=self.ssl_context,
            reuse_port=self.reuse_port or None,  # None: asyncio's default, not set
        )
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening, finish what is in flight (the drain waited for it already),
        close the connections."""
        await self._runner.cleanup()

    def _add_routes(self, routes: Iterable[Route]) -> None:
        """`routes`, then for each path a route answering 405 to its other methods, then
        one answering 404 to every other path."""
        router = self.app.router
        by_path: dict[str, list[Route]] = {}
        for route in routes:
            by_path.setdefault(route.path, []).append(route)
        for path, routes_here in by_path.items():
            methods = []
            for route in routes_here:
                handler = self._endpoint(route)
                if route.method == "GET":  # and HEAD (a probe may use it), as add_get does
                    router.add_get(path, handler, expect_handler=expect_later)
                    methods += ["GET", "HEAD"]
                else:
                    router.add_route(route.method, path, handler, expect_handler=expect_later)
                    methods.append(route.method)
            refusal = Route("*", path, UNKNOWN_RPC, _method_not_allowed(tuple(sorted(methods))))
            router.add_route("*", path, self._endpoint(refusal, guarded=False))
        unknown = Route("*", "/{path:.*}", UNKNOWN_RPC, _unknown_endpoint)
        router.add_route("*", unknown.path, self._endpoint(unknown, guarded=False))

    def _endpoint(self, route: Route, guarded: bool = True):
        """`route`'s handler in an HttpCall; `guarded`: behind the token check (unless a
        public route, or a health route and `open_health`)."""

        async def handle(request: web.Request) -> web.StreamResponse:
            call = HttpCall(self.dataplane, self.edge, route.rpc, request, route.inference)
            async with call:
                if guarded and not (route.public or (route.health and self.open_health)):
                    self._authorize(request)
                return await route.handler(request, call)
            return call.answer()  # reached only when the call failed: HttpCall kept it

        return handle

    def _authorize(self, request: web.Request) -> None:
        if self.tokens is not None and not self.tokens.allows(request.headers.get("Authorization")):
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)


def _method_not_allowed(allowed: tuple[str, ...]) -> Handler:
    async def refuse(request: web.Request, call: HttpCall) -> web.StreamResponse:
        raise MethodNotAllowed(
            f"{shown(request.method)} is not allowed on {shown(request.path)}: "
            f"use {', '.join(allowed)}",
            allowed,
        )

    return refuse


async def _unknown_endpoint(request: web.Request, call: HttpCall) -> web.StreamResponse:
    raise UnknownEndpoint(f"no endpoint at {shown(request.path)}")


class _UnparsedRequests(logging.LoggerAdapter):
    """aiohttp's log, where it reports the requests it could not parse (a bad request line,
    headers or chunked framing; it answers those 400 itself, before any route): each is
    counted like a routed failure (rpc "_unknown", INVALID_ARGUMENT) and logged like one,
    a rate-limited warning without aiohttp's traceback. Anything else passes through."""

    def __init__(self, dataplane: DataPlane, edge: EdgeState) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self._dataplane = dataplane
        self._edge = edge

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        error = kwargs.get("exc_info")
        if not isinstance(error, HttpProcessingError):
            super().log(level, msg, *args, **kwargs)
            return
        code = "INVALID_ARGUMENT"
        self._dataplane.observer.rpc_finished(HTTP, UNKNOWN_RPC, "", "", code, 0.0)
        if self._edge.failure_log.allow(UNKNOWN_RPC, code, logging.WARNING):
            rpc_log.warning(
                "%s failed: %s (HTTP 400): the request is not valid HTTP: %s",
                UNKNOWN_RPC,
                code,
                bounded(str(error.message), MAX_PARSER_MESSAGE),
                extra={"rpc": UNKNOWN_RPC, "model": "", "version": "", "code": code},
            )

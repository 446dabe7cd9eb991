"""The edge every servicer shares, gRPC's and HTTP's.

Every request runs inside one `EdgeCall` (`RpcCall` for gRPC, `serving.rest.edge.HttpCall`
for HTTP), which turns a `ServingError` into its status, counts the request by protocol and
status code with its model and version (bounded labels), times it, and logs it once if it failed
(rate-limited per RPC and code). An inference request refused (invalid, or an Explain of a
version that cannot explain) after its model was resolved also counts as failed in that
model's Triton statistics.

`STATUS` is the one map from error types to statuses: each type has a gRPC status code and
an HTTP status, so both protocols answer the same error the same way, and the metrics and
logs name both by the gRPC code.

`EdgeState` is what the edge knows across requests: the inference requests in flight,
whether new ones are still accepted (the drain in `serving.server` waits for the first to
reach 0, then ends the second) and the failure-log rate limit. The server owns one; the
requests of every servicer, gRPC and HTTP, share it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import ClassVar

import grpc

from serving.dataplane import DataPlane
from serving.errors import (
    ClientGone,
    DeadlineExpired,
    InvalidInput,
    MethodNotAllowed,
    ModelNotFound,
    NotExplainable,
    Overloaded,
    RequestTimeout,
    RequestTooLarge,
    ServerNotReady,
    ServingError,
    Unauthenticated,
    UnknownEndpoint,
    UnsupportedMediaType,
)
from serving.logs import FailureLogLimiter
from serving.registry import LoadedModel

log = logging.getLogger("serving.rpc")

UNKNOWN_MODEL = "_unknown"
MAX_LOGGED_NAME = 100
# The `protocol` label of the request metrics: which edge answered, never anything else.
GRPC = "grpc"
HTTP = "http"


@dataclass(frozen=True, slots=True)
class Status:
    """How an outcome is answered: its gRPC status code and its HTTP status."""

    code: grpc.StatusCode
    http: int


OK = Status(grpc.StatusCode.OK, 200)
INTERNAL = Status(grpc.StatusCode.INTERNAL, 500)
# 499 (nginx's "client closed request"): the client that cancelled never sees it.
CANCELLED = Status(grpc.StatusCode.CANCELLED, 499)
DEADLINE_EXCEEDED = Status(grpc.StatusCode.DEADLINE_EXCEEDED, 504)

# The one map from error types to statuses, for both protocols (a subclass not listed takes
# its nearest listed ancestor's). Two types may share a gRPC code and differ in HTTP.
STATUS: dict[type[ServingError], Status] = {
    ModelNotFound: Status(grpc.StatusCode.NOT_FOUND, 404),
    InvalidInput: Status(grpc.StatusCode.INVALID_ARGUMENT, 400),
    # What grpc itself answers a message over its size limit.
    RequestTooLarge: Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    UnsupportedMediaType: Status(grpc.StatusCode.INVALID_ARGUMENT, 415),
    RequestTimeout: Status(grpc.StatusCode.DEADLINE_EXCEEDED, 408),
    ServerNotReady: Status(grpc.StatusCode.UNAVAILABLE, 503),
    DeadlineExpired: DEADLINE_EXCEEDED,
    Overloaded: Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    NotExplainable: Status(grpc.StatusCode.FAILED_PRECONDITION, 409),
    ClientGone: CANCELLED,
    Unauthenticated: Status(grpc.StatusCode.UNAUTHENTICATED, 401),
    UnknownEndpoint: Status(grpc.StatusCode.UNIMPLEMENTED, 404),
    MethodNotAllowed: Status(grpc.StatusCode.UNIMPLEMENTED, 405),
}
# Refused by the model the RPC resolved, before any inference: counted as failed requests
# in that model's Triton statistics here, since the data plane never saw them run.
_REFUSED = (InvalidInput, NotExplainable)

_CLIENT_SIDE = {
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
}

# (status, message) a failed request is answered with.
Outcome = tuple[Status, str]


def status_of(error: ServingError) -> Status:
    """`error`'s status from `STATUS`: its type's, else its nearest listed ancestor's."""
    for kind in type(error).__mro__:
        status = STATUS.get(kind)
        if status is not None:
            return status
    return INTERNAL


@dataclass(eq=False)
class EdgeState:
    """The server's edge state, shared by the requests of every servicer, gRPC's and
    HTTP's. Protocol-neutral (no gRPC in it)."""

    # how many failed requests are logged (no limit by default)
    failure_log: FailureLogLimiter = field(default_factory=lambda: FailureLogLimiter(0))
    in_flight: int = 0  # inference requests being handled: the drain waits for 0
    accepting: bool = True  # False once the drain stops taking new inference requests
    # time.monotonic() of the latest inference request's arrival, refused ones included:
    # the drain stops the transport only once clients have stopped sending.
    last_arrival: float = float("-inf")

    def arrived(self) -> None:
        """An inference request came in (whether or not it will be accepted)."""
        self.in_flight += 1
        self.last_arrival = time.monotonic()

    def check_accepting(self) -> None:
        """Refuse an inference request once the drain stopped accepting them."""
        if not self.accepting:
            raise ServerNotReady("the server is shutting down")


class EdgeCall:
    """`async with` a subclass's call around a request's whole handling. Inside,
    `call.resolve(name, version)` finds the model (and labels the request with it); raising
    a `ServingError` answers with its status. With `inference=True` the request counts as
    in flight in `edge`, which a graceful drain waits for, and is refused once the drain
    stopped accepting. Protocol-free: a subclass answers the outcome `_finish` returns, and
    names its protocol (`GRPC` or `HTTP`) for the metrics."""

    protocol: ClassVar[str]

    __slots__ = (
        "_dataplane",
        "_edge",
        "_inference",
        "_loaded",
        "_requested_version",
        "_start",
        "model",
        "requested",
        "rpc",
        "version",
    )

    def __init__(
        self, dataplane: DataPlane, edge: EdgeState, rpc: str, inference: bool = False
    ) -> None:
        self._edge = edge
        self._dataplane = dataplane
        self._inference = inference
        self.rpc = rpc
        self.model = ""
        self.version = ""
        self.requested = ""
        self._requested_version = ""
        self._loaded: LoadedModel | None = None

    def resolve(self, name: str, version: str = "") -> LoadedModel:
        """The model `name` at `version`, which labels the request. An inference request is
        admitted here, as it picks the model it will run on: once the drain stopped
        accepting, it is refused (UNAVAILABLE), labelled with that model."""
        self.name_model(name)
        self._requested_version = version
        loaded = self._dataplane.resolve(name, version)
        self.version = loaded.version_label
        self._loaded = loaded
        if self._inference:
            self._edge.check_accepting()
        return loaded

    def name_model(self, name: str) -> None:
        """Label the request with model `name`: kept if such a model is loaded, else the
        fixed "_unknown", so clients cannot create label values."""
        self.requested = name
        self.model = name if self._dataplane.registry.versions(name) else UNKNOWN_MODEL

    async def __aenter__(self) -> EdgeCall:
        if self._inference:
            self._edge.arrived()
        self._start = time.perf_counter()
        return self

    def _finish(self, error: BaseException | None) -> Outcome | None:
        """The request ended, with `error` or not: leave the in-flight count, observe it,
        log it if it failed. The status and message to answer with; None when there is
        nothing to answer (KeyboardInterrupt, SystemExit: not a request's outcome)."""
        seconds = time.perf_counter() - self._start
        if self._inference:
            self._edge.in_flight -= 1
        if error is None:
            self._dataplane.observer.rpc_finished(
                self.protocol, self.rpc, self.model, self.version, "OK", seconds
            )
            return OK, ""
        outcome = self._outcome(error, seconds)
        if outcome is None:
            return None
        status, details = outcome
        observer = self._dataplane.observer
        observer.rpc_finished(
            self.protocol, self.rpc, self.model, self.version, status.code.name, seconds
        )
        self._log_failure(status, details, error)
        return outcome

    def _outcome(self, error: BaseException, seconds: float) -> Outcome | None:
        if isinstance(error, ServingError):
            if self._inference and self._loaded is not None and isinstance(error, _REFUSED):
                self._dataplane.record_rejected(self._loaded, int(seconds * 1e9))
            return status_of(error), str(error)
        if isinstance(error, asyncio.CancelledError):
            return self._cancellation()
        if isinstance(error, Exception):
            return INTERNAL, f"internal error: {type(error).__name__}"
        return None

    def _cancellation(self) -> Outcome:
        """Why the handler was cancelled, as far as the edge knows."""
        if not self._edge.accepting:
            return CANCELLED, "cancelled while the server was stopping"
        return CANCELLED, "cancelled by the client"

    def _peer(self) -> str:
        """The client's address, for the failure log."""
        return ""

    def _summary(self, status: Status) -> str:
        """The status as the failure log line names it."""
        return status.code.name

    def _log_failure(self, status: Status, details: str, error: BaseException) -> None:
        code = status.code
        internal = code not in _CLIENT_SIDE
        level = logging.ERROR if internal else logging.WARNING
        if not self._edge.failure_log.allow(self.rpc, code.name, level):
            return
        log.log(
            level,
            "%s failed: %s: %s",
            self.rpc,
            self._summary(status),
            details,
            exc_info=error if internal else None,
            extra={
                "rpc": self.rpc,
                "model": self.requested[:MAX_LOGGED_NAME],
                "version": self.version or self._requested_version[:MAX_LOGGED_NAME],
                "code": code.name,
                "peer": self._peer(),
            },
        )


class RpcCall(EdgeCall):
    """`async with RpcCall(dataplane, edge, "ModelInfer", context) as call:` around an RPC's
    whole handling: an `EdgeCall` that answers a failure by aborting the RPC with its
    status code."""

    protocol = GRPC
    __slots__ = ("_context",)

    def __init__(
        self,
        dataplane: DataPlane,
        edge: EdgeState,
        rpc: str,
        context: grpc.aio.ServicerContext,
        inference: bool = False,
    ) -> None:
        super().__init__(dataplane, edge, rpc, inference)
        self._context = context

    async def __aenter__(self) -> RpcCall:
        await super().__aenter__()
        return self

    async def __aexit__(self, error_type: type | None, error: BaseException | None, _tb) -> None:
        outcome = self._finish(error)
        if outcome is None or error is None:
            return
        if isinstance(error, Exception) and not isinstance(error, grpc.aio.AbortError):
            status, details = outcome
            await self._context.abort(status.code, details)

    def _outcome(self, error: BaseException, seconds: float) -> Outcome | None:
        if isinstance(error, grpc.aio.AbortError):
            # Aborted already, with a code the context keeps; only the code is ever used.
            return Status(self._context.code() or grpc.StatusCode.UNKNOWN, INTERNAL.http), ""
        return super()._outcome(error, seconds)

    def _cancellation(self) -> Outcome:
        """grpc.aio cancels the handler when the client cancels, its deadline passes or the
        server's stop runs out of grace."""
        remaining = self._context.time_remaining()
        if remaining is not None and remaining <= 0:
            return DEADLINE_EXCEEDED, "deadline exceeded"
        return super()._cancellation()

    def _peer(self) -> str:
        return self._context.peer()


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The RPC's deadline in event-loop time, or None."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return asyncio.get_running_loop().time() + remaining

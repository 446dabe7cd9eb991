"""The gRPC edge both servicers share.

Every RPC runs inside one `RpcCall`, which turns a `ServingError` into its status code,
counts the RPC by code with its model and version (bounded labels), times it, and logs it
once if it failed (rate-limited per RPC and code). An inference request refused (invalid,
or an Explain of a version that cannot explain) after its model was resolved also counts
as failed in that model's Triton statistics.

`EdgeState` is what the edge knows across RPCs: the inference requests in flight, whether
new ones are still accepted (the drain in `serving.server` waits for the first to reach 0,
then ends the second) and the failure-log rate limit. The server owns one; the RPCs of
every servicer share it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from serving.dataplane import DataPlane
from serving.errors import (
    DeadlineExpired,
    InvalidInput,
    ModelNotFound,
    NotExplainable,
    Overloaded,
    ServerNotReady,
    ServingError,
)
from serving.logs import FailureLogLimiter
from serving.registry import LoadedModel

log = logging.getLogger("serving.rpc")

UNKNOWN_MODEL = "_unknown"
MAX_LOGGED_NAME = 100

_STATUS = {
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ServerNotReady: grpc.StatusCode.UNAVAILABLE,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotExplainable: grpc.StatusCode.FAILED_PRECONDITION,
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
}


@dataclass(eq=False)
class EdgeState:
    """The server's edge state, shared by every servicer's RPCs. Protocol-neutral (no gRPC
    in it), so another edge serving the same data plane can share it too."""

    # how many failed RPCs are logged (no limit by default)
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


class RpcCall:
    """`async with RpcCall(dataplane, edge, "ModelInfer", context) as call:` around an RPC's
    whole handling. Inside, `call.resolve(name, version)` finds the model (and labels the
    RPC with it); raising a `ServingError` answers with its status code. With
    `inference=True` the RPC counts as in flight in `edge`, which a graceful drain waits
    for, and is refused once the drain stopped accepting."""

    __slots__ = (
        "_context",
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
        self,
        dataplane: DataPlane,
        edge: EdgeState,
        rpc: str,
        context: grpc.aio.ServicerContext,
        inference: bool = False,
    ) -> None:
        self._edge = edge
        self._dataplane = dataplane
        self._context = context
        self._inference = inference
        self.rpc = rpc
        self.model = ""
        self.version = ""
        self.requested = ""
        self._requested_version = ""
        self._loaded: LoadedModel | None = None

    def resolve(self, name: str, version: str = "") -> LoadedModel:
        """The model `name` at `version`, which labels the RPC. An inference RPC is admitted
        here, as it picks the model it will run on: once the drain stopped accepting, it is
        refused (UNAVAILABLE), labelled with that model."""
        self.name_model(name)
        self._requested_version = version
        loaded = self._dataplane.resolve(name, version)
        self.version = loaded.version_label
        self._loaded = loaded
        if self._inference:
            self._edge.check_accepting()
        return loaded

    def name_model(self, name: str) -> None:
        """Label the RPC with model `name`: kept if such a model is loaded, else the fixed
        "_unknown", so clients cannot create label values."""
        self.requested = name
        self.model = name if self._dataplane.registry.versions(name) else UNKNOWN_MODEL

    async def __aenter__(self) -> RpcCall:
        if self._inference:
            self._edge.arrived()
        self._start = time.perf_counter()
        return self

    async def __aexit__(self, error_type: type | None, error: BaseException | None, _tb) -> None:
        seconds = time.perf_counter() - self._start
        if self._inference:
            self._edge.in_flight -= 1
        if error is None:
            self._dataplane.observer.rpc_finished(self.rpc, self.model, self.version, "OK", seconds)
            return
        if isinstance(error, ServingError):
            code, details = _STATUS.get(type(error), grpc.StatusCode.INTERNAL), str(error)
            if self._inference and self._loaded is not None and isinstance(error, _REFUSED):
                self._dataplane.record_rejected(self._loaded, int(seconds * 1e9))
        elif isinstance(error, asyncio.CancelledError):
            code, details = self._cancellation()
        elif isinstance(error, grpc.aio.AbortError):
            code, details = self._context.code() or grpc.StatusCode.UNKNOWN, ""
        elif isinstance(error, Exception):
            code, details = grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}"
        else:
            return  # KeyboardInterrupt, SystemExit: not a request's outcome
        observer = self._dataplane.observer
        observer.rpc_finished(self.rpc, self.model, self.version, code.name, seconds)
        self._log_failure(code, details, error)
        if isinstance(error, Exception) and not isinstance(error, grpc.aio.AbortError):
            await self._context.abort(code, details)

    def _cancellation(self) -> tuple[grpc.StatusCode, str]:
        """Why the handler was cancelled: grpc.aio cancels it when the client cancels, its
        deadline passes or the server's stop runs out of grace."""
        remaining = self._context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
        if not self._edge.accepting:
            return grpc.StatusCode.CANCELLED, "cancelled while the server was stopping"
        return grpc.StatusCode.CANCELLED, "cancelled by the client"

    def _log_failure(self, code: grpc.StatusCode, details: str, error: BaseException) -> None:
        internal = code not in _CLIENT_SIDE
        level = logging.ERROR if internal else logging.WARNING
        if not self._edge.failure_log.allow(self.rpc, code.name, level):
            return
        log.log(
            level,
            "%s failed: %s: %s",
            self.rpc,
            code.name,
            details,
            exc_info=error if internal else None,
            extra={
                "rpc": self.rpc,
                "model": self.requested[:MAX_LOGGED_NAME],
                "version": self.version or self._requested_version[:MAX_LOGGED_NAME],
                "code": code.name,
                "peer": self._context.peer(),
            },
        )


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The RPC's deadline in event-loop time, or None."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return asyncio.get_running_loop().time() + remaining

"""The HTTP side of the edge: each request's `EdgeCall`, its body read within limits, and
the answers (JSON, or `{"error": ...}` with the status `serving.edge.STATUS` gives).

A body over the limit is refused (413) from its Content-Length before any of it is read; a
chunked one is counted while it is read and cut off at the limit. A body that does not
arrive whole within the body timeout (slow, stalled or truncated) is refused with 408.
After a refusal that left part of a body unread, aiohttp reads and drops the rest for at
most its lingering time (10 s), then closes the connection: closing at once would reset
it under a client still sending, and the client might lose the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from serving.dataplane import DataPlane
from serving.edge import HTTP, EdgeCall, EdgeState, Outcome, Status
from serving.errors import (
    ClientGone,
    InvalidInput,
    MethodNotAllowed,
    RequestTimeout,
    RequestTooLarge,
    Unauthenticated,
    UnsupportedMediaType,
    shown,
)

JSON = "application/json"
BINARY = "application/octet-stream"
PNG = "image/png"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# A route's handler: the request and its call in, the answer out.
Handler = Callable[[web.Request, "HttpCall"], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint. `rpc` names it in metrics and logs: the gRPC RPC it answers like."""

    method: str
    path: str
    rpc: str
    handler: Handler
    inference: bool = False  # in flight for the drain, refused once it stops accepting
    health: bool = False  # a probe: open without a token when the server says so
    public: bool = False  # open without a token always: the web page's files carry no secret


@dataclass(frozen=True, slots=True)
class BodyLimits:
    max_bytes: int
    timeout: float


class HttpCall(EdgeCall):
    """One HTTP request's `EdgeCall`. A failure is accounted for like an RPC's and then
    kept, not raised: the endpoint answers it with `answer()`."""

    protocol = HTTP
    __slots__ = ("_request", "failure")

    def __init__(
        self,
        dataplane: DataPlane,
        edge: EdgeState,
        rpc: str,
        request: web.Request,
        inference: bool = False,
    ) -> None:
        super().__init__(dataplane, edge, rpc, inference)
        self._request = request
        self.failure: tuple[Outcome, Exception] | None = None

    async def __aenter__(self) -> HttpCall:
        await super().__aenter__()
        return self

    async def __aexit__(self, error_type: type | None, error: BaseException | None, _tb) -> bool:
        outcome = self._finish(error)
        if outcome is None or not isinstance(error, Exception):
            return False  # success, or cancelled (the server stopping): nothing to answer
        self.failure = (outcome, error)
        return True

    def answer(self) -> web.Response:
        """The error response for the failure kept."""
        assert self.failure is not None, "answer() is for a failed call"
        (status, message), error = self.failure
        return error_response(status, message, error)

    def _peer(self) -> str:
        return peer_of(self._request)

    def _summary(self, status: Status) -> str:
        return f"{status.code.name} (HTTP {status.http})"


def peer_of(request: web.Request) -> str:
    """The client's address as gRPC writes a peer (`ipv4:127.0.0.1:5000`); without the
    port once the connection is gone (aiohttp keeps the host only)."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    host, port = (peer[0], peer[1]) if peer else (request.remote, None)
    if not host:
        return ""
    family, address = ("ipv6", f"[{host}]") if ":" in host else ("ipv4", host)
    return f"{family}:{address}" + (f":{port}" if port is not None else "")


def error_response(status: Status, message: str, error: Exception | None = None) -> web.Response:
    """`{"error": message}` with the status's HTTP status and the headers it asks for."""
    response = json_response({"error": message}, status.http)
    if isinstance(error, Unauthenticated):
        response.headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(error, MethodNotAllowed):
        response.headers["Allow"] = ", ".join(error.allowed)
    return response


def json_response(value: object, status: int = 200) -> web.Response:
    # OPT_SERIALIZE_NUMPY: output tensors go out as numpy arrays, without a Python list.
    body = orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
    return web.Response(body=body, status=status, content_type=JSON)


def check_content_type(
    request: web.Request, accepted: Collection[str], optional: bool = True
) -> str:
    """The request body's media type, one of `accepted` ("" when the header is absent and
    `optional`); any other, or an encoded (compressed) body, is UnsupportedMediaType."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType(
            f"Content-Encoding {shown(encoding)} is not supported: send the body uncompressed"
        )
    if "Content-Type" not in request.headers:
        if optional:
            return ""
        raise UnsupportedMediaType(f"Content-Type is missing: send one of {', '.join(accepted)}")
    media_type = request.content_type
    if media_type not in accepted:
        raise UnsupportedMediaType(
            f"Content-Type {shown(media_type)} is not accepted here: "
            f"send one of {', '.join(accepted)}"
        )
    return media_type


async def read_body(request: web.Request, limits: BodyLimits) -> bytearray:
    """The whole request body, within `limits` (see the module docstring)."""
    declared = request.content_length
    if declared is not None and declared > limits.max_bytes:
        raise RequestTooLarge(
            f"the request body is {declared} bytes (Content-Length), more than the limit of "
            f"{limits.max_bytes} (--http-max-body-bytes)"
        )
    await _send_continue(request)
    body = bytearray()
    try:
        async with asyncio.timeout(limits.timeout):
            while chunk := await request.content.readany():
                body += chunk
                if len(body) > limits.max_bytes:
                    raise RequestTooLarge(
                        f"the request body is more than the limit of {limits.max_bytes} bytes "
                        "(--http-max-body-bytes)"
                    )
    except TimeoutError:
        expected = f"of {declared} " if declared is not None else ""
        raise RequestTimeout(
            f"the request body did not arrive within {limits.timeout:g} s "
            f"(--http-body-timeout): {len(body)} bytes {expected}read"
        ) from None
    except RequestPayloadError as error:
        raise InvalidInput(f"the request body is malformed: {error}") from None
    except ConnectionError:  # aiohttp's "Connection lost": nobody is left to answer
        raise ClientGone(
            f"the client closed the connection with {len(body)} bytes of the body read"
        ) from None
    return body


async def _send_continue(request: web.Request) -> None:
    """Answer `Expect: 100-continue` only now, when the body is wanted: a request refused
    before (unknown model, no token, too large) is answered without its body being sent."""
    if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
        await request.writer.write(_CONTINUE)
        request.writer.output_size = 0  # as aiohttp's own handler: the response starts after


async def expect_later(request: web.Request) -> None:
    """Every route's `Expect` handler: nothing at routing time (see `_send_continue`)."""
    return None

"""Typed errors of the serving core. `serving.edge` maps each type to its gRPC status code
and HTTP status, one table for both protocols."""

from __future__ import annotations

# How much of a client's string (a model name, a tensor name, ...) a message or log repeats:
# enough to recognise it, never enough to make an answer or a log line grow with the input.
MAX_ECHOED_CHARACTERS = 100


def shown(text: str, limit: int = MAX_ECHOED_CHARACTERS) -> str:
    """`text` quoted for a message, at most `limit` characters of it (escapes counted, so
    unprintable characters cannot multiply its length), with its full length noted if cut."""
    quoted = repr(text[:limit])
    if len(text) <= limit and len(quoted) <= limit + 2:
        return quoted
    return f"{quoted[:limit]}... ({len(text)} characters)"


class ServingError(Exception):
    """Base class; the message names the offending field where there is one."""

    kind = "internal"


class ModelNotFound(ServingError):
    """No loaded model matches the requested name (and version)."""

    kind = "not_found"


class InvalidInput(ServingError):
    """The request is malformed: wrong name, datatype, shape, size or content."""

    kind = "invalid_argument"


class ServerNotReady(ServingError):
    """The server is starting or stopping and cannot take the request."""

    kind = "unavailable"


class DeadlineExpired(ServingError):
    """The request's deadline passed while it waited in the queue."""

    kind = "deadline_exceeded"


class Overloaded(ServingError):
    """A bounded resource (a model's queue, the decoding threads) is full: retry later."""

    kind = "resource_exhausted"


class NotExplainable(ServingError):
    """The model version cannot explain its predictions: it was published without an
    explanation graph."""

    kind = "failed_precondition"


class RequestTooLarge(InvalidInput):
    """The request's body is larger than the server takes (HTTP's body limit)."""


class UnsupportedMediaType(InvalidInput):
    """The request's body is of a content type or encoding the endpoint does not take."""


class RequestTimeout(InvalidInput):
    """The request's body did not arrive whole in time: a slow, stalled or truncated body."""


class ClientGone(ServingError):
    """The client closed its connection before its request was whole."""

    kind = "cancelled"


class Unauthenticated(ServingError):
    """The request carries no valid credentials."""

    kind = "unauthenticated"


class UnknownEndpoint(ServingError):
    """The request names no endpoint the server has (an unknown path or method)."""

    kind = "unimplemented"


class MethodNotAllowed(UnknownEndpoint):
    """The endpoint exists, but not for the request's method; `allowed` lists its methods."""

    def __init__(self, message: str, allowed: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allowed = allowed

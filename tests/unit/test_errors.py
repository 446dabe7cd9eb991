"""Client strings are echoed in messages only up to a bound; each error type has a status."""

from __future__ import annotations

import grpc

from serving.edge import INTERNAL, Status, status_of
from serving.errors import (
    MAX_ECHOED_CHARACTERS,
    InvalidInput,
    MethodNotAllowed,
    ModelNotFound,
    NotExplainable,
    Overloaded,
    RequestTooLarge,
    ServerNotReady,
    ServingError,
    shown,
)


def test_short_strings_are_quoted_whole():
    assert shown("mnist37") == "'mnist37'"


def test_long_strings_are_cut_and_their_length_named():
    text = shown("n" * 3_000_000)
    assert len(text) < MAX_ECHOED_CHARACTERS + 40
    assert text.startswith("'nnn") and text.endswith("... (3000000 characters)")


def test_unprintable_characters_cannot_multiply_the_length():
    text = shown("\U0002ebe1" * 100)
    assert len(text) < MAX_ECHOED_CHARACTERS + 40


def _subclasses(kind: type) -> list[type]:
    return [sub for direct in kind.__subclasses__() for sub in (direct, *_subclasses(direct))]


def test_every_error_type_has_one_status_for_both_protocols():
    """serving.edge.STATUS: one map from each error type to its gRPC code and HTTP status."""
    for kind in _subclasses(ServingError):
        error = kind("x", ("GET",)) if kind is MethodNotAllowed else kind("x")
        assert status_of(error) is not INTERNAL, kind
    code = grpc.StatusCode
    assert status_of(Overloaded("full")) == Status(code.RESOURCE_EXHAUSTED, 429)
    assert status_of(RequestTooLarge("big")) == Status(code.RESOURCE_EXHAUSTED, 413)
    assert status_of(InvalidInput("bad")) == Status(code.INVALID_ARGUMENT, 400)
    assert status_of(ModelNotFound("who")) == Status(code.NOT_FOUND, 404)
    assert status_of(NotExplainable("no graph")) == Status(code.FAILED_PRECONDITION, 409)
    assert status_of(ServerNotReady("stopping")) == Status(code.UNAVAILABLE, 503)
    assert status_of(ServingError("?")) is INTERNAL

"""A JSON request body parsed (orjson) and read member by member: each refusal is
InvalidInput naming the field (`inputs[0].shape: expected an array of integers, got a
string`), never the client's value beyond `serving.errors.shown`'s bound."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from serving.errors import InvalidInput, shown
from serving.logs import bounded

# orjson's messages name a position, never the input; bounded all the same.
_MAX_PARSER_MESSAGE = 200
_MISSING = object()

_JSON_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "true or false"),  # before int: a bool is an int in Python
    (int, "an integer"),
    (float, "a number"),
    (str, "a string"),
    (list, "an array"),
    (dict, "an object"),
)


def parse_json(body: bytes | bytearray | memoryview, what: str = "the request body") -> Any:
    """`body` parsed, or InvalidInput saying where it is not JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InvalidInput(
            f"{what} is not valid JSON: {bounded(str(error), _MAX_PARSER_MESSAGE)}"
        ) from None


def json_type(value: object) -> str:
    """What JSON calls `value`'s type, for a message."""
    if value is None:
        return "null"
    for kind, name in _JSON_TYPES:
        if isinstance(value, kind):
            return name
    return type(value).__name__


def is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def expect_object(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{path}: expected an object, got {json_type(value)}")
    return value


def member(
    container: Mapping[str, Any],
    key: str,
    kind: type,
    path: str,
    default: Any = _MISSING,
) -> Any:
    """`container[key]`, which must be of `kind` (int excludes bool); without `default` it
    is required."""
    value = container.get(key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise InvalidInput(f"{path}: missing")
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        wanted = dict(_JSON_TYPES).get(kind, kind.__name__)
        raise InvalidInput(f"{path}: expected {wanted}, got {json_type(value)}")
    return value


def integers(values: list[Any], path: str) -> list[int]:
    """`values`, which must all be integers (a shape, say)."""
    for value in values:
        if not is_integer(value):
            raise InvalidInput(f"{path}: expected an array of integers, got {json_type(value)}")
    return values


def refuse_unknown(container: Mapping[str, Any], known: frozenset[str], path: str) -> None:
    """Refuse members not in `known`: a misspelt field is an error, not a silent default."""
    unknown = sorted(set(container) - known)
    if unknown:
        listed = ", ".join(shown(key) for key in unknown[:8])
        raise InvalidInput(
            f"{path}: unknown field{'s' if len(unknown) > 1 else ''} {listed}; "
            f"expected {', '.join(sorted(known))}"
        )

"""Command-line settings from one frozen dataclass: each field is a flag (`grpc_port` ->
`--grpc-port`) with an environment variable (`MNIST37_GRPC_PORT`); a flag beats its
variable, which beats the field's default. An empty variable counts as unset.

    @dataclass(frozen=True)
    class Settings:
        \"\"\"The command's description, for --help.\"\"\"

        prog: ClassVar[str] = "mnist37-something"
        epochs: int = setting(80, "passes over the training split", allowed=POSITIVE)
        out: Path | None = setting(None, "run directory", default_help="`runs/<arch>`")
        no_progress: bool = setting(False, "no progress bars")

    settings = load(Settings)                  # sys.argv and os.environ
    print(flag_table(Settings))                # the Markdown table the docs embed

Field types: str, int, float, Path, bool (a switch: `--no-progress`; its variable takes
1/0, true/false, yes/no or on/off) and `X | None` of the first four; `parse=` converts and
checks a value its type alone cannot (`--workers`: a number or `auto`). A class may set
`env_prefix` (a ClassVar, default MNIST37_). `python -m serving.config CLI` prints the
table of each command built here (COMMANDS).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

ENV_PREFIX = "MNIST37_"
EPILOG = "Every flag can also be set by its environment variable, shown in brackets."
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
# The commands built on this module, for `python -m serving.config CLI`: each is imported
# only when its table is asked for (training's pull in torch). A test checks each name is
# the last word of its class's `prog`.
COMMANDS = {
    "mnist37-serve": "serving.config:ServerConfig",
    "mnist37-train": "training.cli:TrainSettings",
    "mnist37-retrain": "training.retrain:RetrainSettings",
    "serving.healthcheck": "serving.healthcheck:HealthcheckSettings",
}
_METADATA_KEY = "mnist37.setting"
_SCALARS = (str, int, float, Path)

T = TypeVar("T")


@dataclass(frozen=True)
class Range:
    """The values a number may take: above or at least a lower bound, below or at most an
    upper one."""

    above: float | None = None
    at_least: float | None = None
    below: float | None = None
    at_most: float | None = None

    def problem(self, value: float) -> str | None:
        """What is wrong with `value`, or None if it is allowed."""
        broken = (
            (self.above is not None and not value > self.above)
            or (self.at_least is not None and not value >= self.at_least)
            or (self.below is not None and not value < self.below)
            or (self.at_most is not None and not value <= self.at_most)
        )
        return f"must be {self.rule()}" if broken else None

    def rule(self) -> str:
        if self == POSITIVE:
            return "positive"
        if self == NON_NEGATIVE:
            return "0 or more"
        bounds = [("> ", self.above), (">= ", self.at_least), ("< ", self.below)]
        bounds.append(("<= ", self.at_most))
        return " and ".join(f"{sign}{bound:g}" for sign, bound in bounds if bound is not None)


POSITIVE = Range(above=0)
NON_NEGATIVE = Range(at_least=0)


@dataclass(frozen=True)
class Setting:
    """What a field's metadata says about its flag."""

    help: str  # Markdown: `code` shows as code in the flag table, as plain text in --help
    choices: tuple[str, ...] = ()
    allowed: Range | None = None
    # Shown instead of the default where a value would not say it (None: "`runs/<arch>`").
    default_help: str | None = None
    # Required unless its variable is set.
    required: bool = False
    # Converts and checks the text of a value the field's type alone cannot check (a number
    # or a word, say); raises argparse.ArgumentTypeError saying what it wanted.
    parse: Callable[[str], Any] | None = None


def setting(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] = (),
    allowed: Range | None = None,
    default_help: str | None = None,
    required: bool = False,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A dataclass field that is a command-line setting."""
    meta = Setting(help, tuple(choices), allowed, default_help, required, parse)
    return field(default=default, metadata={_METADATA_KEY: meta})


def redefault(base: type, name: str, default: Any, default_help: str) -> Any:
    """`base`'s setting `name` (help, choices, range) with another default, for a subclass
    whose default is decided at run time (None: "the served version's")."""
    original = _setting(_field(base, name))
    meta = replace(original, default_help=default_help)
    return field(default=default, metadata={_METADATA_KEY: meta})


def env_var(field_name: str, cls: type | None = None) -> str:
    prefix = getattr(cls, "env_prefix", ENV_PREFIX) if cls is not None else ENV_PREFIX
    return prefix + field_name.upper()


def flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def parse_as(kind: type, allowed: Range | None = None) -> Callable[[str], Any]:
    """An argparse `type`: `kind(text)` (int, float, str, Path), refused outside `allowed`.
    Named after `kind`, so argparse says "invalid int value: 'x'"."""

    def convert(text: str) -> Any:
        value = kind(text)
        problem = allowed.problem(value) if allowed is not None else None
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    convert.__name__ = kind.__name__
    return convert


def build_parser(cls: type, environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of `cls`; every value it parses is None
    when the flag is absent (see `load`). `environ` decides which required flags may be
    left out."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog=cls.prog, description=inspect.cleandoc(cls.__doc__ or ""), epilog=EPILOG
    )
    for item in fields(cls):
        meta, kind = _setting(item), _kind(cls, item)
        help_text = f"{meta.help} [{_variable(item, kind, cls)}; {_default_text(item)}]"
        help_text = help_text.replace("`", "").replace("%", "%%")  # Markdown, format string
        options: dict[str, Any] = {"dest": item.name, "default": None}
        if kind is bool:
            options.update(action="store_const", const=True)
        else:
            convert = meta.parse or parse_as(kind, meta.allowed)
            options.update(type=convert, choices=meta.choices or None)
            options["required"] = meta.required and not _env_text(environ, item, cls)
        parser.add_argument(flag(item.name), help=help_text, **options)
    return parser


def load(
    cls: type[T],
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """The settings from the flags in `argv` (sys.argv), then the variables in `environ`
    (os.environ), then the defaults. Exits with status 2 and a usage message on a bad
    flag or variable."""
    environ = os.environ if environ is None else environ
    parser = build_parser(cls, environ)
    arguments = parser.parse_args(argv)
    values = {}
    for item in fields(cls):
        value = getattr(arguments, item.name)
        text = _env_text(environ, item, cls)
        if value is None and text:
            try:
                value = _from_env(text, _kind(cls, item), _setting(item))
            except (ValueError, argparse.ArgumentTypeError) as error:
                parser.error(f"{env_var(item.name, cls)}={text!r}: {error}")
        if value is not None:
            values[item.name] = value
    return cls(**values)


def flag_table(cls: type) -> str:
    """The Markdown table of every flag of `cls`: flag, variable, default, meaning."""
    rows = ["| flag | variable | default | meaning |", "| --- | --- | --- | --- |"]
    for item in fields(cls):
        meta = _setting(item)
        meaning = meta.help
        if meta.choices:
            meaning += "; one of " + ", ".join(f"`{choice}`" for choice in meta.choices)
        cells = (
            f"`{flag(item.name)}`",
            f"`{_variable(item, _kind(cls, item), cls)}`",
            _default_text(item, markdown=True),
            meaning.replace("|", "\\|"),
        )
        rows.append(f"| {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"


def command_settings(name: str) -> type:
    """The settings class of a command in COMMANDS."""
    module, attribute = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def print_flag_table(argv: Sequence[str]) -> int:
    """`python -m serving.config [CLI]`: CLI's flag table (default mnist37-serve)."""
    name = argv[0] if argv else "mnist37-serve"
    if name not in COMMANDS or len(argv) > 1:
        print(f"usage: python -m serving.config [{' | '.join(COMMANDS)}]", file=sys.stderr)
        return 2
    print(flag_table(command_settings(name)), end="")
    return 0


def _field(cls: type, name: str) -> Field:
    return next(item for item in fields(cls) if item.name == name)


def _setting(item: Field) -> Setting:
    try:
        return item.metadata[_METADATA_KEY]
    except KeyError:
        raise TypeError(f"field {item.name} is not a setting(): it has no help") from None


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluates the annotations: once per class


def _kind(cls: type, item: Field) -> type:
    """The field's type, without `| None`."""
    kind = _type_hints(cls)[item.name]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        (kind,) = (arg for arg in typing.get_args(kind) if arg is not type(None))
    if kind is not bool and kind not in _SCALARS:
        raise TypeError(f"setting {item.name}: unsupported type {kind}")
    return kind


def _variable(item: Field, kind: type, cls: type) -> str:
    """The variable as --help and the table show it: a switch's as `NAME=1`."""
    return env_var(item.name, cls) + ("=1" if kind is bool else "")


def _env_text(environ: Mapping[str, str], item: Field, cls: type) -> str:
    return environ.get(env_var(item.name, cls), "")


def _from_env(text: str, kind: type, meta: Setting) -> Any:
    if kind is bool:
        word = text.strip().lower()
        if word not in TRUE_WORDS + FALSE_WORDS:
            raise ValueError(f"expected one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")
        return word in TRUE_WORDS
    if meta.parse is not None:
        return meta.parse(text)
    try:
        value = parse_as(kind, meta.allowed)(text)
    except ValueError:
        raise ValueError(f"invalid {kind.__name__} value") from None
    if meta.choices and value not in meta.choices:
        raise ValueError(f"choose from {', '.join(meta.choices)}")
    return value


def _default_text(item: Field, markdown: bool = False) -> str:
    """The default as --help ("default 8001") or the flag table ("`8001`") says it."""
    meta = _setting(item)
    if meta.required:
        return "required"
    if meta.default_help is not None:
        text = meta.default_help
    elif isinstance(item.default, bool):
        text = "on" if item.default else "off"
    elif item.default is None:
        text = "none"
    else:
        return f"`{item.default}`" if markdown else f"default {item.default}"
    return text if markdown else f"default {text}"

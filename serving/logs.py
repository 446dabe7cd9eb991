"""Logging for the server: one JSON object per line (the default, for log collectors) or
plain text for people, chosen with --log-format.

A JSON line holds `ts` (UTC, ISO 8601 with milliseconds), `level`, `logger`, `message`,
then the request fields a log call passes in `extra` (`rpc`, `model`, `version`, `code`,
`peer`, `suppressed`) and `exception` with the traceback when there is one; a worker of
`--workers N` adds `worker` (its index, 0 to N-1, kept by the worker that replaces it)
and `pid` to each of its lines. Only failed
requests are logged (by `serving.edge.RpcCall`), never successful ones, and at most
--log-failures-per-second of each kind (`FailureLogLimiter`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from serving.config import LOG_FORMATS

REQUEST_FIELDS = ("rpc", "model", "version", "code", "peer", "suppressed")
# Bounds on one log line, whatever a client sent: a message, each request field and a
# traceback are cut to these many characters (a log collector's line limit is typically
# 16 KiB), so no request can make the log grow faster than the failure-line rate allows.
MAX_MESSAGE_CHARACTERS = 2000
MAX_FIELD_CHARACTERS = 200
MAX_EXCEPTION_CHARACTERS = 8000


def bounded(text: str, limit: int) -> str:
    """`text`, cut to `limit` characters with a note of how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters]"


def _field(value: object) -> object:
    return bounded(value, MAX_FIELD_CHARACTERS) if isinstance(value, str) else value


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_TEXT_FORMAT = (
    "%(asctime)s %(levelname)s worker {worker} pid %(process)d %(name)s: %(message)s"
)


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        """`worker`: the index of the worker process whose lines these are (None: the only
        process, or the supervisor)."""
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": bounded(record.getMessage(), MAX_MESSAGE_CHARACTERS),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
            entry["pid"] = record.process
        for name in REQUEST_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = _field(value)
        if record.exc_info:
            entry["exception"] = bounded(
                self.formatException(record.exc_info), MAX_EXCEPTION_CHARACTERS
            )
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic one-line format, with the request fields appended as `key=value` (and
    a worker's index and pid after the level)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__(
            TEXT_FORMAT if worker is None else WORKER_TEXT_FORMAT.format(worker=worker)
        )

    def format(self, record: logging.LogRecord) -> str:
        line = bounded(super().format(record), MAX_MESSAGE_CHARACTERS + MAX_EXCEPTION_CHARACTERS)
        fields = [
            f"{name}={_field(getattr(record, name))!r}"
            for name in REQUEST_FIELDS
            if getattr(record, name, None) is not None
        ]
        if not fields:
            return line
        first, newline, rest = line.partition("\n")
        return f"{first} [{' '.join(fields)}]{newline}{rest}"


def configure_logging(
    level: str, log_format: str, stream: TextIO | None = None, worker: int | None = None
) -> None:
    """Send every log record of the process to `stream` (stderr by default) in
    `log_format`, replacing any handlers set up before; `worker`: the index of this worker
    process, which each line then names."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: choose from {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(worker) if log_format == "json" else TextFormatter(worker))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


@dataclass(slots=True)
class _Window:
    end: float
    level: int
    logged: int = 0
    suppressed: int = 0


class FailureLogLimiter:
    """Keeps a client that sends bad requests in a loop from flooding the log: of the
    failures of one kind (RPC and status code), at most `lines_per_window` are logged per
    `window_s` (so the first of each window always is); the rest are counted and reported
    in one line when their window ends. 0 turns the limit off. Event loop thread only."""

    def __init__(
        self,
        lines_per_window: int,
        window_s: float = 1.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.lines_per_window = lines_per_window
        self.window_s = window_s
        self._logger = logger or logging.getLogger("serving.rpc")
        self._windows: dict[tuple[str, str], _Window] = {}

    def allow(self, rpc: str, code: str, level: int) -> bool:
        """True if this failure should be logged; counts it if not."""
        if self.lines_per_window <= 0:
            return True
        loop = asyncio.get_running_loop()
        now = loop.time()
        key = (rpc, code)
        window = self._windows.get(key)
        if window is None or now >= window.end:
            if window is not None:
                self._report(key, window)  # its timer has not run yet
            window = self._windows[key] = _Window(now + self.window_s, level)
        if window.logged < self.lines_per_window:
            window.logged += 1
            return True
        window.suppressed += 1
        if window.suppressed == 1:
            loop.call_at(window.end, self._report, key, window)
        return False

    def _report(self, key: tuple[str, str], window: _Window) -> None:
        if not window.suppressed:
            return
        rpc, code = key
        self._logger.log(
            window.level,
            "%s failed: %s: suppressed %d similar failures in the last %g s "
            "(at most %d lines per %g s)",
            rpc,
            code,
            window.suppressed,
            self.window_s,
            self.lines_per_window,
            self.window_s,
            extra={"rpc": rpc, "code": code, "suppressed": window.suppressed},
        )
        window.suppressed = 0

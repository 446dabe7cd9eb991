"""Logging for the server: one JSON object per line (the default, for log collectors) or
plain text for people, chosen with --log-format.

A JSON line holds `ts` (UTC, ISO 8601 with milliseconds), `level`, `logger`, `message`,
then the request fields a log call passes in `extra` (`rpc`, `model`, `version`, `code`,
`peer`) and `exception` with the traceback when there is one. Only failed requests are
logged (by `serving.oip.RpcCall`), never successful ones.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

from serving.config import LOG_FORMATS

REQUEST_FIELDS = ("rpc", "model", "version", "code", "peer")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in REQUEST_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic one-line format, with the request fields appended as `key=value`."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [
            f"{name}={getattr(record, name)!r}"
            for name in REQUEST_FIELDS
            if getattr(record, name, None) is not None
        ]
        if not fields:
            return line
        first, newline, rest = line.partition("\n")
        return f"{first} [{' '.join(fields)}]{newline}{rest}"


def configure_logging(level: str, log_format: str, stream: TextIO | None = None) -> None:
    """Send every log record of the process to `stream` (stderr by default) in
    `log_format`, replacing any handlers set up before."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: choose from {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())

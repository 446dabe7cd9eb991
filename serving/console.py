"""What every console script does around its `main`: end quietly when the reader of its
standard output goes away early (`mnist37-client classify IDX | head -3`).

Python ignores SIGPIPE, so a write to a closed pipe raises BrokenPipeError; uncaught it is
a traceback, and a command's own `except OSError` turns it into an error message. Setting
SIGPIPE back to its default would instead kill the process on any socket write to a peer
that hung up (prometheus_client's HTTP server, urllib), which Python's documentation warns
against. So standard output itself turns the BrokenPipeError into a SystemExit, which no
`except Exception` catches: the command stops at once, says nothing, and exits with 141,
the status a shell reports for `seq` or `yes` stopped by `head`.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, TextIO

EXIT_STDOUT_CLOSED = 128 + signal.SIGPIPE

Main = Callable[[Sequence[str] | None], int]


class _StdoutThatStops:
    """Standard output, except that a closed pipe stops the program quietly."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._stop()

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._stop()

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)

    def _stop(self) -> NoReturn:
        # What is still buffered, and Python's own flush at exit, go to /dev/null: writing
        # them to the closed pipe would fail again ("Exception ignored ... BrokenPipeError").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)
        raise SystemExit(EXIT_STDOUT_CLOSED)


def console_script(main: Main) -> Main:
    """Decorate a command's `main(argv) -> exit status`: see the module docstring. Calling
    it from Python (tests, `training.init_repository`) is the same as calling `main`,
    as long as nothing closes standard output."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        stdout = sys.stdout
        if stdout is not None:  # None: started with standard output closed (`>&-`)
            sys.stdout = _StdoutThatStops(stdout)
        try:
            status = main(argv)
            if stdout is not None:
                sys.stdout.flush()  # a reader that left before the last buffer stops here too
            return status
        finally:
            sys.stdout = stdout

    run.console_script = True  # type: ignore[attr-defined] (a test checks every script has it)
    return run

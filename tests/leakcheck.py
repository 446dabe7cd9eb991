"""A pytest plugin: the session fails if a process it started outlives it.

Every process the tests start inherits `MNIST37_TEST_SESSION` (set here at start-up), so a
survivor is found even after its parent died and it was re-parented; direct children
started with an environment of their own are found by their parent pid. At the end of the
session each survivor is named, killed, and the exit status turned into a failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

MARKER = "MNIST37_TEST_SESSION"


def pytest_configure(config: pytest.Config) -> None:
    os.environ[MARKER] = str(os.getpid())


def survivors() -> dict[int, str]:
    """pid -> command line of every process (but this one) this session started."""
    me, tag = os.getpid(), f"{MARKER}={os.getpid()}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            state = stat.rsplit(")", 1)[1].split()[0]
            ours = parent == me or tag in (entry / "environ").read_bytes().split(b"\0")
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if ours and state != "Z":
            found[int(entry.name)] = command.strip() or stat.split()[1]
    return found


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = survivors()
    if not left:
        return
    lines = "\n".join(f"  pid {pid}: {command[:200]}" for pid, command in sorted(left.items()))
    print(f"\nleakcheck: {len(left)} process(es) started by the tests outlived them:\n{lines}")
    for pid in left:
        with contextlib.suppress(OSError):  # it may have ended meanwhile
            os.kill(pid, signal.SIGKILL)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

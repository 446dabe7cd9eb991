"""Start the servers a sweep measures, on free loopback ports, and stop them.

mnist37 runs as `python -m serving.server` (`serving.launcher`) with metrics on (a port of
its own, as deployed) and logging at `info` (start-up, reloads and failures: nothing per
request; the launcher waits for the supervisor's `info` line that every worker serves); the
bare servers as
`python -m serving.bench.bare`. Each is ready once ServerReady answers true.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from serving.bench.plan import BATCHING_FLAGS, ServerSpec
from serving.launcher import ServerNotReady, ServerProcess, free_port, start_server, wait_ready
from serving.repository import MODEL_FILE

MODEL_NAME = "mnist37"


class NotStarted(Exception):
    """The server refused to start or never became ready; the message says why."""


@dataclass
class Running:
    spec: ServerSpec
    process: ServerProcess
    flags: list[str]

    @property
    def pid(self) -> int:
        return self.process.process.pid

    def target(self, protocol: str) -> str:
        return self.process.target if protocol == "grpc" else self.process.http_address

    def stop(self) -> int:
        return self.process.terminate(timeout=60)


def server_has_flag(flag: str) -> bool:
    """Whether this checkout's mnist37-serve takes `flag` (`--workers` lands separately)."""
    from serving.config import build_parser

    return any(flag in action.option_strings for action in build_parser()._actions)


def mnist37_flags(spec: ServerSpec, metrics_port: int) -> list[str]:
    flags = [*BATCHING_FLAGS[spec.batching], "--log-level", "info"]
    flags += ["--metrics-port", str(metrics_port)]
    # One worker is all a server without --workers has; asked for more, it must refuse.
    if spec.workers != "1" or server_has_flag("--workers"):
        flags += ["--workers", spec.workers]
    return flags


def model_file(repository: Path, name: str = MODEL_NAME) -> Path:
    """The newest version's model.onnx of `name` in `repository`."""
    versions = sorted(
        (path for path in (repository / name).iterdir() if path.name.isdigit()),
        key=lambda path: int(path.name),
    )
    return versions[-1] / MODEL_FILE


def start(spec: ServerSpec, repository: Path, log_dir: Path) -> Running:
    """`spec`'s server, ready; NotStarted with the reason from its log otherwise."""
    if spec.kind == "mnist37":
        flags = mnist37_flags(spec, free_port())
        try:
            process = start_server(repository, log_dir, *flags, timeout=90)
        except ServerNotReady as error:
            raise NotStarted(_reason(str(error))) from None
        return Running(spec, process, flags)
    port = free_port()
    flags = ["--echo"] if spec.kind == "echo" else ["--model", str(model_file(repository))]
    command = [sys.executable, "-m", "serving.bench.bare", "--port", str(port), *flags]
    log_path = log_dir / f"{spec.kind}-{port}.log"
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    process = ServerProcess(child, port, log_path)
    try:
        wait_ready(process, timeout=60)
    except ServerNotReady as error:
        raise NotStarted(_reason(str(error))) from None
    return Running(spec, process, flags)


def _reason(message: str) -> str:
    """The line of a failed start's log that says why (argparse's `error:` line, the
    server's `refusing to start`), else its last line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in reversed(lines):
        if "error:" in line or "refusing to start" in line:
            return line[:300]
    return (lines[-1] if lines else message)[:300]

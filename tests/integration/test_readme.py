"""The README's "Use it" section works as written: its ```bash blocks run with
`bash -euo pipefail` and its ```python block with this Python, in order, in a fresh
directory (with `examples/`), against the real server its serve command starts. Only the
ports change: 8000/8001/8002 in the text become free ones, and MNIST37_HTTP_PORT,
MNIST37_GRPC_PORT, MNIST37_METRICS_PORT and MNIST37_SERVER point the defaults at them."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT

from serving.launcher import ServerProcess, free_port, wait_ready

README = REPO_ROOT / "README.md"
EXAMPLES = REPO_ROOT / "examples"
SERVE = "mnist37-serve"


def use_it_blocks() -> list[tuple[str, str]]:
    """(language, code) of every ```bash and ```python block of the "Use it" section."""
    text = README.read_text()
    start = text.index("\n## Use it\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"^```(bash|python)\n(.*?)^```$", text[start:end], re.MULTILINE | re.DOTALL)


def test_use_it_shows_the_newcomer_commands():
    code = "\n".join(code for _, code in use_it_blocks())
    for command in (
        "mnist37-serve --repository model_repository --host 127.0.0.1",
        "python -m serving.healthcheck --address 127.0.0.1:8001",
        "mnist37-client classify examples/*.png",
        "curl -s 127.0.0.1:8002/metrics",
        "mnist37-models list --repository model_repository",
        "tritonclient.grpc",
    ):
        assert command in code, command
    serve_blocks = [code for language, code in use_it_blocks() if SERVE in code]
    assert len(serve_blocks) == 1 and serve_blocks[0].strip().startswith(SERVE)


def localized(code: str, ports: dict[int, int]) -> str:
    """`code` with each default port of `ports` replaced by its free one."""
    for default, port in ports.items():
        code = re.sub(rf"\b{default}\b", str(port), code)
    return code


def run_block(language: str, code: str, cwd: Path, env: dict[str, str]) -> str:
    command = (
        [sys.executable, "-c", code]
        if language == "python"
        else ["bash", "-euo", "pipefail", "-c", code]
    )
    completed = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, (
        f"{language} block failed ({completed.returncode}):\n{code}\n{output}"
    )
    return completed.stdout


@contextlib.contextmanager
def serving(code: str, cwd: Path, env: dict[str, str], port: int):
    """Runs the serve block in its own process group; SIGTERM to all of it at the end."""
    log_path = cwd / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", code],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = ServerProcess(process, port, log_path)
    try:
        wait_ready(server, timeout=60)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"the server did not stop on SIGTERM:\n{server.log()}")


def test_use_it_commands_run_against_a_real_server(tmp_path):
    blocks = use_it_blocks()
    serve_at = next(i for i, (_, code) in enumerate(blocks) if SERVE in code)
    (tmp_path / "examples").symlink_to(EXAMPLES, target_is_directory=True)
    ports: dict[int, int] = {}
    for default in (8000, 8001, 8002):
        port = free_port()
        while port in ports.values():
            port = free_port()
        ports[default] = port
    http_port, grpc_port, metrics_port = ports.values()
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join(
            part for part in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if part
        ),
        "MNIST37_HTTP_PORT": str(http_port),
        "MNIST37_GRPC_PORT": str(grpc_port),
        "MNIST37_METRICS_PORT": str(metrics_port),
        "MNIST37_SERVER": f"127.0.0.1:{grpc_port}",
    }
    outputs = {}
    for language, code in blocks[:serve_at]:  # e.g. training a model to serve
        outputs[code] = run_block(language, localized(code, ports), tmp_path, env)
    serve = localized(blocks[serve_at][1], ports)
    with serving(serve, tmp_path, env, grpc_port) as server:
        for language, code in blocks[serve_at + 1 :]:
            outputs[code] = run_block(language, localized(code, ports), tmp_path, env)
    assert server.process.returncode == 0, server.log()

    classify = next(out for code, out in outputs.items() if "mnist37-client classify" in code)
    pngs = sorted(EXAMPLES.glob("*.png"))
    assert pngs
    for png in pngs:
        digit = {"three": 3, "seven": 7}[png.stem.split("-")[0]]
        assert re.search(rf"^{re.escape(png.name)}\tdigit={digit}\t", classify, re.MULTILINE), (
            png.name,
            classify,
        )
    metrics = next(out for code, out in outputs.items() if "/metrics" in code)
    assert re.search(r'^mnist37_images_total\{digit="7",.*\} [1-9]', metrics, re.MULTILINE)
    python = next(out for code, out in outputs.items() if "tritonclient" in code)
    assert "[3 7]" in python, python

"""The server refuses to start, with one clear line, when it cannot do its job."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from serving.launcher import start_server


def test_a_busy_metrics_port_is_a_clean_refusal(model_repository, tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        server = start_server(
            model_repository,
            tmp_path,
            "--metrics-port",
            str(busy),
            "--log-format",
            "text",
            wait=False,
        )
        assert server.process.wait(timeout=60) == 1
    (line,) = server.log().splitlines()  # before any model is loaded: nothing else
    assert line.endswith(
        f"ERROR serving: refusing to start: cannot serve metrics on 127.0.0.1:{busy}: "
        "Address already in use"
    )


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_busy_grpc_port_is_refused_in_one_line(server, model_repository, log_format):
    """Our line only: no gRPC C-core lines (absl's "All log messages before
    absl::InitializeLog()", chttp2_server.cc's "Failed to add port") before it."""
    command = [sys.executable, "-m", "serving.server", "--repository", str(model_repository)]
    command += ["--host", "127.0.0.1", "--grpc-port", str(server.port), "--metrics-port", "0"]
    command += ["--http-port", "0"]
    done = subprocess.run(
        [*command, "--log-format", log_format], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    refusal = f"refusing to start: cannot listen on 127.0.0.1:{server.port}: Address already in use"
    if log_format == "json":
        entry = json.loads(line)
        assert (entry["level"], entry["logger"], entry["message"]) == ("error", "serving", refusal)
    else:
        assert line.endswith(f" ERROR serving: {refusal}")


def test_a_busy_http_port_is_refused_in_one_line(server, model_repository):
    command = [sys.executable, "-m", "serving.server", "--repository", str(model_repository)]
    command += ["--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0"]
    command += ["--http-port", str(server.http_port), "--log-format", "text"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.endswith(
        f" ERROR serving: refusing to start: cannot listen on 127.0.0.1:{server.http_port} "
        "(HTTP): Address already in use"
    )

"""The server refuses to start, with one clear line, when it cannot do its job."""

from __future__ import annotations

import socket

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
    log = server.log()
    assert f"refusing to start: cannot serve metrics on 127.0.0.1:{busy}" in log
    assert "Traceback" not in log

"""Structured logs: the formatters, the flag, and the real server logging each failed
request once (and successful ones never)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import time

import grpc
import pytest
from helpers import infer_request

from serving.config import load_config
from serving.generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving.launcher import start_server
from serving.logs import FailureLogLimiter, JsonFormatter, TextFormatter, configure_logging


def record(message: str, level: int = logging.WARNING, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("serving.rpc", level, __file__, 1, message, (), None)
    made.__dict__.update(extra)
    return made


def test_json_lines_carry_the_request_fields():
    line = JsonFormatter().format(
        record('ModelInfer failed: "quoted"\nsecond line', rpc="ModelInfer", model="m", code="X")
    )
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["logger"] == "serving.rpc"
    assert entry["message"] == 'ModelInfer failed: "quoted"\nsecond line'
    assert (entry["rpc"], entry["model"], entry["code"]) == ("ModelInfer", "m", "X")
    assert "version" not in entry and "peer" not in entry
    assert entry["ts"].endswith("+00:00") and "T" in entry["ts"]


def test_json_lines_include_the_traceback():
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        failed = record("boom", logging.ERROR)
        failed.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(failed))
    assert "RuntimeError: kaput" in entry["exception"] and entry["level"] == "error"


def test_text_lines_append_the_request_fields():
    line = TextFormatter().format(record("failed", model="m", version="2", code="NOT_FOUND"))
    assert line.endswith("WARNING serving.rpc: failed [model='m' version='2' code='NOT_FOUND']")


def test_configure_logging_replaces_handlers_and_checks_the_format():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("info", "json", stream)
        configure_logging("info", "json", stream)
        logging.getLogger("serving.test").info("hello")
        logging.getLogger("serving.test").debug("hidden")
        assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == ["hello"]
        with pytest.raises(ValueError, match="choose from json, text"):
            configure_logging("info", "xml", stream)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_log_format_flag_and_variable():
    assert load_config([]).log_format == "json"
    assert load_config([], {"MNIST37_LOG_FORMAT": "text"}).log_format == "text"
    assert load_config(["--log-format", "json"], {"MNIST37_LOG_FORMAT": "text"}).log_format == (
        "json"
    )
    with pytest.raises(SystemExit):
        load_config(["--log-format", "xml"])


def test_the_server_logs_failed_requests_once_successes_never_and_limits_a_flood(
    model_repository, test_digits, tmp_path
):
    server = start_server(
        model_repository, tmp_path, "--log-format", "json", "--log-failures-per-second", "2"
    )
    flood = 40
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            images = test_digits[0][:3]
            for _ in range(20):
                stub.ModelInfer(infer_request(images))
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(infer_request(images, model="nope"))
            wrong = infer_request(images)
            wrong.inputs[0].shape.append(1)
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(wrong)
            for _ in range(20):
                stub.ModelInfer(infer_request(images))
            started = time.monotonic()
            for _ in range(flood):
                with pytest.raises(grpc.RpcError):
                    stub.ModelInfer(infer_request(images, model="flood"))
            elapsed = time.monotonic() - started

        def not_found_accounted() -> int:
            """NOT_FOUND failures logged one by one or counted in a summary line."""
            return sum(
                int(entry.get("suppressed", 1))
                for entry in rpc_entries(server.log())
                if entry["code"] == "NOT_FOUND"
            )

        deadline = time.monotonic() + 10
        while not_found_accounted() < 1 + flood and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        assert server.terminate() == 0
    entries = [json.loads(line) for line in server.log().splitlines()]  # each line is JSON
    failures = rpc_entries(server.log())
    assert [
        (entry["level"], entry["rpc"], entry["model"], entry["version"], entry["code"])
        for entry in failures[:2]
    ] == [
        ("warning", "ModelInfer", "nope", "", "NOT_FOUND"),
        ("warning", "ModelInfer", "mnist37", "2", "INVALID_ARGUMENT"),
    ]
    assert "inputs[0].shape" in failures[1]["message"]
    assert all(entry["peer"].startswith("ipv4:127.0.0.1:") for entry in failures[:2])
    assert any("SIGTERM received" in entry["message"] for entry in entries)
    # the flood: at most 2 lines a second, the rest counted in summary lines
    assert not_found_accounted() == 1 + flood
    single = [entry for entry in failures if "suppressed" not in entry]
    summaries = [entry for entry in failures if "suppressed" in entry]
    assert 3 <= len(single) <= 1 + 2 * (int(elapsed) + 2)
    assert summaries and all(
        (entry["rpc"], entry["code"], entry["level"]) == ("ModelInfer", "NOT_FOUND", "warning")
        and f"suppressed {entry['suppressed']} similar failures" in entry["message"]
        for entry in summaries
    )


def rpc_entries(log: str) -> list[dict[str, object]]:
    entries = [json.loads(line) for line in log.splitlines()]
    return [entry for entry in entries if entry["logger"] == "serving.rpc"]


def test_failure_lines_are_limited_per_kind_and_the_rest_summed_up(caplog):
    window_s = 0.3
    logger = logging.getLogger("serving.rpc")
    limiter = FailureLogLimiter(3, window_s, logger)

    def fail(rpc: str, code: str, level: int = logging.WARNING) -> bool:
        allowed = limiter.allow(rpc, code, level)
        if allowed:
            logger.log(level, "%s failed: %s", rpc, code, extra={"rpc": rpc, "code": code})
        return allowed

    async def scenario() -> list[bool]:
        first_window = [fail("ModelInfer", "NOT_FOUND") for _ in range(10)]
        # other kinds have their own budget: their first failure is always logged
        assert fail("ModelInfer", "INVALID_ARGUMENT")
        assert fail("Classify", "NOT_FOUND")
        assert [fail("ModelInfer", "INTERNAL", logging.ERROR) for _ in range(5)].count(True) == 3
        await asyncio.sleep(window_s * 2)  # the windows end: summaries are logged
        assert fail("ModelInfer", "NOT_FOUND"), "a new window logs again"
        return first_window

    with caplog.at_level(logging.WARNING, logger="serving.rpc"):
        first_window = asyncio.run(scenario())
    assert first_window == [True] * 3 + [False] * 7
    lines = [(record.levelno, record.getMessage()) for record in caplog.records]
    summaries = [(level, message) for level, message in lines if "suppressed" in message]
    assert sorted(summaries) == [
        (logging.WARNING, "ModelInfer failed: NOT_FOUND: suppressed 7 similar failures in the "
         "last 0.3 s (at most 3 lines per 0.3 s)"),
        (logging.ERROR, "ModelInfer failed: INTERNAL: suppressed 2 similar failures in the "
         "last 0.3 s (at most 3 lines per 0.3 s)"),
    ]  # fmt: skip
    summary = next(record for record in caplog.records if "suppressed 7" in record.getMessage())
    assert (summary.rpc, summary.code, summary.suppressed) == ("ModelInfer", "NOT_FOUND", 7)
    assert len(lines) == 3 + 1 + 1 + 3 + 2 + 1
    assert json.loads(JsonFormatter().format(summary))["suppressed"] == 7


def test_no_limit_logs_every_failure():
    async def scenario() -> list[bool]:
        limiter = FailureLogLimiter(0)
        return [limiter.allow("ModelInfer", "NOT_FOUND", logging.WARNING) for _ in range(100)]

    assert all(asyncio.run(scenario()))


def test_log_failures_per_second_flag_and_variable():
    assert load_config([]).log_failures_per_second == 10
    variable = {"MNIST37_LOG_FAILURES_PER_SECOND": "0"}
    assert load_config([], variable).log_failures_per_second == 0
    assert load_config(["--log-failures-per-second", "3"], variable).log_failures_per_second == 3
    with pytest.raises(SystemExit):
        load_config(["--log-failures-per-second", "-1"])


def test_a_huge_message_field_or_traceback_is_cut_to_a_bounded_line():
    huge = "x" * 1_000_000
    try:
        raise ValueError(huge)
    except ValueError:
        exc_info = sys.exc_info()
    made = record(f"ModelInfer failed: {huge}", model=huge, peer=huge, rpc="ModelInfer")
    made.exc_info = exc_info
    json_line = JsonFormatter().format(made)
    text_line = TextFormatter().format(made)
    for line in (json_line, text_line):
        assert len(line) < 12_000
        assert "more characters]" in line
    entry = json.loads(json_line)  # cut field by field: still one valid JSON object
    assert entry["model"].startswith("xxx") and len(entry["model"]) < 250
    assert entry["rpc"] == "ModelInfer"

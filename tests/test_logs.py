"""Structured logs: the formatters, the flag, and the real server logging each failed
request once (and successful ones never)."""

from __future__ import annotations

import io
import json
import logging
import sys
import time

import grpc
import pytest
from conftest import infer_request, start_server

from serving.config import load_config
from serving.generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving.logs import JsonFormatter, TextFormatter, configure_logging


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


def test_the_server_logs_failed_requests_once_and_successes_never(
    model_repository, test_digits, tmp_path
):
    server = start_server(model_repository, tmp_path, "--log-format", "json")
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
        deadline = time.monotonic() + 10
        while server.log().count('"logger": "serving.rpc"') < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        assert server.terminate() == 0
    lines = server.log().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    failures = [entry for entry in entries if entry["logger"] == "serving.rpc"]
    assert [
        (entry["level"], entry["rpc"], entry["model"], entry["version"], entry["code"])
        for entry in failures
    ] == [
        ("warning", "ModelInfer", "nope", "", "NOT_FOUND"),
        ("warning", "ModelInfer", "mnist37", "2", "INVALID_ARGUMENT"),
    ]
    assert "inputs[0].shape" in failures[1]["message"]
    assert all(entry["peer"].startswith("ipv4:127.0.0.1:") for entry in failures)
    assert any("SIGTERM received" in entry["message"] for entry in entries)

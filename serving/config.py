"""Every server setting in one place: a dataclass, its command-line flags and their
environment variables (`--grpc-port` <-> `MNIST37_GRPC_PORT`). A flag beats its variable,
which beats the default.

`python -m serving.config` prints the flag table of the README's "Serving" section (a test
checks that the README's copy matches)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from serving.imaging import MAX_PNG_PIXELS, MAX_REQUEST_PNG_PIXELS

ENV_PREFIX = "MNIST37_"
DEVICES = ("cpu", "cuda", "auto")
GRAPH_OPTIMIZATIONS = ("disable", "basic", "extended", "all")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")


@dataclass(frozen=True)
class ServerConfig:
    repository: Path = Path("model_repository")
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_port: int = 8002
    device: str = "cpu"
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization: str = "all"
    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    max_request_images: int = 4096
    max_png_pixels: int = MAX_PNG_PIXELS
    max_request_png_pixels: int = MAX_REQUEST_PNG_PIXELS
    png_threads: int = 2
    inference_threads: int = 2
    shutdown_timeout: float = 30.0
    drain_quiet_period: float = 0.2
    poll_interval: float = 5.0
    keep_versions: int = 1
    log_level: str = "info"
    log_format: str = "json"
    log_failures_per_second: int = 10

    @property
    def grpc_address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.grpc_port}"


_HELP = {
    "repository": "model repository directory, laid out as REPO/MODEL/VERSION/model.onnx",
    "host": "address to listen on",
    "grpc_port": "gRPC port (Open Inference Protocol, Classifier, health, reflection)",
    "metrics_port": "Prometheus /metrics HTTP port; 0 turns metrics off",
    "device": "onnxruntime execution provider (cuda refuses to start, saying why, without a "
    "usable CUDA; auto falls back to CPU)",
    "intra_op_threads": "onnxruntime threads inside one operator (0: onnxruntime decides)",
    "inter_op_threads": "onnxruntime threads across operators (0: onnxruntime decides)",
    "graph_optimization": "onnxruntime graph optimisation level",
    "max_batch_size": "most images the dynamic batcher puts into one onnxruntime call; "
    "1 turns batching off",
    "max_queue_delay_us": "most microseconds a request waits for others to join its batch "
    "(0: run at once when idle, batch only what queues up meanwhile)",
    "max_request_images": "most images one request may carry, more is INVALID_ARGUMENT "
    "(reported as max_batch_size in ModelConfig)",
    "max_png_pixels": "most pixels (width x height, read from the header before decoding) "
    "of one PNG, more is INVALID_ARGUMENT",
    "max_request_png_pixels": "most pixels of all the PNGs of one request together, more is "
    "INVALID_ARGUMENT",
    "png_threads": "threads that decode PNGs; requests with PNGs wait for one, so decoding "
    "memory does not grow with concurrent requests",
    "inference_threads": "threads that run onnxruntime calls off the event loop",
    "shutdown_timeout": "seconds a SIGTERM/SIGINT drain may take before stopping anyway",
    "drain_quiet_period": "seconds without a request in flight that end a drain",
    "poll_interval": "seconds between scans of the repository for new or removed versions "
    "(0: scan only on SIGHUP)",
    "keep_versions": "how many of each model's newest loadable versions to serve",
    "log_level": "logging level",
    "log_format": "log line format: one JSON object per line (for log collectors) or text",
    "log_failures_per_second": "most failed-request log lines per second for each RPC and "
    "status code; the rest are counted in one summary line (0: no limit)",
}

_CHOICES: Mapping[str, Sequence[str]] = {
    "device": DEVICES,
    "graph_optimization": GRAPH_OPTIMIZATIONS,
    "log_level": LOG_LEVELS,
    "log_format": LOG_FORMATS,
}

_POSITIVE = {
    "max_batch_size",
    "max_request_images",
    "max_png_pixels",
    "max_request_png_pixels",
    "png_threads",
    "inference_threads",
    "keep_versions",
}
_NON_NEGATIVE = {
    "grpc_port",
    "metrics_port",
    "intra_op_threads",
    "inter_op_threads",
    "max_queue_delay_us",
    "shutdown_timeout",
    "drain_quiet_period",
    "poll_interval",
    "log_failures_per_second",
}


def env_var(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def build_parser(prog: str = "mnist37-serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the repository's ONNX 3-vs-7 models over gRPC.",
        epilog="Every flag can also be set by its environment variable, shown in brackets.",
    )
    defaults = ServerConfig()
    for field in fields(ServerConfig):
        default = getattr(defaults, field.name)
        kind = type(default)
        parser.add_argument(
            flag(field.name),
            dest=field.name,
            type=_checked(field.name, kind),
            choices=_CHOICES.get(field.name),
            default=None,
            help=f"{_HELP[field.name]} [{env_var(field.name)}; default {default}]",
        )
    return parser


def flag_table() -> str:
    """The Markdown table of every flag `build_parser()` accepts: flag, variable, default,
    meaning."""
    defaults = ServerConfig()
    rows = ["| flag | variable | default | meaning |", "| --- | --- | --- | --- |"]
    for action in build_parser()._actions:
        if action.dest == "help":
            continue
        meaning = _HELP[action.dest]
        if action.choices:
            meaning += "; one of " + ", ".join(f"`{choice}`" for choice in action.choices)
        cells = (
            f"`{action.option_strings[0]}`",
            f"`{env_var(action.dest)}`",
            f"`{getattr(defaults, action.dest)}`",
            meaning.replace("|", "\\|"),
        )
        rows.append(f"| {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"


def _checked(name: str, kind: type) -> object:
    def convert(text: str) -> object:
        value = kind(text)
        if name in _POSITIVE and value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        if name in _NON_NEGATIVE and value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
        return value

    convert.__name__ = kind.__name__
    return convert


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """The configuration from flags, then environment variables, then defaults."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    defaults = ServerConfig()
    for field in fields(ServerConfig):
        value = getattr(arguments, field.name)
        if value is None and env_var(field.name) in environ:
            text = environ[env_var(field.name)]
            try:
                value = _checked(field.name, type(getattr(defaults, field.name)))(text)
            except (ValueError, argparse.ArgumentTypeError) as error:
                parser.error(f"{env_var(field.name)}={text!r}: {error}")
            choices = _CHOICES.get(field.name)
            if choices and value not in choices:
                parser.error(f"{env_var(field.name)}={text!r}: choose from {', '.join(choices)}")
        if value is not None:
            values[field.name] = value
    return ServerConfig(**values)


if __name__ == "__main__":
    print(flag_table(), end="")

"""Every server setting in one place: `ServerConfig`, whose fields are the command-line
flags of `mnist37-serve` and their environment variables (`--grpc-port` <->
`MNIST37_GRPC_PORT`), built by `serving.settings`. A flag beats its variable, which beats
the default.

`python -m serving.config` prints the flag table of the README's "Serving" section (a test
checks that the README's copy matches); `python -m serving.config mnist37-train` (or
`mnist37-retrain`, `serving.healthcheck`) prints that command's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from serving import settings
from serving.imaging import MAX_PNG_PIXELS, MAX_REQUEST_PNG_PIXELS
from serving.settings import ENV_PREFIX, NON_NEGATIVE, POSITIVE, env_var, flag, setting

__all__ = ["ENV_PREFIX", "ServerConfig", "build_parser", "env_var", "flag", "load_config"]

DEVICES = ("cpu", "cuda", "auto")
GRAPH_OPTIMIZATIONS = ("disable", "basic", "extended", "all")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
# The HTTP body limit: JSON of --max-request-images' default 1,024 images takes at most
# 1024 x 784 x 5 bytes (a pixel "255, ") = 4,014,080 bytes, about 4 MB (binary tensors: 784
# bytes an image); 8 MiB leaves room for nesting, whitespace and base64 PNGs.
HTTP_MAX_BODY_BYTES = 8 * 1024 * 1024
AUTO_WORKERS = "auto"


def parse_workers(text: str) -> str:
    """`--workers`' value: a positive number of processes, or `auto` (decided at start by
    `serving.workers.worker_count`: the cores this process may use)."""
    word = text.strip().lower()
    if word == AUTO_WORKERS:
        return word
    try:
        count = int(word)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive number or {AUTO_WORKERS}, got {text}"
        )
    return str(count)


@dataclass(frozen=True)
class ServerConfig:
    """Serve the repository's ONNX 3-vs-7 models over gRPC and HTTP."""

    prog: ClassVar[str] = "mnist37-serve"

    repository: Path = setting(
        Path("model_repository"),
        "model repository directory, laid out as REPO/MODEL/VERSION/model.onnx",
    )
    host: str = setting(
        "127.0.0.1",
        "address gRPC and HTTP listen on: loopback by default, `0.0.0.0` for every interface "
        "(the container images set that); beyond loopback, use TLS and tokens",
    )
    http_port: int = setting(
        8000,
        "HTTP port (Open Inference Protocol REST, /v1/classify, /v1/explain); 0 turns HTTP off",
        allowed=NON_NEGATIVE,
    )
    grpc_port: int = setting(
        8001,
        "gRPC port (Open Inference Protocol, Classifier, health, reflection)",
        allowed=NON_NEGATIVE,
    )
    metrics_port: int = setting(
        8002, "Prometheus /metrics HTTP port; 0 turns metrics off", allowed=NON_NEGATIVE
    )
    metrics_host: str = setting(
        "127.0.0.1",
        "address the metrics port listens on, apart from gRPC's and HTTP's: it has no "
        "authentication, so expose it only to Prometheus",
    )
    workers: str = setting(
        "1",
        "server processes sharing the gRPC and HTTP ports (SO_REUSEPORT; a client's "
        "connection stays with one): a number, or `auto` for the cores this process may use "
        "(its CPU affinity, capped by its cgroup's `cpu.max`). Above 1, a supervisor starts "
        "them, restarts one that dies, forwards signals and serves the summed metrics",
        parse=parse_workers,
    )
    tls_cert: Path | None = setting(
        None, "PEM certificate chain: serve gRPC and HTTP (HTTPS) over TLS (with `--tls-key`)"
    )
    tls_key: Path | None = setting(None, "PEM private key of `--tls-cert`")
    tls_client_ca: Path | None = setting(
        None,
        "PEM CA certificates: mutual TLS, clients must present a certificate one of them signed",
    )
    auth_token_file: Path | None = setting(
        None,
        "file of bearer tokens, one a line, re-read when it changes: every RPC and HTTP "
        "request needs `authorization: Bearer <token>`, else UNAUTHENTICATED (HTTP 401)",
    )
    protect_health: bool = setting(
        False,
        "with `--auth-token-file`, health checks need a token too (by default they stay "
        "open for load balancers' and Kubernetes' probes)",
    )
    device: str = setting(
        "cpu",
        "onnxruntime execution provider (cuda refuses to start, saying why, without a "
        "usable CUDA; auto falls back to CPU)",
        choices=DEVICES,
    )
    intra_op_threads: int = setting(
        1, "onnxruntime threads inside one operator (0: onnxruntime decides)", allowed=NON_NEGATIVE
    )
    inter_op_threads: int = setting(
        1, "onnxruntime threads across operators (0: onnxruntime decides)", allowed=NON_NEGATIVE
    )
    graph_optimization: str = setting(
        "all", "onnxruntime graph optimisation level", choices=GRAPH_OPTIMIZATIONS
    )
    # As many as one request may carry, so that no request is split by default: 16 calls
    # of 64 images cost 1.3-1.6x one call of 1,024 here, through the whole server.
    max_batch_size: int = setting(
        1024,
        "most images the dynamic batcher puts into one onnxruntime call (a larger request "
        "is split into calls of this many); 1 turns batching off",
        allowed=POSITIVE,
    )
    max_queue_delay_us: int = setting(
        0,
        "most microseconds a request waits for others to join its batch "
        "(0: run at once when idle, batch only what queues up meanwhile)",
        allowed=NON_NEGATIVE,
    )
    max_request_images: int = setting(
        1024,
        "most images one request may carry, more is INVALID_ARGUMENT "
        "(reported as max_batch_size in ModelConfig)",
        allowed=POSITIVE,
    )
    max_queued_images: int = setting(
        65536,
        "most images waiting in one model version's queue; a request that would pass it "
        "is RESOURCE_EXHAUSTED at once",
        allowed=POSITIVE,
    )
    max_queued_requests: int = setting(
        1024,
        "most requests waiting in one model version's queue (each --max-batch-size chunk "
        "of a larger request counts as one); more is RESOURCE_EXHAUSTED",
        allowed=POSITIVE,
    )
    max_connections: int = setting(
        64, "most client connections open at once; more are refused", allowed=POSITIVE
    )
    max_streams_per_connection: int = setting(
        16,
        "most concurrent RPCs (HTTP/2 streams) on one connection; clients queue the rest. "
        "Memory: gRPC receives every stream's message before any handler can refuse it, so "
        "connections x streams x the largest message must fit the memory limit",
        allowed=POSITIVE,
    )
    idle_timeout: float = setting(
        300.0,
        "seconds a connection may stay without an RPC before the server closes it",
        allowed=POSITIVE,
    )
    http_max_body_bytes: int = setting(
        HTTP_MAX_BODY_BYTES,
        "most bytes of an HTTP request body, more is 413 (JSON of 1,024 images, the default "
        "`--max-request-images`, fits in about 4 MB)",
        allowed=POSITIVE,
    )
    http_body_timeout: float = setting(
        30.0,
        "seconds an HTTP request body may take to arrive whole, more is 408 (against slow "
        "or stalled clients)",
        allowed=POSITIVE,
    )
    max_png_pixels: int = setting(
        MAX_PNG_PIXELS,
        "most pixels (width x height, read from the header before decoding) "
        "of one PNG, more is INVALID_ARGUMENT",
        allowed=POSITIVE,
    )
    max_request_png_pixels: int = setting(
        MAX_REQUEST_PNG_PIXELS,
        "most pixels of all the PNGs of one request together, more is INVALID_ARGUMENT",
        allowed=POSITIVE,
    )
    png_threads: int = setting(
        2,
        "threads that decode PNGs; requests with PNGs wait for one, so decoding "
        "memory does not grow with concurrent requests",
        allowed=POSITIVE,
    )
    inference_threads: int = setting(
        2, "threads that run onnxruntime calls off the event loop", allowed=POSITIVE
    )
    shutdown_timeout: float = setting(
        30.0,
        "seconds a SIGTERM/SIGINT drain may take before stopping anyway",
        allowed=NON_NEGATIVE,
    )
    drain_quiet_period: float = setting(
        0.2, "seconds without a request in flight that end a drain", allowed=NON_NEGATIVE
    )
    poll_interval: float = setting(
        5.0,
        "seconds between scans of the repository for new or removed versions "
        "(0: scan only on SIGHUP)",
        allowed=NON_NEGATIVE,
    )
    keep_versions: int = setting(
        1, "how many of each model's newest loadable versions to serve", allowed=POSITIVE
    )
    log_level: str = setting("info", "logging level", choices=LOG_LEVELS)
    log_format: str = setting(
        "json",
        "log line format: one JSON object per line (for log collectors) or text",
        choices=LOG_FORMATS,
    )
    log_failures_per_second: int = setting(
        10,
        "most failed-request log lines per second for each RPC and status code; the rest "
        "are counted in one summary line (0: no limit)",
        allowed=NON_NEGATIVE,
    )

    @property
    def grpc_address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.grpc_port}"


def build_parser() -> argparse.ArgumentParser:
    return settings.build_parser(ServerConfig)


def flag_table() -> str:
    """The Markdown table of every flag `build_parser()` accepts: flag, variable, default,
    meaning."""
    return settings.flag_table(ServerConfig)


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """The configuration from flags, then environment variables, then defaults."""
    return settings.load(ServerConfig, argv, environ)


if __name__ == "__main__":
    sys.exit(settings.print_flag_table(sys.argv[1:]))

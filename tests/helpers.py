"""Helpers the unit and integration tests share: paths, the shipped digits, request and
PNG makers, an event-loop runner and a stand-in for grpc.aio's servicer context."""

from __future__ import annotations

import asyncio
import io
import subprocess
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from PIL import Image

from serving.generated.inference import grpc_service_pb2 as oip_pb

REPO_ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


def shipped_digit_files() -> tuple[Path, Path]:
    """The shipped 3s and 7s of MNIST's test set (images, labels)."""
    data = REPO_ROOT / "training" / "data"
    return data / "t10k-images-idx3-ubyte.gz", data / "t10k-labels-idx1-ubyte.gz"


def infer_request(
    images: np.ndarray, model: str = "mnist37", version: str = "", raw: bool = True
) -> oip_pb.ModelInferRequest:
    """A ModelInfer request for uint8 [N, 28, 28] images, raw or typed."""
    request = oip_pb.ModelInferRequest(model_name=model, model_version=version)
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=images.shape)
    if raw:
        request.raw_input_contents.append(images.tobytes())
    else:
        tensor.contents.uint_contents.extend(images.reshape(-1).tolist())
    return request


def png(array: np.ndarray, mode: str = "L") -> bytes:
    """`array` (uint8, one channel) encoded as a PNG of `mode`."""
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _openssl(*arguments: str | Path) -> None:
    subprocess.run(["openssl", *map(str, arguments)], check=True, capture_output=True, timeout=60)


def _signed(directory: Path, name: str, ca: Path, ca_key: Path, extensions: str) -> None:
    """`name.pem` and `name.key` in `directory`: an EC key and a certificate `ca` signs."""
    key, request = directory / f"{name}.key", directory / f"{name}.csr"
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        key,
        "-out",
        request,
        "-subj",
        f"/CN={name}",
    )
    (directory / f"{name}.ext").write_text(extensions + "\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        request,
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-out",
        directory / f"{name}.pem",
        "-days",
        "2",
        "-extfile",
        directory / f"{name}.ext",
    )


def make_certificates(directory: Path) -> Path:
    """Test certificates made now with openssl: two CAs (`ca`, `other-ca`), a server
    certificate for 127.0.0.1/localhost and a client certificate signed by `ca`, and a
    client certificate signed by `other-ca`. Returns `directory`."""
    for ca in ("ca", "other-ca"):
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            directory / f"{ca}.key",
            "-out",
            directory / f"{ca}.pem",
            "-days",
            "2",
            "-subj",
            f"/CN={ca}",
        )
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    _signed(
        directory,
        "server",
        ca,
        ca_key,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth",
    )
    _signed(directory, "client", ca, ca_key, "extendedKeyUsage=clientAuth")
    _signed(
        directory,
        "stranger",
        directory / "other-ca.pem",
        directory / "other-ca.key",
        "extendedKeyUsage=clientAuth",
    )
    return directory


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine to completion in a fresh event loop."""
    return asyncio.run(coroutine)


class FakeContext:
    """The little of `grpc.aio.ServicerContext` that the servicers and the edge use."""

    def __init__(self, time_remaining: float | None = None) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.remaining = time_remaining

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()

    def code(self) -> grpc.StatusCode | None:
        return self.aborted[0] if self.aborted else None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

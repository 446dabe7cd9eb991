"""Helpers the unit and integration tests share: paths, the shipped digits, request and
PNG makers, an event-loop runner and a stand-in for grpc.aio's servicer context."""

from __future__ import annotations

import asyncio
import io
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

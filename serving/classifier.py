"""The domain API, `mnist37.v1.Classifier`: images in, digits and P(7) out.

`Classification` is the operation itself, protocol-free; `ClassifierServicer` serves it
over gRPC and `serving.rest.classify` over HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np

from serving.contract import IMAGE_SIDE
from serving.dataplane import DataPlane, InferenceResult
from serving.edge import EdgeCall, EdgeState, RpcCall
from serving.errors import DeadlineExpired, InvalidInput
from serving.generated.mnist37.v1 import classifier_pb2 as pb
from serving.generated.mnist37.v1 import classifier_pb2_grpc as pb_grpc
from serving.imaging import (
    DEFAULT_PNG_LIMITS,
    PngLimits,
    check_png_sizes,
    pixels_to_image,
    png_to_image,
)
from serving.repository import DEFAULT_MODEL_NAME


def _never() -> bool:
    return False


def decode_images(
    images: Sequence[pb.Image],
    limits: PngLimits = DEFAULT_PNG_LIMITS,
    should_stop: Callable[[], bool] = _never,
) -> np.ndarray:
    """The request's images as uint8 [N, 28, 28]; PNGs are converted the MNIST way once
    every PNG header is within `limits`. `should_stop()`, asked before each image, abandons
    the rest (DeadlineExpired) when the RPC was cancelled or its deadline passed."""
    check_png_sizes(
        (
            (index, image.png)
            for index, image in enumerate(images)
            if image.WhichOneof("data") == "png"
        ),
        limits,
    )
    batch = np.empty((len(images), IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    for index, image in enumerate(images):
        if should_stop():
            raise DeadlineExpired(
                f"images[{index}]: decoding abandoned: the request was cancelled or its "
                "deadline passed"
            )
        kind = image.WhichOneof("data")
        if kind == "pixels":
            batch[index] = pixels_to_image(image.pixels, index)
        elif kind == "png":
            batch[index] = png_to_image(image.png, index, limits.image_pixels)
        else:
            raise InvalidInput(f"images[{index}]: set either pixels or png")
    return batch


class Classification:
    """Classify, protocol-free: a `ClassifyRequest`'s images decoded (PNGs within `png_limits`
    on the dedicated pool), then classified by the requested model. The gRPC servicer and
    the HTTP edge (`serving.rest.classify`) share one."""

    def __init__(
        self,
        dataplane: DataPlane,
        png_limits: PngLimits = DEFAULT_PNG_LIMITS,
        png_executor: Executor | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.png_limits = png_limits
        # Requests with PNGs decode only on these few threads, so concurrent requests
        # cannot multiply decoding's memory and CPU.
        self.png_executor = png_executor or ThreadPoolExecutor(1, thread_name_prefix="png")

    async def classify(
        self, call: EdgeCall, request: pb.ClassifyRequest, remaining: float | None = None
    ) -> pb.ClassifyResponse:
        """The predictions for `request`, within `remaining` seconds if not None."""
        deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
        name, version = request.model_name or DEFAULT_MODEL_NAME, request.model_version
        call.resolve(name, version)  # an unknown model fails before any decoding
        images = await self.decode(request.images, remaining)
        # Resolve again: a version retired while PNGs decoded must not be used.
        model = call.resolve(name, version)
        result = await self.dataplane.infer(model, images, deadline)
        return _response(result)

    async def decode(self, images: Sequence[pb.Image], remaining: float | None) -> np.ndarray:
        """The images as uint8 [N, 28, 28]; PNGs are decoded off the event loop, and the
        rest of them abandoned once `remaining` seconds passed or the caller was cancelled."""
        self.dataplane.check_image_count(len(images), "images")
        if not any(image.WhichOneof("data") == "png" for image in images):
            return decode_images(list(images))
        deadline = None if remaining is None else time.monotonic() + remaining
        abandoned = threading.Event()

        def should_stop() -> bool:
            return abandoned.is_set() or (deadline is not None and time.monotonic() >= deadline)

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self.png_executor, decode_images, list(images), self.png_limits, should_stop
            )
        finally:
            abandoned.set()  # when cancelled, the decoding thread stops before its next image


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(
        self, dataplane: DataPlane, edge: EdgeState, classification: Classification
    ) -> None:
        self.dataplane = dataplane
        self.edge = edge
        self.classification = classification

    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        async with RpcCall(self.dataplane, self.edge, "Classify", context, inference=True) as call:
            return await self.classification.classify(call, request, context.time_remaining())


def _response(result: InferenceResult) -> pb.ClassifyResponse:
    prediction = pb.Prediction
    name, version = result.model_name, result.model_version
    return pb.ClassifyResponse(
        predictions=[
            prediction(
                digit=int(digit),
                probability_seven=float(probability),
                model_name=name,
                model_version=version,
            )
            for probability, digit in zip(
                result.probability.tolist(), result.digit.tolist(), strict=True
            )
        ]
    )

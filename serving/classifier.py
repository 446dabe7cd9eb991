"""The domain API, `mnist37.v1.Classifier`: images in; digits and P(7) out (`Classify`), or
the same as pixel votes (`Explain`). Both take the same request and share its checks, its
decoding and their limits.

`Classification` is the operation itself, protocol-free: one decode path (`model_and_images`)
for gRPC's Classify and Explain (`ClassifierServicer`) and HTTP's `/v1/classify` and
`/v1/explain` (`serving.rest.classify`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np

from serving.contract import IMAGE_SIDE, PIXELS
from serving.dataplane import DataPlane, ExplanationResult, InferenceResult
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
from serving.registry import LoadedModel
from serving.repository import DEFAULT_MODEL_NAME

# Contributions go out as little-endian float32 bytes (classifier.proto says why).
CONTRIBUTION_DTYPE = np.dtype("<f4")
MAX_EXPLANATION_BYTES = PIXELS * CONTRIBUTION_DTYPE.itemsize + PIXELS + 2 * 255 + 64
"""The most one image's Explanation takes on the wire: its votes, its pixels, the model
name and version (at most 255 bytes each, a file name's limit) and the rest (under 64)."""


def _never() -> bool:
    return False


def _any_model(model: LoadedModel) -> None:
    """Every resolved model may classify."""


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
    """Classify and Explain, protocol-free: a `ClassifyRequest`'s images decoded (PNGs within
    `png_limits` on the dedicated pool), then classified or explained by the requested
    model. The gRPC servicer and the HTTP edge (`serving.rest.classify`) share one."""

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
        deadline = _deadline(remaining)
        model, images = await self.model_and_images(call, request, remaining)
        result = await self.dataplane.infer(model, images, deadline)
        return _response(result)

    async def explain(
        self, call: EdgeCall, request: pb.ClassifyRequest, remaining: float | None = None
    ) -> tuple[ExplanationResult, np.ndarray]:
        """The explanations for `request` and the images they explain, within `remaining`
        seconds if not None; NotExplainable if the model has no explanation graph."""
        deadline = _deadline(remaining)
        model, images = await self.model_and_images(
            call, request, remaining, admit=self.dataplane.explanation_of
        )
        return await self.dataplane.explain(model, images, deadline), images

    async def model_and_images(
        self,
        call: EdgeCall,
        request: pb.ClassifyRequest,
        remaining: float | None = None,
        admit: Callable[[LoadedModel], object] = _any_model,
    ) -> tuple[LoadedModel, np.ndarray]:
        """The requested model and the request's images as uint8 [N, 28, 28]: the part
        every operation shares, whatever the protocol. `admit(model)` raises if the
        operation cannot run on the model; like an unknown model, that fails before any
        decoding."""
        name, version = request.model_name or DEFAULT_MODEL_NAME, request.model_version
        admit(call.resolve(name, version))
        images = await self.decode(request.images, remaining)
        # Resolve again: a version retired while PNGs decoded must not be used.
        return call.resolve(name, version), images

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

    async def Explain(self, request: pb.ClassifyRequest, context) -> pb.ExplainResponse:
        async with RpcCall(self.dataplane, self.edge, "Explain", context, inference=True) as call:
            result, images = await self.classification.explain(
                call, request, context.time_remaining()
            )
            return _explain_response(result, images)


def _deadline(remaining: float | None) -> float | None:
    """`remaining` seconds from now in event-loop time, or None."""
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


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


def _explain_response(result: ExplanationResult, images: np.ndarray) -> pb.ExplainResponse:
    explanation = pb.Explanation
    name, version = result.model_name, result.model_version
    votes = result.contributions.astype(CONTRIBUTION_DTYPE, copy=False)
    return pb.ExplainResponse(
        explanations=[
            explanation(
                contributions=image_votes.tobytes(),
                bias_term=bias_term,
                logit=logit,
                probability_seven=probability,
                digit=digit,
                model_name=name,
                model_version=version,
                pixels=image.tobytes(),
            )
            for image_votes, bias_term, logit, probability, digit, image in zip(
                votes,
                result.bias_term.tolist(),
                result.logit.tolist(),
                result.probability.tolist(),
                result.digit.tolist(),
                images,
                strict=True,
            )
        ]
    )

"""The domain API servicer, `mnist37.v1.Classifier`: images in, digits and P(7) out."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from serving.dataplane import DataPlane, InferenceResult
from serving.edge import RpcCall, deadline_of
from serving.errors import InvalidInput
from serving.generated.mnist37.v1 import classifier_pb2 as pb
from serving.generated.mnist37.v1 import classifier_pb2_grpc as pb_grpc
from serving.imaging import pixels_to_image, png_to_image
from serving.repository import DEFAULT_MODEL_NAME
from serving.runtime import IMAGE_SIDE


def decode_images(images: list[pb.Image]) -> np.ndarray:
    """The request's images as uint8 [N, 28, 28]; PNGs are converted the MNIST way."""
    batch = np.empty((len(images), IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    for index, image in enumerate(images):
        kind = image.WhichOneof("data")
        if kind == "pixels":
            batch[index] = pixels_to_image(image.pixels, index)
        elif kind == "png":
            batch[index] = png_to_image(image.png, index)
        else:
            raise InvalidInput(f"images[{index}]: set either pixels or png")
    return batch


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        async with RpcCall(self.dataplane, "Classify", context, inference=True) as call:
            name, version = request.model_name or DEFAULT_MODEL_NAME, request.model_version
            call.resolve(name, version)  # an unknown model fails before any decoding
            images = await self._decode(request.images)
            # Resolve again: a version retired while PNGs decoded must not be used.
            model = call.resolve(name, version)
            result = await self.dataplane.infer(model, images, deadline_of(context))
            return _response(result)

    async def _decode(self, images: Sequence[pb.Image]) -> np.ndarray:
        limit = self.dataplane.max_request_images
        if len(images) > limit:
            raise InvalidInput(
                f"images: {len(images)} images exceed the limit of {limit} per request "
                "(--max-request-images)"
            )
        if any(image.WhichOneof("data") == "png" for image in images):
            return await asyncio.to_thread(decode_images, list(images))
        return decode_images(list(images))


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

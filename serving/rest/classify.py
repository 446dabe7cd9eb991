"""`POST /v1/classify` and `POST /v1/explain`: the domain API over HTTP, the same
operations as gRPC's `mnist37.v1.Classifier/Classify` and `/Explain`
(`serving.classifier.Classification`: the same checks, PNG limits, decoding pool and
decode path).

The body is one PNG (`Content-Type: image/png`; `?model_name=` and `?model_version=` pick
the model) or JSON (`application/json`):
`{"images": [{"png": "<base64>"} | {"pixels": [784 integers 0-255]}, ...],
"model_name"?: str, "model_version"?: str}`. The answer is ClassifyResponse as JSON:
`{"predictions": [{"digit", "probability_seven", "model_name", "model_version"}, ...]}`.
`/v1/explain` takes the same request and answers, per image, its pixel votes:
`{"explanations": [{"contributions": [784 floats, row-major], "bias_term", "logit",
"probability_seven", "digit", "model_name", "model_version", "pixels": [784 integers]},
...]}` (the logit is the sum of the contributions plus the bias term; `pixels` the image
the votes are about, a PNG as the server converted it, like gRPC's); 409 if the version
has no explanation graph.
Unknown fields are refused: this is our own API, and a misspelt field is a mistake.
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from collections.abc import Mapping
from typing import Any

import numpy as np
from aiohttp import web

from serving.classifier import Classification
from serving.contract import PIXELS
from serving.dataplane import ExplanationResult
from serving.errors import InvalidInput
from serving.generated.mnist37.v1 import classifier_pb2 as pb
from serving.rest.edge import (
    JSON,
    PNG,
    BodyLimits,
    HttpCall,
    Route,
    check_content_type,
    json_response,
    read_body,
)
from serving.rest.fields import (
    expect_object,
    is_integer,
    json_type,
    member,
    parse_json,
    refuse_unknown,
)
from serving.rest.messages import message_json

_REQUEST_FIELDS = frozenset({"images", "model_name", "model_version"})
_IMAGE_FIELDS = frozenset({"png", "pixels"})


class ClassifyEndpoint:
    def __init__(self, classification: Classification, limits: BodyLimits) -> None:
        self.classification = classification
        self.limits = limits

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/v1/classify", "Classify", self.classify, inference=True),
            Route("POST", "/v1/explain", "Explain", self.explain, inference=True),
        ]

    async def classify(self, request: web.Request, call: HttpCall) -> web.Response:
        response = await self.classification.classify(call, await self._request(request))
        return json_response(message_json(response))

    async def explain(self, request: web.Request, call: HttpCall) -> web.Response:
        result, images = await self.classification.explain(call, await self._request(request))
        return json_response(_explanations_json(result, images))

    async def _request(self, request: web.Request) -> pb.ClassifyRequest:
        """The body as the ClassifyRequest both endpoints take."""
        media_type = check_content_type(request, (PNG, JSON), optional=False)
        body = await read_body(request, self.limits)
        if media_type == PNG:
            return _png_request(bytes(body), request.query)
        return self._json_request(body)

    def _json_request(self, body: bytearray) -> pb.ClassifyRequest:
        request = expect_object(parse_json(body), "the request body")
        refuse_unknown(request, _REQUEST_FIELDS, "the request body")
        images = member(request, "images", list, "images")
        # Before any image is converted: a huge list is refused at once.
        self.classification.dataplane.check_image_count(len(images), "images")
        return pb.ClassifyRequest(
            model_name=member(request, "model_name", str, "model_name", ""),
            model_version=member(request, "model_version", str, "model_version", ""),
            images=[_image(image, index) for index, image in enumerate(images)],
        )


def _png_request(png: bytes, query: Mapping[str, str]) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        model_name=query.get("model_name", ""),
        model_version=query.get("model_version", ""),
        images=[pb.Image(png=png)],
    )


def _image(entry: Any, index: int) -> pb.Image:
    path = f"images[{index}]"
    image = expect_object(entry, path)
    refuse_unknown(image, _IMAGE_FIELDS, path)
    if len(image) != 1:
        raise InvalidInput(f"{path}: set either pixels or png")
    if "png" in image:
        text = member(image, "png", str, f"{path}.png")
        try:
            return pb.Image(png=b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInput(f"{path}.png: not valid base64") from None
    return pb.Image(pixels=_pixels(member(image, "pixels", list, f"{path}.pixels"), path))


def _pixels(values: list[Any], path: str) -> bytes:
    """784 JSON integers 0-255 as the 784 bytes gRPC's `pixels` carries."""
    if len(values) != PIXELS:
        raise InvalidInput(f"{path}.pixels: {len(values)} values, expected {PIXELS}")
    for value in values:
        if not is_integer(value) or not 0 <= value <= 255:
            shown_value = value if is_integer(value) else json_type(value)
            raise InvalidInput(f"{path}.pixels: expected integers 0-255, got {shown_value}")
    return bytes(values)


def _explanations_json(result: ExplanationResult, images: np.ndarray) -> dict[str, object]:
    """The explanations as JSON: float32 values written shortest and the uint8 pixels as
    integers (orjson's numpy support)."""
    count = len(result.digit)
    votes = np.ascontiguousarray(result.contributions, dtype=np.float32).reshape(count, PIXELS)
    pixels = np.ascontiguousarray(images, dtype=np.uint8).reshape(count, PIXELS)
    return {
        "explanations": [
            {
                "contributions": votes[index],
                "bias_term": np.float32(result.bias_term[index]),
                "logit": np.float32(result.logit[index]),
                "probability_seven": np.float32(result.probability[index]),
                "digit": int(result.digit[index]),
                "model_name": result.model_name,
                "model_version": result.model_version,
                "pixels": pixels[index],
            }
            for index in range(count)
        ]
    }

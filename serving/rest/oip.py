"""The Open Inference Protocol's REST endpoints (KServe v2) with Triton's extensions
(model configuration, statistics, repository index, binary tensor data).

Each endpoint answers what its gRPC RPC answers (`serving.catalog` builds both), as JSON.
Health and readiness answer with their status, as the protocol says (200 for true, 400 for
false), and a JSON body that says the same (`{"live": true}`, `{"ready": false}`,
`{"name": "mnist37", "ready": true}`): the protocol asks for no body, Triton's clients read
the status only, and the KServe SDK reads the body (`is_server_live()` fails on an empty
one), as KServe's own server sends it.
"""

from __future__ import annotations

from aiohttp import web

from serving.catalog import Catalog
from serving.dataplane import DataPlane
from serving.rest.edge import (
    BINARY,
    JSON,
    BodyLimits,
    HttpCall,
    Route,
    check_content_type,
    json_response,
    read_body,
)
from serving.rest.fields import expect_object, member, parse_json
from serving.rest.messages import message_json
from serving.rest.tensors import HEADER_LENGTH, decode_infer_request, encode_infer_response

MODEL = "/v2/models/{model}"
VERSION = MODEL + "/versions/{version}"


def _status(answer: dict[str, object], true: bool) -> web.Response:
    """`answer` as JSON, with the status that says `true` or false."""
    return json_response(answer, 200 if true else 400)


def _model(request: web.Request) -> tuple[str, str]:
    """The model name and version ("" for the default) the path names."""
    return request.match_info["model"], request.match_info.get("version", "")


class InferenceEndpoints:
    def __init__(self, dataplane: DataPlane, catalog: Catalog, limits: BodyLimits) -> None:
        self.dataplane = dataplane
        self.catalog = catalog
        self.limits = limits

    def routes(self) -> list[Route]:
        """Every endpoint; `/v2/models/stats` (all models) comes before `/v2/models/{model}`,
        which would take it for a model named "stats" (as in Triton)."""
        routes = [
            Route("GET", "/v2/health/live", "ServerLive", self.server_live, health=True),
            Route("GET", "/v2/health/ready", "ServerReady", self.server_ready, health=True),
            Route("GET", "/v2", "ServerMetadata", self.server_metadata),
            Route("GET", "/v2/models/stats", "ModelStatistics", self.statistics),
            Route("POST", "/v2/repository/index", "RepositoryIndex", self.repository_index),
        ]
        for path in (MODEL, VERSION):
            routes += [
                Route("GET", path + "/ready", "ModelReady", self.model_ready, health=True),
                Route("GET", path, "ModelMetadata", self.model_metadata),
                Route("GET", path + "/config", "ModelConfig", self.model_config),
                Route("GET", path + "/stats", "ModelStatistics", self.statistics),
                Route("POST", path + "/infer", "ModelInfer", self.infer, inference=True),
            ]
        return routes

    async def server_live(self, request: web.Request, call: HttpCall) -> web.Response:
        return _status({"live": True}, True)

    async def server_ready(self, request: web.Request, call: HttpCall) -> web.Response:
        ready = self.catalog.server_ready()
        return _status({"ready": ready}, ready)

    async def model_ready(self, request: web.Request, call: HttpCall) -> web.Response:
        name, version = _model(request)
        ready = self.catalog.model_ready(call, name, version)
        return _status({"name": name, "ready": ready}, ready)

    async def server_metadata(self, request: web.Request, call: HttpCall) -> web.Response:
        response = json_response(message_json(self.catalog.server_metadata()))
        response.headers.update(self.catalog.worker_metadata())
        return response

    async def model_metadata(self, request: web.Request, call: HttpCall) -> web.Response:
        model = call.resolve(*_model(request))
        return json_response(message_json(self.catalog.model_metadata(model)))

    async def model_config(self, request: web.Request, call: HttpCall) -> web.Response:
        # Triton answers the configuration itself, not gRPC's {"config": ...}.
        model = call.resolve(*_model(request))
        return json_response(message_json(self.catalog.model_config(model)))

    async def statistics(self, request: web.Request, call: HttpCall) -> web.Response:
        name, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        return json_response(message_json(self.catalog.statistics(call, name, version)))

    async def repository_index(self, request: web.Request, call: HttpCall) -> web.Response:
        """Body: optional JSON `{"ready": true}`; the answer is an array, as Triton's."""
        check_content_type(request, (JSON,))
        body = await read_body(request, self.limits)
        options = expect_object(parse_json(body), "the request body") if body.strip() else {}
        ready = member(options, "ready", bool, "ready", False)
        index = await self.catalog.repository_index(ready)
        return json_response([message_json(entry) for entry in index.models])

    async def infer(self, request: web.Request, call: HttpCall) -> web.Response:
        # Resolved first: an unknown model, or the drain, is answered before the body is read.
        call.resolve(*_model(request))
        check_content_type(request, (JSON, BINARY))
        body = await read_body(request, self.limits)
        decoded = decode_infer_request(
            body, request.headers.get(HEADER_LENGTH), self.dataplane.check_image_count
        )
        # Resolved again: a version retired while the body arrived must not be used.
        model = call.resolve(*_model(request))
        result = await self.dataplane.infer(model, decoded.images)
        encoded = encode_infer_response(decoded, result)
        if encoded.header_length is None:
            return web.Response(body=encoded.body, content_type=JSON)
        return web.Response(
            body=encoded.body,
            content_type=BINARY,
            headers={HEADER_LENGTH: str(encoded.header_length)},
        )

"""The Open Inference Protocol servicer (`inference.GRPCInferenceService`), with Triton's
ModelConfig, ModelStatistics and RepositoryIndex. Each RPC: protobuf -> plain values ->
data plane -> protobuf; what the server says about itself and its models comes from
`serving.catalog`, which the HTTP edge shares.

Every RPC runs inside `serving.edge.RpcCall`, which maps errors to status codes and
observes the RPC for metrics and logs.
"""

from __future__ import annotations

from serving.catalog import Catalog
from serving.codecs import decode_infer_request, encode_infer_response
from serving.dataplane import DataPlane
from serving.edge import EdgeState, RpcCall, deadline_of
from serving.generated.inference import grpc_service_pb2 as pb
from serving.generated.inference import grpc_service_pb2_grpc as pb_grpc


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, edge: EdgeState, catalog: Catalog) -> None:
        self.dataplane = dataplane
        self.edge = edge
        self.catalog = catalog

    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        async with RpcCall(self.dataplane, self.edge, "ServerLive", context):
            return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        async with RpcCall(self.dataplane, self.edge, "ServerReady", context):
            return pb.ServerReadyResponse(ready=self.catalog.server_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        async with RpcCall(self.dataplane, self.edge, "ModelReady", context) as call:
            ready = self.catalog.model_ready(call, request.name, request.version)
            return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context
    ) -> pb.ServerMetadataResponse:
        async with RpcCall(self.dataplane, self.edge, "ServerMetadata", context):
            worker = self.catalog.worker_metadata()
            if worker:
                context.set_trailing_metadata(worker)
            return self.catalog.server_metadata()

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context
    ) -> pb.ModelMetadataResponse:
        async with RpcCall(self.dataplane, self.edge, "ModelMetadata", context) as call:
            model = call.resolve(request.name, request.version)
            return self.catalog.model_metadata(model)

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        async with RpcCall(
            self.dataplane, self.edge, "ModelInfer", context, inference=True
        ) as call:
            model = call.resolve(request.model_name, request.model_version)
            decoded = decode_infer_request(request, self.dataplane.check_image_count)
            result = await self.dataplane.infer(model, decoded.images, deadline_of(context))
            response = pb.ModelInferResponse(
                model_name=result.model_name, model_version=result.model_version, id=request.id
            )
            return encode_infer_response(
                response, decoded.outputs, result.probability, result.digit, decoded.raw
            )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        async with RpcCall(self.dataplane, self.edge, "ModelConfig", context) as call:
            model = call.resolve(request.name, request.version)
            return pb.ModelConfigResponse(config=self.catalog.model_config(model))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context
    ) -> pb.ModelStatisticsResponse:
        async with RpcCall(self.dataplane, self.edge, "ModelStatistics", context) as call:
            return self.catalog.statistics(call, request.name, request.version)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context
    ) -> pb.RepositoryIndexResponse:
        async with RpcCall(self.dataplane, self.edge, "RepositoryIndex", context):
            return await self.catalog.repository_index(request.ready)

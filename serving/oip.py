"""The Open Inference Protocol servicer (`inference.GRPCInferenceService`), with Triton's
ModelConfig, ModelStatistics and RepositoryIndex. Each RPC: protobuf -> plain values ->
data plane -> protobuf.

Every RPC runs inside `serving.edge.RpcCall`, which maps errors to status codes and
observes the RPC for metrics and logs.
"""

from __future__ import annotations

import asyncio
from importlib import metadata
from pathlib import Path

from serving.codecs import decode_infer_request, encode_infer_response
from serving.contract import IMAGES, OUTPUTS
from serving.dataplane import DataPlane
from serving.edge import EdgeState, RpcCall, deadline_of
from serving.errors import ModelNotFound, shown
from serving.generated.inference import grpc_service_pb2 as pb
from serving.generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving.generated.inference import model_config_pb2 as config_pb
from serving.registry import LoadedModel
from serving.repository import MODEL_FILE, list_models, list_versions
from serving.runtime import CUDA_PROVIDER
from serving.stats import Duration

SERVER_NAME = "mnist37"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ("model_configuration", "statistics", "model_repository")

_CONFIG_TYPES = {
    "UINT8": config_pb.TYPE_UINT8,
    "FP32": config_pb.TYPE_FP32,
    "INT64": config_pb.TYPE_INT64,
}


def server_version() -> str:
    try:
        return metadata.version("mnist37")
    except metadata.PackageNotFoundError:
        return "0"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        dataplane: DataPlane,
        edge: EdgeState,
        repository: Path,
        max_queue_delay_us: int,
        keep_versions: int = 1,
    ) -> None:
        self.dataplane = dataplane
        self.edge = edge
        self.registry = dataplane.registry
        self.repository = repository
        self.max_queue_delay_us = max_queue_delay_us
        self.keep_versions = keep_versions
        self._version = server_version()

    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        async with RpcCall(self.dataplane, self.edge, "ServerLive", context):
            return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        async with RpcCall(self.dataplane, self.edge, "ServerReady", context):
            ready = self.edge.accepting and self.registry.is_ready()
            return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        async with RpcCall(self.dataplane, self.edge, "ModelReady", context) as call:
            try:
                call.resolve(request.name, request.version)
            except ModelNotFound:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=self.edge.accepting)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context
    ) -> pb.ServerMetadataResponse:
        async with RpcCall(self.dataplane, self.edge, "ServerMetadata", context):
            return pb.ServerMetadataResponse(
                name=SERVER_NAME, version=self._version, extensions=EXTENSIONS
            )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context
    ) -> pb.ModelMetadataResponse:
        async with RpcCall(self.dataplane, self.edge, "ModelMetadata", context) as call:
            model = call.resolve(request.name, request.version)
            return self._model_metadata(model)

    def _model_metadata(self, model: LoadedModel) -> pb.ModelMetadataResponse:
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[loaded.version_label for loaded in self.registry.versions(model.name)],
            platform=PLATFORM,
            inputs=[tensor(name=IMAGES.name, datatype=IMAGES.datatype, shape=IMAGES.shape)],
            outputs=[
                tensor(name=output.name, datatype=output.datatype, shape=output.shape)
                for output in OUTPUTS
            ],
        )

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
            return pb.ModelConfigResponse(config=self._model_config(model))

    def _model_config(self, model: LoadedModel) -> config_pb.ModelConfig:
        on_gpu = model.provider == CUDA_PROVIDER
        config = config_pb.ModelConfig(
            name=model.name,
            platform=PLATFORM,
            backend="onnxruntime",
            max_batch_size=self.dataplane.max_request_images,
            # Triton's dims leave out the batch dimension.
            input=[
                config_pb.ModelInput(
                    name=IMAGES.name,
                    data_type=_CONFIG_TYPES[IMAGES.datatype],
                    dims=IMAGES.shape[1:],
                )
            ],
            output=[
                # Triton's way of declaring a per-image scalar: dims [1], reshaped to [].
                config_pb.ModelOutput(
                    name=output.name,
                    data_type=_CONFIG_TYPES[output.datatype],
                    dims=[1],
                    reshape=config_pb.ModelTensorReshape(shape=[]),
                )
                for output in OUTPUTS
            ],
            instance_group=[
                config_pb.ModelInstanceGroup(
                    name=model.name,
                    count=1,
                    kind=config_pb.ModelInstanceGroup.KIND_GPU
                    if on_gpu
                    else config_pb.ModelInstanceGroup.KIND_CPU,
                )
            ],
            default_model_filename=MODEL_FILE,
            parameters={
                "execution_provider": config_pb.ModelParameter(string_value=model.provider),
                "max_batch_size_per_execution": config_pb.ModelParameter(
                    string_value=str(model.batcher.max_batch_size)
                ),
            },
        )
        config.version_policy.latest.num_versions = self.keep_versions
        if model.batcher.max_batch_size > 1:
            config.dynamic_batching.preferred_batch_size.append(model.batcher.max_batch_size)
            config.dynamic_batching.max_queue_delay_microseconds = self.max_queue_delay_us
            config.dynamic_batching.preserve_ordering = True
        return config

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context
    ) -> pb.ModelStatisticsResponse:
        async with RpcCall(self.dataplane, self.edge, "ModelStatistics", context) as call:
            if request.name and request.version:
                models = [call.resolve(request.name, request.version)]
            elif request.name:
                call.name_model(request.name)
                models = self.registry.versions(request.name)
                if not models:
                    raise ModelNotFound(f"model {shown(request.name)} is not loaded")
            else:
                models = self.registry.all()
            return pb.ModelStatisticsResponse(model_stats=[_statistics(m) for m in models])

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context
    ) -> pb.RepositoryIndexResponse:
        async with RpcCall(self.dataplane, self.edge, "RepositoryIndex", context):
            return await self._repository_index(request)

    async def _repository_index(
        self, request: pb.RepositoryIndexRequest
    ) -> pb.RepositoryIndexResponse:
        on_disk = await asyncio.to_thread(_scan_repository, self.repository)
        loaded = {(model.name, model.version) for model in self.registry.all()}
        failures = self.registry.load_failures
        index = pb.RepositoryIndexResponse.ModelIndex
        entries = []
        for name, versions in on_disk:
            for version in versions:
                ready = (name, version) in loaded
                if request.ready and not ready:
                    continue
                entries.append(
                    index(
                        name=name,
                        version=str(version),
                        state="READY" if ready else "UNAVAILABLE",
                        reason=""
                        if ready
                        else failures.get(
                            (name, version), "not loaded: outside the version policy"
                        ),
                    )
                )
        return pb.RepositoryIndexResponse(models=entries)


def _scan_repository(repository: Path) -> list[tuple[str, list[int]]]:
    return [
        (name, [entry.version for entry in list_versions(repository, name)])
        for name in list_models(repository)
    ]


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)


def _statistics(model: LoadedModel) -> pb.ModelStatistics:
    stats = model.stats
    return pb.ModelStatistics(
        name=model.name,
        version=model.version_label,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(batch.compute_input),
                compute_infer=_duration(batch.compute_infer),
                compute_output=_duration(batch.compute_output),
            )
            for size, batch in sorted(stats.batches.items())
        ],
    )

"""What the server says about itself and its models, built once for every protocol.

Server and model metadata, Triton's model configuration, statistics and repository index
are built here as the Open Inference Protocol's own messages (the protocol defines its REST
JSON as the same fields): `serving.oip` sends them over gRPC, `serving.rest.oip` renders
them as JSON (`serving.rest.messages.message_json`). So both protocols state the same facts.
"""

from __future__ import annotations

import asyncio
from importlib import metadata
from pathlib import Path

from serving.contract import IMAGES, OUTPUTS
from serving.dataplane import DataPlane
from serving.edge import EdgeCall, EdgeState
from serving.errors import ModelNotFound, shown
from serving.generated.inference import grpc_service_pb2 as pb
from serving.generated.inference import model_config_pb2 as config_pb
from serving.registry import LoadedModel
from serving.repository import MODEL_FILE, list_models, list_versions
from serving.runtime import CUDA_PROVIDER
from serving.stats import Duration

SERVER_NAME = "mnist37"
PLATFORM = "onnxruntime_onnx"
# `binary_tensor_data`: HTTP's binary tensors (Triton lists its extensions for both protocols).
EXTENSIONS = ("model_configuration", "statistics", "model_repository", "binary_tensor_data")
# With --workers N: ServerMetadata names the worker that answered, in this gRPC trailing
# metadata key and HTTP header (its index, 0 to N-1), so a client can see where its
# connection went. Only there: every other answer stays as it is, at no cost.
WORKER_KEY = "mnist37-worker"

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


class Catalog:
    """The facts about the server and its loaded models, as OIP messages."""

    def __init__(
        self,
        dataplane: DataPlane,
        edge: EdgeState,
        repository: Path,
        max_queue_delay_us: int,
        keep_versions: int = 1,
        worker: int | None = None,
    ) -> None:
        """`worker`: this process's index among the workers of `--workers N` (None: the
        only process). Its statistics are its own (see `statistics`)."""
        self.dataplane = dataplane
        self.worker = worker
        self.edge = edge
        self.registry = dataplane.registry
        self.repository = repository
        self.max_queue_delay_us = max_queue_delay_us
        self.keep_versions = keep_versions
        self._metadata = pb.ServerMetadataResponse(
            name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS
        )

    def server_ready(self) -> bool:
        """Ready while a model is loaded, until the drain stops accepting requests."""
        return self.edge.accepting and self.registry.is_ready()

    def model_ready(self, call: EdgeCall, name: str, version: str) -> bool:
        """Whether `name` (at `version`) takes requests; an unknown one is not ready."""
        try:
            call.resolve(name, version)
        except ModelNotFound:
            return False
        return self.edge.accepting

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return self._metadata

    def worker_metadata(self) -> tuple[tuple[str, str], ...]:
        """What ServerMetadata adds to its answer: (WORKER_KEY, index) from a worker."""
        return () if self.worker is None else ((WORKER_KEY, str(self.worker)),)

    def model_metadata(self, model: LoadedModel) -> pb.ModelMetadataResponse:
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

    def model_config(self, model: LoadedModel) -> config_pb.ModelConfig:
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
                # The model card's architecture ("linear", "mlp"; "" if it names none): the
                # web page shows a linear model's weights, which only it has.
                "architecture": config_pb.ModelParameter(string_value=model.architecture),
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

    def statistics(self, call: EdgeCall, name: str, version: str) -> pb.ModelStatisticsResponse:
        """Every loaded version's statistics, or `name`'s (all its versions), or one
        version's; an unknown name or version is ModelNotFound. Labels `call` with it.
        With --workers N they are this worker's: the requests that came over connections
        the kernel gave it. They are not summed across workers (that would take a round
        trip to every worker per call); a client that reads them over the connection it
        sends on, as perf_analyzer does, sees its own requests counted."""
        if name and version:
            models = [call.resolve(name, version)]
        elif name:
            call.name_model(name)
            models = self.registry.versions(name)
            if not models:
                raise ModelNotFound(f"model {shown(name)} is not loaded")
        else:
            models = self.registry.all()
        return pb.ModelStatisticsResponse(model_stats=[_statistics(m) for m in models])

    async def repository_index(self, ready_only: bool) -> pb.RepositoryIndexResponse:
        """Every version on disk, READY if loaded, else UNAVAILABLE with the reason."""
        on_disk = await asyncio.to_thread(_scan_repository, self.repository)
        loaded = {(model.name, model.version) for model in self.registry.all()}
        failures = self.registry.load_failures
        index = pb.RepositoryIndexResponse.ModelIndex
        entries = []
        for name, versions in on_disk:
            for version in versions:
                ready = (name, version) in loaded
                if ready_only and not ready:
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

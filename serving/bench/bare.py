"""The benchmark's reference servers: the least a grpc.aio server can do per ModelInfer.

    python -m serving.bench.bare --port 9001 --model model.onnx    # grpc.aio + onnxruntime
    python -m serving.bench.bare --port 9002 --echo                 # grpc.aio, no model

Both speak enough of the Open Inference Protocol for perf_analyzer to drive them like
mnist37 (ServerLive/Ready, ModelReady, ServerMetadata, ModelMetadata, ModelConfig,
ModelInfer), with the same `images` tensor, and nothing else: the generated servicer
(grpc parses each request in its C callback), no validation beyond what onnxruntime does,
no batching, no metrics, no logging, onnxruntime called on the event loop itself.

- `--model`: the "bare server" of the benchmark's targets, P(7) and the digit from one
  onnxruntime session with mnist37's session options (one thread, all optimisations).
- `--echo`: the floor of one round trip: the input tensor comes back as the output.

ServerMetadata lists no `statistics` extension, so perf_analyzer does not ask for
ModelStatistics (which these servers do not keep).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from serving.contract import IMAGE_SIDE, IMAGES, OUTPUTS, PIXELS, TensorSpec
from serving.generated.inference import grpc_service_pb2 as pb
from serving.generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving.generated.inference import model_config_pb2 as config_pb

ECHO_OUTPUT = TensorSpec("echo", IMAGES.datatype, IMAGES.shape)
MAX_BATCH = 1024  # mnist37's --max-request-images default: the largest batch benchmarked
_CONFIG_TYPES = {
    "UINT8": config_pb.TYPE_UINT8,
    "FP32": config_pb.TYPE_FP32,
    "INT64": config_pb.TYPE_INT64,
}
_RAW_TYPES = {"FP32": "<f4", "INT64": "<i8"}


class BareServicer(pb_grpc.GRPCInferenceServiceServicer):
    """One model, `name`; `session` None: echo."""

    def __init__(self, name: str, session=None) -> None:
        self.name = name
        self.session = session
        self.outputs = OUTPUTS if session is not None else (ECHO_OUTPUT,)
        self.output_names = [output.name for output in self.outputs]

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == self.name)

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="bare", version="1", extensions=[])

    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.name,
            versions=["1"],
            platform="onnxruntime_onnx",
            inputs=[tensor(name=IMAGES.name, datatype=IMAGES.datatype, shape=IMAGES.shape)],
            outputs=[
                tensor(name=spec.name, datatype=spec.datatype, shape=spec.shape)
                for spec in self.outputs
            ],
        )

    async def ModelConfig(self, request, context) -> pb.ModelConfigResponse:
        def output(spec: TensorSpec) -> config_pb.ModelOutput:
            if len(spec.shape) > 1:
                return config_pb.ModelOutput(
                    name=spec.name, data_type=_CONFIG_TYPES[spec.datatype], dims=spec.shape[1:]
                )
            return config_pb.ModelOutput(
                name=spec.name,
                data_type=_CONFIG_TYPES[spec.datatype],
                dims=[1],
                reshape=config_pb.ModelTensorReshape(shape=[]),
            )

        config = config_pb.ModelConfig(
            name=self.name,
            platform="onnxruntime_onnx",
            max_batch_size=MAX_BATCH,
            input=[
                config_pb.ModelInput(
                    name=IMAGES.name,
                    data_type=_CONFIG_TYPES[IMAGES.datatype],
                    dims=IMAGES.shape[1:],
                )
            ],
            output=[output(spec) for spec in self.outputs],
        )
        return pb.ModelConfigResponse(config=config)

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        raw = request.raw_input_contents[0]
        count = len(raw) // PIXELS
        response = pb.ModelInferResponse(model_name=self.name, model_version="1", id=request.id)
        if self.session is None:
            response.outputs.add(name=ECHO_OUTPUT.name, datatype=ECHO_OUTPUT.datatype).shape[:] = [
                count,
                IMAGE_SIDE,
                IMAGE_SIDE,
            ]
            response.raw_output_contents.append(raw)
            return response
        images = np.frombuffer(raw, dtype=np.uint8).reshape(count, IMAGE_SIDE, IMAGE_SIDE)
        values = self.session.run(self.output_names, {IMAGES.name: images})
        for spec, array in zip(self.outputs, values, strict=True):
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=[count])
            response.raw_output_contents.append(array.astype(_RAW_TYPES[spec.datatype]).tobytes())
        return response


def onnxruntime_session(model: Path, threads: int = 1):
    """An onnxruntime session of `model` with mnist37's defaults (`threads` intra and inter
    op threads, all graph optimisations, CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


async def serve(port: int, servicer: BareServicer) -> None:
    # No limit below the largest benchmarked request (1,024 images, 802,816 bytes) and its
    # echo; otherwise grpc's defaults, as a bare server would have.
    limit = 8 * 1024 * 1024
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    server = grpc.aio.server(options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    if not server.add_insecure_port(f"127.0.0.1:{port}"):
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.bench.bare", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="mnist37", help="the model's name (default mnist37)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", type=Path, help="serve this ONNX model with onnxruntime")
    what.add_argument("--echo", action="store_true", help="answer each input as the output")
    args = parser.parse_args(argv)
    session = onnxruntime_session(args.model) if args.model else None
    asyncio.run(serve(args.port, BareServicer(args.name, session)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

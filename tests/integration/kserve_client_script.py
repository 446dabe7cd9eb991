"""The KServe Python SDK against a running mnist37 server, over both protocols.

Run by the KServe SDK's own virtual environment (`.venv-kserve`, `make test` builds it),
never by the project's: kserve pins a grpcio and protobuf of its own. It imports nothing
from this project, and prints one JSON object: what the server answered to each call.
Its settings come as JSON on stdin, not as arguments: importing kserve parses the command
line (kserve.model_server runs its server flags' `parse_known_args()` at import time, and
would take `--grpc` for an abbreviation of its own `--grpc_port`).

    echo '{"http": "http://127.0.0.1:8000", "grpc": "127.0.0.1:8001", "images": "x.npy"}' |
        .venv-kserve/bin/python tests/integration/kserve_client_script.py

Over HTTP (`InferenceRESTClient`, protocol v2) and gRPC (`InferenceGRPCClient`): server
liveness and readiness, model readiness, server and model metadata, and inference with
binary data (`set_data_from_numpy(..., binary_data=True)`: HTTP's binary tensor
extension, gRPC's raw contents) and with typed data (JSON numbers, gRPC `contents`).
The SDK clients have no metadata call: metadata is read with what the SDK ships for it,
its gRPC stubs and its REST data models (pydantic), so a field it needs and does not get,
or gets with the wrong type, fails here as it would in a KServe user's code.
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import httpx
import kserve
import numpy as np
from kserve import InferInput, InferRequest, InferResponse, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from kserve.protocol.infer_type import RequestedOutput
from kserve.protocol.rest import v2_datamodels

MODEL = "mnist37"
OUTPUTS = ("probability", "digit")
TIMEOUT_S = 30


def request(images: np.ndarray, binary: bool, request_id: str, for_http: bool) -> InferRequest:
    tensor = InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=binary)
    # Over HTTP each output is asked for in the form the input was sent in; gRPC answers
    # raw outputs to raw inputs and typed ones otherwise.
    outputs = [
        RequestedOutput(name, {"binary_data": binary} if for_http else None) for name in OUTPUTS
    ]
    return InferRequest(MODEL, [tensor], request_id=request_id, request_outputs=outputs)


def outputs_of(response: InferResponse) -> dict[str, object]:
    found: dict[str, object] = {
        "id": response.id,
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    for output in response.outputs:
        array = output.as_numpy()
        found[output.name] = {"dtype": str(array.dtype), "values": array.tolist()}
    return found


async def over_http(base_url: str, images: np.ndarray) -> dict[str, object]:
    answers: dict[str, object] = {}
    config = RESTConfig(protocol="v2", retries=0, timeout=TIMEOUT_S)
    async with kserve.InferenceRESTClient(config) as client:
        answers["server_live"] = await client.is_server_live(base_url)
        answers["server_ready"] = await client.is_server_ready(base_url)
        answers["model_ready"] = await client.is_model_ready(base_url, MODEL)
        answers["missing_model_ready"] = await client.is_model_ready(base_url, "nope")
        async with httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT_S) as plain:
            server = (await plain.get("/v2")).raise_for_status().json()
            model = (await plain.get(f"/v2/models/{MODEL}")).raise_for_status().json()
        answers["server_metadata"] = v2_datamodels.ServerMetadataResponse(**server).model_dump()
        answers["model_metadata"] = v2_datamodels.ModelMetadataResponse(**model).model_dump()
        for binary in (True, False):
            sent = request(images, binary, f"http-{binary}", for_http=True)
            headers: dict[str, str] = {}
            response = await client.infer(
                base_url, sent, model_name=MODEL, response_headers=headers
            )
            answer = answers[f"infer_binary_{binary}"] = outputs_of(response)
            # binary outputs come after a JSON header of this length
            answer["binary_outputs"] = "inference-header-content-length" in headers
        try:  # an error, as an SDK user sees it: the server's message in the exception
            await client.infer(base_url, request(images, True, "x", True), model_name="nope")
            answers["unknown_model"] = "answered"
        except httpx.HTTPStatusError as error:
            answers["unknown_model"] = [error.response.status_code, str(error)]
    return answers


async def over_grpc(address: str, images: np.ndarray) -> dict[str, object]:
    answers: dict[str, object] = {}
    async with kserve.InferenceGRPCClient(address, timeout=TIMEOUT_S, retries=0) as client:
        answers["server_live"] = await client.is_server_live()
        answers["server_ready"] = await client.is_server_ready()
        answers["model_ready"] = await client.is_model_ready(MODEL)
        for binary in (True, False):
            sent = request(images, binary, f"grpc-{binary}", for_http=False)
            response = await client.infer(sent)
            answer = answers[f"infer_binary_{binary}"] = outputs_of(response)
            # raw_output_contents, or typed contents (the SDK's `data`) in each output
            answer["binary_outputs"] = not any(output.data for output in response.outputs)
        unknown = InferRequest("nope", request(images, True, "x", False).inputs)
        try:
            await client.infer(unknown)
            answers["unknown_model"] = "answered"
        except grpc.aio.AioRpcError as error:
            answers["unknown_model"] = [error.code().name, error.details()]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        server = await stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=TIMEOUT_S)
        model = await stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=TIMEOUT_S)
    answers["server_metadata"] = {
        "name": server.name,
        "version": server.version,
        "extensions": list(server.extensions),
    }
    answers["model_metadata"] = {
        "name": model.name,
        "versions": list(model.versions),
        "platform": model.platform,
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in model.inputs
        ],
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in model.outputs
        ],
    }
    return answers


async def main() -> None:
    # "http": the base URL (http://HOST:PORT), "grpc": HOST:PORT, "images": a .npy file of
    # uint8 [N, 28, 28]
    settings = json.load(sys.stdin)
    images = np.load(settings["images"])
    result = {
        "grpcio": grpc.__version__,
        "http": await over_http(settings["http"], images),
        "grpc": await over_grpc(settings["grpc"], images),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())

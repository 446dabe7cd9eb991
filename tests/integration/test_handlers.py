"""serving.handlers: requests parsed by the handler, malformed bytes refused as
INVALID_ARGUMENT, large requests parsed off the event loop."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from helpers import run

from serving.generated.inference import grpc_service_pb2 as pb
from serving.generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving.handlers import add_service

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


class Echo(pb_grpc.GRPCInferenceServiceServicer):
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ModelInfer(self, request, context):
        return pb.ModelInferResponse(id=request.id, model_name=request.model_name)


class CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(1)
        self.submitted = 0

    def submit(self, *args, **kwargs):
        self.submitted += 1
        return super().submit(*args, **kwargs)


async def serve_and_call(calls):
    executor = CountingExecutor()
    refused: list[str] = []
    server = grpc.aio.server()
    add_service(
        server,
        SERVICE,
        Echo(),
        executor,
        inline_bytes=1024,
        on_malformed=lambda rpc, seconds: refused.append(rpc),
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return [await call(channel) for call in calls], executor.submitted, refused
    finally:
        await server.stop(0)
        executor.shutdown()


def raw_infer(channel: grpc.aio.Channel, payload: bytes):
    method = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=None,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    return method(payload, timeout=10)


def test_valid_requests_small_and_large_are_served_large_ones_parsed_on_a_thread():
    async def small(channel):
        return await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            pb.ModelInferRequest(id="small", model_name="m"), timeout=10
        )

    async def large(channel):
        request = pb.ModelInferRequest(id="large", model_name="m" * 5000)
        return await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)

    async def live(channel):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return await stub.ServerLive(pb.ServerLiveRequest(), timeout=10)

    (first, second, third), submitted, refused = run(serve_and_call([small, large, live]))
    assert (first.id, second.id, third.live) == ("small", "large", True)
    assert len(second.model_name) == 5000
    assert submitted == 1 and refused == []


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x12" + b"\xff" * 11])
def test_bytes_that_are_not_a_message_get_invalid_argument_and_the_next_call_works(payload):
    async def malformed(channel):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await raw_infer(channel, payload)
        return refused.value

    async def valid(channel):
        return await raw_infer(channel, pb.ModelInferRequest(id="next").SerializeToString())

    (error, answer), _, refused = run(serve_and_call([malformed, valid]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "ModelInfer: the request is not a valid inference.ModelInferRequest message"
    )
    assert answer.id == "next" and refused == ["ModelInfer"]


def test_streaming_methods_are_refused_at_wiring_time():
    from grpc_health.v1 import health, health_pb2

    async def wire() -> None:
        service = health_pb2.DESCRIPTOR.services_by_name["Health"]
        add_service(grpc.aio.server(), service, health.aio.HealthServicer(), None)

    with pytest.raises(ValueError, match="only unary"):
        run(wire())

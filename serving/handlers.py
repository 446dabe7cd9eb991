"""gRPC method handlers that parse the request themselves.

grpcio's generated `add_*_to_server` lets the C core's callback parse each request before
the servicer runs: bytes that are not a valid message then end as UNKNOWN, and a large
message is parsed on the event loop thread, where every other RPC waits for it. These
handlers take the raw bytes instead and parse them in the servicer's stead:

- bytes that do not parse get INVALID_ARGUMENT, naming the method and the message type;
- a request of more than `inline_bytes` is parsed on a worker thread, so health checks and
  small requests keep being answered meanwhile.

Every unary-unary method of a service descriptor is served this way; the servicer is the
ordinary generated base class's subclass, unchanged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message

# Below this many bytes parsing costs less than a thread hop (tens of microseconds).
DEFAULT_INLINE_BYTES = 64 * 1024

# (rpc name, seconds): a request refused as unparsable, for the RPC metrics.
MalformedListener = Callable[[str, float], None]
Method = Callable[[Message, grpc.aio.ServicerContext], Awaitable[Message]]


def _handler(
    method: MethodDescriptor,
    implementation: Method,
    executor: Executor,
    inline_bytes: int,
    on_malformed: MalformedListener | None,
) -> grpc.RpcMethodHandler:
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    parse = request_class.FromString
    refusal = f"{method.name}: the request is not a valid {method.input_type.full_name} message"

    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        start = time.perf_counter()
        try:
            if len(raw) <= inline_bytes:
                request = parse(raw)
            else:
                request = await asyncio.get_running_loop().run_in_executor(executor, parse, raw)
        except DecodeError:
            if on_malformed is not None:
                on_malformed(method.name, time.perf_counter() - start)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
        return await implementation(request, context)

    return grpc.unary_unary_rpc_method_handler(
        handle, request_deserializer=None, response_serializer=response_class.SerializeToString
    )


def add_service(
    server: grpc.aio.Server,
    service: ServiceDescriptor,
    servicer: object,
    executor: Executor,
    inline_bytes: int = DEFAULT_INLINE_BYTES,
    on_malformed: MalformedListener | None = None,
) -> None:
    """Serve every method of `service` from `servicer`'s method of the same name."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming or method.server_streaming:
            raise ValueError(f"{method.full_name}: only unary methods are served this way")
        implementation = getattr(servicer, method.name)
        handlers[method.name] = _handler(
            method, implementation, executor, inline_bytes, on_malformed
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )

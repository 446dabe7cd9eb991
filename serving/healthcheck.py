"""`python -m serving.healthcheck`: is the gRPC server SERVING? For container health checks.

    python -m serving.healthcheck                          # localhost:$MNIST37_GRPC_PORT (8001)
    python -m serving.healthcheck --service liveness        # alive, model loaded or not
    python -m serving.healthcheck --address host:8001 --service mnist37 --timeout 2

Each flag also reads a variable of its own (`--timeout`: MNIST37_HEALTHCHECK_TIMEOUT).
Asks the standard gRPC health service (`grpc.health.v1.Health/Check`) and prints one line.
Exit status 0 if the answer is SERVING; 1 for any other answer, an unknown service, no
answer within --timeout seconds, or a server that cannot be reached; 2 for usage errors.
The empty service name (the default) is the server as a whole: NOT_SERVING while no model
is loaded and once a graceful shutdown has begun (readiness). `liveness` is SERVING while the
process runs and answers, model or not, and NOT_SERVING once the shutdown drain has begun
(Kubernetes' livenessProbe). Needs grpcio and grpcio-health-checking
only (no torch, no onnxruntime), so it starts fast in a HEALTHCHECK.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.console import console_script
from serving.settings import POSITIVE, load, setting

DEFAULT_PORT = 8001
PORT_VARIABLE = "MNIST37_GRPC_PORT"
DEFAULT_TIMEOUT_S = 3.0
# The health service name mnist37-serve answers SERVING for as long as it is alive.
LIVENESS_SERVICE = "liveness"


def default_address(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    port = environ.get(PORT_VARIABLE, "") or str(DEFAULT_PORT)
    return f"localhost:{port}"


def check(address: str, service: str = "", timeout: float = DEFAULT_TIMEOUT_S) -> tuple[bool, str]:
    """Ask `address`'s health service about `service`: (serving?, one line saying so)."""
    what = f"{address} service {service!r}" if service else address
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            name = code.name if code is not None else type(error).__name__
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            if code == grpc.StatusCode.NOT_FOUND and not details:
                details = "the server has no health status for this service name"
            return False, f"{what}: {name}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{what}: {status}"


@dataclass(frozen=True)
class HealthcheckSettings:
    """Exit 0 if the gRPC health service answers SERVING, 1 otherwise."""

    prog: ClassVar[str] = "python -m serving.healthcheck"
    # Its own variables: in the server's container MNIST37_* are the server's settings.
    env_prefix: ClassVar[str] = "MNIST37_HEALTHCHECK_"

    address: str | None = setting(
        None,
        "host:port of the gRPC server",
        default_help=f"`localhost:${PORT_VARIABLE}`, or `localhost:{DEFAULT_PORT}`",
    )
    service: str = setting(
        "",
        "service to ask about: '' (the server: ready, a model is loaded), "
        f"'{LIVENESS_SERVICE}' (alive, model or not), a gRPC service name or a model name",
        default_help="`''`, the server",
    )
    timeout: float = setting(DEFAULT_TIMEOUT_S, "seconds to wait for the answer", allowed=POSITIVE)


@console_script
def main(argv: Sequence[str] | None = None) -> int:
    args = load(HealthcheckSettings, argv)
    address = args.address or default_address()
    serving, line = check(address, args.service, args.timeout)
    print(line, flush=True)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())

"""The HTTP edge inside the real server in this process: it shares the gRPC edge's state
(in-flight count, drain, metrics), and takes a token file and a TLS context."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import make_certificates, rest_infer_body

from serving.access import TokenFile
from serving.config import HTTP_MAX_BODY_BYTES, ServerConfig, load_config
from serving.launcher import free_port
from serving.rest.server import HttpServer, HttpSettings
from serving.server import InferenceServer

INFER = "/v2/models/mnist37/infer"
ONE_IMAGE = np.zeros((1, 28, 28), np.uint8)


@pytest.fixture
def http_port() -> int:
    return free_port()


@asynccontextmanager
async def running_server(repository: Path, http_port: int = 0) -> AsyncIterator[InferenceServer]:
    """The server in this process; HTTP on `http_port`, off with 0."""
    config = ServerConfig(
        repository=repository,
        host="127.0.0.1",
        grpc_port=0,
        http_port=http_port,
        metrics_port=free_port(),
        poll_interval=0.0,
        drain_quiet_period=0.0,
    )
    server = InferenceServer(config)
    await server.start()
    try:
        yield server
    finally:
        if server.edge.accepting:  # unless the test drained it
            await server.drain_and_stop()


def requests(server: InferenceServer, metric: str = "mnist37_requests_total", **labels) -> float:
    return server.observer.registry.get_sample_value(metric, labels) or 0.0


def run(scenario) -> None:
    asyncio.run(scenario())


def test_readiness_turns_serving_only_once_the_http_port_listens(
    model_repository, http_port, monkeypatch
):
    """Compose's healthcheck and Kubernetes' probes ask the gRPC health service: while the
    HTTP port is not listening yet, readiness ("" and the models) must say NOT_SERVING
    (liveness may already say SERVING); once it listens, SERVING."""
    seen: dict[str, str] = {}
    listen = HttpServer.start

    async def check(target: str, service: str) -> str:
        async with grpc.aio.insecure_channel(target) as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)

    async def start_seen_from_a_probe(http: HttpServer) -> None:
        target = f"127.0.0.1:{started.port}"  # gRPC listens already
        for service in ("", "mnist37", "liveness"):
            seen[service] = await check(target, service)
        await listen(http)

    monkeypatch.setattr(HttpServer, "start", start_seen_from_a_probe)
    started = InferenceServer(
        ServerConfig(
            repository=model_repository,
            host="127.0.0.1",
            grpc_port=0,
            http_port=http_port,
            metrics_port=0,
            poll_interval=0.0,
        )
    )

    async def scenario() -> None:
        await started.start()
        try:
            assert seen == {"": "NOT_SERVING", "mnist37": "NOT_SERVING", "liveness": "SERVING"}
            target = f"127.0.0.1:{started.port}"
            assert [await check(target, service) for service in ("", "mnist37")] == [
                "SERVING",
                "SERVING",
            ]
        finally:
            await started.drain_and_stop()

    run(scenario)


def test_http_requests_are_observed_like_rpcs_with_bounded_labels(model_repository, http_port):
    async def scenario() -> None:
        async with (
            running_server(model_repository, http_port) as server,
            aiohttp.ClientSession(f"http://127.0.0.1:{http_port}") as client,
        ):
            body, headers = rest_infer_body(ONE_IMAGE)
            async with client.post(INFER, data=body, headers=headers) as answer:
                assert answer.status == 200
            ok = {
                "protocol": "http",
                "rpc": "ModelInfer",
                "model": "mnist37",
                "version": "2",
                "code": "OK",
            }
            assert requests(server, **ok) == 1
            duration = {"protocol": "http", "rpc": "ModelInfer", "model": "mnist37"}
            assert requests(server, "mnist37_request_duration_seconds_count", **duration) == 1

            async with client.post(INFER, data=b"{", headers={"Content-Type": "application/json"}):
                pass
            bad = {**ok, "code": "INVALID_ARGUMENT"}
            assert requests(server, **bad) == 1
            # Refused as invalid after its model was resolved: a failure in its statistics.
            assert server.registry.resolve("mnist37").stats.fail.count == 1

            for path in ("/v2/models/a/infer", "/v2/models/b/infer"):
                async with client.post(path, data=b"{}") as answer:
                    assert answer.status == 404
            unknown = {
                "protocol": "http",
                "rpc": "ModelInfer",
                "model": "_unknown",
                "version": "",
                "code": "NOT_FOUND",
            }
            assert requests(server, **unknown) == 2
            for path in ("/x", "/y/z"):
                async with client.get(path) as answer:
                    assert answer.status == 404
            nowhere = {
                "protocol": "http",
                "rpc": "_unknown",
                "model": "",
                "version": "",
                "code": "UNIMPLEMENTED",
            }
            assert requests(server, **nowhere) == 2
            async with client.get("/v2/health/live") as answer:
                assert answer.status == 200
            live = {
                "protocol": "http",
                "rpc": "ServerLive",
                "model": "",
                "version": "",
                "code": "OK",
            }
            assert requests(server, **live) == 1
            # Not HTTP: aiohttp refuses it before any route; counted all the same.
            reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
            writer.write(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
            assert (await reader.readline()).startswith(b"HTTP/1.0 400")
            writer.close()
            unparsed = {**nowhere, "code": "INVALID_ARGUMENT"}
            assert requests(server, **unparsed) == 1

    run(scenario)


async def _stalled_body(body: bytes, release: asyncio.Event) -> AsyncIterator[bytes]:
    yield body[:100]
    await release.wait()
    yield body[100:]


def test_a_request_in_flight_over_http_holds_the_drain_and_late_ones_get_503(
    model_repository, http_port
):
    async def scenario() -> None:
        async with (
            running_server(model_repository, http_port) as server,
            aiohttp.ClientSession(f"http://127.0.0.1:{http_port}") as client,
        ):
            body, headers = rest_infer_body(ONE_IMAGE)
            release = asyncio.Event()
            pending = asyncio.create_task(
                client.post(INFER, data=_stalled_body(body, release), headers=headers)
            )
            while server.edge.in_flight == 0:
                await asyncio.sleep(0.01)
            assert requests(server, "mnist37_inflight_requests") == 1
            drain = asyncio.create_task(server.drain_and_stop())
            await asyncio.sleep(0.3)
            assert not drain.done(), "the drain waits for the request in flight"
            async with client.get("/v2/health/ready") as answer:
                assert answer.status == 200  # still accepting while one is in flight
            release.set()
            async with await pending as answer:
                assert answer.status == 200
            await drain
            assert server.edge.in_flight == 0 and not server.edge.accepting

    run(scenario)


def test_once_the_drain_stops_accepting_http_inference_is_refused_with_503(
    model_repository, http_port
):
    async def scenario() -> None:
        async with (
            running_server(model_repository, http_port) as server,
            aiohttp.ClientSession(f"http://127.0.0.1:{http_port}") as client,
        ):
            server.edge.accepting = False  # where the drain is once in-flight requests ended
            body, headers = rest_infer_body(ONE_IMAGE)
            async with client.post(INFER, data=body, headers=headers) as answer:
                assert answer.status == 503
                assert await answer.json() == {"error": "the server is shutting down"}
            classify = {"images": [{"pixels": [0] * 784}]}
            async with client.post("/v1/classify", json=classify) as answer:
                assert answer.status == 503
            for path, status in (("/v2/health/ready", 400), ("/v2/health/live", 200)):
                async with client.get(path) as answer:
                    assert answer.status == status, path
            refused = {"protocol": "http", "rpc": "ModelInfer", "model": "mnist37", "version": "2"}
            assert requests(server, **refused, code="UNAVAILABLE") == 1
            server.edge.accepting = True

    run(scenario)


@asynccontextmanager
async def extra_http_server(
    server: InferenceServer, **options: object
) -> AsyncIterator[aiohttp.ClientSession]:
    """Another HTTP server on `server`'s routes, with a token file or TLS."""
    settings = HttpSettings(port=free_port())
    http = HttpServer(
        settings, "127.0.0.1", server.dataplane, server.edge, server.http_routes(), **options
    )
    await http.start()
    scheme = "https" if options.get("ssl_context") else "http"
    try:
        async with aiohttp.ClientSession(f"{scheme}://127.0.0.1:{settings.port}") as client:
            yield client
    finally:
        await http.stop()


@pytest.mark.parametrize("open_health", [True, False])
def test_a_token_file_guards_every_endpoint_but_open_health(
    model_repository, tmp_path, open_health
):
    tokens_path = tmp_path / "tokens"
    tokens_path.write_text("# clients\nsecret-1\n")

    async def scenario() -> None:
        async with (
            running_server(model_repository) as server,
            extra_http_server(
                server, tokens=TokenFile(tokens_path), open_health=open_health
            ) as client,
        ):
            body, headers = rest_infer_body(ONE_IMAGE)
            for authorization in (None, "Bearer wrong", "secret-1", "Basic secret-1"):
                sent = {**headers, **({"Authorization": authorization} if authorization else {})}
                async with client.post(INFER, data=body, headers=sent) as answer:
                    assert answer.status == 401, authorization
                    assert answer.headers["WWW-Authenticate"] == "Bearer"
                    assert "bearer token" in (await answer.json())["error"]
            sent = {**headers, "Authorization": "Bearer secret-1"}
            async with client.post(INFER, data=body, headers=sent) as answer:
                assert answer.status == 200
            for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/mnist37/ready"):
                async with client.get(path) as answer:
                    assert answer.status == (200 if open_health else 401), path
            async with client.get("/v2") as answer:
                assert answer.status == 401
            refused = {
                "protocol": "http",
                "rpc": "ModelInfer",
                "model": "",
                "version": "",
                "code": "UNAUTHENTICATED",
            }
            assert requests(server, **refused) == 4

    run(scenario)


def test_tls_serves_https_with_the_given_context(model_repository, tmp_path):
    certificates = make_certificates(tmp_path)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(certificates / "server.pem", certificates / "server.key")
    client_side = ssl.create_default_context(cafile=str(certificates / "ca.pem"))

    async def scenario() -> None:
        async with (
            running_server(model_repository) as server,
            extra_http_server(server, ssl_context=server_side) as client,
        ):
            async with client.get("/v2/health/ready", ssl=client_side) as answer:
                assert answer.status == 200
            async with client.get("/v2", ssl=False) as answer:  # no CA check: still TLS
                assert (await answer.json())["name"] == "mnist37"

    run(scenario)


def test_http_settings_are_the_server_configs_http_flags():
    assert HttpSettings.from_config(ServerConfig()) == HttpSettings()
    assert HttpSettings() == HttpSettings(8000, HTTP_MAX_BODY_BYTES, 30.0)
    config = load_config(
        ["--http-port", "9000", "--http-max-body-bytes", "1024"],
        {"MNIST37_HTTP_BODY_TIMEOUT": "2.5"},
    )
    assert HttpSettings.from_config(config) == HttpSettings(9000, 1024, 2.5)
    assert HttpSettings.from_config(load_config(["--http-port", "0"], {})).port == 0
    with pytest.raises(ValueError, match="70000"):
        HttpSettings.from_config(ServerConfig(http_port=70000))
    for flags in (["--http-port", "-1"], ["--http-max-body-bytes", "0"]):
        with pytest.raises(SystemExit):
            load_config(flags, {})

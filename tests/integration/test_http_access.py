"""HTTP takes the real server's access control from the same flags as gRPC: HTTPS with
`--tls-cert`/`--tls-key`, mutual TLS with `--tls-client-ca`, bearer tokens with
`--auth-token-file` (health open unless `--protect-health`)."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import http_call, make_certificates

from serving.generated.inference import grpc_service_pb2 as pb
from serving.generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving.launcher import ServerProcess, start_server

CLASSIFY = "/v1/classify"
ONE_IMAGE = json.dumps({"images": [{"pixels": [0] * 784}]}).encode()
JSON_TYPE = {"Content-Type": "application/json"}
TOKEN = "secret-1"
# What a refused TLS client sees: the handshake fails, or the connection is closed on it.
REFUSED = (OSError, http.client.HTTPException)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


def client_context(certificates: Path, who: str | None = None) -> ssl.SSLContext:
    """A client that trusts the test CA, presenting `who`'s certificate if given."""
    context = ssl.create_default_context(cafile=str(certificates / "ca.pem"))
    if who is not None:
        context.load_cert_chain(certificates / f"{who}.pem", certificates / f"{who}.key")
    return context


def channel_credentials(certificates: Path, who: str | None = None) -> grpc.ChannelCredentials:
    key = chain = None
    if who is not None:
        key = (certificates / f"{who}.key").read_bytes()
        chain = (certificates / f"{who}.pem").read_bytes()
    return grpc.ssl_channel_credentials((certificates / "ca.pem").read_bytes(), key, chain)


@pytest.fixture
def running() -> Iterator[list[ServerProcess]]:
    """Servers a test starts, stopped at its end."""
    servers: list[ServerProcess] = []
    yield servers
    for server in servers:
        assert server.terminate() == 0, server.log()


def test_https_with_the_servers_certificate(model_repository, tmp_path, certificates, running):
    server = start_server(
        model_repository,
        tmp_path,
        "--tls-cert",
        str(certificates / "server.pem"),
        "--tls-key",
        str(certificates / "server.key"),
        credentials=channel_credentials(certificates),
    )
    running.append(server)
    assert server.http_url.startswith("https://")
    tls = client_context(certificates)
    status, _, _ = http_call(server.http_address, "GET", "/v2/health/ready", tls=tls)
    assert status == 200
    status, _, body = http_call(
        server.http_address, "POST", CLASSIFY, ONE_IMAGE, JSON_TYPE, tls=tls
    )
    assert status == 200 and json.loads(body)["predictions"][0]["model_version"] == "2"
    with pytest.raises(REFUSED):  # plain HTTP on the HTTPS port
        http_call(server.http_address, "GET", "/v2/health/ready", timeout=10)
    with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust the CA
        http_call(server.http_address, "GET", "/v2", tls=ssl.create_default_context())
    # gRPC is served over TLS with the same certificate.
    with grpc.secure_channel(server.target, channel_credentials(certificates)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready


@pytest.mark.parametrize("protect_health", [False, True])
def test_bearer_tokens_guard_http(model_repository, tmp_path, running, protect_health):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# clients\n{TOKEN}\n")
    flags = ["--auth-token-file", str(tokens)] + (["--protect-health"] if protect_health else [])
    # The launcher's readiness wait (ServerReady, not a health check) needs the token.
    metadata = [("authorization", f"Bearer {TOKEN}")]
    server = start_server(model_repository, tmp_path, *flags, metadata=metadata)
    running.append(server)
    for authorization in (None, "Bearer wrong", TOKEN):
        headers = {**JSON_TYPE, **({"Authorization": authorization} if authorization else {})}
        status, answer_headers, body = http_call(
            server.http_address, "POST", CLASSIFY, ONE_IMAGE, headers
        )
        assert status == 401, authorization
        assert answer_headers["www-authenticate"] == "Bearer"
        assert "bearer token" in json.loads(body)["error"]
    right = {**JSON_TYPE, "Authorization": f"Bearer {TOKEN}"}
    status, _, body = http_call(server.http_address, "POST", CLASSIFY, ONE_IMAGE, right)
    assert status == 200 and len(json.loads(body)["predictions"]) == 1
    status, _, _ = http_call(server.http_address, "GET", "/v2", headers=right)
    assert status == 200
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/mnist37/ready"):
        status, _, _ = http_call(server.http_address, "GET", path)
        assert status == (401 if protect_health else 200), path
        status, _, _ = http_call(server.http_address, "GET", path, headers=right)
        assert status == 200, path


def test_mutual_tls_refuses_clients_without_a_certificate_its_ca_signed(
    model_repository, tmp_path, certificates, running
):
    server = start_server(
        model_repository,
        tmp_path,
        "--tls-cert",
        str(certificates / "server.pem"),
        "--tls-key",
        str(certificates / "server.key"),
        "--tls-client-ca",
        str(certificates / "ca.pem"),
        credentials=channel_credentials(certificates, "client"),
    )
    running.append(server)
    images = np.zeros((1, 28, 28), np.uint8)
    body = json.dumps({"images": [{"pixels": images.reshape(-1).tolist()}]}).encode()
    status, _, answer = http_call(
        server.http_address,
        "POST",
        CLASSIFY,
        body,
        JSON_TYPE,
        tls=client_context(certificates, "client"),
    )
    assert status == 200 and json.loads(answer)["predictions"][0]["digit"] in (3, 7)
    for who in (None, "stranger"):
        with pytest.raises(REFUSED):
            http_call(
                server.http_address,
                "GET",
                "/v2/health/ready",
                timeout=10,
                tls=client_context(certificates, who),
            )
    # gRPC refuses them the same way.
    stranger = channel_credentials(certificates, "stranger")
    with grpc.secure_channel(server.target, stranger) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ServerReady(pb.ServerReadyRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

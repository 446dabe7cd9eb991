"""Access control through a real server: TLS, mutual TLS and bearer tokens, with
certificates made at test time; health checks stay open for probes unless protected."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import infer_request, make_certificates

from serving.generated.inference import grpc_service_pb2 as pb
from serving.generated.inference import grpc_service_pb2_grpc as pb_grpc
from serving.launcher import ServerProcess, start_server

TOKEN = "test-token-3f9a"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


def read(path: Path) -> bytes:
    return path.read_bytes()


def tls_channel(server: ServerProcess, certs: Path, client: str | None = None) -> grpc.Channel:
    chain = (
        (read(certs / f"{client}.key"), read(certs / f"{client}.pem")) if client else (None,) * 2
    )
    credentials = grpc.ssl_channel_credentials(read(certs / "ca.pem"), *chain)
    return grpc.secure_channel(server.target, credentials)


def wait_live(open_channel, timeout: float = 60.0) -> None:
    """Until Health.Check answers SERVING over a channel `open_channel()` makes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open_channel() as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.2)
    raise AssertionError("the server did not become ready")


def infer(channel: grpc.Channel, metadata=()) -> pb.ModelInferResponse:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    return stub.ModelInfer(infer_request(np.zeros((1, 28, 28), np.uint8)), metadata=metadata)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value.code()


@pytest.fixture(scope="module")
def tls_server(model_repository, certificates, tmp_path_factory):
    flags = ("--tls-cert", str(certificates / "server.pem"), "--tls-key")
    server = start_server(
        model_repository,
        tmp_path_factory.mktemp("tls"),
        *flags,
        str(certificates / "server.key"),
        wait=False,
    )
    try:
        wait_live(lambda: tls_channel(server, certificates))
        yield server
    finally:
        server.terminate()


def test_tls_serves_a_client_that_trusts_the_ca_and_no_plaintext(tls_server, certificates):
    with tls_channel(tls_server, certificates) as channel:
        assert infer(channel).model_version == "2"
    with grpc.insecure_channel(tls_server.target) as plaintext:
        stub = pb_grpc.GRPCInferenceServiceStub(plaintext)
        live = pb.ServerLiveRequest()
        assert code_of(lambda: stub.ServerLive(live, timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_servers_ca_is_refused(tls_server, certificates):
    wrong = grpc.ssl_channel_credentials(read(certificates / "other-ca.pem"))
    with grpc.secure_channel(tls_server.target, wrong) as channel:
        assert code_of(lambda: infer(channel)) == grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def mutual_server(model_repository, certificates, tmp_path_factory):
    server = start_server(
        model_repository,
        tmp_path_factory.mktemp("mtls"),
        *("--tls-cert", str(certificates / "server.pem")),
        *("--tls-key", str(certificates / "server.key")),
        *("--tls-client-ca", str(certificates / "ca.pem")),
        wait=False,
    )
    try:
        wait_live(lambda: tls_channel(server, certificates, "client"))
        yield server
    finally:
        server.terminate()


def test_mutual_tls_needs_a_client_certificate_the_ca_signed(mutual_server, certificates):
    with tls_channel(mutual_server, certificates, "client") as channel:
        assert infer(channel).model_version == "2"
    for client in (None, "stranger"):  # none at all, or one another CA signed
        with tls_channel(mutual_server, certificates, client) as channel:
            assert code_of(lambda: infer(channel)) == grpc.StatusCode.UNAVAILABLE, client
    with tls_channel(mutual_server, certificates, "client") as channel:
        assert infer(channel).model_version == "2", "still serving after the refusals"


@pytest.fixture
def token_server(model_repository, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# one token a line\n{TOKEN}\n")
    server = start_server(model_repository, tmp_path, "--auth-token-file", str(tokens), wait=False)
    try:
        wait_live(lambda: grpc.insecure_channel(server.target))  # health stays open
        yield server, tokens
    finally:
        server.terminate()


def test_tokens_let_in_only_a_listed_bearer_and_health_stays_open(token_server):
    server, _ = token_server
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(server.target) as channel:
        assert infer(channel, [("authorization", f"Bearer {TOKEN}")]).model_version == "2"
        assert code_of(lambda: infer(channel)) == unauthenticated
        wrong = [("authorization", "Bearer guessed")]
        assert code_of(lambda: infer(channel, wrong)) == unauthenticated
        index = pb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex
        request = pb.RepositoryIndexRequest()
        assert code_of(lambda: index(request, timeout=5)) == unauthenticated
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
    log = server.log()
    assert TOKEN not in log and "guessed" not in log, "no secret in the log"


def test_a_token_revoked_in_the_file_stops_working_without_a_restart(token_server):
    server, tokens = token_server
    with grpc.insecure_channel(server.target) as channel:
        bearer = [("authorization", f"Bearer {TOKEN}")]
        assert infer(channel, bearer).model_version == "2"
        tokens.write_text("a-new-token\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # re-read within a second or so
            try:
                infer(channel, bearer)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the revoked token still works")
        assert infer(channel, [("authorization", "Bearer a-new-token")]).model_version == "2"


def test_protected_health_needs_the_token_too(model_repository, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    server = start_server(
        model_repository,
        tmp_path,
        *("--auth-token-file", str(tokens), "--protect-health"),
        wait=False,
    )
    try:
        time.sleep(0.5)
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            bearer = [("authorization", f"Bearer {TOKEN}")]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    health.Check(health_pb2.HealthCheckRequest(), metadata=bearer, timeout=1)
                    break
                except grpc.RpcError:
                    time.sleep(0.2)
            check = health_pb2.HealthCheckRequest()
            refused = code_of(lambda: health.Check(check, timeout=5))
            assert refused == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.terminate()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--tls-cert", "{certs}/server.pem"), "TLS needs both --tls-cert and --tls-key"),
        (("--auth-token-file", "{certs}/absent"), "cannot read the token file"),
        (("--tls-client-ca", "{certs}/ca.pem"), "--tls-client-ca needs --tls-cert and --tls-key"),
    ],
)
def test_a_bad_access_setting_refuses_to_start_saying_why(
    model_repository, certificates, tmp_path, flags, message
):
    arguments = [flag.format(certs=certificates) for flag in flags]
    server = start_server(model_repository, tmp_path, *arguments, wait=False)
    assert server.process.wait(timeout=60) == 1
    assert message in server.log()

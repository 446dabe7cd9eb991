"""Who may call the server: TLS (optionally mutual) and bearer tokens.

Tokens live in a file, one a line (blank lines and `#` comments ignored), re-read when the
file changes, so a token is added or revoked without a restart (a Kubernetes Secret volume
updates the file in place). A request passes if its `authorization` header is
`Bearer <token>` for one of them. The comparison takes the same time whichever token
matches, or none: both sides are hashed first, so neither the length nor the content of a
token can be timed, and every token is compared. No token is ever logged, counted or
echoed; the log says only how many tokens the file holds.

`TokenFile` is protocol-neutral (it judges a header value); `AuthInterceptor` applies it to
gRPC, before the request message is even parsed, and `serving.rest.server.HttpServer` to
HTTP, before the body is read. One set of PEM files makes both `server_credentials` (gRPC)
and `server_ssl_context` (HTTP).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

BEARER = "bearer "
# How often, at most, the token file's status is looked at for a change.
RECHECK_SECONDS = 1.0
UNAUTHENTICATED_MESSAGE = (
    "missing or invalid bearer token: send the metadata `authorization: Bearer <token>`"
)


class AccessConfigError(Exception):
    """A TLS file or the token file cannot be used; the message says which and why."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str) -> list[str]:
    """The tokens of a token file's text: one a line, blanks and `#` comments skipped."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@dataclass(frozen=True)
class _Stamp:
    """What identifies one version of the file: a change to any of these is a new one."""

    inode: int
    size: int
    mtime_ns: int


class TokenFile:
    """The bearer tokens of one file, re-read when it changes (looked at once a second at
    most). A file that cannot be read at start is an error; later, the tokens read last
    stay in force and the failure is logged, so a half-finished edit cannot lock every
    client out. An emptied file admits no one."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._digests: tuple[bytes, ...] = ()
        self._stamp: _Stamp | None = None
        self._checked_at = clock()
        try:
            self._load(self._stat())
        except OSError as error:
            raise AccessConfigError(
                f"cannot read the token file {path}: {error.strerror}"
            ) from error
        if not self._digests:
            raise AccessConfigError(f"the token file {path} holds no token")

    @property
    def count(self) -> int:
        return len(self._digests)

    def _stat(self) -> _Stamp:
        status = os.stat(self.path)
        return _Stamp(status.st_ino, status.st_size, status.st_mtime_ns)

    def _load(self, stamp: _Stamp) -> None:
        tokens = parse_tokens(self.path.read_text())
        self._digests = tuple(_digest(token) for token in tokens)
        self._stamp = stamp
        log.info("token file %s read: %d token(s)", self.path, len(tokens))

    def refresh(self) -> None:
        """Re-read the file if it changed since it was read last."""
        now = self._clock()
        if now - self._checked_at < RECHECK_SECONDS:
            return
        self._checked_at = now
        try:
            stamp = self._stat()
            if stamp != self._stamp:
                self._load(stamp)
        except OSError as error:
            log.error(
                "cannot re-read the token file %s: %s; the %d token(s) read before stay in force",
                self.path,
                error.strerror,
                len(self._digests),
            )

    def allows(self, authorization: str | None) -> bool:
        """True if `authorization` (a header's value) is `Bearer <one of the tokens>`."""
        self.refresh()
        if not authorization or authorization[: len(BEARER)].lower() != BEARER:
            return False
        offered = _digest(authorization[len(BEARER) :].strip())
        matched = False
        for digest in self._digests:  # no early exit: the time does not say which matched
            matched |= hmac.compare_digest(offered, digest)
        return matched


def _read_file(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as error:
        raise AccessConfigError(f"cannot read the {what} {path}: {error.strerror}") from error


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, mutual TLS when `client_ca` is given; None for
    plaintext (neither cert nor key)."""
    if cert is None and key is None:
        if client_ca is not None:
            raise AccessConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise AccessConfigError("TLS needs both --tls-cert and --tls-key")
    chain, private_key = _read_file(cert, "TLS certificate"), _read_file(key, "TLS key")
    for name, content in (("certificate", chain), ("key", private_key)):
        if b"-----BEGIN" not in (content or b""):
            raise AccessConfigError(f"the TLS {name} is not PEM (no -----BEGIN line)")
    roots = _read_file(client_ca, "client CA")
    return grpc.ssl_server_credentials(
        ((private_key, chain),), root_certificates=roots, require_client_auth=roots is not None
    )


def server_ssl_context(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> ssl.SSLContext | None:
    """The same TLS as `server_credentials`, for HTTP: an `ssl.SSLContext` from the same
    PEM files (TLS 1.2 at least), requiring a client certificate `client_ca` signed when it
    is given; None for plaintext. Checked like `server_credentials`, so call that first."""
    if cert is None or key is None:
        return None
    # Not create_default_context: it would trust the system's CAs for client certificates.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise AccessConfigError(
            f"cannot use the TLS certificate {cert} with the key {key}: {error}"
        ) from error
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as error:
            raise AccessConfigError(f"cannot use the client CA {client_ca}: {error}") from error
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _metadata_value(metadata: Iterable[tuple[str, str | bytes]] | None, key: str) -> str | None:
    for name, value in metadata or ():
        if name == key:
            return value if isinstance(value, str) else None
    return None


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED. It has no
    request deserializer: an unauthenticated message is never parsed."""

    async def deny(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


# Called with the RPC's name (a known method's: bounded) each time one is refused.
RefusalListener = Callable[[str], None]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC without a valid bearer token, except the methods in `open_methods`
    (full names, `/package.Service/Method`): health checks for probes, when allowed."""

    def __init__(
        self,
        tokens: TokenFile,
        open_methods: Iterable[str] = (),
        on_refused: RefusalListener | None = None,
    ) -> None:
        self.tokens = tokens
        self.open_methods = frozenset(open_methods)
        self._on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in self.open_methods:
            return handler  # an unknown method is UNIMPLEMENTED either way
        if self.tokens.allows(_metadata_value(details.invocation_metadata, "authorization")):
            return handler
        if self._on_refused is not None:
            self._on_refused(details.method.rsplit("/", 1)[-1])
        return _denying(handler)

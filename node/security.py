"""Who may talk to a node: a cluster secret that authenticates every RPC, and optional TLS.

**Authentication.** Every node of a cluster, and every client, holds the same secret
(``--cluster-secret-file PATH`` or ``MACMESH_CLUSTER_SECRET``). A client signs each call::

    x-macmesh-auth: v1:<unix seconds>:<16-byte random nonce, hex>:<HMAC-SHA256 hex>
    HMAC-SHA256(key=secret, msg="<full method>\\n<unix seconds>\\n<nonce>")

and the server's interceptor checks, for every RPC before any handler runs, that the signature
matches the method being called, that the timestamp is within ``FRESHNESS_S`` of its own clock,
and that the nonce was not seen before inside that window. Anything else is ``UNAUTHENTICATED``
with a message saying which check failed (missing, malformed, stale, replayed, wrong secret).

Why an HMAC rather than the secret as a bearer token: the secret never crosses the network, so
a cluster on a trusted LAN is protected without setting up certificates, and a header sniffed
off the wire is useless: it is bound to one method, expires within a minute and is accepted
once. It authenticates the *call*, not the bytes that follow; use TLS as well (``--tls-cert``,
``--tls-key``, ``--tls-ca``) when the network itself is not trusted, to keep prompts private and
streams untampered. Clocks of the nodes must agree within ``FRESHNESS_S`` (NTP does that).

**Open methods.** The standard gRPC health check (``grpc.health.v1.Health``) answers without
a secret: it tells only "serving or not" and load balancers and supervisors probe it. Every
other method, reflection included, needs the secret.

**Peers.** A node that does not hold the secret cannot heartbeat its peers (UNAUTHENTICATED),
so it never becomes "up" in their peer tables and the planner never places a model on it,
whatever its mDNS advert says.

**Process-wide settings.** ``configure()`` (the daemon calls it once at start) sets the secret
and TLS files every channel this process opens uses (``node.rpc.channel`` and the peer
dialer). A process that never calls it (``macmesh status``, the gateway, scripts) reads
``MACMESH_CLUSTER_SECRET`` / ``MACMESH_CLUSTER_SECRET_FILE`` and ``MACMESH_TLS_CA`` from the
environment on first use.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from node.logging import get_logger

log = get_logger(__name__)

AUTH_KEY = "x-macmesh-auth"
# The node id of the daemon making a call (stages learn their coordinator from LoadShard's).
# Informational, for cleanup only: with a secret the call itself is authenticated.
NODE_KEY = "x-macmesh-node"
FRESHNESS_S = 60.0
LOG_EVERY_S = 30.0  # one log line per (method, reason) per this many seconds
MIN_SECRET_BYTES = 16
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
SECRET_ENV = "MACMESH_CLUSTER_SECRET"
SECRET_FILE_ENV = "MACMESH_CLUSTER_SECRET_FILE"
TLS_CA_ENV = "MACMESH_TLS_CA"
NO_SECRET_WARNING = (
    "no cluster secret is set: ANYONE who can reach this node on the network can use it "
    "(run models, read prompts, join the cluster). Set --cluster-secret-file or "
    "MACMESH_CLUSTER_SECRET on every node and client."
)


class SecurityError(ValueError):
    """A secret or certificate setting cannot be used; the message names it."""


# ----------------------------------------------------------------------------- secrets


def read_secret_file(path: Path) -> bytes:
    """The secret in ``path`` (surrounding whitespace stripped)."""
    try:
        data = Path(path).expanduser().read_bytes().strip()
    except OSError as exc:
        raise SecurityError(f"cannot read cluster secret file {str(path)!r}: {exc}") from None
    return check_secret(data, f"cluster secret file {str(path)!r}")


def check_secret(secret: bytes, where: str = "cluster secret") -> bytes:
    if len(secret) < MIN_SECRET_BYTES:
        raise SecurityError(
            f"{where} is {len(secret)} bytes; use at least {MIN_SECRET_BYTES} "
            "(e.g. `openssl rand -hex 32 > secret`)"
        )
    return secret


def sign(secret: bytes, method: str, timestamp: int, nonce: str) -> str:
    message = f"{method}\n{timestamp}\n{nonce}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def auth_header(secret: bytes, method: str, now: float | None = None) -> str:
    """The ``x-macmesh-auth`` value for one call of ``method``."""
    timestamp = int(time.time() if now is None else now)
    nonce = secrets.token_hex(16)
    return f"v1:{timestamp}:{nonce}:{sign(secret, method, timestamp, nonce)}"


class Verifier:
    """Checks ``x-macmesh-auth`` headers; remembers nonces for the freshness window."""

    def __init__(self, secret: bytes, freshness_s: float = FRESHNESS_S) -> None:
        self._secret = secret
        self._freshness_s = freshness_s
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._lock = threading.Lock()

    def check(self, method: str, header: str | None, now: float | None = None) -> str | None:
        """None when the call is authentic, else why not (for the UNAUTHENTICATED message)."""
        if not header:
            return f"{method} needs the cluster secret ({AUTH_KEY} metadata is missing)"
        parts = header.split(":")
        if len(parts) != 4 or parts[0] != "v1" or not parts[1].isdigit():
            return f"{AUTH_KEY} metadata is malformed"
        _, ts_text, nonce, mac = parts
        now = time.time() if now is None else now
        skew = now - int(ts_text)
        if abs(skew) > self._freshness_s:
            return (
                f"{AUTH_KEY} is {skew:+.0f} s old (allowed ±{self._freshness_s:.0f} s): "
                "a replayed header, or the clocks of the two machines disagree"
            )
        if not hmac.compare_digest(mac, sign(self._secret, method, int(ts_text), nonce)):
            return "wrong cluster secret"
        with self._lock:
            self._forget_older_than(now - self._freshness_s)
            if nonce in self._seen:
                return f"{AUTH_KEY} was already used (replay)"
            self._seen[nonce] = now
        return None

    def _forget_older_than(self, cutoff: float) -> None:
        while self._seen:
            nonce, seen_at = next(iter(self._seen.items()))
            if seen_at >= cutoff:
                return
            self._seen.pop(nonce)


# ----------------------------------------------------------------------------- server side


def _deny(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only aborts; requests stay unparsed."""

    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def abort_stream(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - never reached, makes this a generator

    if handler is None or not (handler.request_streaming or handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(abort)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.unary_stream_rpc_method_handler(abort_stream)


class AuthInterceptor(grpc.ServerInterceptor):
    """Rejects every call without a valid signature (health checks excepted)."""

    def __init__(self, verifier: Verifier) -> None:
        self._verifier = verifier
        self._last_logged: dict[tuple[str, str], float] = {}  # an intruder retries every second

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIXES):
            return continuation(handler_call_details)
        header = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTH_KEY:
                header = value if isinstance(value, str) else value.decode(errors="replace")
                break
        problem = self._verifier.check(method, header)
        if problem is None:
            return continuation(handler_call_details)
        key = (method, problem if len(problem) < 60 else problem[:60])
        now = time.monotonic()
        if now - self._last_logged.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last_logged[key] = now
            log.warning("unauthenticated call refused", method=method, reason=problem)
        return _deny(continuation(handler_call_details), problem)


# ----------------------------------------------------------------------------- client side


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


class SigningInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds a fresh ``x-macmesh-auth`` header (with a secret) and the calling daemon's node id
    (``x-macmesh-node``, once ``set_local_node`` ran) to every call of a blocking channel."""

    def __init__(self, secret: bytes | None) -> None:
        self._secret = secret

    def _signed(self, details: Any) -> _CallDetails:
        metadata = list(details.metadata or ())
        if self._secret is not None:
            metadata.append((AUTH_KEY, auth_header(self._secret, _method_name(details.method))))
        if _local_node_id:
            metadata.append((NODE_KEY, _local_node_id))
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._signed(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._signed(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._signed(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._signed(details), requests)


def _aio_signed(secret: bytes, details: Any) -> Any:
    header = auth_header(secret, _method_name(details.method))
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(AUTH_KEY, header)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_signed(self._secret, details), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_signed(self._secret, details), request)


def aio_interceptors(secret: bytes | None) -> list[Any]:
    """Signing interceptors for a ``grpc.aio`` channel (the InferenceService has no
    client-streaming methods, so unary-unary and unary-stream are all it needs)."""
    if secret is None:
        return []
    return [_AioUnaryUnary(secret), _AioUnaryStream(secret)]


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TlsFiles:
    cert: Path | None = None  # this node's certificate chain (PEM), for its server
    key: Path | None = None  # its private key (PEM)
    ca: Path | None = None  # the CA that signed the nodes' certificates, for clients/peers

    @property
    def serves_tls(self) -> bool:
        return self.cert is not None

    @property
    def dials_tls(self) -> bool:
        return self.ca is not None or self.cert is not None


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read {what} {str(path)!r}: {exc}") from None


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    if tls.cert is None or tls.key is None:
        raise SecurityError("TLS needs both --tls-cert and --tls-key")
    pair = (_read(tls.key, "TLS key"), _read(tls.cert, "TLS certificate"))
    return grpc.ssl_server_credentials([pair])


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """Trust ``tls.ca`` (or, without one, the system roots)."""
    roots = _read(tls.ca, "TLS CA") if tls.ca is not None else None
    return grpc.ssl_channel_credentials(root_certificates=roots)


@dataclass(frozen=True)
class Security:
    """What this process presents and expects: the secret and the TLS files."""

    secret: bytes | None = None
    tls: TlsFiles = TlsFiles()

    def server_interceptors(self) -> list[grpc.ServerInterceptor]:
        return [] if self.secret is None else [AuthInterceptor(Verifier(self.secret))]

    def secure_channel(self, address: str, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
        """A blocking channel to ``address`` with TLS and signing as configured."""
        if self.tls.dials_tls:
            channel = grpc.secure_channel(address, channel_credentials(self.tls), options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        return grpc.intercept_channel(channel, SigningInterceptor(self.secret))

    def aio_channel(self, address: str, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
        interceptors = aio_interceptors(self.secret)
        if self.tls.dials_tls:
            return grpc.aio.secure_channel(
                address, channel_credentials(self.tls), options=options, interceptors=interceptors
            )
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def from_values(
    secret: str | bytes | None = None,
    secret_file: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_ca: Path | None = None,
) -> Security:
    """A ``Security`` from settings values; the file wins over the literal secret."""
    if secret_file is not None:
        key: bytes | None = read_secret_file(secret_file)
    elif secret:
        raw = secret.encode() if isinstance(secret, str) else secret
        key = check_secret(raw.strip(), f"${SECRET_ENV}")
    else:
        key = None
    if (tls_cert is None) != (tls_key is None):
        raise SecurityError("TLS needs both --tls-cert and --tls-key (one of them is missing)")
    for path, what in ((tls_cert, "TLS certificate"), (tls_key, "TLS key"), (tls_ca, "TLS CA")):
        if path is not None:
            _read(path, what)  # fail at start, naming the file, not at the first call
    return Security(key, TlsFiles(tls_cert, tls_key, tls_ca))


def from_environment(env: dict[str, str] | None = None) -> Security:
    env = dict(os.environ) if env is None else env
    secret_file = env.get(SECRET_FILE_ENV)
    ca = env.get(TLS_CA_ENV)
    return from_values(
        secret=env.get(SECRET_ENV) or None,
        secret_file=Path(secret_file) if secret_file else None,
        tls_ca=Path(ca) if ca else None,
    )


_local_node_id = ""


def set_local_node(node_id: str) -> None:
    """Calls from this process carry ``x-macmesh-node: node_id`` from now on (daemons)."""
    global _local_node_id
    _local_node_id = node_id


def calling_node(context: grpc.ServicerContext) -> str:
    """The node id a daemon's call carries ("" for clients)."""
    for key, value in context.invocation_metadata() or ():
        if key == NODE_KEY:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""


_current: Security | None = None
_current_lock = threading.Lock()
_warned = False


def configure(security: Security) -> None:
    """Make ``security`` what every channel of this process uses from now on."""
    global _current
    with _current_lock:
        _current = security


def current() -> Security:
    """The process's security (from the environment unless ``configure`` was called)."""
    global _current
    with _current_lock:
        if _current is None:
            try:
                _current = from_environment()
            except SecurityError as exc:
                log.error("ignoring the cluster secret from the environment", error=str(exc))
                _current = Security()
        return _current


def warn_if_open(security: Security) -> bool:
    """Log the 'anyone can use this node' warning, once per process; True if it did."""
    global _warned
    if security.secret is not None or _warned:
        return False
    _warned = True
    log.warning(NO_SECRET_WARNING)
    return True

"""Who may talk to a node, and whom a node believes: a cluster secret that authenticates every
RPC in both directions, and optional TLS.

**Calls.** Every node of a cluster, and every client, holds the same secret
(``--cluster-secret-file PATH`` or ``MACMESH_CLUSTER_SECRET``). A client signs each call::

    x-macmesh-auth: v2:<unix seconds>:<nonce>:<target node>:<full method>:<HMAC-SHA256 hex>
    HMAC-SHA256(key=secret, msg="macmesh-call-v2\\n<method>\\n<target>\\n<seconds>\\n<nonce>")

and the server's interceptor checks, for every RPC before any handler runs, that the signature
is made with the secret, that it was made for this method and for this node (its node id), that
the timestamp is within ``FRESHNESS_S`` of its own clock, and that the nonce was not seen before
inside that window. Anything else is ``UNAUTHENTICATED`` with a message saying which check failed
(missing, malformed, wrong secret, signed for another method, signed for another node, stale,
replayed). Binding the target node means a header captured on the way to one node is refused
by every other node, whose nonce caches it never reached.

**Answers.** A node must not believe an answer from a process that does not hold the secret (an
intruder that answers heartbeats would otherwise be "up", get layers placed on it and see
prompts). Every answer to a signed call therefore carries, in its response headers (gRPC initial
metadata, sent before the first message)::

    x-macmesh-proof: v2:<answering node>:<HMAC(secret, "macmesh-answer-v2\\n<method>\\n<node>\\n<nonce>")>

over the nonce of *this* call, so it cannot be replayed from another call, and the client drops
the call (``UNAUTHENTICATED``, naming the address) before reading a message when it is missing
or wrong. To know which node id to sign for, and so that it never hands a signed header to a
stranger that could relay it, a client first asks the address (once per process and address)
for a proof over a fresh random challenge, on the open health check::

    request metadata  x-macmesh-challenge: <32 hex>
    response headers  x-macmesh-proof: v2:<node>:<HMAC(secret, "macmesh-hello-v2\\n<node>\\n<challenge>")>

Why a challenge-response over the secret rather than signed response bodies or mutual TLS: it
reuses the one secret every node already has (no certificates to issue, which is what users of
a home or office LAN skip), it costs one HMAC per call and one extra round trip per address, not
per message (pipeline streams carry thousands of frames), and it covers every RPC shape the same
way, streams included, because it rides in headers. What it does not do is protect the bytes
that follow from an attacker *on the path*, who could pass the headers through and alter the
messages: when the network itself is not trusted, use TLS as well (``--tls-cert``,
``--tls-key``, ``--tls-ca``), which keeps prompts private and streams untampered; the secret
then still decides membership. Clocks of the nodes must agree within ``FRESHNESS_S`` (NTP).

**Open methods.** The standard gRPC health check (``grpc.health.v1.Health``) answers without
a secret: it tells only "serving or not" (and, when challenged, the node id with a proof), and
load balancers and supervisors probe it. Every other method, reflection included, needs the
secret.

**Peers.** A node that does not hold the secret cannot heartbeat its peers (its calls are
refused) and cannot answer theirs (it has no proof), so it never becomes "up" in any peer table
from either side, and the planner never places a model on it, whatever its mDNS advert says.

**Process-wide settings.** ``configure()`` (the daemon calls it once at start) sets the secret
and TLS files every channel this process opens uses (``node.rpc.channel`` and the peer
dialer). A process that never calls it (``macmesh status``, the gateway, scripts) reads
``MACMESH_CLUSTER_SECRET`` / ``MACMESH_CLUSTER_SECRET_FILE`` and ``MACMESH_TLS_CA`` from the
environment on first use; a secret that is set there but unusable (too short, empty, a missing
or empty file) raises ``SecurityError`` rather than letting the process talk unsigned.
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
PROOF_KEY = "x-macmesh-proof"
CHALLENGE_KEY = "x-macmesh-challenge"
# The node id of the daemon making a call (stages learn their coordinator from LoadShard's).
# Informational, for cleanup only: with a secret the call itself is authenticated.
NODE_KEY = "x-macmesh-node"
VERSION = "v2"
FRESHNESS_S = 60.0
HELLO_TIMEOUT_S = 5.0
LOG_EVERY_S = 30.0  # one log line per (method, reason) per this many seconds
MIN_SECRET_BYTES = 16
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
HELLO_METHOD = "/grpc.health.v1.Health/Check"
SECRET_ENV = "MACMESH_CLUSTER_SECRET"
SECRET_FILE_ENV = "MACMESH_CLUSTER_SECRET_FILE"
TLS_CA_ENV = "MACMESH_TLS_CA"
# The start of the refusal a node gives a header signed for another node: a client that sees it
# asks the address who it is again (a different daemon may now listen there).
OTHER_NODE = "signed for node"
NO_SECRET_WARNING = (
    "no cluster secret is set: ANYONE who can reach this node on the network can use it "
    "(run models, read prompts, join the cluster). Set --cluster-secret-file or "
    "MACMESH_CLUSTER_SECRET on every node and client."
)


class SecurityError(ValueError):
    """A secret or certificate setting cannot be used; the message names it."""


class NotAuthenticated(grpc.RpcError, grpc.Call):
    """The answering side did not prove it holds the cluster secret (raised on the client).

    A ``grpc.RpcError`` with code UNAUTHENTICATED, so every caller that already handles a
    refused call handles this one the same way."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self._message = message

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAUTHENTICATED

    def details(self) -> str:
        return self._message

    def initial_metadata(self) -> tuple:
        return ()

    def trailing_metadata(self) -> tuple:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


# ----------------------------------------------------------------------------- secrets


def read_secret_file(path: Path) -> bytes:
    """The secret in ``path`` (surrounding whitespace stripped)."""
    try:
        data = Path(path).expanduser().read_bytes().strip()
    except OSError as exc:
        # Worded as the daemon's settings check words it, so every process says the same.
        raise SecurityError(
            f"cluster secret file {str(path)!r} is not a readable file ({exc.strerror})"
        ) from None
    return check_secret(data, f"cluster secret file {str(path)!r}")


def check_secret(secret: bytes, where: str = "cluster secret") -> bytes:
    if len(secret) < MIN_SECRET_BYTES:
        raise SecurityError(
            f"{where} is {len(secret)} bytes; use at least {MIN_SECRET_BYTES} "
            "(e.g. `openssl rand -hex 32 > secret`)"
        )
    return secret


def _mac(secret: bytes, *fields: str) -> str:
    return hmac.new(secret, "\n".join(fields).encode(), hashlib.sha256).hexdigest()


def sign(secret: bytes, method: str, target: str, timestamp: int, nonce: str) -> str:
    return _mac(secret, "macmesh-call-v2", method, target, str(timestamp), nonce)


def answer_proof(secret: bytes, method: str, node: str, nonce: str) -> str:
    """What a node answering call ``nonce`` of ``method`` puts in ``x-macmesh-proof``."""
    return f"{VERSION}:{node}:{_mac(secret, 'macmesh-answer-v2', method, node, nonce)}"


def hello_proof(secret: bytes, node: str, challenge: str) -> str:
    return f"{VERSION}:{node}:{_mac(secret, 'macmesh-hello-v2', node, challenge)}"


def auth_header(secret: bytes, method: str, target: str, now: float | None = None) -> str:
    """The ``x-macmesh-auth`` value for one call of ``method`` to node ``target``."""
    timestamp = int(time.time() if now is None else now)
    nonce = secrets.token_hex(16)
    mac = sign(secret, method, target, timestamp, nonce)
    return f"{VERSION}:{timestamp}:{nonce}:{target}:{method}:{mac}"


def header_nonce(header: str) -> str:
    return header.split(":")[2]


def _short(text: str, limit: int = 80) -> str:
    """``text`` for a message, cut so a hostile header cannot grow the log or the reply."""
    return text if len(text) <= limit else text[:limit] + "..."


class Verifier:
    """Checks ``x-macmesh-auth`` headers; remembers nonces for the freshness window."""

    def __init__(
        self,
        secret: bytes,
        freshness_s: float = FRESHNESS_S,
        identity: Callable[[], str] | None = None,
    ) -> None:
        self._secret = secret
        self._freshness_s = freshness_s
        self._identity = identity or local_identity
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._lock = threading.Lock()

    def check(self, method: str, header: str | None, now: float | None = None) -> str | None:
        """None when the call is authentic, else why not (for the UNAUTHENTICATED message)."""
        if not header:
            return f"{method} needs the cluster secret ({AUTH_KEY} metadata is missing)"
        parts = header.split(":")
        if len(parts) != 6 or parts[0] != VERSION or not parts[1].isdigit():
            return (
                f"{AUTH_KEY} metadata is malformed (expected {VERSION}:seconds:nonce:node:"
                "method:mac; a macmesh older than this node signs differently)"
            )
        _, ts_text, nonce, target, signed_method, mac = parts
        if not hmac.compare_digest(
            mac, sign(self._secret, signed_method, target, int(ts_text), nonce)
        ):
            return "wrong cluster secret"
        # The signature is genuine: what is left is a header used for something it was not for.
        if signed_method != method:
            return (
                f"{AUTH_KEY} was signed for {_short(signed_method)}, not {method}: "
                "a signature opens only the method it was made for"
            )
        me = self._identity()
        if target != me:
            return (
                f"{OTHER_NODE} {_short(target)}, but this is node {me}: a header captured on "
                "the way to another node is refused here (or the node at this address changed)"
            )
        now = time.time() if now is None else now
        skew = now - int(ts_text)
        if abs(skew) > self._freshness_s:
            return (
                f"{AUTH_KEY} is {skew:+.0f} s old (allowed ±{self._freshness_s:.0f} s): "
                "a replayed header, or the clocks of the two machines disagree"
            )
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


def check_answer(
    secret: bytes, method: str, target: str, nonce: str, metadata: Any, address: str
) -> None:
    """Raise ``NotAuthenticated`` unless ``metadata`` (an answer's headers) proves that node
    ``target`` holding ``secret`` answered this call."""
    proof = _value(metadata, PROOF_KEY)
    if proof is not None and hmac.compare_digest(
        proof, answer_proof(secret, method, target, nonce)
    ):
        return
    raise NotAuthenticated(
        f"the answer from {address} to {method} is not signed with the cluster secret "
        f"({'no' if proof is None else 'a wrong'} {PROOF_KEY}): it was dropped unread"
    )


def _value(metadata: Any, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode(errors="replace")
    return None


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


class _ProvingContext:
    """The handler's context, with the proof added to the response headers: when the handler
    sends them itself (the InferenceService does, to say "accepted"), or else before the
    first message."""

    def __init__(self, context: grpc.ServicerContext, proof: str) -> None:
        self._context = context
        self._proof = proof
        self._sent = False

    def send_initial_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._sent = True
        self._context.send_initial_metadata((*metadata, (PROOF_KEY, self._proof)))

    def ensure_sent(self) -> None:
        if not self._sent:
            self.send_initial_metadata(())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _proving(handler: grpc.RpcMethodHandler, proof: str) -> grpc.RpcMethodHandler:
    """``handler`` with ``proof`` in its response headers, whatever its shape."""
    if handler.response_streaming:
        behaviour = handler.stream_stream if handler.request_streaming else handler.unary_stream

        def streaming(request: Any, context: grpc.ServicerContext) -> Any:
            proving = _ProvingContext(context, proof)
            for message in behaviour(request, proving):
                proving.ensure_sent()
                yield message
            proving.ensure_sent()

        field = "stream_stream" if handler.request_streaming else "unary_stream"
        return handler._replace(**{field: streaming})
    behaviour = handler.stream_unary if handler.request_streaming else handler.unary_unary

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        proving = _ProvingContext(context, proof)
        response = behaviour(request, proving)
        proving.ensure_sent()
        return response

    field = "stream_unary" if handler.request_streaming else "unary_unary"
    return handler._replace(**{field: unary})


class AuthInterceptor(grpc.ServerInterceptor):
    """Rejects every call without a valid signature (health checks excepted) and proves, in
    each accepted call's response headers, that this node holds the secret too."""

    def __init__(self, verifier: Verifier, secret: bytes) -> None:
        self._verifier = verifier
        self._secret = secret
        self._last_logged: dict[tuple[str, str], float] = {}  # an intruder retries every second

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata
        if method.startswith(OPEN_METHOD_PREFIXES):
            handler = continuation(handler_call_details)
            challenge = _value(metadata, CHALLENGE_KEY)
            if challenge and method == HELLO_METHOD and handler is not None:
                proof = hello_proof(self._secret, local_identity(), _short(challenge, 64))
                return _proving(handler, proof)
            return handler
        header = _value(metadata, AUTH_KEY)
        problem = self._verifier.check(method, header)
        if problem is None:
            handler = continuation(handler_call_details)
            if handler is None:
                return None
            proof = answer_proof(self._secret, method, local_identity(), header_nonce(header))
            return _proving(handler, proof)
        key = (method, problem if len(problem) < 60 else problem[:60])
        now = time.monotonic()
        if now - self._last_logged.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last_logged[key] = now
            log.warning("unauthenticated call refused", method=method, reason=problem)
        return _deny(continuation(handler_call_details), problem)


# ----------------------------------------------------------------------------- client side


_identities: dict[str, str] = {}  # address -> the node id that proved itself there
_identities_lock = threading.Lock()


def hello_problem(secret: bytes, challenge: str, metadata: Any, address: str) -> str | None:
    """Why the health-check answer ``metadata`` does not prove a node holding ``secret``, or
    None; see ``hello`` (pure, for tests)."""
    proof = _value(metadata, PROOF_KEY)
    if proof is None:
        return (
            f"the node at {address} does not prove it holds the cluster secret (it runs "
            "without one, or it is not a macmesh node): refusing to send it signed calls "
            "or to believe its answers"
        )
    parts = proof.split(":")
    if len(parts) != 3 or not hmac.compare_digest(proof, hello_proof(secret, parts[1], challenge)):
        return (
            f"the node at {address} answers with a different cluster secret: refusing to "
            "send it signed calls or to believe its answers"
        )
    return None


def _hello(channel: grpc.Channel, secret: bytes, address: str, timeout: float | None) -> str:
    """The node id at ``address``, proved over a fresh challenge (open health check)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # grpc's own, light

    challenge = secrets.token_hex(16)
    stub = health_pb2_grpc.HealthStub(channel)
    _, call = stub.Check.with_call(
        health_pb2.HealthCheckRequest(service=""),
        metadata=[(CHALLENGE_KEY, challenge)],
        timeout=timeout if timeout is not None else HELLO_TIMEOUT_S,
    )
    metadata = call.initial_metadata()
    problem = hello_problem(secret, challenge, metadata, address)
    if problem is not None:
        raise NotAuthenticated(problem)
    node = str(_value(metadata, PROOF_KEY)).split(":")[1]
    with _identities_lock:
        _identities[address] = node
    return node


def _known_identity(address: str) -> str | None:
    with _identities_lock:
        return _identities.get(address)


def _forget_identity(address: str, details: str | None) -> None:
    """A node refused a header signed for the node we thought was there: ask again next time."""
    if details and details.startswith(OTHER_NODE):
        with _identities_lock:
            _identities.pop(address, None)


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


class _CheckedFuture:
    """A unary call's future whose result is only handed out once its answer is proved."""

    def __init__(self, inner: Any, check: Callable[[Any], None]) -> None:
        self._inner = inner
        self._check = check

    def result(self, timeout: float | None = None) -> Any:
        response = self._inner.result(timeout)
        self._check(self._inner)
        return response

    def exception(self, timeout: float | None = None) -> BaseException | None:
        exc = self._inner.exception(timeout)
        if exc is not None:
            return exc
        try:
            self._check(self._inner)
        except NotAuthenticated as refused:
            return refused
        return None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._inner.add_done_callback(lambda _inner: fn(self))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _CheckedStream:
    """A streaming call whose messages (and headers) are only handed out once proved."""

    def __init__(self, call: Any, check: Callable[[Any], None]) -> None:
        self._call = call
        self._check = check
        self._checked = False

    def _verify(self) -> None:
        if self._checked:
            return
        self._call.initial_metadata()  # waits for the headers, or for the call to end
        if self._call.done() and self._call.code() is not grpc.StatusCode.OK:
            self._checked = True  # refused or failed: the next read raises the real error
            return
        try:
            self._check(self._call)
        except NotAuthenticated:
            self._call.cancel()
            raise
        self._checked = True

    def initial_metadata(self) -> Any:
        self._verify()
        return self._call.initial_metadata()

    def __iter__(self) -> _CheckedStream:
        return self

    def __next__(self) -> Any:
        self._verify()
        return next(self._call)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class SigningInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """With a secret: learns (and checks) who answers at ``address``, signs every call for that
    node, and hands out an answer only once it carries the node's proof. Without one: only
    adds the calling daemon's node id (``x-macmesh-node``, once ``set_local_node`` ran)."""

    def __init__(
        self, secret: bytes | None, address: str = "", raw: grpc.Channel | None = None
    ) -> None:
        self._secret = secret
        self._address = address
        self._raw = raw  # the unintercepted channel, for the hello

    def _signed(self, details: Any) -> tuple[_CallDetails, Callable[[Any], None] | None]:
        metadata = list(details.metadata or ())
        method = _method_name(details.method)
        check = None
        if self._secret is not None and not method.startswith(OPEN_METHOD_PREFIXES):
            secret, address = self._secret, self._address
            target = _known_identity(address)
            if target is None:
                if self._raw is None:
                    raise NotAuthenticated(f"no channel to ask {address} who it is")
                target = _hello(self._raw, secret, address, details.timeout)
            header = auth_header(secret, method, target)
            metadata.append((AUTH_KEY, header))
            nonce = header_nonce(header)

            def check(call: Any) -> None:
                check_answer(secret, method, target, nonce, call.initial_metadata(), address)

        if _local_node_id:
            metadata.append((NODE_KEY, _local_node_id))
        signed = _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )
        return signed, check

    def _unary(self, continuation: Any, details: Any, request: Any) -> Any:
        signed, check = self._signed(details)
        outcome = continuation(signed, request)
        if check is None:
            return outcome
        if not outcome.done():  # .future(): check when the result is asked for
            return _CheckedFuture(outcome, self._checking(check))
        self._checking(check)(outcome)
        return outcome

    def _stream(self, continuation: Any, details: Any, request: Any) -> Any:
        signed, check = self._signed(details)
        call = continuation(signed, request)
        return call if check is None else _CheckedStream(call, self._checking(check))

    def _checking(self, check: Callable[[Any], None]) -> Callable[[Any], None]:
        """``check`` for completed and failed calls alike: a refusal is the server's own
        error, and one signed for another node makes us ask the address again."""

        def run(call: Any) -> None:
            if call.done() and call.code() is not grpc.StatusCode.OK:
                if call.code() is grpc.StatusCode.UNAUTHENTICATED:
                    _forget_identity(self._address, call.details())
                return
            check(call)

        return run

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._unary(continuation, details, request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._stream(continuation, details, request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return self._unary(continuation, details, requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return self._stream(continuation, details, requests)


class _AioPeer:
    """The asyncio side's address, secret and (once set) channel, for hello and checks."""

    def __init__(self, secret: bytes, address: str) -> None:
        self.secret = secret
        self.address = address
        self.channel: grpc.aio.Channel | None = None

    async def target(self, timeout: float | None) -> str:
        known = _known_identity(self.address)
        if known is not None:
            return known
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        assert self.channel is not None
        challenge = secrets.token_hex(16)
        call = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=""),
            metadata=grpc.aio.Metadata((CHALLENGE_KEY, challenge)),
            timeout=timeout if timeout is not None else HELLO_TIMEOUT_S,
        )
        await call
        metadata = await call.initial_metadata()
        problem = hello_problem(self.secret, challenge, metadata, self.address)
        if problem is not None:
            raise _aio_refusal(problem)
        node = str(_value(metadata, PROOF_KEY)).split(":")[1]
        with _identities_lock:
            _identities[self.address] = node
        return node

    async def signed(self, details: Any) -> tuple[Any, str, str]:
        method = _method_name(details.method)
        target = await self.target(details.timeout)
        header = auth_header(self.secret, method, target)
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(AUTH_KEY, header)
        signed = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        return signed, target, header_nonce(header)

    async def check(self, call: Any, method: str, target: str, nonce: str) -> None:
        metadata = await call.initial_metadata()
        if _value(metadata, PROOF_KEY) is None and call.done():
            code = await call.code()
            if code != grpc.StatusCode.OK:
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    _forget_identity(self.address, await call.details())
                return  # the caller reads the server's own error
        try:
            check_answer(self.secret, method, target, nonce, metadata, self.address)
        except NotAuthenticated as exc:
            call.cancel()
            raise _aio_refusal(exc.details()) from None


def _aio_refusal(message: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAUTHENTICATED, grpc.aio.Metadata(), grpc.aio.Metadata(), message
    )


def _is_open(details: Any) -> bool:
    return _method_name(details.method).startswith(OPEN_METHOD_PREFIXES)


async def _aio_intercept(peer: _AioPeer, continuation: Any, details: Any, request: Any) -> Any:
    if _is_open(details):
        return await continuation(details, request)
    signed, target, nonce = await peer.signed(details)
    call = await continuation(signed, request)
    await peer.check(call, _method_name(details.method), target, nonce)
    return call


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, peer: _AioPeer) -> None:
        self._peer = peer

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await _aio_intercept(self._peer, continuation, details, request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, peer: _AioPeer) -> None:
        self._peer = peer

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await _aio_intercept(self._peer, continuation, details, request)


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
        if self.secret is None:
            return []
        return [AuthInterceptor(Verifier(self.secret), self.secret)]

    def secure_channel(self, address: str, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
        """A blocking channel to ``address`` with TLS, signing and answer checks as configured."""
        if self.tls.dials_tls:
            channel = grpc.secure_channel(address, channel_credentials(self.tls), options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        return grpc.intercept_channel(channel, SigningInterceptor(self.secret, address, channel))

    def aio_channel(self, address: str, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
        """The asyncio twin (the InferenceService has no client-streaming methods, so
        unary-unary and unary-stream interceptors are all it needs)."""
        peer = _AioPeer(self.secret, address) if self.secret is not None else None
        interceptors: list[Any] = (
            [] if peer is None else [_AioUnaryUnary(peer), _AioUnaryStream(peer)]
        )
        if self.tls.dials_tls:
            channel = grpc.aio.secure_channel(
                address, channel_credentials(self.tls), options=options, interceptors=interceptors
            )
        else:
            channel = grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
        if peer is not None:
            peer.channel = channel
        return channel


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
    elif secret is not None:
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
    """The environment's settings; a variable that is set (even to "") must be usable."""
    env = dict(os.environ) if env is None else env
    secret_file = env.get(SECRET_FILE_ENV)
    if secret_file is not None and not secret_file.strip():
        raise SecurityError(
            f"${SECRET_FILE_ENV} is set but empty: name the secret file or unset it"
        )
    ca = env.get(TLS_CA_ENV)
    return from_values(
        secret=env.get(SECRET_ENV),
        secret_file=Path(secret_file) if secret_file else None,
        tls_ca=Path(ca) if ca else None,
    )


_local_node_id = ""
_process_identity = f"process-{secrets.token_hex(6)}"


def set_local_node(node_id: str) -> None:
    """Calls from this process carry ``x-macmesh-node: node_id``, and its servers sign their
    answers as that node, from now on (daemons)."""
    global _local_node_id
    _local_node_id = node_id


def local_identity() -> str:
    """Who this process's servers say they are: the daemon's node id, or (a process that
    serves without being a node, like a test server) a random id fixed for its lifetime."""
    return _local_node_id or _process_identity


def calling_node(context: grpc.ServicerContext) -> str:
    """The node id a daemon's call carries ("" for clients)."""
    return _value(context.invocation_metadata(), NODE_KEY) or ""


_current: Security | None = None
_current_lock = threading.Lock()
_warned = False


def configure(security: Security | None) -> None:
    """Make ``security`` what every channel of this process uses from now on (None: read the
    environment again on next use)."""
    global _current
    with _current_lock:
        _current = security


def current() -> Security:
    """The process's security (from the environment unless ``configure`` was called).

    Raises ``SecurityError`` (the daemon's message) when the environment sets a secret that
    cannot be used: a client that carried on unsigned would only be refused later, and a
    misspelt file name must not silently turn signing off."""
    global _current
    with _current_lock:
        if _current is None:
            _current = from_environment()
        return _current


def warn_if_open(security: Security) -> bool:
    """Log the 'anyone can use this node' warning, once per process; True if it did."""
    global _warned
    if security.secret is not None or _warned:
        return False
    _warned = True
    log.warning(NO_SECRET_WARNING)
    return True

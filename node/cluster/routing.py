"""Where a Generate goes: this node's instance, or a peer's, and the relay to that peer.

Design: **the coordinator owns its instances; every other node asks it** (node.cluster.
instances). To keep that from costing a round of lookups per request, a node keeps the view
of its peers' instances it last fetched (over one pooled channel per peer, node.cluster.peers)
and asks again only when the view is older than ``VIEW_TTL_S``, when the view has no usable
instance for the request, when a peer changed state (down, left, restarted), or when the
coordinator it relayed to no longer has the instance. In steady state a forwarded request
costs exactly one call on an already-open channel: the relay itself.

When a coordinator stops answering, its instances do not vanish from the view as if never
launched: a peer that is up but did not answer keeps its last answer, and the multi-node
instances of a peer that is no longer up (suspect, down, gone) stay known as orphans
(``ORPHAN_TTL_S``) until another node reports them (the stage holder that takes them over,
node.cluster.failover). A request for one is UNAVAILABLE naming the coordinator that went,
which a client may retry, never NOT_FOUND.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from node.cluster import peers
from node.cluster.errors import Code, Refusal, abort
from node.cluster.instances import (
    InstanceInfo,
    InstanceRegistry,
    InstanceUnavailable,
    merge,
    pick_instance,
)
from node.cluster.selector import EngineRefused
from node.proto.macmesh.v1 import inference_pb2 as pb

VIEW_TTL_S = 2.0
ORPHAN_TTL_S = 60.0  # how long a gone coordinator's instances answer UNAVAILABLE, not NOT_FOUND
NO_DEADLINE_S = 365 * 24 * 3600.0  # "remaining" beyond a year means no deadline was set


def remaining(context: grpc.ServicerContext) -> float | None:
    """The caller's deadline, to pass on to a peer; None when the caller set none (gRPC then
    reports a far-future deadline, which as a timeout would overflow into the past)."""
    left = context.time_remaining()
    return None if left is None or left > NO_DEADLINE_S else left


class Router:
    """This node's view of where instances live, and the pooled channels to its peers."""

    def __init__(self, daemon: Any, registry: InstanceRegistry[Any]) -> None:
        self.daemon = daemon
        self.registry = registry
        self.channels = peers.PeerChannels()
        self._lock = threading.Lock()
        self._view: list[InstanceInfo] = []
        self._view_at = float("-inf")
        self._last: dict[str, list[InstanceInfo]] = {}  # peer address -> its last answer
        self._orphans: dict[str, tuple[InstanceInfo, float]] = {}  # id -> (record, since)

    def close(self) -> None:
        self.channels.close()

    # -- the view --------------------------------------------------------------------------

    def peer_addresses(self) -> list[str]:
        return [n.address for n in self.daemon.live_nodes() if n.id != self.daemon.node_id]

    def remote_instances(self, *, fresh: bool = True) -> list[InstanceInfo]:
        """The peers' instances: asked now, or (``fresh=False``) the recent view."""
        with self._lock:
            if not fresh and time.monotonic() - self._view_at < VIEW_TTL_S:
                return self._view
        answers = peers.gather_by_peer(self.channels, self.peer_addresses())
        now = time.monotonic()
        with self._lock:
            # A peer no longer up leaves its multi-node instances behind as orphans: a stage
            # holder takes them over; until then a request for one is told so.
            for address, infos in self._last.items():
                if address not in answers:
                    for info in infos:
                        if len(info.stages) > 1:
                            self._orphans.setdefault(info.instance_id, (info, now))
            # A peer that is up but did not answer keeps its last answer: a request for its
            # instances then learns that it is unreachable, not that nothing was launched.
            self._last = {
                address: infos if infos is not None else self._last.get(address, [])
                for address, infos in answers.items()
            }
            view = [info for infos in self._last.values() for info in infos]
            for info in view:
                self._orphans.pop(info.instance_id, None)  # someone coordinates it again
            self._view, self._view_at = view, now
        return view

    def cluster_instances(self) -> list[InstanceInfo]:
        return merge(self.registry.infos(), self.remote_instances())

    def invalidate(self) -> None:
        with self._lock:
            self._view_at = float("-inf")

    def on_peer_event(self, event: Any) -> None:
        """Any change in a peer (up, suspect, down, left, restarted) may move instances."""
        self.invalidate()

    def orphan(self, model: str) -> str | None:
        """Why a request for ``model`` cannot be served right now, when it names the
        instance of a coordinator that went (None otherwise)."""
        now = time.monotonic()
        with self._lock:
            for key in [k for k, o in self._orphans.items() if now - o[1] > ORPHAN_TTL_S]:
                del self._orphans[key]
            found = [info for info, _ in self._orphans.values() if info.answers_to(model)]
        if not found:
            return None
        return (
            f"the coordinator of {found[0].instance_id}, {_node(found[0])}, stopped answering; "
            "a node that holds one of its stages takes the instance over; retry shortly"
        )

    # -- routing ---------------------------------------------------------------------------

    def target(self, model: str, requested: str, forwarded: bool) -> InstanceInfo:
        """The instance a Generate goes to: this node's if one fits, else a peer's."""
        local = [i.info() for i in self.registry.matching(model)]
        me = self.daemon.node_id
        try:
            return pick_instance(local, requested, me)
        except (LookupError, EngineRefused, InstanceUnavailable):
            if forwarded:  # the peer that sent it found it here; answer from here only
                if not local:
                    raise Refusal(
                        Code.NOT_FOUND, f"model {model!r} is not launched on this node"
                    ) from None
                raise
        for fresh in (False, True):
            remote = [i for i in self.remote_instances(fresh=fresh) if i.answers_to(model)]
            try:
                return pick_instance(merge(local, remote), requested, me)
            except LookupError:
                if fresh:
                    if why := self.orphan(model):
                        raise Refusal(Code.UNAVAILABLE, why) from None
                    raise Refusal(Code.NOT_FOUND, self.not_launched(model)) from None
            except (EngineRefused, InstanceUnavailable):
                if fresh:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def not_launched(self, model: str) -> str:
        launched = sorted({i.model for i in self.cluster_instances()})
        hint = f"launched: {', '.join(launched)}" if launched else "nothing is launched"
        return (
            f"model {model!r} is not launched on this cluster ({hint}); launch it first: "
            f"macmesh launch {model} --node {self.daemon.client_address()}"
        )

    def open_relay(
        self, target: InstanceInfo, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Any:
        """Start the Generate on the instance's coordinator and wait until it accepted it;
        raises ``grpc.RpcError`` with the coordinator's status if it refused."""
        call = self.channels.stub(target.coordinator_address).Generate(
            request, timeout=remaining(context), metadata=peers.FORWARDED
        )
        context.add_callback(call.cancel)
        call.initial_metadata()  # the coordinator accepted it (or failed)
        if call.done() and call.code() is not Code.OK:
            call.cancel()
            details = call.details() or call.code().name
            if call.code() is Code.UNAVAILABLE and _lost_connection(details):
                self.invalidate()  # look again on the retry: a stage holder may take it over
                raise Refusal(
                    Code.UNAVAILABLE,
                    f"the coordinator of {target.instance_id}, {_node(target)}, is not "
                    f"reachable ({details}); retry shortly",
                )
            raise _Refused(call.code(), details)
        return call

    def relay(
        self, target: InstanceInfo, call: Any, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        """Relay an accepted call's messages and final status, as they come."""
        context.send_initial_metadata(())
        try:
            yield from call
        except grpc.RpcError as exc:
            if exc.code() is Code.UNAVAILABLE and _lost_connection(exc.details() or ""):
                context.abort(
                    Code.UNAVAILABLE,
                    f"the coordinator of {target.instance_id}, {_node(target)}, went away "
                    f"during the request ({exc.details()}); retry it",
                )
            abort(context, exc)
        finally:
            call.cancel()


_TRANSPORT_LOSS = (
    "Stream removed",
    "Socket closed",
    "Connection reset",
    "Connection refused",
    "failed to connect",
)


def _node(info: InstanceInfo) -> str:
    return f"node {info.coordinator_node_id[:8]} at {info.coordinator_address}"


def _lost_connection(details: str) -> bool:
    """gRPC's own words for a peer that vanished (not a status the peer sent)."""
    return any(words in details for words in _TRANSPORT_LOSS)


class _Refused(grpc.RpcError):
    """A coordinator's refusal, as the ``grpc.RpcError`` the rest of the path expects."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

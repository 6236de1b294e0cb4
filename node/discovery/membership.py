"""Membership: who this node is, which peers it dials, and what it knows about each.

Inputs: mDNS adverts, static peers, heartbeats and goodbyes received by the gRPC service, and the
answers to our own heartbeats. Output: the peer table (``cluster_view()``) and peer events for
subscribers. One thread ticks every 250 ms: it dials due targets (each every heartbeat interval),
advances liveness, and prunes targets nobody needs any more.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc

from node import __version__
from node.discovery import PROTOCOL_VERSION
from node.discovery.heartbeat import PeerDialer
from node.discovery.mdns import Advert, Network
from node.discovery.models import (
    NODE_ID_RE,
    ClusterNode,
    ClusterView,
    NodeInfo,
    PeerState,
    Resources,
    cluster_node,
    info_from_proto,
    info_to_proto,
    state_to_proto,
)
from node.discovery.once import Once
from node.discovery.peers import EventKind, Liveness, PeerEvent, PeerTable
from node.discovery.static import PeerAddress, format_address, parse_peer
from node.discovery.targets import TargetSet
from node.logging import get_logger
from node.proto.macmesh.v1 import node_pb2

log = get_logger(__name__)

TICK_S = 0.25
MAX_GOSSIP_REFS = 256  # per message: a hostile peer cannot make us dial the whole internet
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}

PeerListener = Callable[[PeerEvent], None]


class Rejected(Exception):
    """A request this node refuses; ``kind`` maps to a gRPC status in the service."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "invalid" | "mismatch" | "unavailable"
        self.message = message


@dataclass(frozen=True)
class LocalNode:
    node_id: str
    name: str
    cluster: str
    grpc_address: str
    incarnation: str
    started_unix_ms: int

    @classmethod
    def create(cls, node_id: str, name: str, cluster: str, grpc_address: str) -> LocalNode:
        return cls(
            node_id=node_id,
            name=name,
            cluster=cluster,
            grpc_address=grpc_address,
            incarnation=uuid.uuid4().hex[:16],
            started_unix_ms=int(time.time() * 1000),
        )


class Membership:
    def __init__(
        self,
        local: LocalNode,
        resources: Callable[[], Resources],
        *,
        liveness: Liveness | None = None,
        static_peers: Sequence[PeerAddress] = (),
        local_networks: Sequence[Network] = (),
    ) -> None:
        self.local = local
        self.liveness = liveness or Liveness()
        self._resources = resources
        self._local_networks = list(local_networks)
        self.table = PeerTable(local.node_id, local.name, self.liveness)
        self._targets = TargetSet(self.liveness.heartbeat_interval_s)
        self._dialer = PeerDialer(self.liveness.heartbeat_timeout_s)
        self._lock = threading.Lock()  # guards _targets and _adverts
        self._adverts: dict[str, tuple[str, str]] = {}  # mdns service name -> (address, node id)
        self._once = Once()
        self._listeners: list[PeerListener] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._leaving = False
        self._thread: threading.Thread | None = None
        now = time.monotonic()
        for peer in static_peers:
            self._targets.add(str(peer), "static", now)

    # -- identity ---------------------------------------------------------------------------

    def local_info(self) -> NodeInfo:
        return NodeInfo(
            node_id=self.local.node_id,
            name=self.local.name,
            cluster=self.local.cluster,
            protocol_version=PROTOCOL_VERSION,
            version=__version__,
            grpc_address=self.local.grpc_address,
            incarnation=self.local.incarnation,
            started_unix_ms=self.local.started_unix_ms,
            resources=self._resources(),
        )

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="membership", daemon=True)
        self._thread.start()

    def leave(self, timeout_s: float = 1.0) -> None:
        """Stop heartbeating and tell every reachable peer we are going (clean shutdown)."""
        self._leaving = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        request = node_pb2.GoodbyeRequest(
            node_id=self.local.node_id,
            incarnation=self.local.incarnation,
            cluster=self.local.cluster,
        )
        addresses = {v.address for v in self.table.snapshot() if v.state is not PeerState.DOWN}
        futures = []
        for address in sorted(addresses):
            try:
                futures.append((address, self._dialer.goodbye(address, request, timeout_s)))
            except Exception as exc:  # one bad peer must not stop the others' goodbyes
                log.debug("goodbye not sent", peer=address, error=str(exc))
        for address, future in futures:
            try:
                future.result()
            except grpc.RpcError as exc:
                log.debug("goodbye not delivered", peer=address, code=str(exc.code()))
        log.info("said goodbye", peers=len(futures))
        self._dialer.close()

    def subscribe(self, listener: PeerListener) -> None:
        """Call ``listener(event)`` on every peer event (up, suspect, down, left, ...).

        Listeners run on membership threads and must return quickly.
        """
        self._listeners.append(listener)

    # -- inputs -----------------------------------------------------------------------------

    def on_advert(self, advert: Advert) -> None:
        address = advert.grpc_address(self._local_networks)
        with self._lock:
            previous = self._adverts.get(advert.service_name)
            stale = None
            if previous is not None and previous[0] != address:
                old = self._targets.remove_mdns_name(advert.service_name)
                if old is not None and old.address not in self._targets:
                    stale = old.address
            self._adverts[advert.service_name] = (address, advert.node_id)
            is_new = self._targets.add(
                address,
                "mdns",
                time.monotonic(),
                expected_id=advert.node_id,
                mdns_name=advert.service_name,
            )
        if stale is not None:
            self._dialer.forget(stale)
        if is_new:
            log.debug("mdns advert", node=advert.name, node_id=advert.node_id, address=address)
            self._wake.set()

    def on_advert_removed(self, service_name: str) -> None:
        with self._lock:
            entry = self._adverts.pop(service_name, None)
            removed = self._targets.remove_mdns_name(service_name)
            dropped = self._targets.drop_node(entry[1]) if entry is not None else []
            if removed is not None and removed.address not in self._targets:
                dropped.append(removed.address)
        for address in dropped:
            self._dialer.forget(address)
        if entry is None:
            return
        event = self.table.remove(entry[1], reason="mdns goodbye")
        if event is not None:
            self._publish([event])

    def handle_heartbeat(
        self,
        sender: NodeInfo,
        known_peers: Iterable[node_pb2.PeerRef],
        observed_host: str,
    ) -> tuple[NodeInfo, list[node_pb2.PeerRef]]:
        """A peer heartbeated us: record it (the exchange confirms it) and answer with our info."""
        if self._leaving:
            raise Rejected("unavailable", "node is shutting down")
        self._check_compatible(sender)
        if sender.node_id == self.local.node_id:
            if sender.incarnation != self.local.incarnation:
                if self._once.first(("id conflict", sender.incarnation)):
                    log.warning(
                        "another daemon uses this node's id (copied state dir?)",
                        other_address=sender.grpc_address,
                    )
                raise Rejected("mismatch", f"node id {sender.node_id} is this node's own id")
            return self.local_info(), self._known_refs()
        address = self._inbound_address(sender, observed_host)
        events = self.table.record_exchange(
            sender, address=address, sources=("inbound",), outbound=False
        )
        now = time.monotonic()
        with self._lock:
            is_new = not self._targets.reaches(sender.node_id) and self._targets.add(
                address, "inbound", now, expected_id=sender.node_id
            )
        self._publish(events)
        self._learn(known_peers)
        if is_new:
            self._wake.set()
        return self.local_info(), self._known_refs()

    def handle_goodbye(self, node_id: str, incarnation: str, cluster: str) -> None:
        if cluster != self.local.cluster:
            raise Rejected("mismatch", f"cluster {cluster!r} is not {self.local.cluster!r}")
        if not NODE_ID_RE.match(node_id):
            raise Rejected("invalid", f"node id {node_id!r} is not a node id")
        event = self.table.remove(node_id, incarnation=incarnation, reason="goodbye")
        with self._lock:
            dropped = self._targets.drop_node(node_id)
        for address in dropped:
            self._dialer.forget(address)
        if event is not None:
            self._publish([event])

    # -- outputs ----------------------------------------------------------------------------

    def cluster_view(self, queried: str = "") -> ClusterView:
        info = self.local_info()
        nodes: list[ClusterNode] = [
            cluster_node(
                info,
                address=info.grpc_address,
                state=PeerState.UP,
                local=True,
                seconds_since_seen=0.0,
                last_seen_unix_ms=int(time.time() * 1000),
                sources=[],
            )
        ]
        for view in self.table.snapshot():
            nodes.append(
                cluster_node(
                    view.info,
                    address=view.address,
                    state=view.state,
                    local=False,
                    seconds_since_seen=round(view.silent_s, 3),
                    last_seen_unix_ms=int(view.last_seen_wall * 1000),
                    sources=list(view.sources),
                )
            )
        return ClusterView(
            cluster=self.local.cluster, queried=queried or info.grpc_address, nodes=nodes
        )

    def cluster_view_proto(self) -> node_pb2.ClusterViewResponse:
        peers = [
            node_pb2.PeerStatus(
                info=info_to_proto(v.info),
                state=state_to_proto(v.state),
                seconds_since_seen=round(v.silent_s, 3),
                last_seen_unix_ms=int(v.last_seen_wall * 1000),
                sources=list(v.sources),
                address=v.address,
            )
            for v in self.table.snapshot()
        ]
        return node_pb2.ClusterViewResponse(local=info_to_proto(self.local_info()), peers=peers)

    def target_addresses(self) -> list[str]:
        with self._lock:
            return self._targets.addresses()

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # the loop must survive anything; log and carry on
                log.exception("membership tick failed")
            with self._lock:
                next_due = self._targets.next_due()
            wait = TICK_S if next_due is None else next_due - time.monotonic()
            self._wake.wait(timeout=min(TICK_S, max(0.0, wait)))
            self._wake.clear()

    def _tick(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = self._targets.due(now)
            pruned = self._targets.prune(now)
        for address in pruned:
            self._dialer.forget(address)
            self._once.forget((address, "unreachable"))
        if due:
            request = node_pb2.HeartbeatRequest(
                sender=info_to_proto(self.local_info()), known_peers=self._known_refs()
            )
            for target in due:
                try:
                    self._dialer.heartbeat(target.address, request, self._on_response)
                except Exception as exc:  # e.g. an address gRPC cannot parse
                    with self._lock:
                        self._targets.completed(target.address, now, ok=False)
                    if self._once.first((target.address, "undialable")):
                        log.warning("cannot dial peer", peer=target.address, error=str(exc))
        self._publish(self.table.tick())

    def _on_response(self, address: str, future: grpc.Future) -> None:
        try:
            self._handle_response(address, future)
        except Exception:  # runs on a gRPC thread: never let it raise
            log.exception("handling heartbeat response failed", peer=address)

    def _handle_response(self, address: str, future: grpc.Future) -> None:
        now = time.monotonic()
        try:
            response = future.result()
            info = info_from_proto(response.receiver)
            self._check_compatible(info)
        except grpc.RpcError as exc:
            self._failed(address, now, f"{exc.code().name}: {exc.details()}")
            return
        except (ValueError, Rejected) as exc:
            self._failed(address, now, str(exc))
            return
        with self._lock:
            target = self._targets.completed(address, now, node_id=info.node_id, ok=True)
            sources = tuple(sorted(target.sources)) if target is not None else ("gossip",)
            expected = target.expected_id if target is not None else ""
            if target is not None and info.node_id == self.local.node_id:
                target.is_self = info.incarnation == self.local.incarnation
        self._once.forget((address, "unreachable"))  # a later outage is news again
        if info.node_id == self.local.node_id:
            if info.incarnation != self.local.incarnation:
                if self._once.first(("id conflict", info.incarnation)):
                    log.warning(
                        "another daemon uses this node's id (copied state dir?)", peer=address
                    )
            elif self._once.first((address, "self")):
                log.info("peer address is this node itself; not dialling it", peer=address)
            return
        if (
            expected
            and expected != info.node_id
            and self._once.first((address, "id", info.node_id))
        ):
            log.warning(
                "advertised node id differs from the node that answered",
                peer=address,
                advertised=expected,
                answered=info.node_id,
            )
        events = self.table.record_exchange(info, address=address, sources=sources, outbound=True)
        self._publish(events)
        self._learn(response.known_peers)

    def _failed(self, address: str, now: float, reason: str) -> None:
        with self._lock:
            target = self._targets.completed(address, now, ok=False)
        if target is None:
            return
        if self._once.first((address, "unreachable")):
            # Static peers and adverts are worth a line; a gossiped or inbound address that
            # stops answering is usually a node that just left.
            report = log.debug if target.transient else log.info
            report(
                "peer not answering heartbeats"
                + ("" if target.transient else "; will keep trying"),
                peer=address,
                via=",".join(sorted(target.sources)),
                reason=reason,
            )

    # -- helpers ----------------------------------------------------------------------------

    def _check_compatible(self, info: NodeInfo) -> None:
        if info.protocol_version != PROTOCOL_VERSION:
            if self._once.first(("protocol", info.node_id, info.protocol_version)):
                log.warning(
                    "ignoring node with another protocol version",
                    node=info.name,
                    node_id=info.node_id,
                    theirs=info.protocol_version,
                    ours=PROTOCOL_VERSION,
                )
            raise Rejected(
                "mismatch",
                f"protocol version {info.protocol_version} is not {PROTOCOL_VERSION}",
            )
        if info.cluster != self.local.cluster:
            if self._once.first(("cluster", info.node_id, info.cluster)):
                log.info(
                    "ignoring node of another cluster",
                    node=info.name,
                    node_id=info.node_id,
                    cluster=info.cluster,
                )
            raise Rejected(
                "mismatch", f"cluster {info.cluster!r} is not this node's {self.local.cluster!r}"
            )

    def _inbound_address(self, sender: NodeInfo, observed_host: str) -> str:
        """Where to dial a peer that dialled us: its own address, or the address the packet
        came from when the peer did not say (or listens on a wildcard)."""
        try:
            declared = parse_peer(sender.grpc_address)
        except ValueError:
            raise Rejected(
                "invalid", f"sender grpc_address {sender.grpc_address!r} is not HOST:PORT"
            ) from None
        if declared.host in _WILDCARD_HOSTS and observed_host:
            return format_address(observed_host, declared.port)
        return str(declared)

    def _known_refs(self) -> list[node_pb2.PeerRef]:
        return [
            node_pb2.PeerRef(node_id=v.info.node_id, grpc_address=v.address)
            for v in self.table.up()
        ]

    def _learn(self, refs: Iterable[node_pb2.PeerRef]) -> None:
        """Dial peers a peer knows and we do not (gossip), so one seed is enough."""
        added = False
        now = time.monotonic()
        for i, ref in enumerate(refs):
            if i >= MAX_GOSSIP_REFS:
                break
            if ref.node_id == self.local.node_id or not NODE_ID_RE.match(ref.node_id):
                continue
            if self.table.state_of(ref.node_id) in (PeerState.UP, PeerState.SUSPECT):
                continue
            try:
                address = str(parse_peer(ref.grpc_address))
            except ValueError:
                continue
            with self._lock:
                added |= self._targets.add(address, "gossip", now, expected_id=ref.node_id)
        if added:
            self._wake.set()

    def _publish(self, events: list[PeerEvent]) -> None:
        for event in events:
            self._log_event(event)
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:
                    log.exception("peer listener failed", event=event.kind)

    def _log_event(self, e: PeerEvent) -> None:
        fields = {"node": e.name, "node_id": e.node_id, "address": e.address, "detail": e.detail}
        if e.kind is EventKind.DUPLICATE_NAME:
            if self._once.first(("dup", e.name, e.node_id)):
                log.warning("duplicate node name (ids tell the nodes apart)", **fields)
        elif e.kind in (EventKind.SUSPECT, EventKind.DOWN):
            log.warning(f"peer {e.kind}", **fields)
        else:
            log.info(f"peer {e.kind}", **fields)

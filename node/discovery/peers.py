"""The peer table and its liveness state machine. Pure logic: time comes in through a clock.

A peer enters the table only through a heartbeat exchange (in either direction) that carried its
NodeInfo and resources: an mDNS advert or a ``--peer`` address alone proves nothing. From then on

    up  --silent 3 s-->  suspect  --silent 5 s-->  down  --silent forget_after-->  (forgotten)
     ^                      |                        |
     +----- any exchange ---+------------------------+

and a goodbye (RPC or mDNS) removes it at once. A node that restarts keeps its id, so it lands
on its old row; its new ``incarnation`` tells the restart from a late packet of the old process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from node.discovery.models import NodeInfo, PeerState


@dataclass(frozen=True)
class Liveness:
    """How often peers talk and how long silence is tolerated (the issue fixes 1 s / 3 s / 5 s)."""

    heartbeat_interval_s: float = 1.0
    suspect_after_s: float = 3.0
    down_after_s: float = 5.0
    forget_after_s: float = 600.0
    heartbeat_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval_s < self.suspect_after_s < self.down_after_s:
            raise ValueError(
                "liveness needs 0 < heartbeat_interval_s < suspect_after_s < down_after_s, got "
                f"{self.heartbeat_interval_s}, {self.suspect_after_s}, {self.down_after_s}"
            )

    def state_for(self, silent_s: float) -> PeerState:
        if silent_s >= self.down_after_s:
            return PeerState.DOWN
        if silent_s >= self.suspect_after_s:
            return PeerState.SUSPECT
        return PeerState.UP


class EventKind(StrEnum):
    UP = "up"  # first exchange, or an exchange after suspect/down
    SUSPECT = "suspect"
    DOWN = "down"
    LEFT = "left"  # goodbye received
    FORGOTTEN = "forgotten"  # down for forget_after_s
    RESTARTED = "restarted"  # same id, new incarnation
    DUPLICATE_NAME = "duplicate_name"  # another node (or this one) has the same name


@dataclass(frozen=True)
class PeerEvent:
    kind: EventKind
    node_id: str
    name: str
    address: str
    detail: str = ""


@dataclass
class Peer:
    info: NodeInfo
    address: str
    sources: set[str]
    last_seen: float
    last_seen_wall: float
    state: PeerState = PeerState.UP


@dataclass(frozen=True)
class PeerView:
    """A consistent copy of one row, with the state computed at the time of the copy."""

    info: NodeInfo
    address: str
    state: PeerState
    silent_s: float
    last_seen_wall: float
    sources: tuple[str, ...]


@dataclass
class PeerTable:
    local_id: str
    local_name: str
    liveness: Liveness = field(default_factory=Liveness)
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self._peers: dict[str, Peer] = {}
        # node id -> incarnation that said goodbye; packets from that incarnation are stale.
        self._departed: dict[str, str] = {}
        self._lock = threading.RLock()

    def record_exchange(
        self, info: NodeInfo, *, address: str, sources: Iterable[str], outbound: bool
    ) -> list[PeerEvent]:
        """A heartbeat exchange with ``info`` succeeded; ``outbound`` means we dialled ``address``.

        Returns what changed (possibly nothing). Exchanges with ourselves, and with an incarnation
        that already said goodbye, are ignored.
        """
        if info.node_id == self.local_id:
            return []
        with self._lock:
            if info.incarnation and self._departed.get(info.node_id) == info.incarnation:
                return []
            now, wall = self.clock(), self.wall_clock()
            peer = self._peers.get(info.node_id)
            events: list[PeerEvent] = []
            if peer is None:
                peer = Peer(info, address, set(sources), now, wall)
                self._peers[info.node_id] = peer
                self._departed.pop(info.node_id, None)
                events.append(self._event(EventKind.UP, peer, "joined"))
                events.extend(self._duplicate_name_events(info))
                return events
            previous_state = self._state(peer, now)
            if peer.info.incarnation != info.incarnation and info.incarnation:
                self._departed.pop(info.node_id, None)
                events.append(self._event(EventKind.RESTARTED, peer, "new incarnation"))
            renamed = peer.info.name != info.name
            peer.info = info
            peer.sources.update(sources)
            # The address we dialled and got an answer from beats what the peer says about itself.
            if outbound or not peer.address:
                peer.address = address
            peer.last_seen, peer.last_seen_wall = now, wall
            was = previous_state if previous_state is not PeerState.UP else peer.state
            if was is not PeerState.UP:
                peer.state = PeerState.UP
                events.append(self._event(EventKind.UP, peer, f"recovered from {was}"))
            if renamed:
                events.extend(self._duplicate_name_events(info))
            return events

    def remove(self, node_id: str, *, incarnation: str = "", reason: str) -> PeerEvent | None:
        """Drop a peer at once (goodbye). With an incarnation, a newer one is left alone."""
        with self._lock:
            if incarnation:
                self._departed[node_id] = incarnation
            peer = self._peers.get(node_id)
            if peer is None:
                return None
            if incarnation and peer.info.incarnation and peer.info.incarnation != incarnation:
                return None  # the goodbye is from a previous life; the node is back already
            del self._peers[node_id]
            return self._event(EventKind.LEFT, peer, reason)

    def tick(self) -> list[PeerEvent]:
        """Advance states by elapsed time; return the transitions (suspect, down, forgotten)."""
        with self._lock:
            now = self.clock()
            events: list[PeerEvent] = []
            for node_id, peer in list(self._peers.items()):
                state = self._state(peer, now)
                if now - peer.last_seen >= self.liveness.forget_after_s:
                    del self._peers[node_id]
                    events.append(self._event(EventKind.FORGOTTEN, peer, "down too long"))
                elif state is not peer.state:
                    peer.state = state
                    kind = EventKind.DOWN if state is PeerState.DOWN else EventKind.SUSPECT
                    events.append(self._event(kind, peer, f"silent {now - peer.last_seen:.1f} s"))
            return events

    def state_of(self, node_id: str) -> PeerState | None:
        with self._lock:
            peer = self._peers.get(node_id)
            return None if peer is None else self._state(peer, self.clock())

    def snapshot(self) -> list[PeerView]:
        """Every row, ordered by name then id, with states computed now (not at the last tick)."""
        with self._lock:
            now = self.clock()
            views = [
                PeerView(
                    info=p.info,
                    address=p.address,
                    state=self._state(p, now),
                    silent_s=max(0.0, now - p.last_seen),
                    last_seen_wall=p.last_seen_wall,
                    sources=tuple(sorted(p.sources)),
                )
                for p in self._peers.values()
            ]
        return sorted(views, key=lambda v: (v.info.name, v.info.node_id))

    def up(self) -> list[PeerView]:
        return [v for v in self.snapshot() if v.state is PeerState.UP]

    def _state(self, peer: Peer, now: float) -> PeerState:
        return self.liveness.state_for(now - peer.last_seen)

    def _duplicate_name_events(self, info: NodeInfo) -> list[PeerEvent]:
        same = sorted(
            p.info.node_id
            for p in self._peers.values()
            if p.info.name == info.name and p.info.node_id != info.node_id
        )
        if info.name == self.local_name:
            same.append(f"{self.local_id} (this node)")
        if not same:
            return []
        peer = self._peers[info.node_id]
        return [self._event(EventKind.DUPLICATE_NAME, peer, "also used by " + ", ".join(same))]

    @staticmethod
    def _event(kind: EventKind, peer: Peer, detail: str) -> PeerEvent:
        return PeerEvent(kind, peer.info.node_id, peer.info.name, peer.address, detail)

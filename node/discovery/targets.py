"""The addresses a node dials every heartbeat, and why. Pure bookkeeping; no sockets here.

Sources of an address:
- ``static``: ``--peer``; dialled for as long as the daemon runs.
- ``mdns``: an advert of our cluster; dialled until the advert goes away.
- ``inbound``: a peer that heartbeated us (so we also watch it ourselves).
- ``gossip``: named by a peer as one of its live peers.
The last two are transient: dropped after ``transient_ttl_s`` without an answer, so a departed
node is not dialled forever. A target is never dialled twice at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PERMANENT_SOURCES = frozenset({"static", "mdns"})
TRANSIENT_SOURCES = frozenset({"inbound", "gossip"})
# A cluster is a handful of Macs; this bounds what a misbehaving peer's gossip can make us dial.
MAX_TRANSIENT_TARGETS = 256


@dataclass
class Target:
    address: str
    sources: set[str]
    added_at: float
    expected_id: str = ""  # from the advert or gossip; "" for static peers
    node_id: str = ""  # who actually answered last
    mdns_names: set[str] = field(default_factory=set)
    last_ok: float | None = None
    next_due: float = 0.0
    in_flight: bool = False
    failures: int = 0
    is_self: bool = False  # answered with our own id: a --peer pointing at this node

    @property
    def transient(self) -> bool:
        return not (self.sources & PERMANENT_SOURCES)


class TargetSet:
    def __init__(self, interval_s: float, transient_ttl_s: float = 30.0) -> None:
        self._targets: dict[str, Target] = {}
        self._interval_s = interval_s
        self._transient_ttl_s = transient_ttl_s

    def __contains__(self, address: str) -> bool:
        return address in self._targets

    def __len__(self) -> int:
        return len(self._targets)

    def get(self, address: str) -> Target | None:
        return self._targets.get(address)

    def add(
        self, address: str, source: str, now: float, *, expected_id: str = "", mdns_name: str = ""
    ) -> bool:
        """Add (or re-source) a target; True when the address is new and should be dialled now."""
        target = self._targets.get(address)
        is_new = target is None
        if target is None:
            if source in TRANSIENT_SOURCES and self._transient_count() >= MAX_TRANSIENT_TARGETS:
                return False
            target = Target(address, set(), now, next_due=now)
            self._targets[address] = target
        target.sources.add(source)
        if expected_id:
            target.expected_id = expected_id
        if mdns_name:
            target.mdns_names.add(mdns_name)
        return is_new

    def _transient_count(self) -> int:
        return sum(t.transient for t in self._targets.values())

    def remove_mdns_name(self, name: str) -> Target | None:
        """The advert ``name`` went away; drop its target unless something else still needs it."""
        for target in list(self._targets.values()):
            if name in target.mdns_names:
                target.mdns_names.discard(name)
                if not target.mdns_names:
                    target.sources.discard("mdns")
                if not target.sources:
                    del self._targets[target.address]
                return target
        return None

    def drop_node(self, node_id: str) -> list[str]:
        """``node_id`` left: stop dialling it because of inbound/gossip (static and mDNS stay, so
        a restart is found). Return the addresses no longer dialled at all."""
        dropped = []
        for target in list(self._targets.values()):
            if node_id in (target.node_id, target.expected_id):
                target.sources -= TRANSIENT_SOURCES
                if not target.sources:
                    del self._targets[target.address]
                    dropped.append(target.address)
        return dropped

    def reaches(self, node_id: str) -> bool:
        """Some target answered as ``node_id`` at its last attempt."""
        return any(t.node_id == node_id and t.failures == 0 for t in self._targets.values())

    def due(self, now: float) -> list[Target]:
        """Targets to dial now; they are marked in flight until ``completed``."""
        ready = [
            t
            for t in self._targets.values()
            if not t.in_flight and not t.is_self and t.next_due <= now
        ]
        for target in ready:
            target.in_flight = True
            target.next_due = now + self._interval_s
        return ready

    def completed(self, address: str, now: float, *, node_id: str = "", ok: bool) -> Target | None:
        target = self._targets.get(address)
        if target is None:
            return None
        target.in_flight = False
        if ok:
            target.last_ok, target.failures, target.node_id = now, 0, node_id
        else:
            target.failures += 1
        return target

    def prune(self, now: float) -> list[str]:
        """Drop transient targets that have not answered for ``transient_ttl_s``."""
        stale = [
            t.address
            for t in self._targets.values()
            if t.transient
            and not t.in_flight
            and now - (t.last_ok if t.last_ok is not None else t.added_at) > self._transient_ttl_s
        ]
        for address in stale:
            del self._targets[address]
        return stale

    def next_due(self) -> float | None:
        pending = [t.next_due for t in self._targets.values() if not t.in_flight and not t.is_self]
        return min(pending) if pending else None

    def addresses(self) -> list[str]:
        return sorted(self._targets)

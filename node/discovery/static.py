"""Static peers (``--peer HOST:PORT``) for networks where multicast is blocked.

A static peer is dialled every heartbeat for as long as the daemon runs, whether it answers or
not, so a node that starts later (or restarts) is found without mDNS. One reachable static peer is
enough: heartbeats carry the peers each side knows, so the rest of the cluster follows.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class PeerAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return format_address(self.host, self.port)


def format_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed as gRPC expects."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_peer(text: str) -> PeerAddress:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT``; ``ValueError`` names the bad value."""
    raw = text.strip()
    host, sep, port_text = raw.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"peer {text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"peer {text!r}: write IPv6 addresses as [ADDR]:PORT")
    if not sep or not host:
        raise ValueError(f"peer {text!r} is not HOST:PORT")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"peer {text!r}: port {port_text!r} is not 1-65535")
    if any(c.isspace() for c in host):
        raise ValueError(f"peer {text!r}: host {host!r} contains whitespace")
    return PeerAddress(host, int(port_text))


def parse_peers(texts: list[str]) -> list[PeerAddress]:
    """Parse and de-duplicate, keeping the order given."""
    seen: dict[PeerAddress, None] = {}
    for text in texts:
        seen.setdefault(parse_peer(text), None)
    return list(seen)

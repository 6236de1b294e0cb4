"""Advertise this node as ``_macmesh._tcp.local.`` and browse for the others (python-zeroconf).

TXT record: ``id`` (node id), ``name``, ``cluster``, ``proto`` (protocol version), ``port`` (gRPC
port, also in the SRV record) and ``ver`` (package version). Adverts of other clusters, other
protocol versions, and malformed adverts are logged once per advert and ignored; the ones that
pass are handed to ``on_advert``, which only makes their address a heartbeat target: nothing is
trusted until the node answers a heartbeat.

Zeroconf calls handlers on its own event-loop thread, which must not block, so resolving an advert
(``ServiceInfo.request``) happens on a small worker pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from zeroconf import (
    InterfaceChoice,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
    get_all_addresses,
)

from node.discovery import PROTOCOL_VERSION, SERVICE_TYPE
from node.discovery.models import NODE_ID_RE, NodeInfo
from node.discovery.once import Once
from node.discovery.static import format_address
from node.logging import get_logger

log = get_logger(__name__)

RESOLVE_TIMEOUT_MS = 2000
MAX_INSTANCE_BYTES = 63  # DNS label limit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AdvertError(ValueError):
    """An advert this node cannot use; the message says why."""


@dataclass(frozen=True)
class Advert:
    service_name: str
    node_id: str
    name: str
    cluster: str
    protocol_version: int
    grpc_port: int
    version: str
    addresses: tuple[str, ...]

    def grpc_address(self, local_networks: Sequence[Network] = ()) -> str:
        """The address to dial: the first advertised address on one of our own networks (a Mac
        often advertises Wi-Fi, Ethernet and Thunderbolt-bridge addresses; only some are
        reachable from here), else the first non-loopback one."""
        parsed = [ipaddress.ip_address(a) for a in self.addresses]
        on_link = [a for a in parsed if any(a in net for net in local_networks)]
        routable = [a for a in parsed if not a.is_loopback]
        host = (on_link or routable or parsed)[0]
        return format_address(str(host), self.grpc_port)


def local_networks(interface: str | None) -> list[Network]:
    """The networks this host is on (only the interface's, when one is chosen)."""
    import psutil

    networks: list[Network] = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family not in (socket.AF_INET, socket.AF_INET6) or not addr.netmask:
                continue
            host = addr.address.split("%")[0]
            try:
                net = ipaddress.ip_network(f"{host}/{addr.netmask}", strict=False)
            except ValueError:
                continue
            if interface is None or ipaddress.ip_address(interface) in net:
                networks.append(net)
    return networks


def instance_name(name: str, node_id: str) -> str:
    """``<name>-<id prefix>``: unique per node even when names repeat, at most one DNS label."""
    suffix = "-" + node_id[:8]
    # Dots would split the instance into several labels; keep it one label.
    base = name.replace(".", "-").strip() or "node"
    encoded = base.encode()[: MAX_INSTANCE_BYTES - len(suffix)]
    return encoded.decode(errors="ignore") + suffix


def build_txt(info: NodeInfo, grpc_port: int) -> dict[str, str]:
    return {
        "id": info.node_id,
        "name": info.name,
        "cluster": info.cluster,
        "proto": str(info.protocol_version),
        "port": str(grpc_port),
        "ver": info.version,
    }


def parse_advert(
    service_name: str,
    properties: Mapping[bytes, bytes | None],
    addresses: list[str],
    srv_port: int | None,
) -> Advert:
    """Validate a resolved advert; ``AdvertError`` says what is wrong with it."""
    txt: dict[str, str] = {}
    for raw_key, raw_value in properties.items():
        try:
            key = raw_key.decode("utf-8")
            value = raw_value.decode("utf-8") if raw_value is not None else ""
        except (UnicodeDecodeError, AttributeError):
            raise AdvertError(f"TXT entry {raw_key!r} is not UTF-8") from None
        txt[key] = value
    missing = [k for k in ("id", "name", "cluster", "proto", "port") if not txt.get(k)]
    if missing:
        raise AdvertError(f"TXT record lacks {', '.join(missing)} (has {sorted(txt)})")
    if not txt["proto"].isdigit():
        raise AdvertError(f"TXT proto={txt['proto']!r} is not a number")
    if not NODE_ID_RE.match(txt["id"]):
        raise AdvertError(f"TXT id={txt['id']!r} is not a node id")
    if not txt["port"].isdigit() or not 0 < int(txt["port"]) < 65536:
        raise AdvertError(f"TXT port={txt['port']!r} is not a port")
    port = int(txt["port"])
    if srv_port is not None and srv_port != port:
        raise AdvertError(f"TXT port {port} disagrees with SRV port {srv_port}")
    if not addresses:
        raise AdvertError("advert has no address")
    return Advert(
        service_name=service_name,
        node_id=txt["id"],
        name=txt["name"],
        cluster=txt["cluster"],
        protocol_version=int(txt["proto"]),
        grpc_port=port,
        version=txt.get("ver", ""),
        addresses=tuple(addresses),
    )


def advertised_addresses(interface: str | None) -> list[str]:
    """The addresses to put in our A records: the chosen interface, or every non-loopback IPv4."""
    if interface:
        return [interface]
    found = [a for a in get_all_addresses() if not ipaddress.ip_address(a).is_loopback]
    return found or ["127.0.0.1"]


class MdnsDiscovery:
    """One zeroconf instance that advertises this node and browses for its cluster."""

    def __init__(
        self,
        *,
        local_id: str,
        cluster: str,
        interface: str | None,
        on_advert: Callable[[Advert], None],
        on_removed: Callable[[str], None],
    ) -> None:
        self._local_id = local_id
        self._cluster = cluster
        self._interface = interface
        self._on_advert = on_advert
        self._on_removed = on_removed
        self._once = Once()
        self._zc: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None
        self._info: ServiceInfo | None = None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mdns-resolve")
        self._accepted: set[str] = set()  # service names handed to on_advert
        self._closed = False

    def start(self, info: NodeInfo, grpc_port: int) -> None:
        version = IPVersion.V4Only
        if self._interface and ipaddress.ip_address(self._interface).version == 6:
            version = IPVersion.V6Only
        interfaces = [self._interface] if self._interface else InterfaceChoice.All
        self._zc = Zeroconf(interfaces=interfaces, ip_version=version)
        addresses = advertised_addresses(self._interface)
        instance = instance_name(info.name, info.node_id)
        self._info = ServiceInfo(
            SERVICE_TYPE,
            f"{instance}.{SERVICE_TYPE}",
            port=grpc_port,
            properties=build_txt(info, grpc_port),
            server=f"macmesh-{info.node_id[:12]}.local.",
            parsed_addresses=addresses,
        )
        # No probing: the instance name embeds the node id, so two nodes never claim one name,
        # and skipping the ~1.5 s probe lets a cluster form in well under the 3 s budget. The
        # records are in place when this returns; the announcements go out in the background
        # (register_service would block ~0.5 s for them).
        assert self._zc.loop is not None
        asyncio.run_coroutine_threadsafe(
            self._zc.async_register_service(self._info, cooperating_responders=True),
            self._zc.loop,
        ).result(timeout=5)
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])
        log.info("mdns advertising", service=self._info.name, addresses=addresses, port=grpc_port)

    def close(self) -> None:
        """Send mDNS goodbyes (TTL 0) and stop browsing."""
        self._closed = True
        if self._browser is not None:
            self._browser.cancel()
        if self._zc is not None:
            try:
                self._zc.unregister_all_services()
            finally:
                self._zc.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- browsing ---------------------------------------------------------------------------

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if self._closed:
            return
        if state_change is ServiceStateChange.Removed:
            if name in self._accepted:
                self._accepted.discard(name)
                self._safely(self._on_removed, name)
            return
        with contextlib.suppress(RuntimeError):  # pool shut down while closing
            self._pool.submit(self._resolve, name)

    def _resolve(self, name: str) -> None:
        if self._closed or self._zc is None:
            return
        info = ServiceInfo(SERVICE_TYPE, name)
        if not info.request(self._zc, RESOLVE_TIMEOUT_MS):
            if self._once.first((name, "unresolved")):
                log.info("ignoring mdns advert that does not resolve", service=name)
            return
        family = IPVersion.V6Only if self._ipv6 else IPVersion.V4Only
        try:
            advert = parse_advert(
                name, info.properties or {}, info.parsed_addresses(family), info.port
            )
        except AdvertError as exc:
            if self._once.first((name, "malformed", str(exc))):
                log.warning("ignoring malformed mdns advert", service=name, reason=str(exc))
            return
        if advert.node_id == self._local_id:
            ours = self._info is not None and name == self._info.name
            if not ours and self._once.first((name, "our id")):
                log.warning(
                    "another advert claims this node's id (copied state dir?)", service=name
                )
            return
        if advert.protocol_version != PROTOCOL_VERSION:
            if self._once.first((name, "protocol", advert.protocol_version)):
                log.warning(
                    "ignoring node with another protocol version",
                    service=name,
                    node=advert.name,
                    theirs=advert.protocol_version,
                    ours=PROTOCOL_VERSION,
                )
            return
        if advert.cluster != self._cluster:
            if self._once.first((name, "cluster", advert.cluster)):
                log.info(
                    "ignoring node of another cluster",
                    service=name,
                    node=advert.name,
                    cluster=advert.cluster,
                )
            return
        self._accepted.add(name)
        self._safely(self._on_advert, advert)

    @property
    def _ipv6(self) -> bool:
        return bool(self._interface) and ipaddress.ip_address(self._interface).version == 6

    @staticmethod
    def _safely(fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:  # a bug in a callback must not kill zeroconf's thread
            log.exception("mdns callback failed")


def resolve_interface(value: str) -> str:
    """``--interface`` accepts an IP address or an interface name (``en0``); return the address."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    import psutil

    addrs = psutil.net_if_addrs().get(value)
    if not addrs:
        raise ValueError(f"interface {value!r} is neither an IP address nor a network interface")
    for family in (socket.AF_INET, socket.AF_INET6):
        for addr in addrs:
            if addr.family == family:
                return addr.address.split("%")[0]
    raise ValueError(f"interface {value!r} has no IP address")

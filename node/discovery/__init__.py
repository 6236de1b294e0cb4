"""Discovery and membership: nodes find each other over mDNS (or static peers) and know who is alive.

- ``identity``: the stable node id persisted in the state dir.
- ``resources``: memory, chip, bandwidth, OS and MLX device, read from the machine.
- ``mdns``: advertise ``_macmesh._tcp.local.`` and browse for peers.
- ``static``: ``--peer HOST:PORT`` parsing.
- ``peers``: the peer table and its liveness state machine (pure logic).
- ``heartbeat``: the loop that confirms peers over gRPC every second.
- ``service``: the NodeService gRPC servicer.
- ``client``: functions to ask any daemon about the cluster.
- ``membership``: who this node is, which peers it dials, and what it knows about each.
- ``targets``: the addresses dialled every heartbeat, and why (pure).
- ``models``: typed membership messages and their ``node.proto`` conversion.
- ``once``: log a repeated bad advert once.
"""

from __future__ import annotations

# Bumped when nodes of different versions can no longer talk; adverts and heartbeats with another
# version are ignored.
PROTOCOL_VERSION = 1
SERVICE_TYPE = "_macmesh._tcp.local."

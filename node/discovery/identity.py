"""A node's stable identity, persisted in its state directory.

The id survives restarts so a node that comes back recovers its place in every peer table. The
state directory is locked while a daemon runs: two daemons sharing one directory would share one
id, and peers could not tell them apart.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from pathlib import Path

from node.discovery.models import NODE_ID_RE
from node.logging import get_logger

log = get_logger(__name__)

NODE_ID_FILE = "node_id"
LOCK_FILE = "daemon.lock"


class StateDirInUse(RuntimeError):
    """Another daemon holds the state directory."""


def load_or_create_node_id(state_dir: Path) -> str:
    """Return the id stored in ``state_dir/node_id``, creating it (atomically) on first use."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / NODE_ID_FILE
    if path.exists():
        stored = path.read_text(encoding="utf-8", errors="replace").strip()
        if NODE_ID_RE.match(stored):
            return stored
        # A corrupt id is kept aside rather than deleted, so a human can see what happened.
        backup = path.with_name(NODE_ID_FILE + ".corrupt")
        path.replace(backup)
        log.warning(
            "node id file was not a valid id; made a new one", path=str(path), kept=str(backup)
        )
    node_id = uuid.uuid4().hex
    tmp = path.with_name(f".{NODE_ID_FILE}.{os.getpid()}.tmp")
    tmp.write_text(node_id + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return node_id


class StateDirLock:
    """An exclusive advisory lock on ``state_dir/daemon.lock``, released on close or process exit."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateDirInUse(
                f"state dir {str(self.path.parent)!r} is in use by another macmesh daemon "
                f"(pid {holder}); give this one its own --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

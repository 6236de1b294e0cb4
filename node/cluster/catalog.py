"""What models this node can name, and where a MODEL's files are: a thin layer over the one
resolver (``node.placement.resolve``), which decides what MODEL means everywhere.

``locate`` gives the coordinator the card the planner needs, the local checkpoint to load and
the name the other nodes are told to load (a name under a models directory, ``repo@commit`` for
a hub snapshot, an absolute path otherwise); ``checkpoint_resolver`` is how a stage node turns
that name back into its own files. ``list_models`` is ``macmesh models`` / ``ListModels``:
the checkpoints here, the hub cache, the shipped cards, and every launched instance under the
name a client must send. Reads headers only, never tensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from node.logging import get_logger
from node.placement import ModelCard, card_from_checkpoint, registry
from node.placement.errors import PlacementError
from node.placement.resolve import (
    BUNDLED,
    BUNDLED_MODELS_DIR,
    HUB_CACHE,
    Found,
    NoCheckpointError,
    checkpoint_resolver,
    download_candidates,
    find_files,
    local_checkpoints,
    resolve,
)

log = get_logger(__name__)

__all__ = ["Located", "ModelEntry", "NoCheckpointError", "checkpoint_resolver", "list_models"]


class NativeMtpCapability(BaseModel):
    default_k: int
    max_k: int


class ModelEntry(BaseModel):
    """One row of ``macmesh models`` / ``ListModels``."""

    id: str  # the name a client sends (GenerateRequest.model, the OpenAI "model")
    model_type: str
    num_layers: int
    bytes: int
    context_length: int
    native_mtp: NativeMtpCapability | None
    source: str  # checkpoint | bundled | hub_cache | card | instance
    checkpoint: str | None = None  # the directory, when the weights are on this node
    has_weights: bool = False  # the weights are on this node (or the instance is launched)
    download_from: list[str] = []  # repos `macmesh pull` can fetch the weights from
    mtp_note: str = ""  # why native MTP is unavailable, or where the head comes from
    note: str = ""
    launched: bool = False


@dataclass(frozen=True)
class Located:
    card: ModelCard
    checkpoint: Path
    remote_name: str  # what LoadShard is told; every node resolves it the same way
    found: Found | None = None


def locate(model: str, models_dir: Path | None) -> Located:
    """Card, local checkpoint and remote name for MODEL. ``UnknownModelError`` when MODEL is
    nothing known; ``NoCheckpointError`` when it is a card whose weights are not here."""
    resolved = resolve(model, models_dir)
    found = resolved.require_files(models_dir)
    return Located(resolved.card, found.checkpoint, found.remote_name, found)


def resolve_checkpoint_name(model: str, models_dir: Path | None) -> Path | None:
    """MODEL's checkpoint directory on this node, or None (the resolver's order)."""
    found = find_files(model, models_dir)
    return found.checkpoint if found else None


def mtp_status(card: ModelCard, checkpoint: Path | None) -> tuple[NativeMtpCapability | None, str]:
    """Native-MTP capability and, when there is none, why (and how to get it)."""
    spec = card.native_mtp
    if spec is None:
        return None, "the model has no MTP head"
    if checkpoint is not None:
        from node.inference.mtp.recovery import MtpLayout, MtpUnavailable, probe_mtp

        try:
            probe = probe_mtp(checkpoint)
        except (MtpUnavailable, OSError, ValueError) as exc:
            return None, f"MTP weights unreadable: {exc}"
        if not probe.available:
            source = card.source_repo or "ORIGINAL_REPO"
            return None, (
                "checkpoint is stripped of its MTP weights; "
                f"`macmesh pull {card.id} --mtp-from {source}` recovers them"
            )
        where = probe.describe()
        if probe.layout is MtpLayout.SIDECAR and (origin := sidecar_source(checkpoint)):
            where += f" (fetched from {origin})"
        return NativeMtpCapability(default_k=spec.default_k, max_k=spec.max_k), where
    if spec.weights_in_checkpoint is False:
        return None, "config declares an MTP head but the checkpoint has no MTP weights"
    return NativeMtpCapability(default_k=spec.default_k, max_k=spec.max_k), ""


def sidecar_source(checkpoint: Path) -> str | None:
    """The ``repo@commit`` a sidecar written by ``macmesh pull`` names in its metadata."""
    import json
    import struct

    try:
        with (checkpoint / "mtp.safetensors").open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(length)).get("__metadata__", {}).get("source")
    except (OSError, ValueError, struct.error):
        return None


def _entry(
    card: ModelCard, source: str, checkpoint: Path | None, entry_id: str | None = None
) -> ModelEntry:
    mtp, why = mtp_status(card, checkpoint)
    return ModelEntry(
        id=entry_id or card.id,
        model_type=card.model_type,
        num_layers=card.num_layers,
        bytes=card.bytes,
        context_length=card.context_length,
        native_mtp=mtp,
        source=source,
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        has_weights=checkpoint is not None,
        download_from=[] if checkpoint is not None else download_candidates(card),
        mtp_note=why,
    )


def _hub_snapshots() -> list[tuple[str, Path]]:
    """(repo id, snapshot of its default branch or newest revision) of the cached model
    repos that hold a config.json."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from node.hub.refs import hub_cache_dir

    try:
        info = scan_cache_dir(hub_cache_dir())
    except (CacheNotFound, OSError):
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: ("main" not in r.refs, -r.last_modified))
        for revision in revisions:
            if (revision.snapshot_path / "config.json").is_file():
                out.append((repo.repo_id, revision.snapshot_path))
                break
    return out


def list_models(
    models_dir: Path | None, instances: Iterable[Any] = (), *, hub_cache: bool = True
) -> list[ModelEntry]:
    """Checkpoints on this node first (models dir, bundled, hub cache), then the shipped cards,
    then launched instances nothing above names. A checkpoint hides a card of the same id, as
    ``resolve`` prefers the checkpoint; ``launched`` marks every entry an instance answers to."""
    entries: list[ModelEntry] = []
    seen: set[str] = set()
    local: list[tuple[str, Path, str | None, str]] = [
        (name, root / name, None, source)
        for root, source in ((models_dir, "checkpoint"), (BUNDLED_MODELS_DIR, BUNDLED))
        if root is not None
        for name in local_checkpoints(root)
    ]
    if hub_cache:
        local += [(repo, snap, repo, HUB_CACHE) for repo, snap in _hub_snapshots()]
    for name, directory, card_id, source in local:
        if name in seen:
            continue
        try:
            card = card_from_checkpoint(directory, card_id=card_id)
        except (PlacementError, OSError, ValueError) as exc:
            log.warning("unreadable checkpoint skipped", path=str(directory), error=str(exc))
            continue
        seen.add(name)
        entries.append(_entry(card, source, directory.resolve(), name))
    for card in registry().values():
        if card.id in seen:
            continue
        found = resolve(card.id, models_dir).found
        entries.append(_entry(card, "card", found.checkpoint if found else None))
        seen.add(card.id)
    for info in instances:
        names = {info.model, *info.aliases}
        hits = [e for e in entries if e.id in names or (e.checkpoint or "") in names]
        for e in hits:
            e.launched = True
        if not hits:
            entries.append(_instance_entry(info, models_dir))
    return entries


def client_name(info: Any) -> str:
    """The name a client sends to reach an instance: what it was launched as, unless that is
    a filesystem path (meaningless to a remote client), then its card id."""
    for name in (info.model, *info.aliases):
        if name and not name.startswith(("/", ".", "~")):
            return name
    return info.instance_id


def _instance_entry(info: Any, models_dir: Path | None) -> ModelEntry:
    """An entry for a launched instance that no local checkpoint or card lists (launched
    from a path, or on another node): listed under the name a client must send."""
    name = client_name(info)
    try:
        resolved = resolve(info.model, models_dir)
        entry = _entry(resolved.card, "instance", resolved.checkpoint, name)
    except PlacementError:  # its files are on another node: what the instance says
        entry = ModelEntry(
            id=name,
            model_type="",
            num_layers=max((s.end_layer for s in info.stages), default=0),
            bytes=0,
            context_length=0,
            native_mtp=None,
            source="instance",
        )
    if info.engine == "native_mtp" and entry.native_mtp is None:
        entry.native_mtp = resolved_k(info)
    entry.has_weights, entry.launched = True, True
    entry.note = f"launched as {info.instance_id} ({info.engine})"
    return entry


def resolved_k(info: Any) -> NativeMtpCapability | None:
    """(default_k, max_k) of a native-MTP instance whose card is not readable here."""
    from node.placement import find_card

    for name in (info.model, *info.aliases):
        card = find_card(name)
        if card is not None and card.native_mtp is not None:
            return NativeMtpCapability(
                default_k=card.native_mtp.default_k, max_k=card.native_mtp.max_k
            )
    return None


def model_info_proto(entry: ModelEntry) -> Any:
    """A ``ModelEntry`` as the wire's ``ModelInfo``."""
    from node.proto.macmesh.v1 import inference_pb2 as pb

    msg = pb.ModelInfo(
        id=entry.id,
        model_type=entry.model_type,
        num_layers=entry.num_layers,
        bytes=entry.bytes,
        context_length=entry.context_length,
        launched=entry.launched,
        has_weights=entry.has_weights,
        download_from=entry.download_from,
        source=entry.source,
        mtp_note=entry.mtp_note,
    )
    if entry.native_mtp is not None:
        msg.native_mtp.CopyFrom(
            pb.NativeMtp(default_k=entry.native_mtp.default_k, max_k=entry.native_mtp.max_k)
        )
    return msg

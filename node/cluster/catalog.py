"""What models this node can name: shipped cards, checkpoints in the models directory, bundled
checkpoints; and where a MODEL's checkpoint lives. Reads headers only, never tensors.

MODEL is a card id or a checkpoint directory (a path, a name under the models directory, or a
model bundled with macmesh). ``locate`` turns it into the card the planner needs, the local
checkpoint to load, and the name the other nodes are told to load: the name itself when it
resolved under a models directory (each node reads its own), the absolute path otherwise (each
node reads the same path). Nodes resolve names with ``checkpoint_resolver``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from node.logging import get_logger
from node.placement import ModelCard, card_from_checkpoint, registry, resolve_card
from node.placement.errors import PlacementError, UnknownModelError
from node.placement.resolve import BUNDLED_MODELS_DIR, local_checkpoints

log = get_logger(__name__)


class NoCheckpointError(UnknownModelError):
    """MODEL names a known card, but no checkpoint for it is on this node."""


class NativeMtpCapability(BaseModel):
    default_k: int
    max_k: int


class ModelEntry(BaseModel):
    """One row of ``macmesh models`` / ``ListModels``."""

    id: str
    model_type: str
    num_layers: int
    bytes: int
    context_length: int
    native_mtp: NativeMtpCapability | None
    source: str  # card | checkpoint | bundled
    checkpoint: str | None = None  # the directory, when the weights are on this node
    note: str = ""


@dataclass(frozen=True)
class Located:
    card: ModelCard
    checkpoint: Path
    remote_name: str  # what LoadShard is told; every node resolves it the same way


def _roots(models_dir: Path | None) -> list[Path]:
    return [root for root in (models_dir, BUNDLED_MODELS_DIR) if root is not None]


def _under_roots(name: str, models_dir: Path | None) -> Path | None:
    for root in _roots(models_dir):
        for candidate in (root / name, root / name.replace("/", "--")):
            if (candidate / "config.json").is_file():
                return candidate
    return None


def resolve_checkpoint_name(model: str, models_dir: Path | None) -> Path | None:
    """MODEL as a checkpoint directory on this node: a path, then a name under the roots."""
    path = Path(model).expanduser()
    if path.is_absolute() or model.startswith((".", "~")):
        return path.resolve() if (path / "config.json").is_file() else None
    return _under_roots(model, models_dir) or (
        path.resolve() if (path / "config.json").is_file() else None
    )


def locate(model: str, models_dir: Path | None) -> Located:
    """Card, local checkpoint and remote name for MODEL. ``UnknownModelError`` when MODEL is
    nothing known; ``NoCheckpointError`` when it is a card whose weights are not here."""
    card = resolve_card(model, models_dir)  # raises UnknownModelError naming what is known
    path = Path(model).expanduser()
    if (path / "config.json").is_file() and (path.is_absolute() or model.startswith((".", "~"))):
        return Located(card, path.resolve(), str(path.resolve()))
    names = [model, card.id, *([card.source_repo] if card.source_repo else [])]
    for name in names:
        found = _under_roots(name, models_dir)
        if found is not None and name != model and not _same_precision(found, card):
            # e.g. "Qwen3.6-27B-8bit" must not load the bf16 download of its source repo.
            continue
        if found is not None:
            # Found under a root every node has (its own models dir, the bundled models):
            # the name travels, so each node reads its own copy.
            return Located(card, found.resolve(), found.name)
    if (path / "config.json").is_file():  # a relative path from the caller's directory
        return Located(card, path.resolve(), str(path.resolve()))
    where = str(models_dir) if models_dir is not None else "the models directory"
    raise NoCheckpointError(
        f"model {model!r} is the card {card.id!r}, but its weights are not on this node: put "
        f"the checkpoint in {where}/{card.id}"
        + (f" (e.g. download {card.source_repo})" if card.source_repo else "")
        + " or pass a checkpoint directory"
    )


def _same_precision(checkpoint: Path, card: ModelCard) -> bool:
    try:
        return card_from_checkpoint(checkpoint).bits == card.bits
    except Exception:  # an unreadable checkpoint is not a match
        return False


def _capability(card: ModelCard) -> tuple[NativeMtpCapability | None, str]:
    spec = card.native_mtp
    if spec is None:
        return None, ""
    if spec.weights_in_checkpoint is False:
        return None, "config declares an MTP head but the checkpoint has no MTP weights"
    return NativeMtpCapability(default_k=spec.default_k, max_k=spec.max_k), ""


def _entry(card: ModelCard, source: str, checkpoint: Path | None) -> ModelEntry:
    mtp, note = _capability(card)
    return ModelEntry(
        id=card.id,
        model_type=card.model_type,
        num_layers=card.num_layers,
        bytes=card.bytes,
        context_length=card.context_length,
        native_mtp=mtp,
        source=source,
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        note=note,
    )


def list_models(models_dir: Path | None) -> list[ModelEntry]:
    """Checkpoints on this node first (models dir, then bundled), then the shipped cards.

    A checkpoint hides a card of the same id, as ``resolve_card`` prefers the checkpoint."""
    entries: list[ModelEntry] = []
    seen: set[str] = set()
    for root, source in ((models_dir, "checkpoint"), (BUNDLED_MODELS_DIR, "bundled")):
        for name in local_checkpoints(root):
            if name in seen:
                continue
            assert root is not None
            directory = root / name
            try:
                card = card_from_checkpoint(directory)
            except (PlacementError, OSError, ValueError) as exc:
                log.warning("unreadable checkpoint skipped", path=str(directory), error=str(exc))
                continue
            seen.add(name)
            entries.append(_entry(card, source, directory))
    for card in registry().values():
        if card.id in seen:
            continue
        checkpoint = _under_roots(card.id, models_dir)
        if checkpoint is None and card.source_repo:
            checkpoint = _under_roots(card.source_repo, models_dir)
        entries.append(_entry(card, "card", checkpoint))
    return entries


def checkpoint_resolver(models_dir: Path | None):
    """The StageService's model resolver: a path, or a name under this node's models
    directory or the bundled models. Raises ``ShardError`` naming where it looked."""

    def resolve(model: str) -> Path:
        found = resolve_checkpoint_name(model, models_dir)
        if found is None:
            from node.inference.shard import ShardError

            where = ", ".join(str(r) for r in _roots(models_dir))
            raise ShardError(
                f"model {model!r} is not a checkpoint directory on this node ({where})"
            )
        return found

    return resolve

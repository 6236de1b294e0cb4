"""MODEL -> (card, local files): the one place that decides what a MODEL argument means.

MODEL is a checkpoint directory, a name under the models directory (or a model bundled with
macmesh in ``node/models``), a Hugging Face repo id with an optional ``@revision``
(``mlx-community/Qwen3.6-27B-4bit@main``), or a shipped card id (``Qwen3.6-27B-8bit``).
Local files are looked for in this order, and the first hit wins:

1. MODEL is a checkpoint directory (a path with a config.json);
2. a checkpoint under the models directory, then the bundled models;
3. the local Hugging Face hub cache (``HF_HUB_CACHE`` / ``HF_HOME``, through ``huggingface_hub``);

and when none has it, a card that names MODEL (a shipped card, or one whose source repo or
conversions MODEL is) still resolves, without files: enough to plan, and to say where the
weights can be downloaded from (``macmesh pull``). The card comes from the same checkpoint the
files do, so a card and its weights can never come from different places.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node.placement.cards import ModelCard, find_card, known_card_ids
from node.placement.checkpoint import card_from_checkpoint
from node.placement.errors import CheckpointError, UnknownModelError

BUNDLED_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"

# Where the files were found (``Resolved.origin``).
PATH, MODELS_DIR, BUNDLED, HUB_CACHE, CARD = "path", "models_dir", "bundled", "hub_cache", "card"


class NoCheckpointError(UnknownModelError):
    """MODEL names a known card or repo, but no checkpoint for it is on this node."""


@dataclass(frozen=True)
class Found:
    """Local files for MODEL, without reading them."""

    checkpoint: Path
    origin: str  # path | models_dir | bundled | hub_cache
    remote_name: str  # what other nodes are told to load; each resolves it the same way
    repo: str | None = None  # "org/name" when the files came from the hub cache
    revision: str | None = None  # the snapshot's commit


@dataclass(frozen=True)
class Resolved:
    card: ModelCard
    found: Found | None  # None: the card only, no weights on this node

    @property
    def checkpoint(self) -> Path | None:
        return self.found.checkpoint if self.found else None

    @property
    def origin(self) -> str:
        return self.found.origin if self.found else CARD

    def require_files(self, models_dir: Path | None) -> Found:
        """The local files, or ``NoCheckpointError`` saying where to put or get them."""
        if self.found is not None:
            return self.found
        where = str(models_dir) if models_dir is not None else "the models directory"
        repos = download_candidates(self.card)
        hint = f" or `macmesh pull {repos[0]}`" if repos else ""
        raise NoCheckpointError(
            f"model {self.card.id!r} is a card, but its weights are not on this node (not in "
            f"{where}, not in the Hugging Face cache): put the checkpoint in "
            f"{where}/{self.card.id}{hint}, or launch with --pull"
        )


def download_candidates(card: ModelCard) -> list[str]:
    """Repos holding the card's weights at the card's precision: the source repo first (it
    keeps the MTP head), then the conversions."""
    repos = [card.source_repo] if card.source_repo and card.bits == 16 else []
    return repos + [r for r in card.conversions if _precision_of(r) == card.bits]


def local_checkpoints(models_dir: Path | None) -> list[str]:
    """Names of the checkpoint directories (those with a config.json) under ``models_dir``."""
    if models_dir is None or not models_dir.is_dir():
        return []
    return sorted(p.name for p in models_dir.iterdir() if (p / "config.json").is_file())


def _roots(models_dir: Path | None) -> list[tuple[Path, str]]:
    return [(r, o) for r, o in ((models_dir, MODELS_DIR), (BUNDLED_MODELS_DIR, BUNDLED)) if r]


def _is_path(model: str) -> bool:
    return Path(model).is_absolute() or model.startswith((".", "~"))


def _under_roots(name: str, models_dir: Path | None) -> Found | None:
    for root, origin in _roots(models_dir):
        # "Qwen/Qwen3.6-27B" may sit under a models dir as that path, or flattened.
        for rel in (name, name.replace("/", "--")):
            candidate = root / rel
            if (candidate / "config.json").is_file():
                return Found(candidate.resolve(), origin, rel)
    return None


def _in_hub_cache(name: str) -> Found | None:
    from node.hub.cache import cached_snapshot
    from node.hub.refs import parse_repo_ref

    ref = parse_repo_ref(name)
    if ref is None:
        return None
    snapshot = cached_snapshot(ref)
    if snapshot is None:
        return None
    commit = snapshot.name
    return Found(snapshot, HUB_CACHE, f"{ref.repo_id}@{commit}", ref.repo_id, commit)


def find_files(model: str, models_dir: Path | None = None) -> Found | None:
    """MODEL's local files by name alone (no card): path, models dir, bundled, hub cache.

    This is what a stage node runs on the name its coordinator sent (a path, a name under the
    models directory, or ``repo@commit``); it never reads the weights, so a snapshot holding
    only this node's shards is found too."""
    if not model or not model.strip():
        return None
    path = Path(model).expanduser()
    if _is_path(model):
        return Found(path.resolve(), PATH, str(path.resolve())) if _has_config(path) else None
    found = _under_roots(model, models_dir) or _in_hub_cache(model)
    if found is None and _has_config(path):  # a relative path from the caller's directory
        found = Found(path.resolve(), PATH, str(path.resolve()))
    return found


def _has_config(path: Path) -> bool:
    return (path / "config.json").is_file()


def resolve(model: str, models_dir: Path | None = None) -> Resolved:
    """The card for MODEL and its local files (None when only a card knows MODEL).

    Raises ``UnknownModelError`` naming the known cards and local checkpoints when MODEL is
    nothing known."""
    if not model or not model.strip():
        raise UnknownModelError("no model given; pass a card id, a repo id or a checkpoint")
    found = find_files(model, models_dir)
    if found is not None:
        return Resolved(_card_of(found), found)
    if (card := _pulled_card(model)) is not None:  # planned for a pull, weights not here yet
        return Resolved(card, None)
    card = find_card(model)
    if card is None:
        raise UnknownModelError(_unknown(model, models_dir))
    # The card's own names, at the card's precision: "Qwen3.6-27B-8bit" must not load the
    # bf16 download of its source repo.
    names = [card.id, *card.conversions, *([card.source_repo] if card.source_repo else [])]
    for name in dict.fromkeys(names):
        found = find_files(name, models_dir)
        if found is not None and _card_of(found).bits == card.bits:
            return Resolved(_card_of(found), found)
    return Resolved(card, None)


def resolve_card(model: str, models_dir: Path | None = None) -> ModelCard:
    """The card for MODEL: from its local checkpoint when there is one, else a shipped card."""
    return resolve(model, models_dir).card


def _card_of(found: Found) -> ModelCard:
    # A hub snapshot's directory is a commit hash; the card answers to the repo id.
    try:
        return card_from_checkpoint(found.checkpoint, card_id=found.repo)
    except CheckpointError:
        # A node of a pipeline holds only its own shards: the card read from the hub's
        # headers when the download was planned describes the whole model.
        if found.repo and found.revision:
            from node.hub.card import cached_card

            if (card := cached_card(found.repo, found.revision)) is not None:
                return card
        raise


def _pulled_card(model: str) -> ModelCard | None:
    from node.hub.card import cached_card
    from node.hub.refs import parse_repo_ref

    ref = parse_repo_ref(model)
    if ref is None or ref.revision is None:
        return None
    return cached_card(ref.repo_id, ref.revision)


def _precision_of(name: str) -> int | None:
    from node.placement.cards import precision_suffix

    return precision_suffix(name.rsplit("/", 1)[-1])


def _unknown(model: str, models_dir: Path | None) -> str:
    from node.hub.refs import parse_repo_ref

    where = ""
    for root, _ in _roots(models_dir):
        if local := local_checkpoints(root):
            where += f"; checkpoints in {root}: {', '.join(local)}"
    if parse_repo_ref(model) is not None:
        return (
            f"model {model!r} is not in the Hugging Face cache, nor a checkpoint under the "
            f"models directory: download it with `macmesh pull {model}` (or launch with --pull)"
        )
    return (
        f"unknown model {model!r}: not a card id, a Hugging Face repo id (org/name) or a "
        f"checkpoint directory. Known cards: {', '.join(known_card_ids())}{where} "
        "(a card id may end in -4bit, -8bit or -bf16 for another precision)"
    )


def checkpoint_resolver(models_dir: Path | None):
    """A stage node's model resolver: the name its coordinator sent (a path, a name under this
    node's models directory or the bundled models, ``repo@commit`` in the hub cache) -> its
    files. Raises ``ShardError`` naming where it looked."""

    def resolve_files(model: str) -> Path:
        found = find_files(model, models_dir)
        if found is None:
            from node.inference.shard import ShardError

            where = ", ".join(str(root) for root, _ in _roots(models_dir))
            raise ShardError(
                f"model {model!r} is not a checkpoint directory on this node ({where}, "
                "the Hugging Face cache)"
            )
        return found.checkpoint

    return resolve_files

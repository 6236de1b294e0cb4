"""MODEL → ModelCard: a shipped card id, or a checkpoint directory (a path, a name under the
models directory, or a checkpoint bundled with macmesh in ``node/models``). This is the one
place that decides what a MODEL argument means."""

from __future__ import annotations

from pathlib import Path

from node.placement.cards import ModelCard, find_card, known_card_ids
from node.placement.checkpoint import card_from_checkpoint
from node.placement.errors import UnknownModelError

BUNDLED_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def local_checkpoints(models_dir: Path | None) -> list[str]:
    """Names of the checkpoint directories (those with a config.json) under ``models_dir``."""
    if models_dir is None or not models_dir.is_dir():
        return []
    return sorted(p.name for p in models_dir.iterdir() if (p / "config.json").is_file())


def _checkpoint_dir(model: str, models_dir: Path | None) -> Path | None:
    candidates = [Path(model).expanduser()]
    for root in (models_dir, BUNDLED_MODELS_DIR):
        if root is not None:
            # "Qwen/Qwen3.6-27B" may sit under a models dir as that path, or flattened.
            candidates += [root / model, root / model.replace("/", "--")]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    return None


def resolve_card(model: str, models_dir: Path | None = None) -> ModelCard:
    """The card for MODEL. A checkpoint directory wins over a card id of the same name, since
    its real bytes beat an estimate."""
    if not model or not model.strip():
        raise UnknownModelError("no model given; pass a card id or a checkpoint directory")
    directory = _checkpoint_dir(model, models_dir)
    if directory is not None:
        return card_from_checkpoint(directory)
    card = find_card(model)
    if card is not None:
        return card
    where = ""
    for root in (models_dir, BUNDLED_MODELS_DIR):
        if local := local_checkpoints(root):
            where += f"; checkpoints in {root}: {', '.join(local)}"
    raise UnknownModelError(
        f"unknown model {model!r}: not a card id and not a checkpoint directory. "
        f"Known cards: {', '.join(known_card_ids())}{where} "
        "(a card id may end in -4bit, -8bit or -bf16 for another precision)"
    )

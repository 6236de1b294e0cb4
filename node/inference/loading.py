"""Load a checkpoint directory into memory, reporting progress layer by layer.

mlx-lm builds the model and maps the shards lazily (``load_model(lazy=True)``); the weights
are then materialised group by group — embedding, each decoder layer, final norm + LM head —
so a caller sees bytes loaded / total as it happens.  The MTP head is not loaded here: it is
recovered on demand by ``LoadedModel.mtp_head`` (mlx-lm's sanitize drops those tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model, load_tokenizer

from node.inference import forward
from node.inference.integrity import check_checkpoint
from node.inference.mtp.head import MtpHead
from node.inference.mtp.recovery import MtpProbe, load_mtp_head, probe_mtp
from node.logging import get_logger

log = get_logger(__name__)

# K limits when the checkpoint has no card to give them (the card module's own defaults).
FALLBACK_DEFAULT_K = 2
FALLBACK_MAX_K = 4


@dataclass(frozen=True)
class LoadProgress:
    what: str
    done_bytes: int
    total_bytes: int

    @property
    def fraction(self) -> float:
        return self.done_bytes / self.total_bytes if self.total_bytes else 1.0


ProgressCallback = Callable[[LoadProgress], None]


@dataclass
class LoadedModel:
    """A checkpoint in memory: mlx-lm model, tokenizer, config, card and MTP probe."""

    path: Path
    model: nn.Module
    tokenizer: Any
    config: dict[str, Any]
    mtp_probe: MtpProbe
    card: Any | None = None  # node.placement.cards.ModelCard when one could be derived
    _mtp_head: MtpHead | None = field(default=None, repr=False)

    @property
    def text_args(self) -> Any:
        return forward.language_model(self.model).args

    @property
    def vocab_size(self) -> int:
        return int(self.text_args.vocab_size)

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    @property
    def context_length(self) -> int:
        if self.card is not None:
            return int(self.card.context_length)
        return int(self.text_args.max_position_embeddings)

    @property
    def mtp_k_limits(self) -> tuple[int, int]:
        """(default_k, max_k) from the card, or the fallback defaults."""
        spec = getattr(self.card, "native_mtp", None)
        if spec is not None:
            return int(spec.default_k), int(spec.max_k)
        return FALLBACK_DEFAULT_K, FALLBACK_MAX_K

    @property
    def eos_token_ids(self) -> set[int]:
        return set(getattr(self.tokenizer, "eos_token_ids", set()) or set())

    def mtp_head(self) -> MtpHead:
        """The recovered MTP head, loaded on first use. Raises ``MtpUnavailable``."""
        if self._mtp_head is None:
            self._mtp_head = load_mtp_head(self.path, self.text_args, self.mtp_probe)
            log.info("mtp head loaded", path=str(self.path), layout=self.mtp_probe.layout.value)
        return self._mtp_head


def _parameter_groups(model: nn.Module) -> list[tuple[str, list[mx.array]]]:
    lm = forward.language_model(model)
    groups = [("embedding", [v for _, v in tree_flatten(lm.model.embed_tokens.parameters())])]
    for i, layer in enumerate(lm.model.layers):
        groups.append((f"layer {i}", [v for _, v in tree_flatten(layer.parameters())]))
    head = [v for _, v in tree_flatten(lm.model.norm.parameters())]
    if "lm_head" in lm:
        head += [v for _, v in tree_flatten(lm.lm_head.parameters())]
    groups.append(("final norm + lm_head", head))
    return groups


def _card_for(path: Path) -> Any | None:
    try:
        from node.placement.checkpoint import card_from_checkpoint
    except ImportError:  # the placement package is optional for local generation
        return None
    try:
        return card_from_checkpoint(path)
    except Exception as exc:  # a card is a convenience here; the config still works
        log.warning("no model card for checkpoint", path=str(path), error=str(exc))
        return None


def load_checkpoint(path: str | Path, progress: ProgressCallback | None = None) -> LoadedModel:
    """Load the checkpoint directory ``path`` (any of the four MTP layouts)."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    check_checkpoint(path)  # a truncated shard is named here, not a RuntimeError from MLX
    model, config = load_model(path, lazy=True)
    groups = _parameter_groups(model)
    total = sum(a.nbytes for _, arrays in groups for a in arrays)
    done = 0
    for what, arrays in groups:
        mx.eval(arrays)
        done += sum(a.nbytes for a in arrays)
        if progress is not None:
            progress(LoadProgress(what=what, done_bytes=done, total_bytes=total))
    mx.eval(model.parameters())  # anything outside the groups above
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return LoadedModel(
        path=path,
        model=model,
        tokenizer=tokenizer,
        config=config,
        mtp_probe=probe_mtp(path),
        card=_card_for(path),
    )

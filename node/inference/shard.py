"""One pipeline stage's slice of a model: layers [start, end) and nothing else.

Everything model-specific is mlx-lm's own code, reached through two public seams:

- ``mlx_lm.utils.load_model(path, lazy=True)`` builds the model class from ``config.json`` and
  applies ``sanitize`` (HF norm offsets, conv1d layout, MoE expert packing) and quantization
  exactly as ``mlx_lm.load`` does, with every tensor still lazy: ``mx.load`` reads a tensor
  from its safetensors file only when it is evaluated;
- ``PipelineMixin.pipeline(group, split)`` (mlx-lm's own pipeline parallelism, on every model
  that supports it) keeps only the stage's layers, sets the layer-type indices its forward
  needs for the masks, and makes ``model.layers`` / ``make_cache`` see only the stage's layers.
  Its forward hands activations to the neighbours with ``mx.distributed``; macmesh carries them
  over gRPC instead, so after ``pipeline`` the stage says it is a pipeline of one, and the
  forward is mlx-lm's ``__call__`` unchanged.

What must differ from a whole model is only what a stage lacks: a stage after the first takes
hidden states, not token ids (its embedding becomes a pass-through), and a stage before the last
stops at the residual stream (its final norm becomes a pass-through). The embedding, norm and LM
head tensors that a stage does not keep are dropped before anything is evaluated, so only the
stage's own tensors are ever read from disk; the process's resident-memory growth while loading
is measured and reported with the bytes of the parameters kept.

Architectures without ``PipelineMixin`` in mlx-lm run on one node only (``ShardError`` says so);
``tests/test_shard.py`` checks that chained shards give the full model's logits bit for bit, so a
change in upstream's forward that our stages do not follow fails there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import psutil
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from node.hub.shards import stage_files_on_disk
from node.inference import forward
from node.inference.integrity import check_checkpoint
from node.logging import get_logger

log = get_logger(__name__)


class ShardError(ValueError):
    """A layer range or checkpoint this stage cannot load; the message names the value."""


class _PassThrough(nn.Module):
    """Stands in for the embedding of a later stage (its input already is a hidden state) and
    for the final norm of an earlier one (the next stage continues the residual stream)."""

    def __call__(self, x: mx.array) -> mx.array:
        return x


@dataclass(frozen=True)
class _StageGroup:
    """What ``PipelineMixin.pipeline`` reads from an ``mx.distributed`` group: this stage's rank
    and the number of ranks. mlx-lm gives rank 0 the *last* layers."""

    stage_rank: int
    stage_count: int

    def rank(self) -> int:
        return self.stage_rank

    def size(self) -> int:
        return self.stage_count


def _pipeline_split(start: int, end: int, num_layers: int) -> tuple[_StageGroup, list[int]]:
    """The (group, split) under which mlx-lm's ``pipeline`` keeps exactly [start, end)."""
    parts = [n for n in (num_layers - end, end - start, start) if n > 0]
    rank = 0 if end == num_layers else 1
    return _StageGroup(rank, len(parts)), parts


@dataclass
class Shard:
    """Layers [start_layer, end_layer) of a checkpoint, ready to run."""

    path: Path
    config: dict[str, Any]
    model: nn.Module = field(repr=False)
    start_layer: int
    end_layer: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    context_length: int
    activation_dtype: mx.Dtype
    weight_bytes: int
    resident_bytes: int
    load_seconds: float

    head_embedding: nn.Module | None = field(default=None, repr=False)  # tied LM head
    # The embedding a later stage keeps when asked (pipeline_mtp: the MTP head on the last
    # stage embeds its drafts); the first stage's is in the model itself.
    embedding: nn.Module | None = field(default=None, repr=False)

    @property
    def has_embedding(self) -> bool:
        return self.start_layer == 0

    @property
    def has_head(self) -> bool:
        return self.end_layer == self.num_layers

    @property
    def text_model(self) -> nn.Module:
        return forward.text_model(self.model)

    @property
    def layers(self) -> list[nn.Module]:
        return self.model.layers

    def make_cache(self) -> list[Any]:
        """Fresh per-request caches for this stage's layers (mlx-lm's own cache types)."""
        return make_prompt_cache(self.model)

    def forward(self, inputs: mx.array, cache: list[Any]) -> mx.array:
        """Token ids [1, T] (first stage) or hidden states [1, T, D] through this stage's layers:
        mlx-lm's own forward of the text model. The last stage returns post-final-norm hidden
        states; the others the residual stream after their last layer."""
        return self.text_model(inputs, cache)

    def logits(self, hidden: mx.array) -> mx.array:
        """The LM head over the last stage's (post-norm) hidden states, tied embeddings included."""
        if not self.has_head:
            raise ShardError(
                f"stage [{self.start_layer}, {self.end_layer}) has no LM head "
                f"(the model has {self.num_layers} layers)"
            )
        if self.head_embedding is not None:
            return self.head_embedding.as_linear(hidden)
        return forward.language_model(self.model).lm_head(hidden)


# ---- loading ----


def _tied(model: nn.Module) -> bool:
    return "lm_head" not in forward.language_model(model)


def _keep_stage(
    model: nn.Module, start: int, end: int, num_layers: int, keep_embedding: bool = False
) -> tuple[nn.Module | None, nn.Module | None]:
    """Prune ``model`` to layers [start, end) with mlx-lm's ``pipeline``; return the embedding
    when the last stage needs it as its (tied) LM head, and the embedding a later stage keeps
    on request (``keep_embedding``)."""
    text = forward.text_model(model)
    if not hasattr(text, "pipeline"):
        raise ShardError(
            f"mlx-lm has no pipeline support for model type "
            f"{getattr(model, 'model_type', type(model).__module__)!r}: it runs on one node only"
        )
    group, split = _pipeline_split(start, end, num_layers)
    text.pipeline(group, split)
    # macmesh moves activations between stages itself: to mlx-lm's forward this is a
    # pipeline of one, so it sends and receives nothing.
    text.pipeline_rank, text.pipeline_size = 0, 1
    first, last = start == 0, end == num_layers
    head_embedding = text.embed_tokens if last and _tied(model) else None
    embedding = text.embed_tokens if keep_embedding and not first else None
    if not first:
        text.embed_tokens = _PassThrough()
    if not last:
        text.norm = _PassThrough()
        if "lm_head" in forward.language_model(model):
            del forward.language_model(model).lm_head
    return head_embedding, embedding


def _rss() -> int:
    return psutil.Process().memory_info().rss


def check_range(start: int, end: int, num_layers: int) -> None:
    if not 0 <= start < end <= num_layers:
        raise ShardError(
            f"layer range [{start}, {end}) is not inside the model's {num_layers} layers "
            "(need 0 <= start < end <= num_layers)"
        )


def load_shard(
    path: str | Path, start_layer: int, end_layer: int, *, keep_embedding: bool = False
) -> Shard:
    """Load layers [start_layer, end_layer) of the checkpoint at ``path``; ``keep_embedding``
    keeps the token embedding on a later stage too (``Shard.embedding``)."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise ShardError(f"{path} is not a checkpoint directory (no config.json)")
    # A per-node pull: the loader is then not strict, so the files of everything the stage
    # keeps (the embedding for an MTP head included) are checked here, or it would be random.
    missing, partial = stage_files_on_disk(path, start_layer, end_layer, mtp_head=keep_embedding)
    if missing:
        raise ShardError(
            f"{path} lacks {', '.join(missing)}, needed for layers [{start_layer}, {end_layer})"
        )
    # A truncated shard is named here, not a RuntimeError from MLX.
    check_checkpoint(path, partial=partial)
    # Freed MLX buffers stay cached for reuse and would hide the growth: return them first.
    mx.clear_cache()
    began, rss_before = time.perf_counter(), _rss()
    model, config = load_model(path, lazy=True, strict=not partial)  # nothing is read yet
    args = forward.language_model(model).args
    num_layers = len(forward.text_model(model).layers)
    check_range(start_layer, end_layer, num_layers)
    head_embedding, embedding = _keep_stage(
        model, start_layer, end_layer, num_layers, keep_embedding
    )
    model.eval()
    mx.eval(model.parameters())  # reads exactly the stage's tensors
    params = [v for _, v in tree_flatten(model.parameters())]
    # Kept outside the module tree, still this stage's memory (once when both are the same).
    for extra in {id(m): m for m in (head_embedding, embedding) if m is not None}.values():
        mx.eval(extra.parameters())
        params += [v for _, v in tree_flatten(extra.parameters())]
    first_layer = model.layers[0]
    norm = getattr(first_layer, "input_layernorm", None)
    shard = Shard(
        path=path,
        config=config,
        model=model,
        start_layer=start_layer,
        end_layer=end_layer,
        num_layers=num_layers,
        hidden_size=int(args.hidden_size),
        vocab_size=int(args.vocab_size),
        context_length=int(getattr(args, "max_position_embeddings", 0) or 1 << 20),
        activation_dtype=norm.weight.dtype if norm is not None else params[0].dtype,
        weight_bytes=sum(p.nbytes for p in params),
        resident_bytes=max(0, _rss() - rss_before),
        load_seconds=time.perf_counter() - began,
        head_embedding=head_embedding,
        embedding=embedding,
    )
    log.info(
        "shard loaded",
        path=str(path),
        layers=f"[{start_layer}, {end_layer})",
        weight_mb=round(shard.weight_bytes / 2**20, 1),
        resident_mb=round(shard.resident_bytes / 2**20, 1),
        seconds=round(shard.load_seconds, 2),
    )
    return shard

"""One pipeline stage's slice of a model: layers [start, end) and nothing else.

The model object is mlx-lm's own class built from ``config.json`` (so the layers compute
exactly what mlx-lm computes), then pruned the way mlx-lm's ``PipelineMixin`` prunes: layers
outside the range become ``None`` so parameter names keep their layer numbers. The embedding
stays only on the first stage (and on the last when the LM head is tied to it), the final norm
and LM head only on the last.

Only the tensors the stage keeps are read from disk: the safetensors index (or the shard
headers) says which files hold them, ``mx.load`` maps those files lazily, every other key is
dropped before anything is evaluated, and the survivors go through mlx-lm's ``sanitize``
(HF norm offsets, conv1d layout, MoE expert packing) and quantization exactly as
``mlx_lm.utils.load_model`` would. The process's resident-memory growth while loading is
measured and reported with the bytes of the parameters kept.
"""

from __future__ import annotations

import glob
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import psutil
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask, create_ssm_mask
from mlx_lm.models.cache import ArraysCache, KVCache
from mlx_lm.utils import _get_classes, infer_quant_config, load_config

from node.logging import get_logger

log = get_logger(__name__)

_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class ShardError(ValueError):
    """A layer range or checkpoint this stage cannot load; the message names the value."""


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

    @property
    def has_embedding(self) -> bool:
        return self.start_layer == 0

    @property
    def has_head(self) -> bool:
        return self.end_layer == self.num_layers

    @property
    def text_model(self) -> nn.Module:
        return _text_model(self.model)

    @property
    def layers(self) -> list[nn.Module]:
        return self.text_model.layers[self.start_layer : self.end_layer]

    def make_cache(self) -> list[Any]:
        """Fresh per-request caches for this stage's layers (mlx-lm's cache types)."""
        return [ArraysCache(size=2) if _is_linear(layer) else KVCache() for layer in self.layers]

    def forward(self, inputs: mx.array, cache: list[Any]) -> mx.array:
        """Token ids [1, T] (first stage) or hidden states [1, T, D] through this stage's layers.

        Mirrors ``Qwen3_5TextModel.__call__``: one attention mask from the first full-attention
        layer's cache and one SSM mask from the first linear layer's cache. The result is the
        residual stream after the last layer, before the final norm.
        """
        h = self.text_model.embed_tokens(inputs) if self.has_embedding else inputs
        layers = self.layers
        linear = [_is_linear(layer) for layer in layers]
        fa_mask = ssm_mask = None
        if False in linear:
            fa_mask = create_attention_mask(h, cache[linear.index(False)])
        if True in linear:
            ssm_mask = create_ssm_mask(h, cache[linear.index(True)])
        for layer, is_linear, layer_cache in zip(layers, linear, cache, strict=True):
            h = layer(h, mask=ssm_mask if is_linear else fa_mask, cache=layer_cache)
        return h

    def logits(self, hidden: mx.array) -> mx.array:
        """Final norm + LM head (tied embeddings included); last stage only."""
        if not self.has_head:
            raise ShardError(
                f"stage [{self.start_layer}, {self.end_layer}) has no LM head "
                f"(the model has {self.num_layers} layers)"
            )
        h = self.text_model.norm(hidden)
        if _tied(self.model):
            return self.text_model.embed_tokens.as_linear(h)
        return _language_model(self.model).lm_head(h)


# ---- model structure (qwen3_5 nests the text model under language_model) ----


def _language_model(model: nn.Module) -> nn.Module:
    return model.language_model if "language_model" in model else model


def _text_model(model: nn.Module) -> nn.Module:
    return _language_model(model).model


def _text_prefix(model: nn.Module) -> str:
    return "language_model.model" if "language_model" in model else "model"


def _head_prefix(model: nn.Module) -> str:
    return "language_model.lm_head" if "language_model" in model else "lm_head"


def _text_args(model: nn.Module) -> Any:
    return _language_model(model).args


def _tied(model: nn.Module) -> bool:
    return bool(getattr(_text_args(model), "tie_word_embeddings", False))


def _is_linear(layer: nn.Module) -> bool:
    return bool(getattr(layer, "is_linear", False))


# ---- loading ----


def _weight_files(path: Path) -> dict[str, list[str]]:
    """file -> tensor names, from the safetensors index or each shard's header."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(str(path / file), []).append(name)
        return files
    found = sorted(glob.glob(str(path / "model*.safetensors")))
    if not found:
        raise ShardError(f"no model*.safetensors in {path}")
    return {file: list(mx.load(file).keys()) for file in found}


def _wanted(name: str, start: int, end: int, first: bool, last: bool, tied: bool) -> bool:
    """Whether a raw (unsanitized) tensor name belongs to the stage, in any layout."""
    if "mtp." in name or "visual" in name or "vision_tower" in name:
        return False
    match = _LAYER_KEY.search(name)
    if match is not None:
        return start <= int(match.group(1)) < end
    if "embed_tokens" in name:
        return first or (last and tied)
    if "lm_head" in name or name.endswith("norm.weight"):
        return last
    return True  # anything else top-level: kept, and checked against the model below


def _read_weights(
    path: Path, start: int, end: int, first: bool, last: bool, tied: bool
) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    probe: tuple[str, str] | None = None
    for file, names in _weight_files(path).items():
        wanted = [n for n in names if _wanted(n, start, end, first, last, tied)]
        if probe is None:
            probe = next(
                ((file, n) for n in names if "conv1d.weight" in n and "mtp." not in n), None
            )
        if wanted:
            tensors = mx.load(file)  # lazy: only evaluated tensors are read
            weights.update({n: tensors[n] for n in wanted})
    # mlx-lm's sanitize decides "raw HF checkpoint" (norm offsets, conv layout) from any
    # conv1d weight; a stage without GatedDeltaNet layers must still see one to decide the same.
    if probe is not None and not any("conv1d.weight" in n for n in weights):
        weights[probe[1]] = mx.load(probe[0])[probe[1]]
    return weights


def _quantize(model: nn.Module, config: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """mlx-lm's quantization of the modules whose packed weights are present."""
    quantization = config.get("quantization")
    if quantization is None:
        if config.get("quantization_config"):
            method = config["quantization_config"].get("quant_method")
            raise ShardError(
                f"quantization_config with quant_method={method!r} is not supported for "
                "pipeline shards; convert the checkpoint with mlx_lm.convert"
            )
        return

    def class_predicate(p: str, m: nn.Module) -> Any:
        if p in quantization:
            return quantization[p]
        if not hasattr(m, "to_quantized") or f"{p}.scales" not in weights:
            return False
        return infer_quant_config(p, m, weights)

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=class_predicate,
    )


def _prune(model: nn.Module, start: int, end: int, first: bool, last: bool) -> None:
    text = _text_model(model)
    layers = text.layers[:end]
    layers[:start] = [None] * start
    text.layers = layers
    # PipelineMixin's view of the range, so model.layers / make_cache see only ours.
    if hasattr(text, "start_idx"):
        text.start_idx, text.end_idx = start, end
    lm = _language_model(model)
    if not first and not (last and _tied(model)):
        del text.embed_tokens
    if not last:
        del text.norm
        if "lm_head" in lm:
            del lm.lm_head


def _rss() -> int:
    return psutil.Process().memory_info().rss


def check_range(start: int, end: int, num_layers: int) -> None:
    if not 0 <= start < end <= num_layers:
        raise ShardError(
            f"layer range [{start}, {end}) is not inside the model's {num_layers} layers "
            "(need 0 <= start < end <= num_layers)"
        )


def load_shard(path: str | Path, start_layer: int, end_layer: int) -> Shard:
    """Load layers [start_layer, end_layer) of the checkpoint at ``path``."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise ShardError(f"{path} is not a checkpoint directory (no config.json)")
    # Freed MLX buffers stay cached for reuse and would hide the growth: return them first.
    mx.clear_cache()
    began, rss_before = time.perf_counter(), _rss()
    config = load_config(path)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))  # parameters stay lazy until loaded
    args = _text_args(model)
    num_layers = len(_text_model(model).layers)
    check_range(start_layer, end_layer, num_layers)
    first, last = start_layer == 0, end_layer == num_layers
    tied = _tied(model)

    _prune(model, start_layer, end_layer, first, last)
    weights = _read_weights(path, start_layer, end_layer, first, last, tied)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    _quantize(model, config, weights)
    model.eval()
    expected = {name for name, _ in tree_flatten(model.parameters())}
    missing = sorted(expected - weights.keys())
    if missing:
        raise ShardError(
            f"checkpoint {path} lacks {len(missing)} tensors of layers "
            f"[{start_layer}, {end_layer}), e.g. {missing[:3]}"
        )
    model.load_weights([(k, v) for k, v in weights.items() if k in expected], strict=True)
    del weights
    mx.eval(model.parameters())
    params = [v for _, v in tree_flatten(model.parameters())]
    first_layer = _text_model(model).layers[start_layer]
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
        activation_dtype=first_layer.input_layernorm.weight.dtype,
        weight_bytes=sum(p.nbytes for p in params),
        resident_bytes=max(0, _rss() - rss_before),
        load_seconds=time.perf_counter() - began,
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

"""Model cards derived from a checkpoint on disk, from headers only.

Reads ``config.json`` and the safetensors headers (an 8-byte little-endian length, then a JSON
table of every tensor's dtype, shape and byte range) and sums the real bytes of each decoder
layer, the embedding, the final norm + LM head and the MTP head. No tensor data is read, so a
120 GB checkpoint costs a few kilobytes of I/O.

Tensor names seen in the wild (all handled):
  HF Qwen3.5/3.6:   model.language_model.layers.{i}.…, model.language_model.embed_tokens, lm_head,
                    mtp.… (in the main shards or a sidecar mtp.safetensors)
  MLX conversions:  language_model.model.layers.{i}.…, language_model.lm_head, language_model.mtp.…
  plain models:     model.layers.{i}.…, model.embed_tokens, model.norm, lm_head
Vision-tower tensors are skipped: mlx-lm drops them on load.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.logging import get_logger
from node.placement import architecture as arch
from node.placement.cards import ModelCard, NativeMtpSpec, registry
from node.placement.errors import CheckpointError

log = get_logger(__name__)

INDEX_FILE = "model.safetensors.index.json"
MTP_SIDECAR = "mtp.safetensors"
MAX_HEADER_BYTES = 256 * 1024 * 1024  # a sane ceiling: real headers are a few MB at most

# Native-MTP K values for checkpoints no shipped card describes: draft two tokens, allow up to
# four. Conservative defaults; a card with measured values overrides them.
UNKNOWN_MTP_DEFAULT_K = 2
UNKNOWN_MTP_MAX_K = 4

_PREFIX = r"^(?:model\.language_model\.|language_model\.model\.|language_model\.|model\.)?"
_MTP = re.compile(_PREFIX + r"mtp\.")
_LAYER = re.compile(_PREFIX + r"layers\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)embed_tokens\.(?:weight|scales|biases)$")
_LM_HEAD = re.compile(r"(?:^|\.)lm_head\.(?:weight|scales|biases)$")
_FINAL_NORM = re.compile(_PREFIX + r"norm\.weight$")
_VISION = re.compile(
    r"^(?:model\.visual\.|visual\.|vision_tower\.|model\.vision_tower\.|mm_projector\.)"
)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Every tensor a safetensors file holds, from its header alone."""
    try:
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(
                    f"{str(path)!r} is not a safetensors file (shorter than 8 bytes)"
                )
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{str(path)!r} claims a {header_len}-byte header; not a safetensors file"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"cannot read {str(path)!r}: {exc}") from None
    if len(raw) != header_len:
        raise CheckpointError(f"{str(path)!r} is truncated inside its header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} has an unreadable header: {exc}") from None
    return tensors_from_header(header, path.name, str(path))


def tensors_from_header(header: dict[str, Any], file: str, where: str) -> list[TensorInfo]:
    """The tensors of a parsed safetensors header (a local file's, or one read by range)."""
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            tensors.append(
                TensorInfo(name, entry["dtype"], tuple(entry["shape"]), end - begin, file)
            )
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where!r}: tensor {name!r} has a malformed entry") from None
    return tensors


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files holding the model: the index's shards (else every *.safetensors),
    plus an MTP sidecar if one sits beside them."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{str(index)!r} is not a safetensors index: {exc}") from None
        files = [directory / name for name in names]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{str(directory)!r} lacks shard(s) named in its index: {missing}"
            )
    else:
        files = sorted(directory.glob("*.safetensors"))
    sidecar = directory / MTP_SIDECAR
    if sidecar.is_file() and sidecar not in files:
        files.append(sidecar)
    if not files:
        raise CheckpointError(f"{str(directory)!r} has no .safetensors files")
    return files


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{str(directory)!r} has no config.json")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(path)!r} does not hold a JSON object")
    return config


@dataclass
class _Buckets:
    layers: list[int]
    embedding: int = 0
    head: int = 0
    lm_head: int = 0
    mtp: int = 0
    skipped: int = 0
    unknown: int = 0
    norm_dtype: str | None = None


def _classify(tensors: list[TensorInfo], n_layers: int) -> _Buckets:
    buckets = _Buckets(layers=[0] * n_layers)
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:  # a tensor repeated in two files is loaded once
            continue
        seen.add(t.name)
        if _VISION.match(t.name):
            buckets.skipped += t.nbytes
        elif _MTP.match(t.name):
            buckets.mtp += t.nbytes
        elif m := _LAYER.match(t.name):
            i = int(m.group(1))
            if i >= n_layers:
                raise CheckpointError(
                    f"tensor {t.name!r} is for layer {i} but config.json has {n_layers} layers"
                )
            buckets.layers[i] += t.nbytes
        elif _EMBEDDING.search(t.name):
            buckets.embedding += t.nbytes
        elif _LM_HEAD.search(t.name):
            buckets.lm_head += t.nbytes
        elif _FINAL_NORM.match(t.name):
            buckets.head += t.nbytes
            buckets.norm_dtype = t.dtype
        else:
            # Counted on the first stage, where the embedding lives: better over than under.
            log.warning("unrecognised checkpoint tensor counted with the embedding", tensor=t.name)
            buckets.unknown += t.nbytes
    return buckets


def _activation_bytes(buckets: _Buckets, config: dict[str, Any]) -> int:
    """Bytes per activation value: the final norm's dtype (norms are never quantized)."""
    if buckets.norm_dtype in arch.DTYPE_BYTES:
        return arch.DTYPE_BYTES[buckets.norm_dtype]
    tc = arch.text_config(config)
    named = tc.get("torch_dtype") or tc.get("dtype")
    return arch.DTYPE_BYTES.get(str(named), 2)


def _quantization(config: dict[str, Any], activation_bytes: int) -> tuple[int, int | None]:
    for key in ("quantization", "quantization_config"):
        q = config.get(key) or arch.text_config(config).get(key)
        if isinstance(q, dict) and isinstance(q.get("bits"), int):
            group = q.get("group_size")
            return q["bits"], group if isinstance(group, int) else None
    return activation_bytes * 8, None


def _mtp_k_for(name: str) -> tuple[int, int, str]:
    """(default_k, max_k, why): from the shipped card whose id starts the directory name."""
    lowered = name.lower().rsplit("/", 1)[-1]  # a repo id: "org/Qwen3.6-27B-4bit"
    matches = [
        card
        for card in registry().values()
        if card.native_mtp is not None and lowered.startswith(card.id.lower())
    ]
    if matches:
        best = max(matches, key=lambda c: len(c.id))
        assert best.native_mtp is not None
        return best.native_mtp.default_k, best.native_mtp.max_k, f"from the {best.id} card"
    return (
        UNKNOWN_MTP_DEFAULT_K,
        UNKNOWN_MTP_MAX_K,
        "defaults for models without a card (default_k 2, max_k 4)",
    )


def card_from_checkpoint(path: Path | str, card_id: str | None = None) -> ModelCard:
    """A card with the real bytes of the checkpoint in ``path`` (HF or MLX layout)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"{str(directory)!r} is not a directory")
    config = read_config(directory)
    tensors = [t for f in checkpoint_files(directory) for t in read_safetensors_header(f)]
    return card_from_parts(config, tensors, card_id or directory.name, str(directory))


def card_from_parts(
    config: dict[str, Any], tensors: list[TensorInfo], name: str, where: str
) -> ModelCard:
    """A card from a config and the tensors' headers, wherever they were read (a directory, or
    a hub repo by ranged reads before any weight is downloaded)."""
    directory = where
    tc = arch.text_config(config)
    try:
        kinds = arch.layer_types(tc)
        n_layers = len(kinds)
        hidden_size = int(tc["hidden_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{str(directory)!r}: config.json lacks a usable {exc}") from None
    buckets = _classify(tensors, n_layers)
    empty = [i for i, size in enumerate(buckets.layers) if size == 0]
    if empty:
        raise CheckpointError(f"{str(directory)!r} has no tensors for layer(s) {empty}")

    # mlx-lm drops lm_head when embeddings are tied and ties them when lm_head is absent.
    tied = arch.tie_word_embeddings(config) or buckets.lm_head == 0
    head = buckets.head + (0 if tied else buckets.lm_head)
    activation_bytes = _activation_bytes(buckets, config)
    bits, group_size = _quantization(config, activation_bytes)

    n_full = kinds.count(arch.FULL)
    n_linear = n_layers - n_full
    try:
        kv = n_full * arch.kv_bytes_per_token_per_layer(tc, activation_bytes) if n_full else 0
        state = (
            n_linear * arch.linear_state_bytes_per_layer(tc, activation_bytes) if n_linear else 0
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise CheckpointError(
            f"{str(directory)!r}: config.json lacks attention geometry ({exc})"
        ) from None

    notes = [f"derived from the checkpoint at {directory}"]
    if buckets.unknown:
        notes.append(f"{buckets.unknown} bytes of unrecognised tensors counted with the embedding")
    native_mtp = None
    if arch.mtp_layer_count(tc) > 0:
        default_k, max_k, why = _mtp_k_for(name)
        notes.append(f"native MTP K values {why}")
        if buckets.mtp == 0:
            notes.append("config declares MTP layers but the checkpoint has no MTP weights")
        native_mtp = NativeMtpSpec(
            default_k=default_k,
            max_k=max_k,
            num_layers=arch.mtp_layer_count(tc),
            head_bytes=buckets.mtp,
            weights_in_checkpoint=buckets.mtp > 0,
        )
    embedding = buckets.embedding + buckets.unknown
    return ModelCard(
        id=name,
        source_repo=str(config.get("_name_or_path")) if config.get("_name_or_path") else None,
        model_type=arch.model_type(config),
        num_layers=n_layers,
        hidden_size=hidden_size,
        vocab_size=int(tc["vocab_size"]) if tc.get("vocab_size") else None,
        bytes=sum(buckets.layers) + embedding + head + buckets.mtp,
        layer_bytes=buckets.layers,
        layer_types=kinds,
        embedding_bytes=embedding,
        head_bytes=head,
        tie_word_embeddings=tied,
        kv_bytes_per_token=kv,
        linear_state_bytes=state,
        context_length=arch.context_length(tc),
        bits=bits,
        group_size=group_size,
        native_mtp=native_mtp,
        architecture={k: tc[k] for k in _ARCH_KEYS if k in tc},
        notes=notes,
    )


_ARCH_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "full_attention_interval",
    "num_experts",
    "mtp_num_hidden_layers",
)

"""Find and recover a checkpoint's MTP head weights, which mlx-lm's ``sanitize`` drops.

Layouts seen in the wild (DESIGN.md):

- ``original``: the Hugging Face layout, ``mtp.*`` in the main shards;
- ``embedded_mlx``: an MLX conversion that kept ``language_model.mtp.*`` in its shards;
- ``sidecar``: the MTP tensors in their own file (``mtp.safetensors``) next to the shards;
- ``stripped``: config.json declares ``mtp_num_hidden_layers`` but no tensor is there.

How the tensors are stored follows from their naming, never from their values:
HF naming (``mtp.*``, wherever the file is) means the Hugging Face storage convention —
RMSNorm weights as offsets from 1 (scale = 1 + w) and fused MoE experts
(``experts.gate_up_proj``/``experts.down_proj``) — while MLX naming
(``language_model.mtp.*``) means mlx-lm's conventions — absolute norms, experts split into
``switch_mlp`` — and possibly quantized like the rest of the conversion.

Only the MTP tensors are read: the probe reads the index (or safetensors headers), and
``mx.load`` maps shards lazily so untouched tensors never leave the disk.
"""

from __future__ import annotations

import json
import struct
from enum import StrEnum
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import infer_quant_config
from pydantic import BaseModel, ConfigDict

from node.inference.errors import EngineUnavailable
from node.inference.mtp.head import MtpHead


class MtpUnavailable(EngineUnavailable):
    """The checkpoint declares (or was asked for) an MTP head that cannot be recovered."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)

    def __str__(self) -> str:
        return f"MTP head unavailable: {self.reason}"


class MtpLayout(StrEnum):
    ORIGINAL = "original"
    EMBEDDED_MLX = "embedded_mlx"
    SIDECAR = "sidecar"
    STRIPPED = "stripped"
    NOT_DECLARED = "not_declared"


# Prefixes by naming convention.  Longest first so "model.language_model.mtp." wins.
_MLX_PREFIXES = ("language_model.mtp.",)
_HF_PREFIXES = ("model.language_model.mtp.", "model.mtp.", "mtp.")

# RMSNorm weights inside the head (HF stores them as offsets from 1).
_NORM_SUFFIXES = (
    "pre_fc_norm_embedding.weight",
    "pre_fc_norm_hidden.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "q_norm.weight",
    "k_norm.weight",
)


class MtpProbe(BaseModel):
    """What a checkpoint holds for its MTP head, found without reading any tensor."""

    model_config = ConfigDict(frozen=True)

    layout: MtpLayout
    declared_layers: int
    files: tuple[str, ...] = ()
    prefix: str | None = None
    num_tensors: int = 0
    norm_offsets: bool = False
    fused_experts: bool = False
    quantized: bool = False

    @property
    def available(self) -> bool:
        return self.layout in (MtpLayout.ORIGINAL, MtpLayout.EMBEDDED_MLX, MtpLayout.SIDECAR)

    def describe(self) -> str:
        """Where the head is, in words (used in engine reasons)."""
        files = ", ".join(self.files)
        match self.layout:
            case MtpLayout.ORIGINAL:
                return f"head recovered from embedded {self.prefix}* in {files}"
            case MtpLayout.EMBEDDED_MLX:
                return f"head recovered from embedded {self.prefix}* in {files}"
            case MtpLayout.SIDECAR:
                return f"head recovered from sidecar {files}"
            case MtpLayout.STRIPPED:
                return (
                    f"checkpoint is stripped (config declares mtp_num_hidden_layers="
                    f"{self.declared_layers} but has no mtp.* tensors)"
                )
            case MtpLayout.NOT_DECLARED:
                return "checkpoint declares no MTP head (mtp_num_hidden_layers is 0 or absent)"


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    return json.loads(config_file.read_text())


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config (Qwen3.5 nests it under text_config)."""
    return {**config, **config.get("text_config", {})}


def safetensors_keys(file: Path) -> list[str]:
    """Tensor names of a safetensors file from its JSON header, without reading tensors."""
    with file.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return [k for k in header if k != "__metadata__"]


def _tensor_files(path: Path) -> dict[str, list[str]]:
    """Map every safetensors file in the checkpoint to its tensor names."""
    files: dict[str, list[str]] = {}
    index = path / "model.safetensors.index.json"
    if index.is_file():
        for key, file in json.loads(index.read_text()).get("weight_map", {}).items():
            files.setdefault(file, []).append(key)
    for file in sorted(path.glob("*.safetensors")):
        if file.name not in files:
            files[file.name] = safetensors_keys(file)
    return files


def _mtp_prefix(key: str) -> str | None:
    for prefix in (*_MLX_PREFIXES, *_HF_PREFIXES):
        if key.startswith(prefix):
            return prefix
    return None


def _is_main_shard(name: str) -> bool:
    # mlx-lm loads exactly the files matching model*.safetensors.
    return name.startswith("model") and name.endswith(".safetensors")


def probe_mtp(path: str | Path) -> MtpProbe:
    """Report where (and whether) the checkpoint at ``path`` keeps its MTP head."""
    path = Path(path)
    declared = int(text_config(read_config(path)).get("mtp_num_hidden_layers") or 0)
    holders: dict[str, list[str]] = {}
    prefixes: set[str] = set()
    for file, keys in _tensor_files(path).items():
        found = [k for k in keys if _mtp_prefix(k) is not None]
        if found:
            holders[file] = found
            prefixes.update(_mtp_prefix(k) for k in found)  # type: ignore[misc]
    if not holders:
        layout = MtpLayout.STRIPPED if declared > 0 else MtpLayout.NOT_DECLARED
        return MtpProbe(layout=layout, declared_layers=declared)
    if len(prefixes) > 1:
        raise MtpUnavailable(f"MTP tensors under several prefixes {sorted(prefixes)} in {path}")
    prefix = prefixes.pop()
    keys = [k for ks in holders.values() for k in ks]
    hf_naming = prefix in _HF_PREFIXES
    if all(_is_main_shard(f) for f in holders):
        layout = MtpLayout.ORIGINAL if hf_naming else MtpLayout.EMBEDDED_MLX
    else:
        layout = MtpLayout.SIDECAR
    return MtpProbe(
        layout=layout,
        declared_layers=declared,
        files=tuple(sorted(holders)),
        prefix=prefix,
        num_tensors=len(keys),
        norm_offsets=hf_naming,
        fused_experts=any(k.endswith("experts.gate_up_proj") for k in keys),
        quantized=any(k.endswith(".scales") for k in keys),
    )


def _read_mtp_tensors(path: Path, probe: MtpProbe) -> dict[str, mx.array]:
    assert probe.prefix is not None
    tensors: dict[str, mx.array] = {}
    for file in probe.files:
        for key, value in mx.load(str(path / file)).items():
            if key.startswith(probe.prefix):
                tensors[key[len(probe.prefix) :]] = value
    return tensors


def _split_experts(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """HF MoE experts -> mlx-lm's SwitchGLU: fused gate_up (E, 2I, D) or one tensor per expert."""
    out: dict[str, mx.array] = {}
    per_expert: dict[tuple[str, str], dict[int, mx.array]] = {}
    for key, value in weights.items():
        if key.endswith("experts.gate_up_proj"):
            base = key.removesuffix("experts.gate_up_proj")
            mid = value.shape[-2] // 2
            out[f"{base}switch_mlp.gate_proj.weight"] = value[..., :mid, :]
            out[f"{base}switch_mlp.up_proj.weight"] = value[..., mid:, :]
        elif key.endswith("experts.down_proj"):
            base = key.removesuffix("experts.down_proj")
            out[f"{base}switch_mlp.down_proj.weight"] = value
        elif ".experts." in key and key.endswith("_proj.weight"):
            # Qwen3-Next style: mlp.experts.<e>.<proj>.weight
            base, rest = key.split(".experts.", 1)
            expert, proj, _ = rest.split(".", 2)
            per_expert.setdefault((base, proj), {})[int(expert)] = value
        else:
            out[key] = value
    for (base, proj), experts in per_expert.items():
        stacked = mx.stack([experts[e] for e in sorted(experts)])
        out[f"{base}.switch_mlp.{proj}.weight"] = stacked
    return out


def _apply_norm_offsets(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    def is_norm(key: str) -> bool:
        return key == "norm.weight" or key.endswith(_NORM_SUFFIXES)

    return {k: (v + 1.0 if is_norm(k) and v.ndim == 1 else v) for k, v in weights.items()}


def _quantize_like_weights(head: nn.Module, weights: dict[str, mx.array]) -> None:
    """Quantize exactly the modules whose weights are stored quantized, as they were stored."""

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(head, class_predicate=predicate)


def sanitize_mtp_weights(weights: dict[str, mx.array], probe: MtpProbe) -> dict[str, mx.array]:
    """Head-relative names in mlx-lm conventions (split experts, absolute norms)."""
    weights = _split_experts(weights)
    if probe.norm_offsets:
        weights = _apply_norm_offsets(weights)
    return weights


def load_mtp_head(path: str | Path, text_args: Any, probe: MtpProbe | None = None) -> MtpHead:
    """Build the MTP head of the checkpoint at ``path`` with its recovered weights.

    ``text_args`` is the target's ``TextModelArgs`` (``model.language_model.args``).
    Raises ``MtpUnavailable`` for a stripped checkpoint, one that declares no head, or a head
    whose tensors are incomplete — never returns a randomly initialised head.
    """
    path = Path(path)
    probe = probe or probe_mtp(path)
    if not probe.available:
        raise MtpUnavailable(probe.describe())
    if probe.declared_layers > 1:
        raise MtpUnavailable(
            f"mtp_num_hidden_layers={probe.declared_layers} is not supported (one layer only)"
        )
    weights = sanitize_mtp_weights(_read_mtp_tensors(path, probe), probe)
    head = MtpHead(text_args)
    if probe.quantized:
        _quantize_like_weights(head, weights)
    expected = {k for k, _ in tree_flatten(head.parameters())}
    missing = sorted(expected - weights.keys())
    unexpected = sorted(weights.keys() - expected)
    if missing:
        raise MtpUnavailable(f"{len(missing)} MTP tensors missing in {path}, e.g. {missing[:3]}")
    if unexpected:
        raise MtpUnavailable(f"unexpected MTP tensors in {path}: {unexpected[:3]}")
    for key, value in tree_flatten(head.parameters()):
        if weights[key].shape != value.shape:
            raise MtpUnavailable(
                f"MTP tensor {key} has shape {weights[key].shape}, expected {value.shape}"
            )
    head.load_weights(list(weights.items()), strict=True)
    head.eval()
    mx.eval(head.parameters())
    return head

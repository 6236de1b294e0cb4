"""Tensor naming and value conventions of each checkpoint layout (pure: arrays in, arrays out).

MLX conventions are what mlx-lm holds after ``sanitize``; HF conventions are the original
Hugging Face checkpoint's. Converting MLX -> HF inverts mlx-lm's ``qwen3_5[_moe].sanitize``:

* ``language_model.model.X`` -> ``model.language_model.X``; ``language_model.lm_head.weight``
  -> ``lm_head.weight``; the MTP head's ``X`` -> ``mtp.X``.
* conv1d (C, K, 1) -> (C, 1, K).
* RMSNorm scales -> offsets (scale - 1) for the norms sanitize adds 1 to and for every MTP norm.
* MoE experts ``switch_mlp.{gate,up}_proj.weight`` (E, I, D) -> ``experts.gate_up_proj``
  (E, 2I, D) (gate rows first), ``switch_mlp.down_proj.weight`` (E, D, I) -> ``experts.down_proj``.
"""

from __future__ import annotations

import mlx.core as mx

from node.checkpoints.reference_mtp import is_mtp_offset_norm

# The suffixes mlx-lm's qwen3_5 sanitize adds 1.0 to (when it sees an HF conv1d).
MAIN_OFFSET_NORM_SUFFIXES = (
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    "model.norm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
)
HF_MTP_PREFIX = "mtp."


def _fuse_experts(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """``switch_mlp.{gate,up,down}_proj.weight`` -> ``experts.gate_up_proj`` / ``experts.down_proj``."""
    out: dict[str, mx.array] = {}
    for name, value in weights.items():
        if name.endswith("mlp.switch_mlp.gate_proj.weight"):
            base = name.removesuffix("switch_mlp.gate_proj.weight")
            up = weights[base + "switch_mlp.up_proj.weight"]
            out[base + "experts.gate_up_proj"] = mx.concatenate([value, up], axis=-2)
        elif name.endswith("mlp.switch_mlp.up_proj.weight"):
            continue  # fused with gate_proj above
        elif name.endswith("mlp.switch_mlp.down_proj.weight"):
            out[name.removesuffix("switch_mlp.down_proj.weight") + "experts.down_proj"] = value
        else:
            out[name] = value
    return out


def _hf_main_name(name: str) -> str:
    if name.startswith("language_model.model."):
        return "model.language_model." + name.removeprefix("language_model.model.")
    if name.startswith("language_model."):
        return name.removeprefix("language_model.")
    raise ValueError(f"unexpected MLX tensor name {name!r}")


def hf_main_weights(mlx_weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Main-model tensors (unquantized, MLX names) in the original HF layout."""
    out: dict[str, mx.array] = {}
    for name, value in _fuse_experts(mlx_weights).items():
        if name.endswith("conv1d.weight"):
            value = mx.swapaxes(value, 1, 2)  # (C, K, 1) -> (C, 1, K)
        elif name.endswith(MAIN_OFFSET_NORM_SUFFIXES) and value.ndim == 1:
            value = value - 1.0
        out[_hf_main_name(name)] = value
    return out


def hf_mtp_weights(mtp_weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """MTP tensors (unquantized, ``mtp``-relative MLX names) as HF stores them: ``mtp.*``."""
    out: dict[str, mx.array] = {}
    for name, value in _fuse_experts(mtp_weights).items():
        if is_mtp_offset_norm(name):
            value = value - 1.0
        out[HF_MTP_PREFIX + name] = value
    return out


def hf_sort_key(name: str) -> tuple:
    """Order tensors like an HF checkpoint: embedding, layers by index, norm, head, MTP last."""
    parts = name.split(".")
    group = 3 if name.startswith(HF_MTP_PREFIX) or ".mtp." in name else 1
    if "embed_tokens" in name:
        group = 0
    elif "lm_head" in name or name.endswith(("language_model.norm.weight", "model.norm.weight")):
        group = 2
    indices = tuple(int(p) for p in parts if p.isdigit())
    return (group, indices, name)

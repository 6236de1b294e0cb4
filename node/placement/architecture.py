"""What a model's config.json says about memory: layer kinds, KV cache and recurrent state sizes.

Pure functions over the parsed config dict. HF and MLX-converted Qwen3.5/3.6 checkpoints nest the
language model's settings under ``text_config``; older and plain models keep them at the top.
The rules follow mlx-lm (``models/qwen3_5.py``, ``models/gated_delta.py``):

- layer ``i`` of a hybrid model is full attention iff ``(i + 1) % full_attention_interval == 0``,
  unless the config lists ``layer_types`` explicitly;
- a full-attention layer caches keys and values: ``2 * kv_heads * head_dim`` activations per token;
- a GatedDeltaNet layer keeps, per sequence, a conv state of ``(kernel - 1) * conv_dim``
  activations and a recurrent state of ``v_heads * v_dim * k_dim`` float32 values, whatever the
  context length.
"""

from __future__ import annotations

from typing import Any, Literal

LayerType = Literal["full_attention", "linear_attention"]
FULL: LayerType = "full_attention"
LINEAR: LayerType = "linear_attention"

# Hybrid families whose layers follow the full_attention_interval rule when the config does not
# spell out layer_types (mlx-lm's default interval is 4 for all of them).
HYBRID_MODEL_TYPES = ("qwen3_5", "qwen3_5_moe", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")
DEFAULT_FULL_ATTENTION_INTERVAL = 4
RECURRENT_STATE_BYTES_PER_VALUE = 4  # mlx-lm keeps the GatedDeltaNet state in float32

DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's settings: ``text_config`` merged over the top level.

    Top-level keys stay visible (``tie_word_embeddings`` and ``quantization`` often live only
    there) but the nested values win, as they describe the text model itself.
    """
    nested = config.get("text_config")
    if isinstance(nested, dict):
        return {**config, **nested}
    return dict(config)


def model_type(config: dict[str, Any]) -> str:
    """The top-level model type mlx-lm dispatches on (``qwen3_5``, not ``qwen3_5_text``)."""
    value = config.get("model_type") or text_config(config).get("model_type") or "unknown"
    return str(value)


def num_layers(tc: dict[str, Any]) -> int:
    value = tc.get("num_hidden_layers")
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"config num_hidden_layers must be a positive integer, got {value!r}")
    return value


def layer_types(tc: dict[str, Any]) -> list[LayerType]:
    """One entry per decoder layer: which kind of cache it keeps."""
    n = num_layers(tc)
    listed = tc.get("layer_types")
    if isinstance(listed, list) and len(listed) == n:
        # Anything but linear attention keeps a KV cache (sliding windows included: counting
        # them as full over-reserves a little, which is the safe side).
        return [LINEAR if kind == "linear_attention" else FULL for kind in listed]
    interval = tc.get("full_attention_interval")
    if interval is None and str(tc.get("model_type", "")) in HYBRID_MODEL_TYPES:
        interval = DEFAULT_FULL_ATTENTION_INTERVAL
    if interval is None:
        return [FULL] * n
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"config full_attention_interval must be >= 1, got {interval!r}")
    return [FULL if (i + 1) % interval == 0 else LINEAR for i in range(n)]


def head_dim(tc: dict[str, Any]) -> int:
    if tc.get("head_dim"):
        return int(tc["head_dim"])
    return int(tc["hidden_size"]) // int(tc["num_attention_heads"])


def kv_bytes_per_token_per_layer(tc: dict[str, Any], activation_bytes: int) -> int:
    """Keys + values one full-attention layer caches for one token."""
    kv_heads = int(tc.get("num_key_value_heads") or tc["num_attention_heads"])
    return 2 * kv_heads * head_dim(tc) * activation_bytes


def linear_state_bytes_per_layer(tc: dict[str, Any], activation_bytes: int) -> int:
    """Conv + recurrent state one GatedDeltaNet layer keeps for one sequence."""
    k_heads = int(tc["linear_num_key_heads"])
    v_heads = int(tc["linear_num_value_heads"])
    k_dim = int(tc["linear_key_head_dim"])
    v_dim = int(tc["linear_value_head_dim"])
    kernel = int(tc.get("linear_conv_kernel_dim", 4))
    conv_dim = 2 * k_heads * k_dim + v_heads * v_dim
    conv_state = (kernel - 1) * conv_dim * activation_bytes
    recurrent_state = v_heads * v_dim * k_dim * RECURRENT_STATE_BYTES_PER_VALUE
    return conv_state + recurrent_state


def context_length(tc: dict[str, Any], default: int = 32768) -> int:
    value = tc.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else default


def mtp_layer_count(tc: dict[str, Any]) -> int:
    """How many MTP decoder layers the config declares (0: no native MTP)."""
    for key in ("mtp_num_hidden_layers", "num_nextn_predict_layers"):
        value = tc.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def tie_word_embeddings(config: dict[str, Any]) -> bool:
    """Tied when either level says so (MLX conversions sometimes only keep the top-level key)."""
    nested = config.get("text_config")
    if isinstance(nested, dict) and "tie_word_embeddings" in nested:
        return bool(nested["tie_word_embeddings"])
    return bool(config.get("tie_word_embeddings", False))

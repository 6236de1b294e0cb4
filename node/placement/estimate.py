"""Model cards from a config alone: count every tensor a Qwen3.5/3.6 checkpoint holds.

Used for the shipped cards (written once from the published config.json numbers) and for models
whose weights are not on this machine. The inventory mirrors mlx-lm's ``qwen3_5`` modules
(gated attention's doubled ``q_proj``, GatedDeltaNet projections, dense MLP or sparse MoE with a
shared expert) and the HF MTP head (``mtp.fc``, three norms, one full-attention decoder layer);
``tests/test_placement_cards.py`` checks the counts against a lazily built mlx-lm model.

Quantized sizes follow mlx-lm's affine quantization: a weight of a Linear, Embedding or
SwitchLinear whose input width is a multiple of the group size is packed at ``bits`` per value
plus one scale and one bias (activation dtype) per group; MoE router gates stay at 8 bits
(mlx-lm's ``quant_predicate``); norms, conv weights and biases stay in the activation dtype;
``A_log`` stays float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any

from node.placement import architecture as arch
from node.placement.cards import ModelCard, NativeMtpSpec

ROUTER_BITS = 8
ROUTER_GROUP_SIZE = 64


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    quantizable: bool = False  # a Linear / Embedding / SwitchLinear weight
    router: bool = False  # MoE router gate: mlx-lm quantizes it at 8 bits
    float32: bool = False  # kept in float32 whatever the checkpoint dtype


def tensor_bytes(t: TensorSpec, bits: int, group_size: int, activation_bytes: int) -> int:
    """Bytes of one tensor in a checkpoint stored at ``bits`` (16/32 mean unquantized)."""
    n = prod(t.shape)
    if t.float32:
        return n * 4
    if bits >= 16:
        return n * bits // 8
    if not t.quantizable:
        return n * activation_bytes
    q_bits, q_group = (ROUTER_BITS, ROUTER_GROUP_SIZE) if t.router else (bits, group_size)
    if t.shape[-1] % q_group:
        return n * activation_bytes  # mlx-lm leaves widths the group does not divide alone
    packed = n * q_bits // 8
    scales_and_biases = 2 * (n // q_group) * activation_bytes
    return packed + scales_and_biases


def _linear(name: str, out_dim: int, in_dim: int) -> TensorSpec:
    return TensorSpec(f"{name}.weight", (out_dim, in_dim), quantizable=True)


def _norm(name: str, dim: int) -> TensorSpec:
    return TensorSpec(f"{name}.weight", (dim,))


def _full_attention(tc: dict[str, Any], prefix: str) -> list[TensorSpec]:
    hidden, heads = int(tc["hidden_size"]), int(tc["num_attention_heads"])
    kv_heads, hd = int(tc["num_key_value_heads"]), arch.head_dim(tc)
    # Qwen3.5 gated attention: q_proj yields the queries and their output gate.
    return [
        _linear(f"{prefix}.q_proj", heads * hd * 2, hidden),
        _linear(f"{prefix}.k_proj", kv_heads * hd, hidden),
        _linear(f"{prefix}.v_proj", kv_heads * hd, hidden),
        _linear(f"{prefix}.o_proj", hidden, heads * hd),
        _norm(f"{prefix}.q_norm", hd),
        _norm(f"{prefix}.k_norm", hd),
    ]


def _gated_delta_net(tc: dict[str, Any], prefix: str) -> list[TensorSpec]:
    hidden = int(tc["hidden_size"])
    key_dim = int(tc["linear_num_key_heads"]) * int(tc["linear_key_head_dim"])
    v_heads = int(tc["linear_num_value_heads"])
    value_dim = v_heads * int(tc["linear_value_head_dim"])
    conv_dim = 2 * key_dim + value_dim
    kernel = int(tc.get("linear_conv_kernel_dim", 4))
    return [
        TensorSpec(f"{prefix}.conv1d.weight", (conv_dim, kernel, 1)),
        _linear(f"{prefix}.in_proj_qkv", conv_dim, hidden),
        _linear(f"{prefix}.in_proj_z", value_dim, hidden),
        _linear(f"{prefix}.in_proj_b", v_heads, hidden),
        _linear(f"{prefix}.in_proj_a", v_heads, hidden),
        TensorSpec(f"{prefix}.dt_bias", (v_heads,)),
        TensorSpec(f"{prefix}.A_log", (v_heads,), float32=True),
        _norm(f"{prefix}.norm", int(tc["linear_value_head_dim"])),
        _linear(f"{prefix}.out_proj", hidden, value_dim),
    ]


def _mlp(tc: dict[str, Any], prefix: str) -> list[TensorSpec]:
    hidden = int(tc["hidden_size"])
    experts = int(tc.get("num_experts") or 0)
    if experts <= 0:
        inter = int(tc["intermediate_size"])
        return [
            _linear(f"{prefix}.gate_proj", inter, hidden),
            _linear(f"{prefix}.up_proj", inter, hidden),
            _linear(f"{prefix}.down_proj", hidden, inter),
        ]
    moe, shared = int(tc["moe_intermediate_size"]), int(tc["shared_expert_intermediate_size"])
    return [
        TensorSpec(f"{prefix}.gate.weight", (experts, hidden), quantizable=True, router=True),
        TensorSpec(f"{prefix}.switch_mlp.gate_proj.weight", (experts, moe, hidden), True),
        TensorSpec(f"{prefix}.switch_mlp.up_proj.weight", (experts, moe, hidden), True),
        TensorSpec(f"{prefix}.switch_mlp.down_proj.weight", (experts, hidden, moe), True),
        _linear(f"{prefix}.shared_expert.gate_proj", shared, hidden),
        _linear(f"{prefix}.shared_expert.up_proj", shared, hidden),
        _linear(f"{prefix}.shared_expert.down_proj", hidden, shared),
        TensorSpec(
            f"{prefix}.shared_expert_gate.weight", (1, hidden), quantizable=True, router=True
        ),
    ]


def decoder_layer_tensors(
    tc: dict[str, Any], kind: arch.LayerType, prefix: str
) -> list[TensorSpec]:
    hidden = int(tc["hidden_size"])
    if kind == arch.FULL:
        mixer = _full_attention(tc, f"{prefix}.self_attn")
    else:
        mixer = _gated_delta_net(tc, f"{prefix}.linear_attn")
    return [
        *mixer,
        _norm(f"{prefix}.input_layernorm", hidden),
        _norm(f"{prefix}.post_attention_layernorm", hidden),
        *_mlp(tc, f"{prefix}.mlp"),
    ]


def embedding_tensors(tc: dict[str, Any]) -> list[TensorSpec]:
    return [
        TensorSpec("embed_tokens.weight", (int(tc["vocab_size"]), int(tc["hidden_size"])), True)
    ]


def head_tensors(tc: dict[str, Any], tied: bool) -> list[TensorSpec]:
    hidden = int(tc["hidden_size"])
    tensors = [_norm("norm", hidden)]
    if not tied:
        tensors.append(_linear("lm_head", int(tc["vocab_size"]), hidden))
    return tensors


def mtp_tensors(tc: dict[str, Any]) -> list[TensorSpec]:
    """The HF MTP head: fc over [embedding, hidden], three norms, full-attention layer(s)."""
    hidden = int(tc["hidden_size"])
    tensors = [
        _linear("mtp.fc", hidden, 2 * hidden),
        _norm("mtp.pre_fc_norm_embedding", hidden),
        _norm("mtp.pre_fc_norm_hidden", hidden),
        _norm("mtp.norm", hidden),
    ]
    for j in range(arch.mtp_layer_count(tc)):
        tensors += decoder_layer_tensors(tc, arch.FULL, f"mtp.layers.{j}")
    return tensors


def _sum(tensors: list[TensorSpec], bits: int, group_size: int, activation_bytes: int) -> int:
    return sum(tensor_bytes(t, bits, group_size, activation_bytes) for t in tensors)


def card_from_config(
    config: dict[str, Any],
    *,
    card_id: str,
    source_repo: str | None = None,
    bits: int = 16,
    group_size: int = 64,
    mtp_k: tuple[int, int] | None = None,
    notes: list[str] | None = None,
    activation_bytes: int | None = None,
) -> ModelCard:
    """Estimate a card for a qwen3_5 / qwen3_5_moe config at ``bits`` (16 = bf16, 32 = fp32).

    ``mtp_k`` is (default_k, max_k) for native MTP; it only applies when the config declares
    MTP layers. ``activation_bytes`` is the unquantized dtype's size (norms, quantization
    scales, KV cache): 4 for fp32 checkpoints, else 2 (bf16), the default.
    """
    tc = arch.text_config(config)
    mtype = arch.model_type(config)
    if not mtype.startswith("qwen3_5"):
        raise ValueError(
            f"no parameter estimator for model_type {mtype!r}; derive the card from a checkpoint"
        )
    if activation_bytes is None:
        activation_bytes = 4 if bits == 32 else 2
    tied = arch.tie_word_embeddings(config)
    kinds = arch.layer_types(tc)
    layer_bytes = [
        _sum(decoder_layer_tensors(tc, kind, f"layers.{i}"), bits, group_size, activation_bytes)
        for i, kind in enumerate(kinds)
    ]
    embedding = _sum(embedding_tensors(tc), bits, group_size, activation_bytes)
    head = _sum(head_tensors(tc, tied), bits, group_size, activation_bytes)
    n_full = kinds.count(arch.FULL)
    n_linear = kinds.count(arch.LINEAR)
    native_mtp = None
    mtp_bytes = 0
    if arch.mtp_layer_count(tc) > 0 and mtp_k is not None:
        mtp_bytes = _sum(mtp_tensors(tc), bits, group_size, activation_bytes)
        native_mtp = NativeMtpSpec(
            default_k=mtp_k[0],
            max_k=mtp_k[1],
            num_layers=arch.mtp_layer_count(tc),
            head_bytes=mtp_bytes,
        )
    return ModelCard(
        id=card_id,
        source_repo=source_repo,
        model_type=mtype,
        num_layers=len(kinds),
        hidden_size=int(tc["hidden_size"]),
        vocab_size=int(tc["vocab_size"]),
        bytes=sum(layer_bytes) + embedding + head + mtp_bytes,
        layer_bytes=layer_bytes,
        layer_types=kinds,
        embedding_bytes=embedding,
        head_bytes=head,
        tie_word_embeddings=tied,
        kv_bytes_per_token=n_full * arch.kv_bytes_per_token_per_layer(tc, activation_bytes),
        linear_state_bytes=n_linear * arch.linear_state_bytes_per_layer(tc, activation_bytes)
        if n_linear
        else 0,
        context_length=arch.context_length(tc),
        bits=bits,
        group_size=group_size if bits < 16 else None,
        native_mtp=native_mtp,
        architecture=_architecture_summary(tc),
        notes=list(notes or []),
    )


ARCHITECTURE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "full_attention_interval",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "max_position_embeddings",
    "mtp_num_hidden_layers",
    "tie_word_embeddings",
)


def _architecture_summary(tc: dict[str, Any]) -> dict[str, Any]:
    """The config numbers a card was computed from, so it can be checked and recomputed."""
    return {k: tc[k] for k in ARCHITECTURE_KEYS if k in tc and tc[k] is not None}

"""Verify-mode forward of a qwen3_5 target that keeps every position's GatedDeltaNet state.

Speculative decoding runs the target over ``[last, d1..dK]`` and then keeps only the
accepted prefix.  Attention layers roll back by trimming their ``KVCache``.  GatedDeltaNet
layers carry a recurrent state that cannot be trimmed, so this forward leaves the linear
caches untouched and returns, per linear layer, what is needed to commit the state after
any prefix length:

- the recurrent state after each of the K+1 steps (the step function is mlx-lm's own, so
  the states are bit-identical to a plain decode of the same tokens);
- the convolution input ``[conv_state, qkv]``: the conv state after ``n`` tokens is the
  ``kernel - 1`` rows that end at token ``n``, a slice.

The forward is mlx-lm's own; only the linear-attention mixer is re-expressed here, built
from mlx-lm's ``gated_delta`` ops (the Metal kernel on a Mac, the ops loop on CPU), and swapped
in for the verify pass alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.gated_delta import (
    compute_g,
    gated_delta_kernel,
    gated_delta_ops,
    normalize_qk,
)


@dataclass
class PendingGdnState:
    """A linear layer's cache candidates after a verify pass, one per prefix length."""

    conv_input: mx.array  # [B, kernel-1 + T, conv_dim]
    states: list[mx.array]  # states[i]: recurrent state after i+1 tokens
    keep: int  # kernel - 1 rows of conv state

    def commit(self, cache: Any, n_tokens: int) -> None:
        """Set ``cache`` to its value after the first ``n_tokens`` verified tokens."""
        cache[0] = self.conv_input[:, n_tokens : n_tokens + self.keep, :]
        cache[1] = self.states[n_tokens - 1]


def _use_metal_kernel(k: mx.array) -> bool:
    # The same rule as mlx_lm.models.gated_delta.gated_delta_update.
    return (
        mx.default_device() == mx.gpu
        and mx.metal.is_available()
        and k.shape[-1] >= 32
        and k.shape[-1] % 32 == 0
    )


def gdn_verify(gdn: nn.Module, x: mx.array, cache: Any) -> tuple[mx.array, PendingGdnState]:
    """GatedDeltaNet forward over T tokens without touching ``cache``.

    Mirrors ``mlx_lm.models.qwen3_5.GatedDeltaNet.__call__`` (batch, no padding mask) but
    runs the recurrence one step at a time so each intermediate state is kept.
    """
    B, S, _ = x.shape
    qkv = gdn.in_proj_qkv(x)
    z = gdn.in_proj_z(x).reshape(B, S, gdn.num_v_heads, gdn.head_v_dim)
    b = gdn.in_proj_b(x)
    a = gdn.in_proj_a(x)

    keep = gdn.conv_kernel_size - 1
    conv_state = cache[0]
    if conv_state is None:
        conv_state = mx.zeros((B, keep, gdn.conv_dim), dtype=x.dtype)
    conv_input = mx.concatenate([conv_state, qkv], axis=1)
    conv_out = nn.silu(gdn.conv1d(conv_input))

    q, k, v = [
        t.reshape(B, S, h, d)
        for t, h, d in zip(
            mx.split(conv_out, [gdn.key_dim, 2 * gdn.key_dim], -1),
            [gdn.num_k_heads, gdn.num_k_heads, gdn.num_v_heads],
            [gdn.head_k_dim, gdn.head_k_dim, gdn.head_v_dim],
            strict=True,
        )
    ]
    q, k = normalize_qk(q, k, inv_scale=gdn.head_k_dim**-0.5, eps=1e-6)
    beta = mx.sigmoid(b)
    g = compute_g(gdn.A_log, a, gdn.dt_bias)

    state = cache[1]
    if state is None:
        state = mx.zeros((B, gdn.num_v_heads, gdn.head_v_dim, gdn.head_k_dim), mx.float32)

    step = gated_delta_kernel if _use_metal_kernel(k) else gated_delta_ops
    ys, states = [], []
    for t in range(S):
        y, state = step(
            q[:, t : t + 1],
            k[:, t : t + 1],
            v[:, t : t + 1],
            g[:, t : t + 1],
            beta[:, t : t + 1],
            state,
        )
        ys.append(y)
        states.append(state)
    out = ys[0] if S == 1 else mx.concatenate(ys, axis=1)
    out = gdn.norm(out, z)
    out = gdn.out_proj(out.reshape(B, S, -1))
    return out, PendingGdnState(conv_input=conv_input, states=states, keep=keep)


class _VerifyMixer(nn.Module):
    """Stands in for one GatedDeltaNet mixer during a verify pass: computes what the mixer
    would, keeps every position's state in ``pending``, and leaves the cache untouched."""

    def __init__(self, gdn: nn.Module) -> None:
        super().__init__()
        self.gdn = gdn
        self.pending: PendingGdnState | None = None

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        out, self.pending = gdn_verify(self.gdn, x, cache)
        return out


def verify_forward(
    text_model: nn.Module, inputs: mx.array, cache: list[Any]
) -> tuple[mx.array, list[PendingGdnState | None]]:
    """Target forward over ``inputs`` returning post-final-norm hidden states.

    This is mlx-lm's own forward (``Qwen3_5TextModel.__call__``: embedding, masks, decoder
    layers, final norm) with only the linear-attention mixers swapped for ``_VerifyMixer``
    for the duration of the call. Attention caches are extended as usual (trim them
    afterwards); linear caches are left as they were and a ``PendingGdnState`` per linear
    layer is returned for ``commit``.
    """
    # A pipeline stage's text model runs (and caches) only its own layers.
    layers = getattr(text_model, "pipeline_layers", text_model.layers)
    mixers = [_VerifyMixer(layer.linear_attn) if layer.is_linear else None for layer in layers]
    for layer, mixer in zip(layers, mixers, strict=True):
        if mixer is not None:
            layer.linear_attn = mixer
    try:
        hidden = text_model(inputs, cache)
    finally:
        for layer, mixer in zip(layers, mixers, strict=True):
            if mixer is not None:
                layer.linear_attn = mixer.gdn
    return hidden, [None if mixer is None else mixer.pending for mixer in mixers]


def commit_verified(
    cache: list[Any], pending: list[PendingGdnState | None], n_tokens: int, n_verified: int
) -> None:
    """Keep the first ``n_tokens`` of the ``n_verified`` tokens a verify pass consumed."""
    for c, p in zip(cache, pending, strict=True):
        if p is None:
            c.trim(n_verified - n_tokens)
        else:
            p.commit(c, n_tokens)

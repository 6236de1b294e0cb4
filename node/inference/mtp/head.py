"""The Qwen3.5/3.6 MTP head: one extra full-attention decoder layer that predicts t+2.

    e = pre_fc_norm_embedding(embed(t+1))
    h = pre_fc_norm_hidden(hidden_t)          # the target's post-final-norm hidden
    x = fc(concat[e, h])                      # embedding first
    x = DecoderLayer(x, own KV cache)         # mlx-lm's qwen3_5 layer, full attention
    logits = lm_head(norm(x))                 # the target's LM head (tied embeddings too)

The decoder layer is mlx-lm's own ``qwen3_5.DecoderLayer`` built with a full-attention
layer index, so attention, the dense MLP and the MoE block are the real implementations.
Chained drafting (K > 1) feeds the head's own post-norm output back in as ``hidden``.
The embedding and LM head are the target's; the head holds only its own 15 (dense) or
19 (MoE) tensors.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.models.qwen3_5 import DecoderLayer


class MtpHead(nn.Module):
    def __init__(self, args: Any) -> None:
        super().__init__()
        d, eps = args.hidden_size, args.rms_norm_eps
        self.pre_fc_norm_embedding = nn.RMSNorm(d, eps=eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(d, eps=eps)
        self.fc = nn.Linear(2 * d, d, bias=False)
        # Layer index interval-1 is a full-attention layer under mlx-lm's rule.
        self.layers = [DecoderLayer(args, layer_idx=args.full_attention_interval - 1)]
        self.norm = nn.RMSNorm(d, eps=eps)

    def __call__(self, embeddings: mx.array, hidden: mx.array, cache: KVCache) -> mx.array:
        """Post-norm head output for [B, T] (embedding of t+1, hidden of t) pairs."""
        x = mx.concatenate(
            [self.pre_fc_norm_embedding(embeddings), self.pre_fc_norm_hidden(hidden)], axis=-1
        )
        x = self.fc(x)
        x = self.layers[0](x, mask=create_attention_mask(x, cache), cache=cache)
        return self.norm(x)

    def make_cache(self) -> KVCache:
        return KVCache()

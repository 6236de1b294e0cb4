"""Thin helpers over mlx-lm's qwen3_5 model: hidden states and logits as separate steps.

``model.language_model.model(ids, cache)`` returns hidden states after the final norm;
keeping the LM head separate lets prefill compute logits for the last position only and
lets the MTP head reuse both the hidden states and the (possibly tied) LM head.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn


def text_model(model: nn.Module) -> nn.Module:
    """The decoder stack (embedding, layers, final norm) of an mlx-lm model."""
    return model.language_model.model


def embed(model: nn.Module, ids: mx.array) -> mx.array:
    return model.language_model.model.embed_tokens(ids)


def hidden_states(model: nn.Module, ids: mx.array, cache: list[Any]) -> mx.array:
    """Post-final-norm hidden states [B, T, D]; extends ``cache``."""
    return model.language_model.model(ids, cache)


def logits(model: nn.Module, hidden: mx.array) -> mx.array:
    """The target's LM head, tied embeddings included."""
    lm = model.language_model
    if lm.args.tie_word_embeddings:
        return lm.model.embed_tokens.as_linear(hidden)
    return lm.lm_head(hidden)

"""Thin helpers over an mlx-lm model: hidden states and logits as separate steps.

Every mlx-lm model with a standard layer stack has the same shape: a text model (embedding,
layers, final norm) whose ``__call__(ids, cache)`` returns post-final-norm hidden states, and an
LM head (``lm_head``, or the embedding itself when the weights are tied). Qwen3.5/3.6 nests it
one level deeper, under ``language_model``. Keeping the head separate lets prefill compute logits
for the last position only and lets the MTP head reuse both the hidden states and the (possibly
tied) LM head. ``tests/test_forward.py`` checks, for several architectures, that these steps
chained give exactly ``model(ids, cache)``.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn


def language_model(model: nn.Module) -> nn.Module:
    """The module that holds the text model and the LM head (the model itself, for most)."""
    return model.get("language_model", model)


def text_model(model: nn.Module) -> nn.Module:
    """The decoder stack (embedding, layers, final norm) of an mlx-lm model."""
    return language_model(model).model


def embed(model: nn.Module, ids: mx.array) -> mx.array:
    return text_model(model).embed_tokens(ids)


def hidden_states(model: nn.Module, ids: mx.array, cache: list[Any]) -> mx.array:
    """Post-final-norm hidden states [B, T, D]; extends ``cache``."""
    return text_model(model)(ids, cache)


def logits(model: nn.Module, hidden: mx.array) -> mx.array:
    """The target's LM head, tied embeddings included."""
    lm = language_model(model)
    if "lm_head" in lm:
        return lm.lm_head(hidden)
    return lm.model.embed_tokens.as_linear(hidden)

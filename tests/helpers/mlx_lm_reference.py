"""mlx-lm's own generation: the independent reference exactness tests compare with.

``mlx_lm_processors`` maps our ``SamplingParams`` onto mlx-lm's ``make_logits_processors``
(penalties, their context sizes, logit bias); ``mlx_lm_greedy`` is ``generate_step`` with an
argmax sampler, on the prompt alone; ``checkpoint_greedy`` loads a checkpoint with mlx-lm's
own ``load`` and remembers each answer for the test process."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors

from node.inference.sampling import SamplingParams

# Penalties and a logit bias the batching tests give some of their requests.
PENALTIES: dict[str, Any] = dict(
    repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2, logit_bias={7: 1.5}
)
# Penalties over short windows (16 tokens) and a logit bias, for the native-MTP tests: every
# verified position must see exactly the tokens accepted before it.
WINDOWED_PENALTIES = SamplingParams(
    repetition_penalty=1.3,
    repetition_context_size=16,
    presence_penalty=0.4,
    frequency_penalty=0.2,
    penalty_context_size=16,
    logit_bias={7: 1.5, 301: -2.0},
)


def mlx_lm_processors(params: SamplingParams) -> list:
    """mlx-lm's own logits processors for ``params`` (the independent reference)."""
    return make_logits_processors(
        logit_bias=params.logit_bias or None,
        repetition_penalty=params.repetition_penalty,
        repetition_context_size=params.repetition_context_size,
        presence_penalty=params.presence_penalty,
        presence_context_size=params.penalty_context_size,
        frequency_penalty=params.frequency_penalty,
        frequency_context_size=params.penalty_context_size,
    )


def mlx_lm_greedy(
    model: Any,
    prompt: Sequence[int],
    max_tokens: int,
    params: SamplingParams | None = None,
    **generate_step_options: Any,
) -> list[int]:
    """mlx-lm's greedy continuation of ``prompt`` (with ``params``' processors, if given)."""
    steps = generate_step(
        mx.array(list(prompt)),
        model,
        max_tokens=max_tokens,
        sampler=lambda x: mx.argmax(x, -1),
        logits_processors=mlx_lm_processors(params) if params is not None else None,
        **generate_step_options,
    )
    return [int(t) for t, _ in steps]


def mlx_lm_model(path: str | Path) -> Any:
    """The checkpoint at ``path`` as mlx-lm's own ``load`` builds it (once per process, whether
    the path comes as a ``str`` or a ``Path``)."""
    return _mlx_lm_model(str(path))


@functools.cache
def _mlx_lm_model(path: str) -> Any:
    return mlx_lm_load(path)[0]


@functools.cache
def _checkpoint_greedy(path: str, prompt: tuple[int, ...], n: int, prefill_step: int) -> list[int]:
    return mlx_lm_greedy(mlx_lm_model(path), prompt, n, prefill_step_size=prefill_step)


def checkpoint_greedy(path: Path, prompt: Sequence[int], n: int, prefill_step: int) -> list[int]:
    """mlx-lm's greedy ``n`` tokens after ``prompt`` from the checkpoint at ``path`` (loaded by
    mlx-lm itself), prefilling ``prefill_step`` tokens at a time; computed once per process."""
    return list(_checkpoint_greedy(str(path), tuple(prompt), n, prefill_step))

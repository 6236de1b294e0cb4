"""The engine edge of a request: API options in, the engines' request out; engine events in,
API events out. Pure (MLX-free) apart from the tokenizer a chat request is rendered with.

The node converts a request once at each edge: protobuf -> ``GenerateOptions``
(node.messages, validated there), ``GenerateOptions`` -> the engines' ``GenerateRequest``
(here, once an instance and its tokenizer are known), and back: the engines' ``TokenDelta`` is
the API's ``Delta``; ``GenerationDone`` becomes ``FinalStats`` (here) and then protobuf.
``macmesh generate --local`` runs the same two functions, so it prints what ``--node`` prints.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from node.inference.events import GenerationDone
from node.inference.requests import GenerateRequest
from node.inference.sampling import SamplingParams
from node.inference.stats import FinalStats
from node.messages import GenerateOptions, describe

DEFAULT_MAX_TOKENS = 256  # GenerateOptions.max_tokens = 0 means this


def engine_request(options: GenerateOptions, tokenizer: Any | None = None) -> GenerateRequest:
    """The engines' request for ``options``. Chat messages are rendered with ``tokenizer``'s
    chat template into token ids (engines see ids); ``ValueError`` names the bad field. The
    engine is chosen per instance (node.cluster.selector), so the request says "auto"."""
    ids = options.prompt_ids
    if options.messages is not None:
        if tokenizer is None or not getattr(tokenizer, "has_chat_template", False):
            raise ValueError("this model has no chat template; send text (raw) or prompt_ids")
        turns = [{"role": m.role, "content": m.content} for m in options.messages]
        ids = list(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True))
    try:
        return GenerateRequest(
            prompt=options.prompt,
            prompt_ids=ids,
            max_tokens=options.max_tokens or DEFAULT_MAX_TOKENS,
            sampling=SamplingParams(**options.sampling.model_dump()),
            mtp_k=options.mtp_k or None,
            ignore_eos=options.ignore_eos,
            raw=options.raw,
        )
    except ValidationError as exc:
        raise ValueError(describe(exc)) from None


def final_stats(done: GenerationDone, **update: Any) -> FinalStats:
    """The last event of a request from its engine's last event; ``update`` overrides stats
    fields (the instance's engine reason and stages)."""
    return FinalStats.of(done.stats, done.finish_reason, **update)

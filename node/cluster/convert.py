"""Wire <-> engine conversions for the InferenceService. Pure (MLX-free) apart from the
tokenizer a chat request is rendered with.

``engine_request`` turns a ``GenerateRequest`` message into the engines' typed request
(``ValueError`` naming the field for anything invalid); ``stats_to_proto`` and
``stats_from_proto`` carry ``GenerationStats`` across the wire both ways, so
``macmesh generate --node`` prints exactly what ``--local`` prints.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from node.inference.requests import GenerateRequest
from node.inference.sampling import SamplingParams
from node.inference.stats import GenerationStats, StageStats
from node.proto.macmesh.v1 import inference_pb2 as pb
from node.validation import describe

DEFAULT_MAX_TOKENS = 256  # GenerateRequest.max_tokens = 0 means this
CHAT_ROLES = ("system", "user", "assistant")


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    """Proto zeros mean "unset" for top_p and repetition_penalty (see inference.proto)."""
    try:
        return SamplingParams(
            temperature=msg.temperature,
            top_p=msg.top_p or 1.0,
            top_k=msg.top_k,
            min_p=msg.min_p,
            repetition_penalty=msg.repetition_penalty or 1.0,
            presence_penalty=msg.presence_penalty,
            frequency_penalty=msg.frequency_penalty,
            logit_bias=dict(msg.logit_bias),
            seed=msg.seed if msg.HasField("seed") else None,
        )
    except ValidationError as exc:
        raise ValueError(describe(exc, prefix="sampling.")) from None


def check_messages(msg: pb.GenerateRequest) -> None:
    """What can be checked before an instance (and its tokenizer) is chosen."""
    kind = msg.WhichOneof("prompt")
    if kind is None:
        raise ValueError("the request has no prompt: set text, prompt_ids or messages")
    if kind == "text" and not msg.text:
        raise ValueError("text is empty")
    if kind == "prompt_ids" and not msg.prompt_ids.ids:
        raise ValueError("prompt_ids is empty")
    if kind == "messages":
        if not msg.messages.messages:
            raise ValueError("messages is empty")
        for i, m in enumerate(msg.messages.messages):
            if m.role not in CHAT_ROLES:
                raise ValueError(f"messages[{i}].role={m.role!r} is not one of {CHAT_ROLES}")


def engine_request(msg: pb.GenerateRequest, tokenizer: Any | None = None) -> GenerateRequest:
    """The engines' request for ``msg``. Chat messages are rendered with ``tokenizer``'s chat
    template into token ids (so engines see ids); ``ValueError`` names the bad field."""
    check_messages(msg)
    kind = msg.WhichOneof("prompt")
    prompt: str | None = None
    ids: list[int] | None = None
    if kind == "text":
        prompt = msg.text
    elif kind == "prompt_ids":
        ids = list(msg.prompt_ids.ids)
    else:
        if tokenizer is None or not getattr(tokenizer, "has_chat_template", False):
            raise ValueError("this model has no chat template; send text (raw) or prompt_ids")
        turns = [{"role": m.role, "content": m.content} for m in msg.messages.messages]
        ids = list(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True))
    try:
        return GenerateRequest(
            prompt=prompt,
            prompt_ids=ids,
            max_tokens=msg.max_tokens or DEFAULT_MAX_TOKENS,
            sampling=sampling_params(msg.sampling),
            mtp_k=msg.mtp_k or None,
            ignore_eos=msg.ignore_eos,
            raw=msg.raw,
        )
    except ValidationError as exc:
        raise ValueError(describe(exc)) from None


def stats_to_proto(stats: GenerationStats, finish_reason: str) -> pb.GenerationStats:
    return pb.GenerationStats(
        engine=stats.engine,
        engine_reason=stats.engine_reason,
        drafter_kind=stats.drafter_kind or "",
        num_draft_tokens=stats.num_draft_tokens,
        proposed_draft_tokens=stats.proposed_draft_tokens,
        accepted_draft_tokens=stats.accepted_draft_tokens,
        acceptance_rate=stats.acceptance_rate or 0.0,
        prompt_tokens=stats.prompt_tokens,
        generation_tokens=stats.generation_tokens,
        prompt_tps=stats.prompt_tps,
        generation_tps=stats.generation_tps,
        stages=[
            pb.StageStats(
                node_id=s.node_id,
                address=s.address,
                start_layer=s.start_layer,
                end_layer=s.end_layer,
            )
            for s in stats.stages
        ],
        finish_reason=finish_reason,
        queue_seconds=stats.queue_seconds,
        time_to_first_token_seconds=stats.time_to_first_token_seconds,
    )


def stats_from_proto(msg: pb.GenerationStats) -> GenerationStats:
    engine = msg.engine if msg.engine in ("native_mtp", "local", "pipeline") else "local"
    return GenerationStats(
        engine=engine,  # type: ignore[arg-type]
        engine_reason=msg.engine_reason,
        drafter_kind="native_mtp" if msg.drafter_kind == "native_mtp" else None,
        num_draft_tokens=msg.num_draft_tokens,
        proposed_draft_tokens=msg.proposed_draft_tokens,
        accepted_draft_tokens=msg.accepted_draft_tokens,
        acceptance_rate=msg.acceptance_rate if msg.proposed_draft_tokens else None,
        prompt_tokens=msg.prompt_tokens,
        generation_tokens=msg.generation_tokens,
        prompt_tps=max(0.0, msg.prompt_tps),
        generation_tps=max(0.0, msg.generation_tps),
        stages=[
            StageStats(
                node_id=s.node_id,
                address=s.address,
                start_layer=s.start_layer,
                end_layer=s.end_layer,
            )
            for s in msg.stages
        ],
        queue_seconds=max(0.0, msg.queue_seconds),
        time_to_first_token_seconds=max(0.0, msg.time_to_first_token_seconds),
    )

"""The Forward stream's request-level wire pieces: sampling options and status codes.

``SamplingParams`` travel in a request's ``OpenRequest`` (stage.proto ``SamplingOptions``, all
of them, unlike the API's subset) to the last stage, which samples with them.
"""

from __future__ import annotations

import grpc
import mlx.core as mx
from pydantic import ValidationError

from node.inference.codec import FrameError, encode_tensor
from node.inference.sampling import SamplingParams
from node.proto.macmesh.v1 import stage_pb2 as pb

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


def sampling_to_proto(params: SamplingParams) -> pb.SamplingOptions:
    options = pb.SamplingOptions(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        repetition_context_size=params.repetition_context_size,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        penalty_context_size=params.penalty_context_size,
        logit_bias=params.logit_bias,
    )
    if params.seed is not None:
        options.seed = params.seed
    return options


def sampling_from_proto(options: pb.SamplingOptions) -> SamplingParams:
    """SamplingParams from the wire; raises FrameError naming an invalid value."""
    try:
        return SamplingParams(
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            min_p=options.min_p,
            repetition_penalty=options.repetition_penalty,
            repetition_context_size=options.repetition_context_size,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            penalty_context_size=options.penalty_context_size,
            logit_bias=dict(options.logit_bias),
            seed=options.seed if options.HasField("seed") else None,
        )
    except ValidationError as exc:
        raise FrameError(
            f"invalid sampling options: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}"
        ) from None


def activation_frames(
    rid: str, header: pb.Activation, hidden: mx.array, max_chunk_bytes: int
) -> list[pb.ForwardRequest]:
    """``header``'s positions with ``hidden`` as the next hop's input: the first frame carries
    the header and the first chunk, the others one chunk each."""
    chunks = encode_tensor(hidden, max_chunk_bytes)
    first = pb.Activation()
    first.CopyFrom(header)
    first.hidden.CopyFrom(chunks[0])
    frames = [pb.ForwardRequest(request_id=rid, activation=first)]
    frames += [
        pb.ForwardRequest(request_id=rid, activation=pb.Activation(hidden=chunk))
        for chunk in chunks[1:]
    ]
    return frames


def error_response(rid: str, code: int, message: str, position: int) -> pb.ForwardResponse:
    return pb.ForwardResponse(
        request_id=rid, error=pb.StageError(code=code, message=message, position=position)
    )

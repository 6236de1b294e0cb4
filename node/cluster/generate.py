"""One Generate on the instance's coordinator: validate, admit, run, stream.

The request arrives as ``GenerateOptions`` (already validated against the API contract). Here
it is checked against the instance (engine, tokenizer, vocabulary, context, max K, the node's
token limit), admitted into the instance's queue (``Instance.admit``: ``RESOURCE_EXHAUSTED``
beyond it; the one place admission is decided), and only then are response headers sent: a
client knows its request was accepted. The engine runs on a worker thread; when the client
goes away or its deadline passes, the call's callback sets the request's ``CancelToken`` and
every stage frees its caches. Events go out as API events (``Delta`` / ``FinalStats``),
converted to protobuf once by the caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from queue import Empty, SimpleQueue
from typing import Any

import grpc

from node.cluster.convert import engine_request, final_stats
from node.cluster.errors import Code, abort
from node.cluster.limits import Limits, check_prompt_tokens
from node.cluster.live import CancelToken, Instance
from node.cluster.selector import EngineChoice, request_engine
from node.cluster.stops import StopMatcher
from node.inference.events import GenerationDone, TokenDelta
from node.inference.stats import FinalStats, rate
from node.logging import get_logger
from node.messages import Delta, GenerateOptions

log = get_logger(__name__)

POLL_S = 0.1


def cancel_token(context: grpc.ServicerContext) -> CancelToken:
    """Set when the call ends for any reason: client gone, deadline passed, or done."""
    cancel = CancelToken()
    if not context.add_callback(cancel.set):  # the call already ended
        cancel.set()
    return cancel


def serve(
    instance: Instance,
    options: GenerateOptions,
    limits: Limits,
    cancel: CancelToken,
    context: grpc.ServicerContext,
) -> Iterator[Delta | FinalStats]:
    """The events of one request on ``instance`` (this node coordinates it)."""
    try:
        choice = request_engine(
            options.engine, instance.choice.engine, instance.choice.reason, len(instance.stages)
        )
        request = engine_request(options, instance.tokenizer)
        prompt_ids = instance.validate(request, choice)
        check_prompt_tokens(len(prompt_ids), limits)
        release = instance.admit(cancel)
    except Exception as exc:
        abort(context, exc)
        return
    events: SimpleQueue[Any] = SimpleQueue()
    threading.Thread(
        target=_run,
        args=(instance, request, choice, cancel, events, release),
        name=f"generate-{instance.instance_id}",
        daemon=True,
    ).start()
    context.send_initial_metadata(())  # accepted: the request is validated and queued
    yield from _stream(
        instance, choice, len(prompt_ids), options.stop, events, cancel, context, options.request_id
    )


def _run(
    instance: Instance,
    request: Any,
    choice: EngineChoice,
    cancel: CancelToken,
    events: SimpleQueue[Any],
    release: Callable[[], None],
) -> None:
    """The engine loop of one request, on its own thread: it ends (and frees the request's
    caches) when the request finishes or is cancelled, whatever happens to the gRPC call."""
    try:
        finished = False
        for event in instance.generate(request, choice, cancel):
            events.put(("event", event))
            finished = event.kind == "done"
            if cancel.is_set():
                return
        if not finished and not cancel.is_set():
            events.put(("end", None))  # the instance went away without finishing the request
    except Exception as exc:
        events.put(("error", exc))
    finally:
        release()


def _stream(
    instance: Instance,
    choice: EngineChoice,
    prompt_tokens: int,
    stops: list[str],
    events: SimpleQueue[Any],
    cancel: CancelToken,
    context: grpc.ServicerContext,
    request_id: str = "",
) -> Iterator[Delta | FinalStats]:
    stop = StopMatcher(stops)
    began = time.perf_counter()
    first_at: float | None = None
    tokens = 0
    outcome = "cancelled"  # unless it ends any other way
    try:
        while True:
            try:
                kind, payload = events.get(timeout=POLL_S)
            except Empty:
                if not cancel.is_set():
                    continue
                if context.is_active():  # cancelled, but not by the client: an unload
                    why = getattr(instance, "failure", "") or "it was unloaded"
                    context.abort(Code.UNAVAILABLE, f"instance {instance.instance_id}: {why}")
                return  # the client is gone (or its deadline passed); the worker stopped
            if kind == "error":
                outcome = "failed"
                abort(context, payload)
                return
            if kind == "end":
                context.abort(Code.UNAVAILABLE, "the instance was unloaded while the request ran")
                return
            if isinstance(payload, GenerationDone):
                tail = stop.flush()
                if tail:
                    yield Delta(text=tail, token_ids=[])
                stats = final_stats(
                    payload, engine_reason=choice.reason, stages=instance.stage_stats()
                )
                instance.record(stats)
                outcome = "finished"
                yield stats
                return
            assert isinstance(payload, TokenDelta)
            first_at = first_at or time.perf_counter()
            tokens += len(payload.token_ids)
            text = stop.feed(payload.text)
            if text or not stop.stopped:
                yield Delta(text=text, token_ids=payload.token_ids)
            if stop.stopped:
                cancel.set()  # the engine stops; its caches are freed
                stats = _stopped_stats(instance, choice, prompt_tokens, tokens, began, first_at)
                stats = stats.model_copy(update={"stop_sequence": stop.matched})
                instance.record(stats)
                outcome = "finished"
                yield stats
                return
    finally:
        cancel.set()  # whatever ended the stream, the request ends with it
        # The request's fate, under the caller's request_id (the proto's contract).
        log.info(
            "request ended",
            request_id=request_id,
            instance=instance.instance_id,
            outcome=outcome,
            tokens=tokens,
        )


def _stopped_stats(
    instance: Instance,
    choice: EngineChoice,
    prompt_tokens: int,
    tokens: int,
    began: float,
    first_at: float | None,
) -> FinalStats:
    """Stats of a request a stop string ended (the engine's own stats never came)."""
    now = time.perf_counter()
    first = first_at or now
    return FinalStats(
        engine=choice.engine,
        engine_reason=choice.reason,
        drafter_kind="native_mtp" if choice.engine in ("native_mtp", "pipeline_mtp") else None,
        prompt_tokens=prompt_tokens,
        generation_tokens=tokens,
        prompt_tps=rate(prompt_tokens, first - began),
        generation_tps=rate(max(tokens - 1, 0), now - first),
        stages=instance.stage_stats(),
        finish_reason="stop",
    )

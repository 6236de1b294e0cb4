"""The pipeline coordinator: loads the stages of a placement and runs the request loop.

``PipelineEngine(model, placement, addresses)`` loads each stage's layer range (stage 0
in-process when it sits on this node, the others through ``StageService.LoadShard`` with the
next hop's address), then ``generate(request)`` streams the same ``TokenDelta`` /
``GenerationDone`` events as the local engines.

One Forward stream carries every request. Prefill is cut like mlx-lm's ``generate_step`` (the
prompt minus its last token in ``prefill_step_size`` pieces, then the last token alone, which
is the first one sampled), so a greedy pipelined run computes exactly what mlx-lm computes.
Each sampled token comes from the last stage straight to the coordinator, on a return stream
the coordinator keeps open to the last stage (a ring: the token does not retrace the chain;
with stage 0 here, a token costs one hop per stage, N, instead of 2(N-1)). The coordinator
decides right there (on the receiving thread, not the consumer's) whether to stop or to feed
the token back in; so several requests are in flight at once and different stages work on different
requests at the same time. Finishing, cancelling or abandoning a request's iterator sends a
release down the pipeline, and every stage frees that request's caches.

Batching: the last stage samples the rows of a batched forward together and sends their tokens
home as one ``TokenBatch``; the coordinator feeds the ones that go on back to stage 0 as one
``ActivationBatch``, and stage 0 batches whatever waits at it (node.inference.stage_batch), so
the decode steps of the requests in flight go through each stage as one [B, 1] forward. At
most ``max_batch`` requests are in flight (the memory the plan budgeted on every stage: caches
for ``max_batch`` sequences of ``context_tokens``); the others wait for a place, and a prompt
that does not fit ``context_tokens`` is refused with RESOURCE_EXHAUSTED naming the budget.

How a daemon drives it (the planner's ``Placement`` fits ``PlacementLike`` as is)::

    engine = PipelineEngine(checkpoint_dir, placement, {n.id: n.grpc_address for n in nodes},
                            local_node_id=daemon.node_id, remote_model=model_name)
    engine.load()                        # LoadShard everywhere; returns each stage's ShardInfo
    for event in engine.generate(request, request_id=rid):   # TokenDelta..., GenerationDone
        ...
    engine.cancel(rid)                   # from any thread; the iterator just ends
    engine.status()                      # StageStatus per stage (cached requests, frames)
    engine.close()                       # UnloadShard everywhere

Errors: ``PipelineError`` with the failing stage's gRPC status code (INVALID_ARGUMENT for a
rejected frame, UNAVAILABLE when a stage is unreachable or died mid-request).
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any, Protocol

import grpc
from mlx_lm.utils import load_config, load_tokenizer

from node.inference.batching.scheduler import DEFAULT_MAX_BATCH
from node.inference.codec import DEFAULT_CHUNK_BYTES
from node.inference.engine import OutputTracker
from node.inference.events import GenerationDone, GenerationEvent
from node.inference.link import ForwardLink, stage_channel
from node.inference.prompt_cache import PromptCache, Snapshot
from node.inference.requests import GenerateRequest, check_against_model, prompt_token_ids
from node.inference.shard import load_shard
from node.inference.stage_runtime import StageRuntime
from node.inference.stage_session import StageSession
from node.inference.stage_wire import sampling_to_proto
from node.inference.stats import GenerationStats, StageStats, rate
from node.logging import get_logger
from node.proto.macmesh.v1 import stage_pb2 as pb
from node.proto.macmesh.v1 import stage_pb2_grpc as pb_grpc

log = get_logger(__name__)

# mlx-lm's generate_step default: the prompt minus its last token goes through in pieces this big.
PREFILL_STEP_SIZE = 2048
DEFAULT_LOAD_TIMEOUT = 600.0
ADMIT_POLL_S = 0.05  # how often a request waiting for a place checks whether it was cancelled


class StageLike(Protocol):
    """What the engine needs of a placement stage (``node.placement.planner.Stage`` fits)."""

    node_id: str
    start_layer: int
    end_layer: int


class PlacementLike(Protocol):
    stages: Sequence[StageLike]


@dataclass(frozen=True)
class PipelineStage:
    """A stage given by hand (tests, benchmarks); same fields the planner's ``Stage`` has."""

    node_id: str
    start_layer: int
    end_layer: int


@dataclass(frozen=True)
class SimplePlacement:
    stages: list[PipelineStage]

    @classmethod
    def even(cls, num_layers: int, node_ids: Sequence[str]) -> SimplePlacement:
        """Contiguous ranges, the first stages taking the extra layers."""
        base, extra = divmod(num_layers, len(node_ids))
        stages, start = [], 0
        for i, node in enumerate(node_ids):
            end = start + base + (1 if i < extra else 0)
            stages.append(PipelineStage(node, start, end))
            start = end
        return cls(stages)


class PipelineError(RuntimeError):
    """A request (or the pipeline) failed; ``code`` is the gRPC status of the failing stage."""

    def __init__(self, code: grpc.StatusCode, message: str, position: int | None = None) -> None:
        where = f"stage {position}: " if position is not None else ""
        super().__init__(f"{code.name}: {where}{message}")
        self.code = code
        self.position = position


_STATUS_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}


def status_for_code(code: int) -> grpc.StatusCode:
    """The gRPC status a ``StageError.code`` names."""
    return _STATUS_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)


@dataclass
class _Active:
    """A request in flight, as the coordinator's receiving side sees it."""

    request_id: str
    stop_ids: set[int]
    max_new: int  # tokens to generate at most (max_tokens, bounded by the context)
    events: SimpleQueue[tuple[str, Any]] = field(default_factory=SimpleQueue)
    generated: int = 0
    admitted: bool = False  # holds one of the engine's max_batch places
    released: bool = False
    # Prompt cache: the tokens the stages' caches hold once the frames sent have run, whether
    # the generation ended (not cancelled: its caches are worth keeping), the prompt tokens
    # served from a snapshot, and the prompt-end snapshot the stages took but the store has
    # not taken in yet (its id and tokens: stored once the first token shows every stage ran
    # the prompt).
    history: list[int] = field(default_factory=list)
    finished: bool = False
    cached: int = 0
    prompt_end: tuple[int, list[int]] | None = None

    def stats(self) -> dict[str, Any]:
        """The engine-specific fields of the request's final stats."""
        return {"engine": "pipeline"}


def _check_stages(stages: Sequence[StageLike], num_layers: int) -> None:
    if not stages:
        raise ValueError("placement has no stages")
    expected = 0
    for i, stage in enumerate(stages):
        if stage.start_layer != expected or stage.end_layer <= stage.start_layer:
            raise ValueError(
                f"stage {i} on {stage.node_id!r} covers [{stage.start_layer}, {stage.end_layer}); "
                f"stages must be contiguous and non-empty starting at layer {expected}"
            )
        expected = stage.end_layer
    if expected != num_layers:
        raise ValueError(
            f"stages cover layers [0, {expected}) but the model has {num_layers} layers"
        )


class PipelineEngine:
    """Pipelined generation over the stages of a placement.

    ``model`` is the checkpoint directory on this node (tokenizer, config and, when stage 0
    is local, its weights); ``remote_model`` is what other nodes are told to load (defaults
    to the same path). ``addresses`` maps node ids to ``host:port`` of their StageService.
    """

    kind = "pipeline"

    def __init__(
        self,
        model: str | Path,
        placement: PlacementLike,
        addresses: Mapping[str, str],
        *,
        local_node_id: str | None = None,
        remote_model: str | None = None,
        instance_id: str | None = None,
        reason: str = "",
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        prefill_step_size: int = PREFILL_STEP_SIZE,
        load_timeout: float = DEFAULT_LOAD_TIMEOUT,
        token_timeout: float | None = None,
        direct_return: bool = True,
        instance_record: Any = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        context_tokens: int | None = None,
        prompt_cache_bytes: int = 0,
    ) -> None:
        self.model_path = Path(model).expanduser()
        self.config = load_config(self.model_path)
        text = self.config.get("text_config", self.config)
        self.num_layers = int(text["num_hidden_layers"])
        self.vocab_size = int(text["vocab_size"])
        self.context_length = int(text.get("max_position_embeddings", 1 << 20))
        self.stages = list(placement.stages)
        _check_stages(self.stages, self.num_layers)
        self.local_node_id = local_node_id
        self.local_first = local_node_id is not None and self.stages[0].node_id == local_node_id
        remote = self.stages[1:] if self.local_first else self.stages
        missing = [s.node_id for s in remote if s.node_id not in addresses]
        if missing:
            raise ValueError(f"no address for stage nodes {missing}")
        self.addresses = dict(addresses)
        self.remote_model = remote_model or str(self.model_path)
        self.instance_id = instance_id or f"pipe-{uuid.uuid4().hex[:12]}"
        self.reason = reason or f"pipeline across {len(self.stages)} nodes"
        self.max_chunk_bytes = max_chunk_bytes
        self.prefill_step_size = prefill_step_size
        self.load_timeout = load_timeout
        self.token_timeout = token_timeout  # longest wait for the next token (None: no limit)
        # Tokens straight from the last stage (False: back up the chain, the control case).
        self.direct_return = direct_return
        # inference_pb2.Instance sent with every LoadShard: what a stage holder needs to take
        # over coordination when this coordinator dies (node.cluster.failover).
        self.instance_record = instance_record
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        # Positions per sequence the plan budgeted memory for (None: the model's context).
        self.context_tokens = min(context_tokens or self.context_length, self.context_length)
        self._places = threading.BoundedSemaphore(max_batch)
        self.tokenizer = load_tokenizer(
            self.model_path, eos_token_ids=self.config.get("eos_token_id")
        )
        self.eos_ids = set(getattr(self.tokenizer, "eos_token_ids", set()) or set())
        self.shards: list[pb.ShardInfo] = []
        self._channels: dict[str, grpc.Channel] = {}
        self._local: StageRuntime | None = None
        self._session: StageSession | None = None
        self._link: ForwardLink | None = None
        self._return: ForwardLink | None = None  # the return stream from the last stage
        self._route = ""  # its route, named in every request's open frame
        self._send_lock = threading.Lock()
        self._active: dict[str, _Active] = {}
        self._lock = threading.Lock()
        self._loaded = False
        self.mtp_head_on_last = False  # pipeline_mtp: the last stage also loads the MTP head
        # The prompt cache: which prefixes are cached is decided here, the payloads live on
        # the stages (node.inference.stage_cache), each its own layers'. The store's entries
        # hold only a snapshot id and count the bytes every stage holds for it.
        self.prompt_cache = self._make_prompt_cache(prompt_cache_bytes)
        self._snapshot_ids = itertools.count(1)
        self._evicted: list[int] = []  # snapshot ids the stages should forget (store's lock)
        self._cache_lock = threading.RLock()  # a lookup and its open frame go out together

    def _make_prompt_cache(self, budget: int) -> PromptCache | None:
        if budget <= 0 or self.kind != "pipeline":  # pipeline_mtp: its head state is not kept
            return None
        try:
            from node.placement.checkpoint import card_from_checkpoint

            card = card_from_checkpoint(self.model_path)
        except Exception as exc:  # no sizes, no budget to keep: run without the cache
            log.warning(
                "prompt cache off: no model card", path=str(self.model_path), error=str(exc)
            )
            return None
        self._snapshot_bytes = lambda tokens: (
            card.kv_bytes_per_token * tokens + card.linear_state_bytes
        )
        return PromptCache(budget, on_evict=lambda s: self._evicted.append(s.caches[0]))

    # ---- lifecycle ----

    def __enter__(self) -> PipelineEngine:
        if not self._loaded:
            self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stub(self, node_id: str) -> pb_grpc.StageServiceStub:
        address = self.addresses[node_id]
        if address not in self._channels:
            self._channels[address] = stage_channel(address)
        return pb_grpc.StageServiceStub(self._channels[address])

    def _next_hop(self, position: int) -> str:
        if position + 1 >= len(self.stages):
            return ""
        return self.addresses[self.stages[position + 1].node_id]

    def load(self) -> list[pb.ShardInfo]:
        """Load every stage (remote ones in parallel); returns what each stage reports."""
        positions = range(1 if self.local_first else 0, len(self.stages))

        def load_remote(position: int) -> pb.ShardInfo:
            stage = self.stages[position]
            request = pb.LoadShardRequest(
                instance_id=self.instance_id,
                model=self.remote_model,
                start_layer=stage.start_layer,
                end_layer=stage.end_layer,
                position=position,
                num_stages=len(self.stages),
                next_hop=self._next_hop(position),
                instance=self.instance_record,
                max_batch=self.max_batch,
                context_tokens=self.context_tokens,
                mtp_head=self.mtp_head_on_last and position == len(self.stages) - 1,
            )
            try:
                return self._stub(stage.node_id).LoadShard(request, timeout=self.load_timeout).shard
            except grpc.RpcError as exc:
                raise PipelineError(
                    exc.code(),
                    f"loading layers [{stage.start_layer}, {stage.end_layer}) on "
                    f"{stage.node_id} ({self.addresses[stage.node_id]}): {exc.details()}",
                    position,
                ) from None

        with ThreadPoolExecutor(max_workers=max(1, len(positions))) as pool:
            futures = {p: pool.submit(load_remote, p) for p in positions}
            infos: dict[int, pb.ShardInfo] = {}
            if self.local_first:
                stage = self.stages[0]
                shard = load_shard(self.model_path, stage.start_layer, stage.end_layer)
                self._local = StageRuntime(
                    shard,
                    instance_id=self.instance_id,
                    model=str(self.model_path),
                    position=0,
                    num_stages=len(self.stages),
                    next_hop=self._next_hop(0),
                    max_chunk_bytes=self.max_chunk_bytes,
                    max_batch=self.max_batch,
                    context_tokens=self.context_tokens,
                )
                infos[0] = self._local.info()
            errors = []
            for position, future in futures.items():
                try:
                    infos[position] = future.result()
                except PipelineError as exc:
                    errors.append(exc)
        self._loaded = True
        if errors:
            self.close()
            raise errors[0]
        self.shards = [infos[p] for p in sorted(infos)]
        try:
            self._open_return()
        except (grpc.RpcError, TimeoutError) as exc:  # tokens then come back up the chain
            log.warning("no return stream from the last stage", error=str(exc))
        log.info(
            "pipeline loaded",
            instance=self.instance_id,
            stages=[f"{s.node_id}[{s.start_layer},{s.end_layer})" for s in self.stages],
        )
        return self.shards

    def _open_return(self) -> None:
        """Open the return stream to the last stage, when it is not the first hop anyway
        (with one remote stage, the chain stream is already the straight way home)."""
        remote = len(self.stages) - (1 if self.local_first else 0)
        if not self.direct_return or remote < 2:
            return
        route = uuid.uuid4().hex
        link = ForwardLink(
            self._channel_to(self.stages[-1].node_id),
            self.instance_id,
            on_response=self._on_response,
            on_closed=self._on_return_closed,
            name="pipeline-return",
            return_route=route,
        )
        try:
            link.wait_accepted(timeout=self.load_timeout)
        except BaseException:
            link.cancel()
            raise
        with self._send_lock:
            self._return, self._route = link, route

    def close(self) -> None:
        """Stop every request, unload every stage, close connections."""
        with self._lock:
            active = list(self._active.values())
        for request in active:
            self._finish(
                request, ("error", PipelineError(grpc.StatusCode.CANCELLED, "engine closed"))
            )
        if self._link is not None:
            self._link.cancel()
            self._link = None
        with self._send_lock:
            returns, self._return, self._route = self._return, None, ""
        if returns is not None:
            returns.cancel()
        with self._send_lock:
            if self._session is not None:
                self._session.end()
                self._session = None
        positions = range(1 if self.local_first else 0, len(self.stages)) if self._loaded else []
        for position in positions:
            node = self.stages[position].node_id
            try:
                self._stub(node).UnloadShard(
                    pb.UnloadShardRequest(instance_id=self.instance_id), timeout=10
                )
            except grpc.RpcError as exc:
                log.warning("unload failed", node=node, error=exc.details())
        if self._local is not None:
            self._local.shutdown()
            self._local = None
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        self._loaded = False

    # ---- sending ----

    def _send(self, frames: list[pb.ForwardRequest]) -> None:
        """Hand frames to stage 0 (in-process) or to the stream to the first remote stage."""
        with self._send_lock:
            if self._local is not None:
                if self._session is None:
                    self._session = self._local.new_session(self._on_response)
                for frame in frames:
                    self._session.handle(frame)
                return
            if self._link is None:
                self._link = ForwardLink(
                    self._channel_to(self.stages[0].node_id),
                    self.instance_id,
                    on_response=self._on_response,
                    on_closed=self._on_link_closed,
                    name="pipeline-receiver",
                )
            self._link.send_all(frames)

    def _channel_to(self, node_id: str) -> grpc.Channel:
        self._stub(node_id)
        return self._channels[self.addresses[node_id]]

    def _release(self, request: _Active) -> None:
        with self._lock:
            if request.released:
                return
            request.released = True
            self._active.pop(request.request_id, None)
            admitted, request.admitted = request.admitted, False
        if admitted:  # a request still waiting for a place has nothing on the stages
            with self._cache_lock:
                release = pb.ReleaseRequest()
                if self.prompt_cache is not None:
                    if request.prompt_end is not None:  # never stored: the request failed
                        self._evicted.append(request.prompt_end[0])
                    if request.finished:  # the stages keep the state after all it fed
                        release.snapshot = next(self._snapshot_ids)
                        self._keep_snapshot(release.snapshot, request.history)
                frame = pb.ForwardRequest(request_id=request.request_id, release=release)
                self._send([frame, *self._forget_frames()])
            self._places.release()

    def _admit(self, request: _Active) -> bool:
        """Wait for one of the ``max_batch`` places; False when the request ended meanwhile."""
        while not self._places.acquire(timeout=ADMIT_POLL_S):
            if request.released:
                return False
        with self._lock:
            if not request.released:
                request.admitted = True
                return True
        self._places.release()
        return False

    @property
    def batch_size(self) -> int:
        """Requests on the stages (holding one of the ``max_batch`` places)."""
        with self._lock:
            return sum(1 for r in self._active.values() if r.admitted)

    @property
    def queued(self) -> int:
        """Requests waiting for a place."""
        with self._lock:
            return sum(1 for r in self._active.values() if not r.admitted)

    def _finish(self, request: _Active, event: tuple[str, Any]) -> None:
        self._release(request)
        request.events.put(event)

    # ---- receiving (link receiver thread, or the local worker) ----

    def _on_response(self, response: pb.ForwardResponse) -> None:
        kind = response.WhichOneof("kind")
        if kind == "tokens":
            entries = response.tokens.tokens
            self._on_tokens([(t.request_id, t.token) for t in entries if t.HasField("token")])
            self._on_verdicts([(t.request_id, t.verdict) for t in entries if t.HasField("verdict")])
            return
        if kind == "token":
            self._on_tokens([(response.request_id, response.token)])
            return
        if kind == "verdict":
            self._on_verdicts([(response.request_id, response.verdict)])
            return
        with self._lock:
            request = self._active.get(response.request_id)
        if request is None or request.released:
            return  # the ack of a released request
        if kind == "error":
            error = response.error
            status = status_for_code(error.code)
            self._finish(request, ("error", PipelineError(status, error.message, error.position)))

    def _on_tokens(self, tokens: list[tuple[str, pb.SampledToken]]) -> None:
        """Tokens of one forward: the requests that go on go back in together, as one batch."""
        rows: list[pb.BatchRow] = []
        delivered: list[tuple[_Active, int]] = []
        for request_id, token in tokens:
            with self._lock:
                request = self._active.get(request_id)
            if request is None or request.released:
                continue  # a late token of a released request
            request.generated += 1
            if request.prompt_end is not None:  # every stage ran the prompt: keep its end
                with self._cache_lock:
                    self._keep_snapshot(*request.prompt_end)
                    request.prompt_end = None
                    if forget := self._forget_frames():
                        self._send(forget)
            if token.token_id in request.stop_ids or request.generated >= request.max_new:
                request.finished = True
                self._release(request)
            else:
                request.history.append(token.token_id)
                rows.append(
                    pb.BatchRow(
                        request_id=request_id,
                        start_position=token.position,
                        token_ids=[token.token_id],
                        sample=True,
                    )
                )
            delivered.append((request, token.token_id))
        self._send_rows(rows)
        for request, token_id in delivered:
            request.events.put(("tokens", [token_id]))

    def _send_rows(self, rows: list[pb.BatchRow]) -> None:
        """The next steps of the requests that go on: one ``ActivationBatch`` per number of
        positions (a row alone as an ``Activation``), so they reach stage 0 together."""
        by_count: dict[int, list[pb.BatchRow]] = {}
        for row in rows:
            by_count.setdefault(len(row.token_ids), []).append(row)
        frames = []
        for same in by_count.values():
            if len(same) > 1:
                frames.append(pb.ForwardRequest(batch=pb.ActivationBatch(rows=same)))
                continue
            (row,) = same
            frame = pb.Activation(
                start_position=row.start_position,
                token_ids=row.token_ids,
                sample=True,
                verify=row.verify if row.HasField("verify") else None,
            )
            frames.append(pb.ForwardRequest(request_id=row.request_id, activation=frame))
        if frames:
            self._send(frames)

    def _on_verdicts(self, verdicts: list[tuple[str, pb.Verdict]]) -> None:
        """Verdicts of one forward (pipeline_mtp): the requests that go on go back together."""
        rows = []
        delivered: list[tuple[_Active, list[int]]] = []
        for request_id, verdict in verdicts:
            with self._lock:
                request = self._active.get(request_id)
            if request is None or request.released:
                continue  # a late verdict of a released request
            row, emitted = self._on_verdict(request, verdict)
            if row is not None:
                rows.append(row)
            if emitted:
                delivered.append((request, emitted))
        self._send_rows(rows)  # before the caller sees the tokens (and may release)
        for request, emitted in delivered:
            request.events.put(("tokens", emitted))

    def _on_verdict(
        self, request: _Active, verdict: pb.Verdict
    ) -> tuple[pb.BatchRow | None, list[int]]:
        """A pipeline_mtp verdict (node.inference.pipeline_mtp): the request's next verify row
        if it goes on, and the tokens it emits. Plain pipelines get none."""
        error = PipelineError(grpc.StatusCode.INTERNAL, "a verdict for a plain pipeline request")
        self._finish(request, ("error", error))
        return None, []

    def _on_return_closed(self, error: grpc.RpcError | None) -> None:
        with self._send_lock:
            if self._return is None:
                return  # closed by close()
            self._return, self._route = None, ""
        # Tokens already on their way home on it are lost: fail (and release, along the chain
        # that still stands) what is in flight; new requests take the chain back.
        detail = error.details() if error is not None else "stream ended"
        with self._lock:
            active = list(self._active.values())
        failure = PipelineError(
            grpc.StatusCode.UNAVAILABLE,
            f"the return stream from the last stage closed: {detail}",
            len(self.stages) - 1,
        )
        for request in active:
            self._finish(request, ("error", failure))

    def _on_link_closed(self, error: grpc.RpcError | None) -> None:
        with self._send_lock:
            self._link = None
        self._fail_active(error, "first stage stream closed", 0)

    def _fail_active(self, error: grpc.RpcError | None, what: str, position: int) -> None:
        """Fail every request in flight; the stages dropped the stream and its caches."""
        detail = error.details() if error is not None else "stream ended"
        with self._lock:
            active = list(self._active.values())
            for request in active:
                request.released = True  # the stages dropped the stream and its caches
                if request.admitted:
                    request.admitted = False
                    self._places.release()
            self._active.clear()
        for request in active:
            request.events.put(
                (
                    "error",
                    PipelineError(grpc.StatusCode.UNAVAILABLE, f"{what}: {detail}", position),
                )
            )

    # ---- the request API ----

    def prompt_ids(self, request: GenerateRequest) -> list[int]:
        ids = prompt_token_ids(request, self.tokenizer)
        check_against_model(
            request, ids, vocab_size=self.vocab_size, context_length=self.context_length, max_k=None
        )
        if len(ids) >= self.context_tokens:
            raise PipelineError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the prompt has {len(ids)} tokens; instance {self.instance_id} budgets memory "
                f"on every stage for {self.context_tokens} tokens per sequence x "
                f"{self.max_batch} sequences; launch it with a larger --context-length",
            )
        return ids

    def _new_active(
        self, request: GenerateRequest, request_id: str, stop_ids: set[int], max_new: int
    ) -> _Active:
        return _Active(request_id=request_id, stop_ids=stop_ids, max_new=max_new)

    def _first_frames(
        self, active: _Active, request: GenerateRequest, ids: list[int]
    ) -> list[pb.ForwardRequest]:
        """The request's open frame and its prompt (from the prompt cache's hit, if any)."""
        resume, begin, snapshot = self._use_prompt_cache(active, ids)
        open_frame = pb.ForwardRequest(
            request_id=active.request_id,
            open=pb.OpenRequest(
                sampling=sampling_to_proto(request.sampling),
                return_route=self._route,
                resume_snapshot=resume,
                resume_length=begin,
            ),
        )
        return [open_frame, *self._prefill_frames(active.request_id, ids, begin, snapshot)]

    def _prefill_frames(
        self, request_id: str, ids: list[int], begin: int = 0, snapshot: int = 0
    ) -> list[pb.ForwardRequest]:
        """Positions ``begin`` on: the prompt but its last token in chunks, then a
        ``SnapshotRequest`` (when ``snapshot``: the stages keep the prompt-end state), then
        the last token, which samples."""
        frames = []
        for start in range(begin, len(ids) - 1, self.prefill_step_size):
            end = min(start + self.prefill_step_size, len(ids) - 1)
            act = pb.Activation(start_position=start, token_ids=ids[start:end], sample=False)
            frames.append(pb.ForwardRequest(request_id=request_id, activation=act))
        if snapshot and len(frames):
            take = pb.SnapshotRequest(id=snapshot)
            frames.append(pb.ForwardRequest(request_id=request_id, snapshot=take))
        last = pb.Activation(start_position=len(ids) - 1, token_ids=ids[-1:], sample=True)
        frames.append(pb.ForwardRequest(request_id=request_id, activation=last))
        return frames

    # ---- the prompt cache (called with _cache_lock held) ----

    def _use_prompt_cache(self, active: _Active, ids: list[int]) -> tuple[int, int, int]:
        """(snapshot to resume, its length, prompt-end snapshot to take) for a request."""
        active.history = list(ids)
        if self.prompt_cache is None:
            return 0, 0, 0
        hit = self.prompt_cache.lookup(ids)
        resume, begin = (hit.snapshot.caches[0], hit.length) if hit is not None else (0, 0)
        active.cached = begin
        snapshot = 0
        if begin < len(ids) - 1:  # the prompt-end state is new
            snapshot = next(self._snapshot_ids)
            active.prompt_end = (snapshot, ids[:-1])
        return resume, begin, snapshot

    def _keep_snapshot(self, snapshot: int, tokens: list[int]) -> None:
        """Enter a snapshot the stages took in the store (or have them forget it)."""
        assert self.prompt_cache is not None
        entry = Snapshot(
            caches=[snapshot], nbytes=self._snapshot_bytes(len(tokens)), trimmable=False
        )
        if not self.prompt_cache.insert(tokens, entry):
            self._evicted.append(snapshot)

    def _forget_frames(self) -> list[pb.ForwardRequest]:
        evicted, self._evicted = self._evicted, []
        if not evicted:
            return []
        return [pb.ForwardRequest(forget=pb.ForgetSnapshots(ids=evicted))]

    def generate(
        self,
        request: GenerateRequest,
        reason: str | None = None,
        *,
        request_id: str | None = None,
    ) -> Iterator[GenerationEvent]:
        """Stream one request's events; closing the iterator early cancels the request.

        ``reason`` overrides the engine's reason in the final stats (as ``LocalEngine``).
        """
        if not self._loaded:
            raise PipelineError(
                grpc.StatusCode.FAILED_PRECONDITION, "pipeline is not loaded; call load()"
            )
        ids = self.prompt_ids(request)
        request_id = request_id or uuid.uuid4().hex
        room = self.context_tokens - len(ids)
        active = self._new_active(
            request,
            request_id,
            set() if request.ignore_eos else self.eos_ids,
            min(request.max_tokens, room),
        )
        with self._lock:
            if request_id in self._active:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._active[request_id] = active
        output = OutputTracker(
            tokenizer=self.tokenizer,
            eos_ids=active.stop_ids,
            max_tokens=request.max_tokens,
            room=room,
        )
        started = time.perf_counter()
        first_token_at: float | None = None
        try:
            if not self._admit(active):  # cancelled or closed while waiting for a place
                while not active.events.empty():
                    kind, payload = active.events.get_nowait()
                    if kind == "error":
                        raise payload
                return
            with self._cache_lock:  # the snapshot it resumes cannot be forgotten before
                self._send(self._first_frames(active, request, ids))
            while not output.done:
                try:
                    kind, payload = active.events.get(timeout=self.token_timeout)
                except Empty:
                    raise PipelineError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no token for {self.token_timeout} s from the pipeline",
                    ) from None
                if kind == "error":
                    raise payload
                if kind == "cancelled":
                    return
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                delta = output.add(payload)
                if delta is not None:
                    yield delta
            ended = time.perf_counter()
            first = first_token_at or ended
            yield GenerationDone(
                text=output.text,
                token_ids=output.tokens,
                finish_reason=output.finish_reason or "length",
                stats=GenerationStats(
                    **active.stats(),
                    engine_reason=reason or self.reason,
                    prompt_tokens=len(ids),
                    cached_prompt_tokens=active.cached,
                    generation_tokens=output.generated,
                    prompt_tps=rate(len(ids), first - started),
                    generation_tps=rate(max(output.generated - 1, 0), ended - first),
                    stages=[
                        StageStats(
                            node_id=s.node_id, start_layer=s.start_layer, end_layer=s.end_layer
                        )
                        for s in self.stages
                    ],
                ),
            )
        finally:
            self._release(active)

    def cancel(self, request_id: str) -> bool:
        """Stop a request from any thread; its iterator ends without a GenerationDone."""
        with self._lock:
            active = self._active.get(request_id)
        if active is None:
            return False
        self._finish(active, ("cancelled", None))
        return True

    @property
    def in_flight(self) -> list[str]:
        with self._lock:
            return list(self._active)

    # ---- observation ----

    def status(self) -> list[pb.StageStatus]:
        """Every stage's status, in pipeline order (the local stage 0 included)."""
        statuses = []
        for position, stage in enumerate(self.stages):
            if position == 0 and self._local is not None:
                statuses.append(self._local.status())
                continue
            response = self._stub(stage.node_id).Status(
                pb.StageStatusRequest(instance_id=self.instance_id), timeout=10
            )
            statuses.extend(response.stages)
        return statuses

    def cached_requests(self) -> list[int]:
        """How many requests hold caches on each stage (0 everywhere when idle)."""
        return [s.cached_requests for s in self.status()]

"""The coordinator: launches instances, runs their requests, unloads them.

The node that receives a Launch coordinates the instance: it resolves MODEL to a card, plans
over the live nodes, decides the engine, loads, and records the instance in its registry.

- A single-node instance runs inside this daemon (``LocalInstance``: ``LocalRunner``, with native
  MTP when the selector chose it). The planner is asked first for a placement on this very node,
  so the node you launch on is the node that serves, whenever the model fits there. When it only
  fits on another single node, the caller delegates the launch to that node (``delegate_to``).
- A multi-node instance is a ``PipelineInstance``: ``PipelineEngine`` loads stage 0 in-process
  when it lands here and every other stage through that node's ``StageService.LoadShard``.

Unloading cancels the instance's requests, unloads every stage (``UnloadShard`` on each remote
node), drops every reference to the weights and calls ``mx.clear_cache()`` so the memory goes
back to the system, not just to MLX's buffer cache.

Faults: a stage node that dies fails the instance, which is placed again (same id) on the
survivors. A coordinator that dies is replaced by a stage holder (``take_over``,
node.cluster.failover): the same instance id, the surviving stages adopted as they are, only
the lost layer ranges loaded again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.cluster import failover
from node.cluster.admission import DEFAULT_HEADROOM, admit_load
from node.cluster.catalog import Located, locate
from node.cluster.instances import (
    FAILED,
    READY,
    UNLOADING,
    InstanceInfo,
    InstanceRegistry,
    InstanceUnavailable,
    StageRef,
    layers_text,
)
from node.cluster.live import (
    DEFAULT_MAX_QUEUED,
    CancelToken,
    Instance,
    LocalInstance,
    PipelineInstance,
    release_instance,
)
from node.cluster.selector import EngineChoice, choose_instance_engine
from node.logging import get_logger
from node.placement import (
    InsufficientMemoryError,
    ModelCard,
    NodeCapacity,
    Placement,
    PlanOptions,
    format_bytes,
    plan,
    resolve_card,
)

log = get_logger(__name__)

Progress = Callable[[str], None]
REPLACE_ENV = "MACMESH_REPLACE_FAILED"  # "0" keeps failed instances failed
REPLACE_DELAY_ENV = "MACMESH_REPLACE_DELAY_S"
DEFAULT_REPLACE_DELAY_S = 2.0


# ---- errors the service maps to status codes ------------------------------------------------


class LaunchCancelled(Exception):
    """The caller went away (or its deadline passed) while the instance was loading."""


# ---- placement ---------------------------------------------------------------------------------


def node_capacities(nodes: list[Any]) -> list[NodeCapacity]:
    """Planner input from ``ClusterNode``s; daemons report 0 for what they could not measure."""
    out = []
    for node in nodes:
        data = node.model_dump()
        for key in ("total_memory_bytes", "memory_bandwidth_gbps"):
            if not data.get(key):
                data[key] = None
        out.append(NodeCapacity.model_validate(data))
    return out


def choose_placement(
    card: ModelCard,
    nodes: list[NodeCapacity],
    local_id: str,
    *,
    min_nodes: int = 1,
    context_length: int | None = None,
    pin_local: bool = False,
    sequences: int = 1,
    mtp_across_pipeline: bool = False,
    prompt_cache_bytes: int = 0,
) -> Placement:
    """Where an instance launched on ``local_id`` goes. Pure.

    The launching node holds the whole model when it can (the instance then runs in its
    daemon, native MTP included); otherwise the planner's choice over all live nodes — which
    may be a single other node (the launch is then delegated there) or several. ``pin_local``
    keeps this node in the placement whatever it costs (a delegated launch). Memory is budgeted
    for ``sequences`` concurrent sequences at the context (the instance's ``max_batch``) and
    for its prompt cache (``prompt_cache_bytes``, spread over the stages)."""
    base = {
        "min_nodes": max(1, min_nodes),
        "context_length": context_length,
        "max_concurrent_sequences": max(1, sequences),
        "mtp_across_pipeline": mtp_across_pipeline,
        "prompt_cache_bytes": prompt_cache_bytes,
    }
    if any(n.id == local_id for n in nodes) and (min_nodes <= 1 or pin_local):
        try:
            here = plan(card, nodes, PlanOptions(**base, pinned_nodes=[local_id]))
            if here.single_node or pin_local:
                return here
        except InsufficientMemoryError:
            if pin_local:
                raise
    return plan(card, nodes, PlanOptions(**base))


# ---- the coordinator ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchPlan:
    card: ModelCard
    placement: Placement
    delegate_to: str | None  # node id: the model fits on that one node only; launch there
    # What the launch asked for, so a re-placement asks for the same (a --min-nodes 2 instance
    # must not come back on one node as native_mtp without notice).
    min_nodes: int = 1
    context_length: int | None = None
    # Native MTP across the pipeline: asked for (the launch's flag or the coordinator's
    # MACMESH_PIPELINE_MTP), and by what, for the engine's reason.
    mtp_across_pipeline: bool = False
    opted_in_by: str = ""


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z._-]+", "-", Path(text).name or text).strip("-")[:40] or "model"


class Coordinator:
    def __init__(
        self,
        daemon: Any,
        registry: InstanceRegistry[Instance],
        *,
        native_mtp_enabled: bool,
        disabled_by: str,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        self.daemon = daemon
        self.registry = registry
        self.native_mtp_enabled = native_mtp_enabled
        self.disabled_by = disabled_by
        self.max_queued = max_queued
        self._load_lock = threading.Lock()  # one load at a time per node: memory is shared
        # Faults: a failed instance is launched again on the survivors (same id) after a delay.
        self.memory_headroom = float(
            getattr(daemon.settings, "launch_memory_headroom", DEFAULT_HEADROOM)
        )
        self.replace_failed = os.environ.get(REPLACE_ENV, "1") not in ("0", "false", "no")
        self.replace_delay_s = float(os.environ.get(REPLACE_DELAY_ENV, DEFAULT_REPLACE_DELAY_S))
        self._taking_over: set[str] = set()  # instance ids this node is taking over now
        self._taking_over_lock = threading.Lock()

    @property
    def models_dir(self) -> Path:
        return self.daemon.settings.models_dir

    def _names(self) -> dict[str, str]:
        return {n.id: n.name for n in self.daemon.cluster_view().nodes}

    # -- planning --

    @property
    def _prompt_cache_bytes(self) -> int:
        """Each instance's prompt-cache budget (--prompt-cache-mb): placed and kept."""
        return int(getattr(self.daemon.settings, "prompt_cache_mb", 0)) * 2**20

    def plan(
        self,
        model: str,
        min_nodes: int = 1,
        context_length: int | None = None,
        *,
        pin_local: bool = False,
        mtp_across_pipeline: bool = False,
    ) -> LaunchPlan:
        """Card and placement for MODEL over the live nodes (raises ``PlacementError``s).
        ``mtp_across_pipeline`` is the launch's opt-in; ``MACMESH_PIPELINE_MTP=1`` in this
        node's environment opts every launch in."""
        from node.inference.selector import pipeline_mtp_opt_in

        opted, opted_by = pipeline_mtp_opt_in(mtp_across_pipeline, dict(os.environ))
        card = resolve_card(model, self.models_dir)
        nodes = node_capacities(self.daemon.live_nodes())
        local_id = self.daemon.node_id
        placement = choose_placement(
            card,
            nodes,
            local_id,
            min_nodes=min_nodes,
            context_length=context_length,
            pin_local=pin_local,
            sequences=int(getattr(self.daemon.settings, "max_batch", 1)),
            mtp_across_pipeline=opted,
            prompt_cache_bytes=self._prompt_cache_bytes,
        )
        delegate = None
        if placement.single_node and placement.stages[0].node_id != local_id and not pin_local:
            delegate = placement.stages[0].node_id
        return LaunchPlan(
            card, placement, delegate, max(1, min_nodes), context_length, opted, opted_by
        )

    # -- launching --

    def launch(
        self,
        model: str,
        launch_plan: LaunchPlan,
        progress: Progress,
        cancel: CancelToken,
        *,
        instance_id: str | None = None,
        pull: bool = False,
        taking_over: str = "",
        replacing: Instance | None = None,
    ) -> Instance:
        """Load ``launch_plan`` (made by ``plan``) and register the instance; returns it ready.
        ``instance_id`` keeps a name (a failed instance placed again keeps its id).
        ``taking_over`` (why: the old coordinator is gone) adopts the stages that are loaded
        already, this node's included, through their StageService: nothing loads twice.
        ``replacing`` (a failed record of the same id) is swapped for the new instance, so
        the id never disappears (a request meanwhile is UNAVAILABLE, not NOT_FOUND).

        Raises ``NoCheckpointError`` (no weights here), ``LaunchCancelled``, ``PipelineError``
        (a stage failed to load) or the loader's own errors; nothing stays loaded on failure.
        ``pull``: every node first downloads the files its layers need (``model`` is then the
        ``repo@commit`` that ``prepare_pull`` returned)."""
        placement = launch_plan.placement
        names = self._names()
        drafting_probe = None  # with --pull: the head as the node that drafts holds it
        if pull:
            from node.hub.pull import pull_for_placement

            def pulling(line: str) -> None:
                if cancel.is_set():  # stops this node's download; a rerun resumes it
                    raise LaunchCancelled("the launch was cancelled by its caller")
                progress(line)

            try:
                drafting_probe = pull_for_placement(
                    model,
                    self._stage_refs(placement),
                    self.daemon.node_id,
                    names,
                    pulling,
                    mtp_on_last=launch_plan.mtp_across_pipeline,
                )
            except Exception:
                if cancel.is_set():
                    raise LaunchCancelled("the launch was cancelled by its caller") from None
                raise
        located = locate(model, self.models_dir)
        stages = self._stage_refs(placement)
        missing = [s.node_id for s in stages if not s.address]
        if missing:
            raise InstanceUnavailable(f"no address known for node(s) {missing}; are they up?")
        progress(_describe_placement(placement, names))

        from node.inference.mtp.recovery import probe_mtp

        choice = choose_instance_engine(
            num_stages=len(stages),
            probe=drafting_probe or probe_mtp(located.checkpoint),
            card=located.card,
            native_mtp_enabled=self.native_mtp_enabled,
            disabled_by=self.disabled_by,
            mtp_across_pipeline=launch_plan.mtp_across_pipeline,
            opted_in_by=launch_plan.opted_in_by,
        )
        if taking_over:
            choice = EngineChoice(choice.engine, f"{choice.reason}; taken over: {taking_over}")
        progress(f"engine {choice.reason}")
        common: dict[str, Any] = dict(
            instance_id=instance_id or f"{_slug(located.card.id)}-{uuid.uuid4().hex[:8]}",
            model=model,
            aliases=_aliases(model, located),
            card=located.card,
            checkpoint=located.checkpoint,
            stages=stages,
            choice=choice,
            coordinator_node_id=self.daemon.node_id,
            coordinator_address=self.daemon.address,
            max_queued=self.max_queued,
            min_nodes=launch_plan.min_nodes,
            context_length=launch_plan.context_length,
            mtp_across_pipeline=launch_plan.mtp_across_pipeline,
            mtp_opted_in_by=launch_plan.opted_in_by,
        )
        instance: Instance = (
            LocalInstance(**common) if len(stages) == 1 else PipelineInstance(**common)
        )
        try:  # visible as "loading" cluster-wide from now on
            self.registry.add(instance, replacing=replacing)
        except ValueError as exc:
            if replacing is None:
                raise
            raise LaunchCancelled(str(exc)) from None
        try:
            with self._load_lock:
                here = [s.bytes for s in placement.stages if s.node_id == self.daemon.node_id]
                if here and not taking_over:  # measured now, after any load that just finished
                    admit_load(sum(here), self.memory_headroom, f"node {self.daemon.node_id}")
                if isinstance(instance, LocalInstance):
                    self._load_local(
                        instance, located, names, progress, cancel, placement.context_length
                    )
                else:
                    assert isinstance(instance, PipelineInstance)
                    self._load_pipeline(
                        instance,
                        located,
                        names,
                        progress,
                        adopt=bool(taking_over),
                        context_tokens=placement.context_length,
                    )
            if cancel.is_set():
                raise LaunchCancelled("the launch was cancelled by its caller")
            if not instance.mark_ready():
                raise LaunchCancelled(f"{instance.instance_id} was unloaded while it loaded")
        except BaseException:
            self.registry.remove(instance.instance_id)
            instance.state = UNLOADING
            release_instance(instance)
            raise
        log.info(
            "instance ready",
            instance=instance.instance_id,
            model=model,
            engine=instance.choice.engine,
            stages=[f"{s.node_id}[{s.start_layer},{s.end_layer})" for s in stages],
        )
        return instance

    def _load_local(
        self,
        instance: LocalInstance,
        located: Located,
        names: dict[str, str],
        progress: Progress,
        cancel: CancelToken,
        context_tokens: int | None = None,
    ) -> None:
        from node.inference.batching.scheduler import DEFAULT_MAX_BATCH
        from node.inference.loading import LoadProgress, load_checkpoint
        from node.inference.runner import LocalRunner

        where = names.get(self.daemon.node_id, self.daemon.node_id)
        began = time.perf_counter()

        def on_progress(p: LoadProgress) -> None:
            if cancel.is_set():
                raise LaunchCancelled("the launch was cancelled by its caller")
            progress(
                f"loading {p.what} on {where}: {p.fraction:.0%} "
                f"({format_bytes(p.done_bytes)} of {format_bytes(p.total_bytes)})"
            )

        loaded = load_checkpoint(located.checkpoint, progress=on_progress)
        runner = LocalRunner(
            loaded,
            native_mtp_enabled=self.native_mtp_enabled,
            disabled_by=self.disabled_by,
            max_batch=int(getattr(self.daemon.settings, "max_batch", DEFAULT_MAX_BATCH)),
            context_tokens=context_tokens,  # what the plan budgeted memory for
            prompt_cache_bytes=self._prompt_cache_bytes,
        )
        if instance.choice.engine == "native_mtp":
            # Recover the head now: the first request should not pay for it, and a head that
            # cannot be recovered must show in status, not surprise a request.
            engine, reason = runner.select("auto")
            from node.cluster.catalog import sidecar_source

            if engine == "native_mtp" and (origin := sidecar_source(located.checkpoint)):
                reason += f" (fetched from {origin})"  # a head `macmesh pull` recovered
            instance.choice = EngineChoice(engine, reason)
            if engine == "native_mtp":
                progress(f"native MTP head ready on {where}")
            else:
                progress(f"native MTP unavailable, decoding without it: {reason}")
        instance.runner = runner
        progress(f"loaded on {where} in {time.perf_counter() - began:.2f} s")

    def _load_pipeline(
        self,
        instance: PipelineInstance,
        located: Located,
        names: dict[str, str],
        progress: Progress,
        *,
        adopt: bool = False,
        context_tokens: int | None = None,
    ) -> None:
        from node.inference.batching.scheduler import DEFAULT_MAX_BATCH
        from node.inference.pipeline import PipelineEngine
        from node.inference.pipeline_mtp import PipelineMtpEngine

        began = time.perf_counter()
        addresses = {s.node_id: s.address for s in instance.stages}
        common: dict[str, Any] = dict(
            # Adopting: this node's stage is in its StageService already; stage 0 in-process
            # would load it a second time.
            local_node_id=None if adopt else self.daemon.node_id,
            remote_model=located.remote_name,
            instance_id=instance.instance_id,
            reason=instance.choice.reason,
            # Every stage holder learns the instance, so one of them can take over from us.
            instance_record=instance.info().to_proto(),
            # What the plan budgeted on every stage: max_batch sequences of context_tokens.
            max_batch=int(getattr(self.daemon.settings, "max_batch", DEFAULT_MAX_BATCH)),
            context_tokens=context_tokens,
            prompt_cache_bytes=self._prompt_cache_bytes,
        )
        if instance.choice.engine == "pipeline_mtp":
            spec = located.card.native_mtp
            limits = (spec.default_k, spec.max_k) if spec is not None else None
            engine: Any = PipelineMtpEngine(
                located.checkpoint,
                _Stages(instance.stages),
                addresses,
                mtp_k_limits=limits,
                **common,
            )
        else:
            engine = PipelineEngine(
                located.checkpoint, _Stages(instance.stages), addresses, **common
            )
        instance.engine = engine  # set before loading, so a failure unloads what did load
        for i, s in enumerate(instance.stages):
            progress(
                f"stage {i}: loading {layers_text(s.start_layer, s.end_layer)} on "
                f"{names.get(s.node_id, s.node_id)} ({s.address})"
            )
        shards = engine.load()  # every stage in parallel; raises PipelineError naming the stage
        for i, shard in enumerate(shards):
            node = instance.stages[i].node_id
            progress(
                f"stage {i}: {layers_text(shard.start_layer, shard.end_layer)} ready on "
                f"{names.get(node, node)}: {format_bytes(shard.weight_bytes)} of weights "
                f"in {shard.load_seconds:.1f} s"
            )
        progress(f"pipeline of {len(shards)} stages loaded in {time.perf_counter() - began:.1f} s")

    def _stage_refs(self, placement: Placement) -> list[StageRef]:
        return [
            StageRef(
                node_id=s.node_id,
                address=self.daemon.address_of(s.node_id) or "",
                start_layer=s.start_layer,
                end_layer=s.end_layer,
            )
            for s in placement.stages
        ]

    def prepare_pull(self, model: str) -> str:
        """MODEL for a launch with --pull (``node.hub.pull.prepare_pull``)."""
        from node.hub.pull import prepare_pull

        return prepare_pull(model, self.models_dir)

    # -- unloading --

    def unload(self, instance: Instance) -> None:
        """Cancel its requests, unload every stage, free the memory."""
        if self.registry.remove(instance.instance_id) is None:
            return
        if not instance.mark_unloading():
            return  # still loading: its launch sees this, frees what it loaded and fails
        instance.cancel_all_and_wait()
        release_instance(instance)
        log.info("instance unloaded", instance=instance.instance_id, model=instance.model)

    def unload_all(self) -> None:
        for instance in self.registry.all():
            try:
                self.unload(instance)
            except Exception:
                log.exception("unload failed", instance=instance.instance_id)

    # -- peers --

    def on_peer_event(self, event: Any) -> None:
        """A stage's node went down, left or restarted: its shard is gone, so the instance is
        failed; the surviving stages are unloaded at once (the record stays, marked failed,
        until someone unloads it)."""
        if str(event.kind) not in ("down", "left", "restarted", "forgotten"):
            return
        for instance in self.registry.all():
            if instance.state != READY or event.node_id == self.daemon.node_id:
                continue
            if any(s.node_id == event.node_id for s in instance.stages):
                where = f" ({event.address})" if event.address else ""
                instance.failure = (
                    f"stage node {event.name or event.node_id}{where} is {event.kind}"
                )
                instance.state = FAILED
                log.warning("instance failed", instance=instance.instance_id, why=instance.failure)
                threading.Thread(target=self._release_failed, args=(instance,), daemon=True).start()

    def _release_failed(self, instance: Instance) -> None:
        instance.cancel_all_and_wait()
        release_instance(instance)
        if self.replace_failed:
            self._place_again(instance)

    def _place_again(self, failed: Instance) -> None:
        """Launch a failed instance again on the live nodes, under the same id, when they have
        room. The failed record stays visible for ``replace_delay_s`` first (status shows what
        happened), and an Unload in the meantime wins."""
        time.sleep(self.replace_delay_s)
        if self.registry.get(failed.instance_id) is not failed or failed.state != FAILED:
            return
        try:
            launch_plan = self.plan(
                failed.model,
                failed.min_nodes,
                failed.context_length,
                pin_local=True,
                mtp_across_pipeline=failed.mtp_across_pipeline,
            )
            if failed.mtp_opted_in_by:  # what opted the launch in, not this node's flag
                launch_plan = dataclasses.replace(launch_plan, opted_in_by=failed.mtp_opted_in_by)
        except Exception as exc:  # no room on the survivors: it stays failed, saying why
            failed.failure += f"; not placed again: {exc}"
            log.warning(
                "failed instance not placed again", instance=failed.instance_id, why=str(exc)
            )
            return
        log.info("placing failed instance again", instance=failed.instance_id, model=failed.model)
        try:
            self.launch(
                failed.model,
                launch_plan,
                lambda line: log.info("re-placement", instance=failed.instance_id, step=line),
                CancelToken(),
                instance_id=failed.instance_id,
                replacing=failed,
            )
        except LaunchCancelled:
            return  # unloaded meanwhile
        except Exception as exc:
            failed.failure += f"; placing it again failed: {exc}"
            with contextlib.suppress(ValueError):
                self.registry.add(failed)  # keep the failed record, with the reason
            log.warning("re-placement failed", instance=failed.instance_id, error=str(exc))

    # -- taking over from a dead coordinator --

    def take_over(self, record: Any) -> None:
        """The coordinator of an instance this node holds a stage of is gone (``record``: the
        ``inference_pb2.Instance`` it sent with the shard). The live stage holder with the
        lowest node id takes over; every holder computes the same from the same membership,
        so the others do nothing. Returns at once; the work runs on a thread."""
        try:
            info = InstanceInfo.from_proto(record)
        except ValueError as exc:  # a record this node cannot read: nothing to take over
            log.warning("unreadable instance record", instance=record.instance_id, error=str(exc))
            return
        live = {n.id for n in self.daemon.live_nodes()}
        lost = failover.lost_nodes(info.stages, info.coordinator_node_id, live)
        if failover.successor(info.stages, lost) != self.daemon.node_id:
            return
        with self._taking_over_lock:
            if info.instance_id in self._taking_over or self.registry.get(info.instance_id):
                return
            self._taking_over.add(info.instance_id)
        threading.Thread(
            target=self._take_over, args=(info, lost), name="take-over", daemon=True
        ).start()

    def _take_over(self, info: InstanceInfo, lost: set[str]) -> None:
        dead = f"node {info.coordinator_node_id[:8]} at {info.coordinator_address}"
        why = f"its coordinator, {dead}, is gone"
        log.warning(
            "taking over an instance from a dead coordinator",
            instance=info.instance_id,
            coordinator=info.coordinator_node_id,
            address=info.coordinator_address,
            lost=sorted(lost),
        )

        def progress(line: str) -> None:
            log.info("take-over", instance=info.instance_id, step=line)

        try:
            try:
                model, located = self._locate_any([info.model, *info.aliases])
                nodes = node_capacities(self.daemon.live_nodes())
                placement = failover.replace_missing(
                    located.card,
                    info.stages,
                    lost,
                    nodes,
                    min_nodes=info.min_nodes,
                    context_length=info.context_length,
                    sequences=int(getattr(self.daemon.settings, "max_batch", 1)),
                    mtp_across_pipeline=bool(info.mtp_opted_in_by),
                    prompt_cache_bytes=self._prompt_cache_bytes,
                )
                # The launch's opt-in travels with the record: a pipeline_mtp instance stays one.
                launch_plan = LaunchPlan(
                    located.card,
                    placement,
                    None,
                    info.min_nodes,
                    info.context_length,
                    bool(info.mtp_opted_in_by),
                    info.mtp_opted_in_by,
                )
                self.launch(
                    model,
                    launch_plan,
                    progress,
                    CancelToken(),
                    instance_id=info.instance_id,
                    taking_over=f"{why}; {self.daemon.node_id[:8]} coordinates it now",
                )
                log.info("took over instance", instance=info.instance_id, why=why)
                return
            except Exception as exc:
                kept = f"the surviving stages could not be kept: {exc}"
                log.warning(
                    "take-over could not keep the surviving stages",
                    instance=info.instance_id,
                    why=str(exc),
                )
            self._unload_survivors(info, lost)
            failed = self._failed_record(info, f"{why}; {kept}")
            if failed is None:
                return
            log.warning("instance failed", instance=info.instance_id, why=failed.failure)
            with contextlib.suppress(ValueError):
                self.registry.add(failed)
                if self.replace_failed:
                    self._place_again(failed)
        finally:
            with self._taking_over_lock:
                self._taking_over.discard(info.instance_id)

    def _locate_any(self, names: list[str]) -> tuple[str, Located]:
        """The first of ``names`` (MODEL as launched, then its aliases) this node resolves:
        a path on the dead coordinator's disk may not exist here."""
        error: Exception | None = None
        for name in names:
            try:
                return name, locate(name, self.models_dir)
            except Exception as exc:
                error = error or exc
        raise error or ValueError("the instance names no model")

    def _unload_survivors(self, info: InstanceInfo, lost: set[str]) -> None:
        from node import rpc
        from node.proto.macmesh.v1 import stage_pb2, stage_pb2_grpc

        for stage in info.stages:
            if stage.node_id in lost:
                continue
            address = self.daemon.address_of(stage.node_id) or stage.address
            try:
                with rpc.channel(address) as channel:
                    stage_pb2_grpc.StageServiceStub(channel).UnloadShard(
                        stage_pb2.UnloadShardRequest(instance_id=info.instance_id), timeout=10
                    )
            except Exception as exc:  # gone too: its own cleanup frees it
                log.warning("unload failed", node=stage.node_id, error=str(exc))

    def _failed_record(self, info: InstanceInfo, failure: str) -> Instance | None:
        """A failed instance for status (and ``_place_again``): what was launched, and why
        it stopped."""
        try:
            model, located = self._locate_any([info.model, *info.aliases])
        except Exception as exc:
            log.warning("instance lost", instance=info.instance_id, why=f"{failure}; {exc}")
            return None
        return PipelineInstance(
            instance_id=info.instance_id,
            model=model,
            aliases=info.aliases,
            card=located.card,
            checkpoint=located.checkpoint,
            stages=info.stages,
            choice=EngineChoice(info.engine, info.engine_reason),  # type: ignore[arg-type]
            coordinator_node_id=self.daemon.node_id,
            coordinator_address=self.daemon.address,
            max_queued=self.max_queued,
            state=FAILED,
            failure=failure,
            min_nodes=info.min_nodes,
            context_length=info.context_length,
            mtp_across_pipeline=bool(info.mtp_opted_in_by),
            mtp_opted_in_by=info.mtp_opted_in_by,
        )


@dataclass(frozen=True)
class _Stage:
    node_id: str
    start_layer: int
    end_layer: int


class _Stages:
    """The ``PlacementLike`` the pipeline engine takes."""

    def __init__(self, stages: list[StageRef]) -> None:
        self.stages = [_Stage(s.node_id, s.start_layer, s.end_layer) for s in stages]


def _aliases(model: str, located: Located) -> list[str]:
    names = [located.card.id, str(located.checkpoint), located.checkpoint.name]
    if located.card.source_repo:
        names.append(located.card.source_repo)
    out: list[str] = []
    for name in names:
        if name and name != model and name not in out:
            out.append(name)
    return out


def _describe_placement(placement: Placement, names: dict[str, str]) -> str:
    parts = [
        f"{names.get(s.node_id, s.node_id)} {layers_text(s.start_layer, s.end_layer)}"
        f" ({format_bytes(s.bytes)}"
        f"{' with the MTP head' if s.has_mtp_head and not placement.single_node else ''})"
        for s in placement.stages
    ]
    kind = "single node" if placement.single_node else f"{len(parts)} stages"
    return f"placement ({kind}): " + ", ".join(parts)

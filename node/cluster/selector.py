"""The engine selector of an instance, and the per-request engine override. Pure: no I/O.

An instance gets one engine when it is launched (``choose_instance_engine``):

- ``pipeline`` when its placement spans several nodes, unless the launch opted in to native
  MTP across the pipeline (``--mtp-across-pipeline``, ``MACMESH_PIPELINE_MTP=1``) and the
  checkpoint's MTP head can be recovered: then ``pipeline_mtp``;
- ``native_mtp`` when it sits on one node, its card (or checkpoint config) declares an MTP
  head, the checkpoint holds recoverable MTP weights, and native MTP is enabled on the node;
- ``local`` for every other single-node instance, with the reason native MTP was not chosen.

The checkpoint facts come in as a ``MtpProbe`` (``node.inference.mtp.recovery.probe_mtp``,
which reads headers only); the rule itself is ``node.inference.selector.select_engine``, the
same one ``macmesh generate --local`` uses, so a model behaves the same in and out of a cluster.

A request may override the engine (``request_engine``): ``auto`` runs the instance's engine;
``local`` runs plain decode on a single-node instance; ``native_mtp`` and ``pipeline`` only run
on instances that chose them (``pipeline`` also runs on a ``pipeline_mtp`` instance: plain
pipelined decode, no drafts). Anything else raises ``EngineRefused`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

EngineKind = Literal["native_mtp", "local", "pipeline", "pipeline_mtp"]
REQUESTABLE = ("auto", "native_mtp", "local", "pipeline", "pipeline_mtp")
DISABLED_BY_ENV = "MACMESH_NATIVE_MTP=0"
DISABLED_BY_SETTING = "--no-native-mtp (or native_mtp = false in the node's config)"


class EngineRefused(Exception):
    """A request asked for an engine its instance cannot run; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class EngineChoice:
    engine: EngineKind
    reason: str


def native_mtp_disabled_by(env: dict[str, str]) -> str:
    """What to blame when native MTP is off: the environment variable or the flag/config."""
    value = env.get("MACMESH_NATIVE_MTP")
    if value is not None:
        return f"MACMESH_NATIVE_MTP={value}"
    return DISABLED_BY_SETTING


def choose_instance_engine(
    *,
    num_stages: int,
    probe: Any,
    card: Any | None,
    native_mtp_enabled: bool,
    disabled_by: str = DISABLED_BY_SETTING,
    mtp_across_pipeline: bool = False,
    opted_in_by: str = "--mtp-across-pipeline",
) -> EngineChoice:
    """The engine of a new instance and why. ``probe`` is the checkpoint's ``MtpProbe``;
    ``mtp_across_pipeline`` is the launch's opt-in (``opted_in_by`` names it)."""
    if num_stages < 1:
        raise ValueError(f"an instance needs at least one stage, got {num_stages}")
    from node.inference.selector import select_engine, select_pipeline_engine

    if num_stages > 1:
        engine, reason = select_pipeline_engine(
            probe, num_stages, opted_in=mtp_across_pipeline, opted_in_by=opted_in_by, card=card
        )
        return EngineChoice(engine, reason)

    engine, reason = select_engine(
        probe,
        "auto",
        native_mtp_enabled,
        single_node=True,
        card=card,
        disabled_by=disabled_by,
    )
    return EngineChoice(engine, reason)


def mtp_fallback(reason: str) -> EngineChoice:
    """The choice when the probe promised an MTP head but recovering it failed at load."""
    return EngineChoice("local", f"local: MTP head could not be recovered ({reason})")


def request_engine(
    requested: str, instance_engine: EngineKind, instance_reason: str, num_stages: int
) -> EngineChoice:
    """The engine one request runs on an instance, or ``EngineRefused`` with the reason.

    ``ValueError`` (a bad request, not a refusal) for names that are no engine at all."""
    requested = requested or "auto"
    if requested not in REQUESTABLE:
        raise ValueError(
            f"engine {requested!r} is not one of {', '.join(REQUESTABLE)} (empty means auto)"
        )
    if requested == "auto" or requested == instance_engine:
        return EngineChoice(instance_engine, instance_reason)
    if requested == "pipeline" and instance_engine == "pipeline_mtp":
        return EngineChoice("pipeline", "pipeline: requested (engine=pipeline), no drafts")
    if requested == "pipeline_mtp":
        raise EngineRefused(
            "engine=pipeline_mtp needs an instance launched across several nodes with "
            "--mtp-across-pipeline (or MACMESH_PIPELINE_MTP=1 on its coordinator); this one "
            f"runs {instance_engine}"
        )
    if requested == "pipeline":
        raise EngineRefused(
            "engine=pipeline needs an instance placed on several nodes; this one runs on one "
            "node (launch another with --min-nodes 2)"
        )
    if instance_engine in ("pipeline", "pipeline_mtp"):
        raise EngineRefused(
            f"engine={requested} needs the whole model on one node; this instance spans "
            f"{num_stages} nodes (launch a single-node instance for {requested})"
        )
    if requested == "local":  # a native_mtp instance decoding without its drafter
        return EngineChoice("local", "local: requested (engine=local)")
    # native_mtp on a single-node instance that chose local: its reason says why.
    why = instance_reason.removeprefix("local: ")
    raise EngineRefused(f"engine=native_mtp is unavailable on this instance: {why}")


def compatible(requested: str, instance_engine: EngineKind) -> bool:
    """Whether a request asking for ``requested`` can run on an instance of that engine."""
    requested = requested or "auto"
    if requested == "auto":
        return True
    if requested == "local":
        return instance_engine in ("local", "native_mtp")
    if requested == "pipeline":
        return instance_engine in ("pipeline", "pipeline_mtp")
    return requested == instance_engine


# Among instances of one model, a request without an engine preference goes to the fastest.
ENGINE_PREFERENCE: dict[str, int] = {"native_mtp": 0, "local": 1, "pipeline_mtp": 2, "pipeline": 3}

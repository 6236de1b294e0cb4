"""Which engine runs a request: native MTP, plain local decode, or the pipeline.

``native_mtp`` needs all of: a single-node placement, a checkpoint (and card, when one is
given) that declares an MTP head, MTP weights that can be recovered, and native MTP enabled
on the node.  ``auto`` falls back to ``local`` (or ``pipeline`` across nodes) and says why;
asking for ``native_mtp`` explicitly when it cannot run raises ``EngineUnavailable``.
Pure apart from reading the checkpoint's headers (``probe_mtp``); no tensor is loaded.

Across several nodes the rule stays ``pipeline`` unless the launch opts in
(``--mtp-across-pipeline``, ``MACMESH_PIPELINE_MTP=1``): then ``select_pipeline_engine`` gives
``pipeline_mtp`` when the checkpoint's MTP head can be recovered (it runs on the last stage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from node.inference.errors import EngineUnavailable
from node.inference.mtp.recovery import MtpLayout, MtpProbe, MtpUnavailable, probe_mtp
from node.inference.requests import RequestedEngine
from node.inference.stats import EngineKind

DEFAULT_DISABLED_BY = "MACMESH_NATIVE_MTP=0 or --no-native-mtp"
PIPELINE_MTP_ENV = "MACMESH_PIPELINE_MTP"
DEFAULT_OPTED_IN_BY = "--mtp-across-pipeline"


def pipeline_mtp_opt_in(requested: bool, env: dict[str, str]) -> tuple[bool, str]:
    """Whether a launch opted in to native MTP across its pipeline, and by what: the launch's
    own flag, or ``MACMESH_PIPELINE_MTP=1`` in the coordinator's environment."""
    if requested:
        return True, DEFAULT_OPTED_IN_BY
    value = env.get(PIPELINE_MTP_ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True, f"{PIPELINE_MTP_ENV}={env[PIPELINE_MTP_ENV]}"
    return False, ""


def _no_mtp_because(probe: MtpProbe, card: Any | None) -> str | None:
    """Why the checkpoint (and card) cannot draft with an MTP head; None when it can."""
    card_mtp = getattr(card, "native_mtp", None) if card is not None else None
    if card is not None and card_mtp is None and probe.layout != MtpLayout.NOT_DECLARED:
        return f"the model card {getattr(card, 'id', '?')!r} declares no native MTP"
    if not probe.available:
        return probe.describe()
    return None


def select_pipeline_engine(
    probe: MtpProbe,
    num_stages: int,
    *,
    opted_in: bool,
    opted_in_by: str = DEFAULT_OPTED_IN_BY,
    card: Any | None = None,
) -> tuple[EngineKind, str]:
    """(engine, reason) of an instance placed on ``num_stages`` > 1 nodes: ``pipeline``, or
    ``pipeline_mtp`` when the launch opted in and the MTP head can be recovered."""
    plain = f"pipeline: the placement spans {num_stages} nodes (native MTP needs one)"
    if not opted_in:
        return "pipeline", plain
    why = _no_mtp_because(probe, card)
    if why is None:
        return "pipeline_mtp", (
            f"pipeline_mtp: the placement spans {num_stages} nodes and {opted_in_by} opted in "
            f"to native MTP across the pipeline (head on the last stage; {probe.describe()})"
        )
    return "pipeline", (
        f"pipeline: the placement spans {num_stages} nodes; {opted_in_by} asked for native "
        f"MTP across the pipeline, but {why}"
    )


def select_engine(
    checkpoint: str | Path | MtpProbe,
    requested: RequestedEngine = "auto",
    native_mtp_enabled: bool = True,
    single_node: bool = True,
    *,
    card: Any | None = None,
    disabled_by: str = DEFAULT_DISABLED_BY,
) -> tuple[EngineKind, str]:
    """(engine, reason) for one request or instance.

    ``checkpoint`` is a checkpoint directory or its ``MtpProbe``; ``card`` is an optional
    ``ModelCard`` whose ``native_mtp`` table (or its absence) is honoured.
    """
    if requested not in ("auto", "native_mtp", "local"):
        raise ValueError(f"engine must be auto, native_mtp or local, got {requested!r}")
    if not single_node:
        if requested == "native_mtp":
            raise EngineUnavailable(
                "native_mtp needs the model on a single node; this placement spans several"
            )
        return "pipeline", "pipeline: the placement spans several nodes"
    if requested == "local":
        return "local", "local: requested (engine=local)"
    if not native_mtp_enabled:
        if requested == "native_mtp":
            raise EngineUnavailable(f"native MTP is disabled on this node ({disabled_by})")
        return "local", f"local: native MTP disabled by {disabled_by}"

    probe = checkpoint if isinstance(checkpoint, MtpProbe) else probe_mtp(checkpoint)
    why = _no_mtp_because(probe, card)
    if why is None:
        return "native_mtp", f"native_mtp: single node, {probe.describe()}"
    if requested == "native_mtp":
        raise MtpUnavailable(why)
    return "local", f"local: {why}"

"""Which engine runs a request: native MTP, plain local decode, or the pipeline.

``native_mtp`` needs all of: a single-node placement, a checkpoint (and card, when one is
given) that declares an MTP head, MTP weights that can be recovered, and native MTP enabled
on the node.  ``auto`` falls back to ``local`` (or ``pipeline`` across nodes) and says why;
asking for ``native_mtp`` explicitly when it cannot run raises ``EngineUnavailable``.
Pure apart from reading the checkpoint's headers (``probe_mtp``); no tensor is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from node.inference.errors import EngineUnavailable
from node.inference.mtp.recovery import MtpLayout, MtpProbe, MtpUnavailable, probe_mtp
from node.inference.requests import RequestedEngine
from node.inference.stats import EngineKind

DEFAULT_DISABLED_BY = "MACMESH_NATIVE_MTP=0 or --no-native-mtp"


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
    card_mtp = getattr(card, "native_mtp", None) if card is not None else None
    if card is not None and card_mtp is None and probe.layout != MtpLayout.NOT_DECLARED:
        why = f"the model card {getattr(card, 'id', '?')!r} declares no native MTP"
    elif not probe.available:
        why = probe.describe()
    else:
        return "native_mtp", f"native_mtp: single node, {probe.describe()}"
    if requested == "native_mtp":
        raise MtpUnavailable(why)
    return "local", f"local: {why}"

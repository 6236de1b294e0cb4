"""``macmesh pull`` and ``launch --pull``: MODEL -> a repo, its files in the hub cache, and the
MTP head recovered when the repo is a stripped conversion whose source repo is known."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from node.hub.download import PullProgress, pull
from node.hub.mtp import Sidecar, fetch_mtp_sidecar
from node.hub.refs import RepoRef, parse_repo_ref
from node.hub.remote import HubError
from node.hub.shards import SIDECAR

if TYPE_CHECKING:  # importing it imports MLX (seconds): only where a head is probed
    from node.inference.mtp.recovery import MtpProbe


@dataclass(frozen=True)
class PullResult:
    ref: RepoRef
    snapshot: Path
    commit: str
    fetched_bytes: int
    sidecar: Sidecar | None
    mtp_note: str  # where the head comes from, or why there is none
    probe: MtpProbe | None = None  # the snapshot's head, where the node drafts


def repo_for(model: str) -> RepoRef:
    """MODEL as a repo to download: a repo id as given, or the repo a card names."""
    from node.placement import find_card
    from node.placement.resolve import download_candidates

    ref = parse_repo_ref(model)
    if ref is not None:
        return ref
    card = find_card(model)
    if card is None:
        raise HubError(
            f"{model!r} is not a Hugging Face repo id (org/name[@revision]) nor a card id"
        )
    repos = download_candidates(card)
    if not repos:
        raise HubError(f"the card {card.id!r} names no repo its weights can be downloaded from")
    return RepoRef(repos[0])


def mtp_source_for(ref: RepoRef) -> str | None:
    """The repo an MTP head can come from: the source repo of the card covering ``ref``."""
    from node.placement import find_card

    card = find_card(ref.repo_id)
    if card is not None and card.source_repo and card.source_repo != ref.repo_id:
        return card.source_repo
    return None


def pull_model(
    model: str,
    *,
    layers: tuple[int, int] | None = None,
    mtp_head: bool = False,
    mtp_from: str | None = None,
    recover_mtp: bool = True,
    progress: Callable[[PullProgress], None] | None = None,
    node: str = "this node",
    endpoint: str | None = None,
) -> PullResult:
    """Download what a node holding ``layers`` of MODEL needs. Where the node drafts (a
    whole-model pull, or ``mtp_head``: the last stage of a pipeline_mtp instance) also the MTP
    head: its files, or for a stripped conversion the sidecar recovered from ``mtp_from`` (or
    the card's source repo)."""
    from node.inference.mtp.recovery import MtpLayout, probe_mtp

    ref = repo_for(model)
    pulled = pull(
        ref, layers=layers, mtp_head=mtp_head, progress=progress, node=node, endpoint=endpoint
    )
    if layers is not None and not mtp_head:  # a stage that does not draft
        return PullResult(ref, pulled.snapshot, pulled.commit, pulled.fetched_bytes, None, "")
    probe = probe_mtp(pulled.snapshot)
    sidecar, note = None, probe.describe()
    if probe.layout is MtpLayout.STRIPPED and recover_mtp:
        source = mtp_from or mtp_source_for(ref)
        if source is None:
            note = (
                f"{ref} is stripped of its MTP weights and no source repo is known: "
                "pass --mtp-from ORIGINAL_REPO"
            )
        else:
            source_ref = parse_repo_ref(source)
            if source_ref is None:
                raise HubError(f"--mtp-from {source!r} is not a repo id (org/name[@revision])")
            sidecar = fetch_mtp_sidecar(source_ref, pulled.snapshot, endpoint=endpoint)
            note = f"MTP head recovered from {sidecar.source} into {SIDECAR}"
            probe = probe_mtp(pulled.snapshot)
    elif probe.layout is MtpLayout.STRIPPED:
        note = f"{ref} is stripped of its MTP weights (not recovered)"
    fetched = pulled.fetched_bytes + (sidecar.bytes_fetched if sidecar else 0)
    return PullResult(ref, pulled.snapshot, pulled.commit, fetched, sidecar, note, probe)


def prepare_pull(model: str, models_dir: Path | None) -> str:
    """MODEL for a launch with --pull: unchanged when its files are on this node, else its
    repo pinned to the current commit (``repo@commit``), whose card is read from the hub's
    headers first so the placement can be planned before any weight moves."""
    from node.hub.card import remote_card
    from node.placement.errors import UnknownModelError
    from node.placement.resolve import resolve

    try:
        if resolve(model, models_dir).found is not None:
            return model
    except UnknownModelError:
        pass
    ref = repo_for(model)
    _, repo = remote_card(ref)
    return f"{ref.repo_id}@{repo.commit}"


def pull_for_placement(
    model: str,
    stages: list,
    local_id: str,
    names: dict[str, str],
    progress: Callable[[str], None],
    *,
    mtp_on_last: bool = False,
) -> MtpProbe | None:
    """Every node of a placement downloads what its layers need, in parallel; each node's
    progress goes to ``progress`` as lines. ``mtp_on_last`` (pipeline_mtp): the last stage
    also gets the MTP head, which drafts there. Returns the drafting node's ``MtpProbe`` (None:
    nothing was pulled, or no node drafts). Raises the first failure, naming the node."""
    import threading

    from node import rpc
    from node.inference.mtp import recovery
    from node.proto.macmesh.v1 import hub_pb2 as pb
    from node.proto.macmesh.v1 import hub_pb2_grpc as pb_grpc

    ref = parse_repo_ref(model)
    if ref is None:
        return None  # files already local (a path or a models-dir name): nothing to pull
    whole = len(stages) == 1
    mtp_from = mtp_source_for(ref) if whole or mtp_on_last else None
    errors: list[BaseException] = []
    drafting: list[MtpProbe] = []

    def one(stage) -> None:
        name = names.get(stage.node_id, stage.node_id)
        layers = None if whole else (stage.start_layer, stage.end_layer)
        mtp_head = mtp_on_last and not whole and stage is stages[-1]
        try:
            if stage.node_id == local_id:
                result = pull_model(
                    str(ref),
                    layers=layers,
                    mtp_head=mtp_head,
                    mtp_from=mtp_from,
                    progress=lambda p: progress(p.line()),
                    node=name,
                )
                drafting.extend([result.probe] if result.probe else [])
                return
            request = pb.PullRequest(
                repo=ref.repo_id,
                revision=ref.revision or "",
                start_layer=stage.start_layer,
                end_layer=stage.end_layer,
                whole=whole,
                mtp_head=mtp_head,
                mtp_from=mtp_from or "",
            )
            with rpc.channel(stage.address) as channel:
                for message in pb_grpc.HubServiceStub(channel).Pull(request):
                    if message.line:
                        progress(message.line)
                    if message.mtp_probe:
                        drafting.append(recovery.MtpProbe.model_validate_json(message.mtp_probe))
        except Exception as exc:
            details = getattr(exc, "details", None)
            text = details() if callable(details) else str(exc)
            errors.append(HubError(f"download on {name} failed: {text}"))

    threads = [threading.Thread(target=one, args=(s,), daemon=True) for s in stages]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return drafting[0] if drafting else None

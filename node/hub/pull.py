"""``macmesh pull`` and ``launch --pull``: MODEL -> a repo, its files in the hub cache, and the
MTP head recovered when the repo is a stripped conversion whose source repo is known."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from node.hub.download import PullProgress, pull
from node.hub.mtp import Sidecar, fetch_mtp_sidecar
from node.hub.refs import RepoRef, parse_repo_ref
from node.hub.remote import HubError
from node.hub.shards import SIDECAR


@dataclass(frozen=True)
class PullResult:
    ref: RepoRef
    snapshot: Path
    commit: str
    fetched_bytes: int
    sidecar: Sidecar | None
    mtp_note: str  # where the head comes from, or why there is none


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
    mtp_from: str | None = None,
    recover_mtp: bool = True,
    progress: Callable[[PullProgress], None] | None = None,
    node: str = "this node",
    endpoint: str | None = None,
) -> PullResult:
    """Download what a node holding ``layers`` of MODEL needs; for a whole-model pull of a
    stripped conversion, also the MTP sidecar from ``mtp_from`` (or the card's source repo)."""
    from node.inference.mtp.recovery import MtpLayout, probe_mtp

    ref = repo_for(model)
    pulled = pull(ref, layers=layers, progress=progress, node=node, endpoint=endpoint)
    if layers is not None:
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
    elif probe.layout is MtpLayout.STRIPPED:
        note = f"{ref} is stripped of its MTP weights (not recovered)"
    fetched = pulled.fetched_bytes + (sidecar.bytes_fetched if sidecar else 0)
    return PullResult(ref, pulled.snapshot, pulled.commit, fetched, sidecar, note)

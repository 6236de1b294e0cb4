"""A repo's card before its weights are here: config.json plus every shard's safetensors
header, read by range (kilobytes, not gigabytes), so a launch with --pull can plan first.

The card is kept in the hub cache (``.macmesh-cards/ORG--NAME@COMMIT.toml``, beside the
``models--*`` folders), so the resolver knows ``repo@commit`` while a node holds only its own
shards, offline included."""

from __future__ import annotations

import os
from pathlib import Path

from node.hub.download import fetch_json
from node.hub.refs import RepoRef, hub_cache_dir
from node.hub.remote import RemoteRepo, remote_repo, safetensors_header
from node.hub.shards import INDEX
from node.placement.cards import ModelCard, card_to_toml, load_card_file

CARDS_DIR = ".macmesh-cards"


def card_file(repo_id: str, commit: str, cache_dir: Path | None = None) -> Path:
    return (
        (cache_dir or hub_cache_dir()) / CARDS_DIR / f"{repo_id.replace('/', '--')}@{commit}.toml"
    )


def cached_card(repo_id: str, commit: str) -> ModelCard | None:
    path = card_file(repo_id, commit)
    return load_card_file(path) if path.is_file() else None


def remote_card(ref: RepoRef, endpoint: str | None = None) -> tuple[ModelCard, RemoteRepo]:
    """The card of ``ref`` from its hub metadata and headers; cached for ``repo@commit``."""
    from node.placement.checkpoint import card_from_parts, tensors_from_header

    repo = remote_repo(ref, endpoint)
    if (card := cached_card(ref.repo_id, repo.commit)) is not None:
        return card, repo
    config = fetch_json(repo, "config.json")
    if INDEX in repo.files:
        shards = sorted(set(fetch_json(repo, INDEX)["weight_map"].values()))
    else:
        shards = sorted(n for n in repo.files if n.endswith(".safetensors"))
    tensors = []
    for shard in shards:
        _, header = safetensors_header(repo, shard)
        tensors += tensors_from_header(header, shard, f"{ref.repo_id}/{shard}")
    card = card_from_parts(config, tensors, ref.repo_id, f"{ref.repo_id}@{repo.commit}")
    path = card_file(ref.repo_id, repo.commit)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(card_to_toml(card, f"{ref.repo_id}@{repo.commit}, from its headers"))
    os.replace(tmp, path)
    return card, repo

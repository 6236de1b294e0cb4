"""A repo's snapshot in the local hub cache, found through ``huggingface_hub``'s own lookup."""

from __future__ import annotations

from pathlib import Path

from node.hub.refs import RepoRef, hub_cache_dir


def cached_snapshot(ref: RepoRef, cache_dir: Path | None = None) -> Path | None:
    """The snapshot directory of ``ref`` holding its config.json, or None.

    A branch or tag resolves through the cache's ``refs/``, a commit hash directly, exactly as
    ``hf_hub_download(..., local_files_only=True)`` would."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        ref.repo_id, "config.json", cache_dir=cache_dir or hub_cache_dir(), revision=ref.revision
    )
    return Path(found).parent if isinstance(found, str) else None

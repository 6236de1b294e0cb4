"""Hugging Face repo ids as MODEL, and the hub's own settings.

``huggingface_hub.constants`` reads ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` /
``HF_ENDPOINT`` once, at import; macmesh reads them each time it is asked, with the hub's
defaults and precedence, and passes them to ``huggingface_hub`` explicitly, so a daemon and a
test see the values in force now.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# The hub's naming rule for repo ids (org/name, letters, digits, ".", "_", "-"), with an
# optional "@revision" (a branch, a tag or a commit hash).
_REPO_REF = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[A-Za-z0-9._/-]+))?$"
)
DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class RepoRef:
    repo_id: str
    revision: str | None = None  # None: the repo's default branch ("main")

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id

    @property
    def rev(self) -> str:
        return self.revision or "main"


def parse_repo_ref(text: str) -> RepoRef | None:
    """``org/name`` or ``org/name@rev`` as a RepoRef; None for anything else."""
    match = _REPO_REF.match(text.strip())
    if match is None or ".." in text:
        return None
    return RepoRef(match["repo"], match["rev"])


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "on", "yes", "true")


def hub_cache_dir() -> Path:
    """``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE"))


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def repo_folder(cache_dir: Path, repo_id: str) -> Path:
    """The hub cache's folder for a model repo: ``models--ORG--NAME``."""
    return cache_dir / ("models--" + repo_id.replace("/", "--"))

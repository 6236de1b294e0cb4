"""A repo on the hub: its files with the hub's sizes and hashes, and ranged reads of them.

Metadata comes from ``huggingface_hub`` (``HfApi.model_info(files_metadata=True)``: one call,
every file's size, its git blob id and, for LFS files, its sha256). File bytes are read from
the hub's resolve URL (``hf_hub_url``), with HTTP ranges, so a download can resume and a
safetensors header can be read without its shard. Every failure is a ``HubError`` whose message
names the repo, the revision or the file.
"""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from node.hub.refs import RepoRef, hub_endpoint, hub_offline

CHUNK = 1 << 20
TIMEOUT_S = 60.0


class HubError(Exception):
    """A hub operation failed; the message says what and what to do."""


class RepoNotFound(HubError):
    pass


class RevisionNotFound(HubError):
    pass


class HubOffline(HubError):
    pass


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    blob_id: str | None  # git blob sha1
    sha256: str | None  # LFS files only

    @property
    def etag(self) -> str:
        """The hub cache's blob name: the sha256 for LFS files, the git blob id otherwise."""
        return self.sha256 or self.blob_id or ""


@dataclass(frozen=True)
class RemoteRepo:
    ref: RepoRef
    commit: str
    files: dict[str, RemoteFile]
    endpoint: str

    def url(self, path: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.ref.repo_id, path, revision=self.commit, endpoint=self.endpoint)


def remote_repo(ref: RepoRef, endpoint: str | None = None) -> RemoteRepo:
    """``ref``'s commit and files, from the hub (``HF_ENDPOINT``)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if hub_offline():
        raise HubOffline(f"cannot download {ref}: HF_HUB_OFFLINE is set")
    endpoint = endpoint or hub_endpoint()
    try:
        info = HfApi(endpoint=endpoint).model_info(
            ref.repo_id, revision=ref.revision, files_metadata=True
        )
    except RevisionNotFoundError:
        raise RevisionNotFound(
            f"revision {ref.rev!r} of {ref.repo_id!r} is not on the hub at {endpoint} "
            "(a branch, a tag or a commit hash)"
        ) from None
    except RepositoryNotFoundError:
        raise RepoNotFound(
            f"repo {ref.repo_id!r} is not on the hub at {endpoint} (or it is private and no "
            "token was given: `hf auth login` or HF_TOKEN)"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise HubError(f"cannot reach the hub at {endpoint} for {ref}: {exc}") from None
    files = {
        s.rfilename: RemoteFile(
            s.rfilename, int(s.size or 0), s.blob_id, s.lfs.sha256 if s.lfs else None
        )
        for s in info.siblings or []
    }
    if not info.sha:
        raise HubError(f"the hub at {endpoint} gave no commit for {ref}")
    return RemoteRepo(ref, info.sha, files, endpoint)


def _headers() -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"  # sizes and ranges are of the stored bytes
    return headers


def open_range(repo: RemoteRepo, path: str, start: int = 0, end: int | None = None):
    """A streaming response for bytes ``start``..``end`` (inclusive) of ``path``; the caller
    reads and closes it. ``.status`` is 206 when the server honoured the range."""
    headers = _headers()
    if start or end is not None:
        headers["Range"] = f"bytes={start}-{'' if end is None else end}"
    request = urllib.request.Request(repo.url(path), headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        raise HubError(f"{path} of {repo.ref}: the hub answered {exc.code} {exc.reason}") from None
    except OSError as exc:
        raise HubError(f"{path} of {repo.ref}: {exc}") from None


def iter_range(repo: RemoteRepo, path: str, start: int = 0) -> Iterator[bytes]:
    """The bytes of ``path`` from ``start`` in chunks (raises ``HubError`` when the server
    ignores the range, since the bytes would not continue the file)."""
    with open_range(repo, path, start) as response:
        if start and response.status != 206:
            raise HubError(f"{path} of {repo.ref}: the hub ignored the byte range")
        while chunk := response.read1(CHUNK):  # what arrived: a partial file grows as it comes
            yield chunk


def read_range(repo: RemoteRepo, path: str, start: int, length: int) -> bytes:
    """Exactly ``length`` bytes of ``path`` from ``start`` (one ranged GET)."""
    if length <= 0:
        return b""
    with open_range(repo, path, start, start + length - 1) as response:
        data = response.read()
    if response.status != 206 and start:
        raise HubError(f"{path} of {repo.ref}: the hub ignored the byte range")
    data = data[:length] if response.status != 206 else data
    if len(data) != length:
        raise HubError(
            f"{path} of {repo.ref}: asked for {length} bytes at {start}, got {len(data)}"
        )
    return data


def safetensors_header(repo: RemoteRepo, path: str) -> tuple[int, dict]:
    """(data start, header) of a remote safetensors file: two ranged reads, the 8-byte
    little-endian header length, then the JSON header."""
    (length,) = struct.unpack("<Q", read_range(repo, path, 0, 8))
    if length > 100 << 20:
        raise HubError(f"{path} of {repo.ref}: a {length}-byte header is not safetensors")
    try:
        header = json.loads(read_range(repo, path, 8, length))
    except json.JSONDecodeError as exc:
        raise HubError(f"{path} of {repo.ref}: unreadable safetensors header ({exc})") from None
    return 8 + length, header


def read_json(repo: RemoteRepo, path: str) -> dict:
    with open_range(repo, path) as response:
        return json.loads(response.read())

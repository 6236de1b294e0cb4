"""Downloads into the hub cache: only the files a node needs, resumable, verified, with progress.

Files land in the hub's own cache layout (``models--ORG--NAME/{blobs,snapshots/COMMIT,refs}``),
so ``huggingface_hub``, ``mlx_lm`` and ``hf`` see what macmesh downloaded and the other way round.

- Resumable: bytes arrive in ``blobs/ETAG.incomplete``; a later pull of the same file asks the
  hub for the rest with an HTTP range (``huggingface_hub`` 2.4's own downloader uses a fresh
  temporary file per process and deletes it on failure, so it cannot resume after a kill).
- Verified: the size and hash the hub lists for the file (sha256 for LFS files, the git blob
  sha1 otherwise) are checked before the blob is renamed into place; a mismatch deletes it.
- Never used half-written: a blob exists only once verified, and the snapshot's config.json
  (what the resolver looks for) is linked last, after the weights.
- Disk space is checked first, against everything still to fetch.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from node.hub.refs import RepoRef, hub_cache_dir, repo_folder
from node.hub.remote import HubError, RemoteFile, RemoteRepo, iter_range, remote_repo
from node.hub.shards import INDEX, files_for_layers

PARALLEL_FILES = 4
PROGRESS_EVERY_S = 0.25


class NoSpace(HubError):
    pass


class CorruptDownload(HubError):
    pass


class IncompleteDownload(HubError):
    pass


# PullProgress.line(), read back by `macmesh launch` to draw a bar per node.
PROGRESS_LINE = re.compile(
    r"^(?P<state>downloading|downloaded) (?P<repo>\S+) on (?P<node>.+?): "
    r"(?P<pct>\d+)% \((?P<detail>.*)\)$"
)


@dataclass(frozen=True)
class PullProgress:
    repo: str
    node: str
    done_bytes: int  # fetched so far in this pull (resumed bytes count as done)
    total_bytes: int  # what this node needs, including what it already had
    rate_bps: float
    eta_s: float | None
    finished: bool = False

    def line(self) -> str:
        from node.placement import format_bytes

        eta = f", ETA {self.eta_s:.0f} s" if self.eta_s is not None and not self.finished else ""
        state = "downloaded" if self.finished else "downloading"
        pct = self.done_bytes / self.total_bytes if self.total_bytes else 1.0
        return (
            f"{state} {self.repo} on {self.node}: {pct:.0%} ({format_bytes(self.done_bytes)} of "
            f"{format_bytes(self.total_bytes)}, {format_bytes(int(self.rate_bps))}/s{eta})"
        )


@dataclass(frozen=True)
class Pulled:
    snapshot: Path
    commit: str
    files: list[str]
    fetched_bytes: int  # bytes that crossed the network in this pull


def check_space(need: int, free: int, node: str, where: Path) -> None:
    """``NoSpace`` naming the node, the need and what is free, when ``need`` exceeds ``free``."""
    if need > free:
        from node.placement import format_bytes

        raise NoSpace(
            f"not enough disk space on {node} for the download: needs {format_bytes(need)}, "
            f"{format_bytes(free)} free in {where}"
        )


def free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


class _Tracker:
    def __init__(self, repo: str, node: str, total: int, done: int, report) -> None:
        self.repo, self.node, self.total, self.done = repo, node, total, done
        self.fetched = 0
        self.report = report
        self.began = time.monotonic()
        self.last = 0.0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            self.fetched += n
            now = time.monotonic()
            if self.report is None or now - self.last < PROGRESS_EVERY_S:
                return
            self.last = now
        self.emit()

    def emit(self, finished: bool = False) -> None:
        if self.report is None:
            return
        with self.lock:
            elapsed = max(time.monotonic() - self.began, 1e-6)
            rate = self.fetched / elapsed
            eta = (self.total - self.done) / rate if rate > 0 else None
            event = PullProgress(self.repo, self.node, self.done, self.total, rate, eta, finished)
        self.report(event)


def _hasher(file: RemoteFile):
    if file.sha256:
        return hashlib.sha256(), file.sha256
    h = hashlib.sha1()
    h.update(b"blob %d\0" % file.size)
    return h, file.blob_id


def _fetch(repo: RemoteRepo, file: RemoteFile, storage: Path, tracker: _Tracker) -> None:
    """``file`` into ``blobs/``: resumed from a partial download, verified, then renamed."""
    from filelock import FileLock

    blob = storage / "blobs" / file.etag
    if blob.is_file() and blob.stat().st_size == file.size:
        return
    blob.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(blob) + ".lock"):
        if blob.is_file() and blob.stat().st_size == file.size:
            return
        partial = blob.with_name(blob.name + ".incomplete")
        have = partial.stat().st_size if partial.is_file() else 0
        if have > file.size:
            partial.unlink()
            have = 0
        digest, expected = _hasher(file)
        if have:
            with partial.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        with partial.open("ab") as out:
            if have < file.size:
                for chunk in iter_range(repo, file.path, have):
                    if have + len(chunk) > file.size:
                        out.close()
                        partial.unlink()
                        raise CorruptDownload(
                            f"{file.path} of {repo.ref}: the hub sent more than the {file.size} "
                            "bytes it lists; the download was deleted and nothing was used"
                        )
                    out.write(chunk)
                    digest.update(chunk)
                    have += len(chunk)
                    tracker.add(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if have < file.size:
            raise IncompleteDownload(
                f"{file.path} of {repo.ref}: the connection ended after {have} of {file.size} "
                "bytes; nothing was used, and running the pull again resumes it"
            )
        if expected and digest.hexdigest() != expected:
            partial.unlink()
            kind = "sha256" if file.sha256 else "git blob id"
            raise CorruptDownload(
                f"{file.path} of {repo.ref}: {kind} {digest.hexdigest()} is not the hub's "
                f"{expected}; the download was deleted and nothing was used"
            )
        os.replace(partial, blob)


def _link(storage: Path, commit: str, file: RemoteFile) -> None:
    link = storage / "snapshots" / commit / file.path
    link.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(storage / "blobs" / file.etag, link.parent)
    if link.is_symlink() and os.readlink(link) == target:
        return
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target, link)


def _write_ref(storage: Path, ref: RepoRef, commit: str) -> None:
    if ref.revision == commit:
        return
    path = storage / "refs" / ref.rev
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(commit)
    os.replace(tmp, path)


def pull(
    ref: RepoRef,
    *,
    layers: tuple[int, int] | None = None,
    mtp_head: bool = False,
    cache_dir: Path | None = None,
    endpoint: str | None = None,
    progress: Callable[[PullProgress], None] | None = None,
    node: str = "this node",
) -> Pulled:
    """Download what a node holding ``layers`` of ``ref`` needs (None: everything; with
    ``mtp_head``, the MTP head's files too) into the hub cache; returns the snapshot. Raises
    ``HubError``s naming what went wrong."""
    from node.placement import architecture as arch

    cache_dir = cache_dir or hub_cache_dir()
    repo = remote_repo(ref, endpoint)
    storage = repo_folder(cache_dir, ref.repo_id)
    if "config.json" not in repo.files:
        raise HubError(f"{ref} has no config.json: not a model checkpoint")
    names = list(repo.files)
    small = [repo.files[n] for n in ("config.json", INDEX) if n in repo.files]
    first = _Tracker(str(ref), node, 0, 0, None)  # config + index: small, read before planning
    check_space(sum(f.size for f in small), free_bytes(cache_dir), node, cache_dir)
    for f in small:
        _fetch(repo, f, storage, first)
    config = read_local_json(storage, small[0])
    tc = arch.text_config(config)
    num_layers = len(arch.layer_types(tc))
    weight_map = (
        read_local_json(storage, repo.files[INDEX])["weight_map"] if INDEX in names else None
    )
    tied = arch.tie_word_embeddings(config)
    wanted = files_for_layers(names, weight_map, layers, num_layers, tied, mtp_head=mtp_head)
    files = [repo.files[n] for n in wanted]
    have = sum(_have(storage, f) for f in files)
    total = sum(f.size for f in files)
    check_space(total - have, free_bytes(cache_dir), node, cache_dir)
    tracker = _Tracker(str(ref), node, total, have, progress)
    tracker.emit()
    with ThreadPoolExecutor(PARALLEL_FILES) as pool:
        for future in [pool.submit(_fetch, repo, f, storage, tracker) for f in files]:
            future.result()  # the first failure propagates; the others finish or fail alone
    _write_ref(storage, ref, repo.commit)
    for f in sorted(files, key=lambda f: f.path == "config.json"):  # config.json last
        _link(storage, repo.commit, f)
    tracker.emit(finished=True)
    fetched = first.fetched + tracker.fetched
    return Pulled(storage / "snapshots" / repo.commit, repo.commit, wanted, fetched)


def _have(storage: Path, file: RemoteFile) -> int:
    blob = storage / "blobs" / file.etag
    if blob.is_file():
        return file.size
    partial = blob.with_name(blob.name + ".incomplete")
    return min(partial.stat().st_size, file.size) if partial.is_file() else 0


def read_local_json(storage: Path, file: RemoteFile) -> dict:
    import json

    return json.loads((storage / "blobs" / file.etag).read_text())


def fetch_json(repo: RemoteRepo, name: str, cache_dir: Path | None = None) -> dict:
    """A small JSON file of ``repo`` (config, index), verified into the hub cache once."""
    storage = repo_folder(cache_dir or hub_cache_dir(), repo.ref.repo_id)
    file = repo.files.get(name)
    if file is None:
        raise HubError(f"{repo.ref} has no {name}")
    _fetch(repo, file, storage, _Tracker(str(repo.ref), "", 0, 0, None))
    return read_local_json(storage, file)

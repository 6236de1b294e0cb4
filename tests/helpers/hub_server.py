"""A small Hugging Face hub on 127.0.0.1 for tests: the endpoints ``huggingface_hub`` and
macmesh call, served over real checkpoint directories.

Endpoints (as huggingface_hub 2.4 calls them; read from its ``hf_api.model_info`` and
``file_download.get_hf_file_metadata`` / ``http_get``):

- ``GET /api/models/{repo}[/revision/{rev}][?blobs=true]``: ``{"id", "sha", "siblings": [
  {"rfilename", "size", "blobId", "lfs": {"size", "sha256", "pointerSize"}}]}``;
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (the git blob sha1,
  or for LFS files ``X-Linked-Etag`` = the sha256 and ``X-Linked-Size``), ``Content-Length``,
  ``Accept-Ranges``; GET honours ``Range: bytes=a-b`` / ``bytes=a-`` with 206;
- errors as the hub sends them: 404 with ``X-Error-Code`` RepoNotFound / RevisionNotFound /
  EntryNotFound.

An endpoint may carry a client tag as its first path segment (``http://127.0.0.1:P/~node-a``),
so one server counts the bytes each node fetched. Faults for tests: ``corrupt`` (same size,
flipped bytes), ``truncate`` (close the connection after N bytes of a file), ``stall`` (send N
bytes of a file, then wait until ``release_stall`` — a client killed meanwhile leaves a partial
download behind).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors",)


@dataclass
class _Repo:
    commit: str
    files: dict[str, bytes]
    branches: dict[str, str] = field(default_factory=dict)


@dataclass
class Fetch:
    tag: str
    method: str
    repo: str
    path: str
    start: int
    bytes: int


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.fetches: list[Fetch] = []
        self.corrupt: set[tuple[str, str]] = set()
        self.truncate: dict[tuple[str, str], int] = {}
        self.stall: dict[tuple[str, str], int] = {}
        self.stalled = threading.Event()  # a stalled response has sent its bytes
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- setup --

    def add_repo(self, repo_id: str, directory: Path, *, branch: str = "main") -> str:
        """Serve every file of ``directory`` as ``repo_id`` at a new commit; returns it."""
        files = {
            str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*"))
            if p.is_file()
        }
        commit = hashlib.sha1(
            repo_id.encode() + b"".join(hashlib.sha1(v).digest() for v in files.values())
        ).hexdigest()
        repo = _Repo(commit, files, {branch: commit})
        self.repos[repo_id] = repo
        return commit

    def endpoint(self, tag: str = "") -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}" + (f"/~{tag}" if tag else "")

    def bytes_fetched(self, tag: str = "", repo: str | None = None) -> int:
        """File bytes sent to a client (metadata answers not counted)."""
        with self._lock:
            return sum(
                f.bytes
                for f in self.fetches
                if f.tag == tag
                and f.method == "GET"
                and f.path
                and (repo is None or f.repo == repo)
            )

    def files_fetched(self, tag: str = "") -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        with self._lock:
            for f in self.fetches:
                if f.tag == tag and f.method == "GET" and f.path:
                    out[f.path] += f.bytes
        return dict(out)

    def release_stall(self) -> None:
        self._release.set()

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    # -- lookups --

    def _commit(self, repo: _Repo, rev: str) -> str | None:
        if rev in repo.branches:
            return repo.branches[rev]
        return rev if rev == repo.commit else None

    def _record(self, fetch: Fetch) -> None:
        with self._lock:
            self.fetches.append(fetch)


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/]+))?$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _split(self) -> tuple[str, str]:
            path = unquote(urlparse(self.path).path)
            tag = ""
            if path.startswith("/~"):
                tag, _, rest = path[2:].partition("/")
                path = "/" + rest
            return tag, path

        def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self._serve()

        def do_GET(self) -> None:
            self._serve()

        def _serve(self) -> None:
            tag, path = self._split()
            if m := _INFO.match(path):
                return self._info(tag, m["repo"], m["rev"] or "main")
            if m := _RESOLVE.match(path):
                return self._file(tag, m["repo"], m["rev"], m["path"])
            self._error(404, "RepoNotFound", f"no route {path}")

        def _lookup(self, repo_id: str, rev: str) -> tuple[_Repo, str] | None:
            """The repo and commit, or None after answering with the hub's 404."""
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            commit = hub._commit(repo, rev)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return None
            return repo, commit

        def _info(self, tag: str, repo_id: str, rev: str) -> None:
            found = self._lookup(repo_id, rev)
            if found is None:
                return
            repo, commit = found
            siblings = []
            for name, data in repo.files.items():
                sibling = {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
                if name.endswith(LFS_SUFFIXES):
                    sibling["lfs"] = {
                        "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "pointerSize": 134,
                    }
                siblings.append(sibling)
            body = json.dumps({"id": repo_id, "sha": commit, "siblings": siblings}).encode()
            hub._record(Fetch(tag, self.command, repo_id, "", 0, len(body)))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def _file(self, tag: str, repo_id: str, rev: str, name: str) -> None:
            found = self._lookup(repo_id, rev)
            if found is None:
                return
            repo, commit = found
            data = repo.files.get(name)
            if data is None:
                return self._error(404, "EntryNotFound", f"{name} does not exist", commit)
            lfs = name.endswith(LFS_SUFFIXES)
            start, end = 0, len(data) - 1
            status = 200
            if (r := self.headers.get("Range")) and (m := _RANGE.match(r.strip())):
                start = int(m[1])
                end = min(int(m[2]), len(data) - 1) if m[2] else len(data) - 1
                status = 206
            body = data[start : end + 1]
            if (repo_id, name) in hub.corrupt and body:
                body = bytes(b ^ 0x5A for b in body)
            self.send_response(status)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            if lfs:
                self.send_header("ETag", f'"{git_blob_sha1(data)}"')
                self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Linked-Size", str(len(data)))
            else:
                self.send_header("ETag", f'"{git_blob_sha1(data)}"')
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.end_headers()
            if self.command == "HEAD":
                hub._record(Fetch(tag, "HEAD", repo_id, name, 0, 0))
                return
            limit = hub.truncate.get((repo_id, name))
            stall = hub.stall.get((repo_id, name))
            cut = min(x for x in (limit, stall, len(body)) if x is not None)
            try:
                self.wfile.write(body[:cut])
                self.wfile.flush()
            finally:
                hub._record(Fetch(tag, "GET", repo_id, name, start, cut))
            if stall is not None and cut < len(body):
                hub.stalled.set()
                hub._release.wait(60)
            if cut < len(body):
                self.close_connection = True
                return
            return

    return Handler

"""Is a checkpoint whole? Cheap checks of its files before anything maps them.

A download that stopped half way, a disk that filled up, or a copy that was cut short leaves a
safetensors shard shorter than its header says; MLX then fails deep inside a load with a bare
``RuntimeError`` (or, lazily, at the first forward). These checks read only each file's size and
header (8 bytes of little-endian length, then a JSON table of ``dtype``, ``shape`` and
``data_offsets`` relative to the end of the header), so they cost one small read per shard, and
they say which file is wrong, how, and what to do about it.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import grpc

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
_HUB_REPO = re.compile(r"^models--([^/]+?)--(.+)$")


class CorruptCheckpoint(OSError):
    """A checkpoint file is damaged on disk; the message names it, says what is wrong and what
    to do. Goes out as FAILED_PRECONDITION: the request is fine, the files are not."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def _remedy(file: Path) -> str:
    """What to do about a damaged ``file``: the exact command for a Hugging Face cache copy."""
    for parent in file.parents:
        match = _HUB_REPO.match(parent.name)
        if match:
            repo = f"{match.group(1)}/{match.group(2)}"
            return f"re-download it: `huggingface-cli download {repo} {file.name} --force-download`"
    return (
        f"re-download the checkpoint, or copy {file.parent} again from a machine where it is whole"
    )


def _corrupt(file: Path, problem: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"checkpoint file {str(file)!r} {problem}; {_remedy(file)}")


def check_safetensors(file: Path) -> None:
    """Raise ``CorruptCheckpoint`` unless ``file``'s size and header agree."""
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if length < 0 or length > MAX_HEADER_BYTES or 8 + length > size:
                raw = b""
            else:
                raw = handle.read(length)
    except OSError as exc:
        raise _corrupt(file, f"cannot be read ({exc.strerror or exc})") from None
    if length < 0:
        raise _corrupt(file, f"is truncated: {size} bytes, not even the 8-byte header length")
    if length > MAX_HEADER_BYTES:
        raise _corrupt(file, f"is not a safetensors file (header length {length} bytes)")
    if 8 + length > size:
        raise _corrupt(
            file, f"is truncated: {size} bytes on disk, but its header alone needs {8 + length}"
        )
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise _corrupt(file, f"has a damaged header ({str(exc)[:80]})") from None
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        problem = _entry_problem(entry)
        if problem is not None:
            raise _corrupt(file, f"has a damaged header entry for {name[:80]!r} ({problem})")
        end = max(end, entry["data_offsets"][1])
    expected = 8 + length + end
    if size < expected:
        raise _corrupt(
            file,
            f"is truncated: {size} bytes on disk, its header says {expected} "
            f"({expected - size} bytes missing)",
        )
    if size > expected:
        raise _corrupt(
            file, f"is {size} bytes on disk, {size - expected} more than its header describes"
        )


def _entry_problem(entry: object) -> str | None:
    if not isinstance(entry, dict):
        return "not an object"
    offsets, shape = entry.get("data_offsets"), entry.get("shape")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        return f"data_offsets {str(offsets)[:40]} are not [begin, end]"
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        return f"shape {str(shape)[:40]} is not a list of sizes"
    width = DTYPE_BYTES.get(str(entry.get("dtype")))
    if width is not None:
        count = 1
        for d in shape:
            count *= d
        if count * width != offsets[1] - offsets[0]:
            return (
                f"{entry.get('dtype')} {shape} is {count * width} bytes, "
                f"its offsets span {offsets[1] - offsets[0]}"
            )
    return None


def check_checkpoint(directory: Path, *, partial: bool = False) -> None:
    """Raise ``CorruptCheckpoint`` when ``config.json``, the index, or any safetensors file of
    the checkpoint ``directory`` is damaged or missing (an index naming an absent shard).

    ``partial``: the directory holds only some shards on purpose (a stage's per-node pull; the
    caller has checked that the ones it needs are there), so absent shards are not an error;
    every present one is still checked."""
    config = directory / "config.json"
    if config.is_file():
        try:
            json.loads(config.read_text())
        except (OSError, ValueError) as exc:
            raise _corrupt(config, f"is not valid JSON ({str(exc)[:80]})") from None
    files = set(directory.glob("*.safetensors"))
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            named = {directory / str(f) for f in weight_map.values()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _corrupt(index, f"is damaged ({str(exc)[:80]})") from None
        present = {f for f in named if f.is_file()}
        for missing in sorted(named - present):
            if not partial:
                raise _corrupt(missing, f"is missing (named by {INDEX_FILE})")
        files |= present
    for file in sorted(files):
        check_safetensors(file)

"""Which files of a checkpoint a node needs: pure functions over file names and the
safetensors index, tested without a hub.

A node holding layers [start, end) of an ``num_layers`` model needs config, tokenizer and
index files, the shards holding its layers, the embedding's shard when it is the first stage
(or the last with tied embeddings), the final norm's and LM head's shard when it is the last,
and the MTP head (main shards or the ``mtp.safetensors`` sidecar) only where it drafts: a node
holding the whole model (native MTP), or the last stage of a pipeline_mtp instance, which then
also needs the embedding (it embeds each draft).
"""

from __future__ import annotations

import re
from pathlib import Path

INDEX = "model.safetensors.index.json"
SIDECAR = "mtp.safetensors"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_MTP = re.compile(r"(?:^|\.)mtp\.")
# Weights in other formats a repo may carry next to safetensors: never needed.
_SKIP = (".bin", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5", ".ckpt", ".md")


def support_files(names: list[str]) -> list[str]:
    """Everything but weights: config, generation config, tokenizer, chat template, index."""
    return sorted(
        n
        for n in names
        if not n.endswith(".safetensors")
        and not n.endswith(_SKIP)
        and not n.startswith(".")
        and "/" not in n
    )


def tensor_needed(
    name: str, start: int, end: int, num_layers: int, tied: bool, with_mtp: bool
) -> bool:
    """Whether a node holding layers [start, end) needs tensor ``name``; ``with_mtp``: it
    drafts with the MTP head (the head, and the embedding it drafts with)."""
    if _MTP.search(name):
        return with_mtp
    if "visual" in name or "vision_tower" in name:
        return False
    if (match := _LAYER.search(name)) is not None:
        return start <= int(match.group(1)) < end
    first, last = start == 0, end == num_layers
    if "embed_tokens" in name:
        return first or (last and (tied or with_mtp))
    if "lm_head" in name or name.endswith("norm.weight"):
        return last
    return True  # anything else top-level is loaded by every stage


def files_for_layers(
    names: list[str],
    weight_map: dict[str, str] | None,
    layers: tuple[int, int] | None,
    num_layers: int,
    tied: bool,
    *,
    mtp_head: bool = False,
) -> list[str]:
    """The files a node holding ``layers`` (None: the whole model) must have; ``mtp_head``:
    the last stage of a pipeline_mtp instance, which drafts with the MTP head."""
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    whole = layers is None or (layers[0] == 0 and layers[1] == num_layers)
    drafts = whole or (mtp_head and layers is not None and layers[1] == num_layers)
    if weight_map is None or layers is None:
        wanted = shards
    else:
        start, end = layers
        wanted = sorted(
            {
                file
                for tensor, file in weight_map.items()
                if tensor_needed(tensor, start, end, num_layers, tied, drafts)
            }
        )
    if not drafts:
        wanted = [f for f in wanted if f != SIDECAR]
    elif SIDECAR in shards and SIDECAR not in wanted:
        wanted.append(SIDECAR)
    return support_files(names) + wanted


def is_mtp(name: str) -> bool:
    """An MTP head tensor, in any layout (``mtp.*``, ``language_model.mtp.*``)."""
    return _MTP.search(name) is not None


def mtp_tensors(header: dict) -> dict[str, dict]:
    """The ``mtp.*`` entries of a safetensors header."""
    return {k: v for k, v in header.items() if k != "__metadata__" and is_mtp(k)}


def stage_files_on_disk(
    path: Path, start: int, end: int, *, mtp_head: bool = False
) -> tuple[list[str], bool]:
    """(files layers [start, end) need that are absent, whether any indexed file is absent);
    ``mtp_head``: the stage drafts with the MTP head (its files and the embedding's too).

    A node that pulled only its own shards holds a partial checkpoint: the loader may then
    skip the strict every-weight check, once this says the stage's own files are all there
    (mlx-lm's ``sharded_load`` loads its per-stage downloads the same way)."""
    import json

    from node.placement import architecture as arch

    index = path / INDEX
    if not index.is_file():
        return [], False
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    absent = {f for f in weight_map.values() if not (path / f).is_file()}
    if not absent:
        return [], False
    config = json.loads((path / "config.json").read_text())
    num_layers = len(arch.layer_types(arch.text_config(config)))
    tied = arch.tie_word_embeddings(config)
    needed = files_for_layers(
        sorted(set(weight_map.values())),
        weight_map,
        (start, end),
        num_layers,
        tied,
        mtp_head=mtp_head,
    )
    return sorted(absent & set(needed)), True

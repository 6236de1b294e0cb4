"""Write tiny checkpoints to disk, and cache them by spec."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import get_total_parameters, quantize_model

from node.checkpoints.config import generation_config, model_config
from node.checkpoints.layouts import (
    hf_main_weights,
    hf_mtp_weights,
    hf_sort_key,
)
from node.checkpoints.spec import BUILDER_VERSION, CheckpointSpec, preset
from node.checkpoints.tokenizer import write_tokenizer
from node.checkpoints.weights import build_model, build_mtp

CACHE_ENV = "MACMESH_CHECKPOINT_CACHE"
SIDECAR_FILE = "mtp.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SPEC_FILE = "macmesh_checkpoint.json"
# Temporary build directories older than this are leftovers of killed builds.
STALE_BUILD_SECONDS = 3600
# Builds of the same spec by an older builder are removed once this old (a process started
# before the builder changed might still be reading one).
SUPERSEDED_SECONDS = 600


@dataclass
class LayoutFiles:
    """Everything a layout writes besides the tokenizer."""

    shards: list[dict[str, mx.array]]
    sidecar: dict[str, mx.array] | None
    config: dict
    safetensors_format: str  # "pt" for the HF layout, "mlx" for converted ones
    total_parameters: int | None


def _flat(module: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(module.parameters()))


def _split_shards(
    main: dict[str, mx.array], mtp: dict[str, mx.array], num_shards: int
) -> list[dict[str, mx.array]]:
    """Contiguous shards of about equal bytes, in checkpoint order; MTP goes in the last one."""
    names = sorted(main, key=hf_sort_key)
    total = sum(main[n].nbytes for n in names)
    count = max(1, min(num_shards, len(names)))
    shards: list[dict[str, mx.array]] = [{} for _ in range(count)]
    seen = 0
    for name in names:
        index = min(count - 1, math.floor(seen * count / max(1, total)))
        shards[index][name] = main[name]
        seen += main[name].nbytes
    shards = [s for s in shards if s] or [{}]
    shards[-1].update({n: mtp[n] for n in sorted(mtp, key=hf_sort_key)})
    return shards


def _quantize(spec: CheckpointSpec, model: nn.Module, config: dict) -> dict:
    """mlx-lm's own quantize_model (and the model's quant_predicate); returns the new config."""
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a bits-per-weight line
        _, quantized_config = quantize_model(
            model, config, group_size=spec.quant_group_size, bits=spec.quant_bits
        )
    mx.eval(model.parameters())
    return quantized_config


def layout_files(spec: CheckpointSpec) -> LayoutFiles:
    """Build the model and head for ``spec`` and arrange their tensors per ``spec.layout``."""
    model = build_model(spec)
    mtp = build_mtp(spec, model)
    config = model_config(spec)
    mtp_mlx = _flat(mtp)

    if spec.layout == "hf":
        return LayoutFiles(
            shards=_split_shards(
                hf_main_weights(_flat(model)), hf_mtp_weights(mtp_mlx), spec.num_shards
            ),
            sidecar=None,
            config=config,
            safetensors_format="pt",
            total_parameters=None,
        )

    sidecar = hf_mtp_weights(mtp_mlx) if spec.layout == "sidecar" else None
    keep_mtp = spec.layout == "mlx"
    if keep_mtp:
        # A child module puts the head at language_model.mtp.* for quantization and saving.
        model.language_model.mtp = mtp
    if spec.quant_bits is not None:
        config = _quantize(spec, model, config)
    total_parameters = get_total_parameters(model)
    weights = _flat(model)
    main = {k: v for k, v in weights.items() if not k.startswith("language_model.mtp.")}
    mtp_tensors = {k: v for k, v in weights.items() if k.startswith("language_model.mtp.")}
    return LayoutFiles(
        shards=_split_shards(main, mtp_tensors, spec.num_shards),
        sidecar=sidecar,
        config=config,
        safetensors_format="mlx",
        total_parameters=total_parameters,
    )


def _shard_name(index: int, count: int) -> str:
    if count == 1:
        return "model.safetensors"
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_checkpoint(spec: CheckpointSpec, out_dir: Path | str) -> Path:
    """Build ``spec`` into ``out_dir`` unconditionally (created if missing); returns it.

    Safetensors files and the index of an earlier build in ``out_dir`` are removed first, so a
    stale shard or sidecar can never mix into the new checkpoint.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = layout_files(spec)
    for stale in [*out_dir.glob("*.safetensors"), out_dir / INDEX_FILE]:
        stale.unlink(missing_ok=True)

    weight_map: dict[str, str] = {}
    total_size = 0
    for i, shard in enumerate(files.shards):
        name = _shard_name(i, len(files.shards))
        mx.save_safetensors(
            str(out_dir / name), shard, metadata={"format": files.safetensors_format}
        )
        for tensor_name, value in shard.items():
            weight_map[tensor_name] = name
            total_size += value.nbytes
    metadata: dict[str, int] = {"total_size": total_size}
    if files.total_parameters is not None:
        metadata["total_parameters"] = files.total_parameters
    _write_json(
        out_dir / INDEX_FILE,
        {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))},
    )
    if files.sidecar is not None:
        mx.save_safetensors(str(out_dir / SIDECAR_FILE), files.sidecar, metadata={"format": "pt"})

    if "quantization" in files.config:
        files.config["quantization_config"] = files.config["quantization"]
    _write_json(out_dir / "config.json", files.config)
    _write_json(out_dir / "generation_config.json", generation_config())
    write_tokenizer(out_dir)
    _write_json(
        out_dir / SPEC_FILE,
        {"builder_version": BUILDER_VERSION, "spec": dataclasses.asdict(spec)},
    )
    return out_dir


def cache_root() -> Path:
    """``$MACMESH_CHECKPOINT_CACHE`` or ``<repo>/.cache/checkpoints``."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists():
        return repo / ".cache" / "checkpoints"
    return Path.home() / ".cache" / "macmesh" / "checkpoints"


def cached_path(spec: CheckpointSpec, cache_dir: Path | None = None) -> Path:
    """``<cache>/<name>-<spec key>-<builder key>``."""
    return (cache_dir or cache_root()) / f"{spec.name()}-{spec.digest()}"


def _remove_stale_builds(spec: CheckpointSpec, final: Path) -> None:
    """Drop leftovers of killed builds and this spec's builds by older builders."""
    now = time.time()
    leftovers = [(p, STALE_BUILD_SECONDS) for p in final.parent.glob(".*")]
    superseded = final.parent.glob(f"{spec.name()}-{spec.spec_key()}-*")
    leftovers += [(p, SUPERSEDED_SECONDS) for p in superseded if p != final]
    for path, max_age in leftovers:
        with contextlib.suppress(OSError):
            if path.is_dir() and now - path.stat().st_mtime > max_age:
                shutil.rmtree(path, ignore_errors=True)


def ensure_checkpoint(spec: CheckpointSpec, cache_dir: Path | str | None = None) -> Path:
    """Build ``spec`` once into the cache and return its directory.

    The build happens in a temporary sibling directory that is renamed into place, so a
    directory that exists is complete, and concurrent builders (pytest workers) are safe:
    the loser of the rename race discards its copy.
    """
    final = cached_path(spec, Path(cache_dir) if cache_dir else None)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(spec, final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared
        build_checkpoint(spec, tmp)
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.is_dir():  # another process won the race
            return final
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def ensure_preset(name: str, **overrides: object) -> Path:
    """``ensure_checkpoint(PRESETS[name] with overrides)``."""
    return ensure_checkpoint(preset(name, **overrides))

"""Models from a Hugging Face hub: a real HTTP hub on 127.0.0.1 (tests/helpers/hub_server.py)
serving checkpoints the builders make, the real ``huggingface_hub`` pointed at it with
HF_ENDPOINT, real files in a real hub cache. No internet."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.daemons import macmesh_env, wait_for
from helpers.hub_server import HubServer

from node.checkpoints import CheckpointSpec, ensure_checkpoint
from node.hub.download import CorruptDownload, IncompleteDownload, NoSpace, check_space
from node.hub.mtp import MERGE_GAP
from node.hub.pull import mtp_source_for, pull_model
from node.hub.refs import parse_repo_ref, repo_folder
from node.hub.remote import RepoNotFound, RevisionNotFound
from node.hub.shards import files_for_layers
from node.placement.errors import UnknownModelError
from node.placement.resolve import HUB_CACHE, resolve

# 24 layers, so the MTP head (one layer + fc + norms) is a small part of the model, as in the
# real ones (Qwen3.6-27B: 0.85 GB of 54 GB).
SPEC = CheckpointSpec(arch="dense", layout="hf", num_hidden_layers=24, seed=7)
N = SPEC.num_hidden_layers
ORIGINAL = "Qwen/Tiny-Orig"
STRIPPED = "mlx-community/Tiny-Stripped"


@pytest.fixture(scope="module")
def checkpoints() -> dict[str, Path]:
    return {
        ORIGINAL: ensure_checkpoint(SPEC),
        STRIPPED: ensure_checkpoint(SPEC.with_layout("stripped")),
    }


@pytest.fixture
def hub(checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with HubServer() as server:
        for repo, directory in checkpoints.items():
            server.add_repo(repo, directory)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint())
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_HOME", raising=False)
        yield server


def _sizes(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*") if p.is_file()
    }


def test_repo_refs_parse() -> None:
    assert parse_repo_ref("mlx-community/Qwen3.6-27B-4bit").revision is None
    ref = parse_repo_ref("Qwen/Qwen3.6-27B@v1.0")
    assert (ref.repo_id, ref.revision) == ("Qwen/Qwen3.6-27B", "v1.0")
    assert parse_repo_ref("macmesh-tiny") is None and parse_repo_ref("/abs/path") is None
    assert parse_repo_ref("../x/y") is None
    assert mtp_source_for(parse_repo_ref("mlx-community/Qwen3.6-27B-4bit")) == "Qwen/Qwen3.6-27B"


def test_full_download_then_found_in_the_cache_offline(hub, checkpoints, monkeypatch) -> None:
    result = pull_model(STRIPPED, recover_mtp=False)
    source = _sizes(checkpoints[STRIPPED])
    assert hub.files_fetched() == source  # every file once, whole
    assert result.fetched_bytes == sum(source.values())
    for name in source:
        assert (result.snapshot / name).read_bytes() == (checkpoints[STRIPPED] / name).read_bytes()
    # Offline, with no hub reachable: the resolver finds it in the cache, through the hub's
    # own lookup, and huggingface_hub itself sees macmesh's download.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    before = len(hub.fetches)
    resolved = resolve(STRIPPED)
    assert resolved.origin == HUB_CACHE and resolved.card.id == STRIPPED
    assert resolved.found.remote_name == f"{STRIPPED}@{result.commit}"
    assert resolve(f"{STRIPPED}@{result.commit}").checkpoint == result.snapshot
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(
        STRIPPED, "config.json", cache_dir=os.environ["HF_HUB_CACHE"], local_files_only=True
    )
    assert Path(path).parent == result.snapshot
    assert len(hub.fetches) == before  # nothing went to the network


def test_a_second_pull_fetches_nothing(hub) -> None:
    pull_model(STRIPPED, recover_mtp=False)
    again = pull_model(STRIPPED, recover_mtp=False)
    assert again.fetched_bytes == 0


def test_resume_after_a_killed_download(hub, checkpoints, tmp_path) -> None:
    shard = "model-00001-of-00003.safetensors"
    size = (checkpoints[STRIPPED] / shard).stat().st_size
    cut = size // 3
    hub.stall[(STRIPPED, shard)] = cut
    env = macmesh_env(tmp_path, {k: os.environ[k] for k in ("HF_HUB_CACHE", "HF_ENDPOINT")})
    cmd = [sys.executable, "-m", "node.cli", "pull", STRIPPED, "--no-mtp", "--json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert hub.stalled.wait(120), "the download never reached the stalled shard"
        blobs = repo_folder(Path(os.environ["HF_HUB_CACHE"]), STRIPPED) / "blobs"
        partial = wait_for(
            lambda: [p for p in blobs.glob("*.incomplete") if p.stat().st_size == cut],
            timeout=60,
            what="the partial shard on disk",
        )[0]
        proc.send_signal(signal.SIGKILL)  # killed mid-file
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert partial.is_file() and partial.stat().st_size == cut
    assert not resolve_or_none(STRIPPED)  # nothing usable yet: no half-written checkpoint
    del hub.stall[(STRIPPED, shard)]
    hub.release_stall()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    gets = [f for f in hub.fetches if f.path == shard and f.method == "GET"]
    assert [g.start for g in gets] == [0, cut]  # the second pull asked for the rest only
    assert sum(g.bytes for g in gets) == size
    snapshot = resolve(STRIPPED).checkpoint
    assert (snapshot / shard).read_bytes() == (checkpoints[STRIPPED] / shard).read_bytes()


def resolve_or_none(model: str):
    try:
        return resolve(model).checkpoint
    except UnknownModelError:
        return None


@pytest.mark.parametrize("fault", ["corrupt", "truncate"])
def test_a_bad_download_is_a_clear_error_and_nothing_is_used(hub, fault) -> None:
    shard = "model-00002-of-00003.safetensors"
    if fault == "corrupt":
        hub.corrupt.add((STRIPPED, shard))
        error, words = CorruptDownload, r"sha256 .* is not the hub's"
    else:
        hub.truncate[(STRIPPED, shard)] = 1000
        error, words = IncompleteDownload, r"the connection ended after \d+ of \d+ bytes"
    with pytest.raises(error, match=rf"{shard} of {STRIPPED}: {words}"):
        pull_model(STRIPPED, recover_mtp=False)
    assert resolve_or_none(STRIPPED) is None  # no snapshot the resolver would use
    storage = repo_folder(Path(os.environ["HF_HUB_CACHE"]), STRIPPED)
    assert not (storage / "snapshots").exists() or not list((storage / "snapshots").rglob(shard))
    hub.corrupt.clear()
    hub.truncate.clear()
    assert pull_model(STRIPPED, recover_mtp=False).snapshot.is_dir()  # a retry succeeds


def test_missing_repo_and_revision_are_clear_errors(hub, tmp_path) -> None:
    with pytest.raises(RepoNotFound, match=r"repo 'org/nope' is not on the hub"):
        pull_model("org/nope")
    with pytest.raises(RevisionNotFound, match=rf"revision 'v9' of '{STRIPPED}'"):
        pull_model(f"{STRIPPED}@v9")
    env = macmesh_env(tmp_path, {k: os.environ[k] for k in ("HF_HUB_CACHE", "HF_ENDPOINT")})
    cli = subprocess.run(
        [sys.executable, "-m", "node.cli", "pull", "org/nope"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 2 and "repo 'org/nope' is not on the hub" in cli.stderr


def test_no_space_names_node_need_and_free(hub, tmp_path, monkeypatch) -> None:
    with pytest.raises(
        NoSpace, match=r"on studio-2 for the download: needs 2\.0 KiB, 1\.0 KiB free in /x"
    ):
        check_space(2048, 1024, "studio-2", Path("/x"))
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)]).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        monkeypatch.setenv("HF_HUB_CACHE", str(small / "hub"))
        with pytest.raises(NoSpace, match=rf"needs .* free in {small}"):
            pull_model(STRIPPED, recover_mtp=False, node="studio-2")
        assert not any(small.rglob("*.safetensors*"))  # refused before any weight was fetched
    finally:
        subprocess.run(["umount", str(small)], check=False)


@pytest.mark.parametrize("layers", [(0, 8), (8, 16), (16, 24)])
def test_a_stage_loads_from_only_the_files_chosen_for_it(checkpoints, tmp_path, layers) -> None:
    """The real shard loader, given a directory holding only the files chosen for a stage,
    loads that stage; and the choice leaves out shards it does not need."""
    from node.inference.shard import ShardError, load_shard

    directory = checkpoints[STRIPPED]
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    names = sorted(_sizes(directory))
    chosen = files_for_layers(names, index["weight_map"], layers, N, tied=False)
    only = tmp_path / "only"
    only.mkdir()
    for name in chosen:
        (only / name).symlink_to(directory / name)
    shard = load_shard(only, *layers)
    assert (shard.start_layer, shard.end_layer) == layers
    # exactly the weights a load from the whole checkpoint gives (none left at their init)
    from mlx.utils import tree_flatten

    full = dict(tree_flatten(load_shard(directory, *layers).model.parameters()))
    part = dict(tree_flatten(shard.model.parameters()))
    assert part.keys() == full.keys()
    assert all(bool((part[k] == full[k]).all()) for k in full)
    assert set(index["weight_map"].values()) - set(chosen)  # some shard was not needed
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(chosen)
    # a shard the stage needs is missing: a clear error, never a stage with random weights
    needed = next(f for f in chosen if f.endswith(".safetensors"))
    (only / needed).unlink()
    with pytest.raises(ShardError, match=rf"lacks {needed}, needed for layers \[{layers[0]}, "):
        load_shard(only, *layers)
    whole = files_for_layers(names, index["weight_map"], None, N, tied=False)
    assert set(whole) >= set(index["weight_map"].values())


def test_mtp_sidecar_by_ranged_reads_gives_the_original_greedy_output(hub, checkpoints) -> None:
    from node.inference.loading import load_checkpoint
    from node.inference.requests import GenerateRequest
    from node.inference.runner import LocalRunner

    plain = pull_model(STRIPPED, recover_mtp=False)
    assert "stripped" in plain.mtp_note
    result = pull_model(STRIPPED, mtp_from=ORIGINAL)
    sidecar = result.sidecar
    assert sidecar is not None and sidecar.tensors == 15
    original_bytes = sum(
        s for n, s in _sizes(checkpoints[ORIGINAL]).items() if n.endswith(".safetensors")
    )
    fetched = hub.bytes_fetched(repo=ORIGINAL)
    index = (checkpoints[ORIGINAL] / "model.safetensors.index.json").stat().st_size
    assert fetched == sidecar.bytes_fetched + index  # headers + mtp ranges + the index only
    header_and_mtp = 0
    for shard in sorted(checkpoints[ORIGINAL].glob("model-*.safetensors")):
        (length,) = struct.unpack("<Q", shard.read_bytes()[:8])
        header = json.loads(shard.read_bytes()[8 : 8 + length])
        mtp = [e["data_offsets"] for k, e in header.items() if k.startswith("mtp.")]
        if mtp:
            header_and_mtp += 8 + length + sum(e - b for b, e in mtp)
    # the tensors' bytes and the headers, with at most the small gaps merged reads span
    assert header_and_mtp <= sidecar.bytes_fetched <= header_and_mtp + 15 * MERGE_GAP
    assert sidecar.bytes_fetched < 0.10 * original_bytes, (sidecar.bytes_fetched, original_bytes)
    assert "recovered from" in result.mtp_note and ORIGINAL in result.mtp_note

    def greedy(path: Path):
        runner = LocalRunner(load_checkpoint(path), native_mtp_enabled=True)
        request = GenerateRequest(
            prompt_ids=[1, 2, 3, 4, 5], max_tokens=24, ignore_eos=True, mtp_k=2
        )
        *_, done = runner.generate(request)
        return done.token_ids, done.stats

    ids, stats = greedy(result.snapshot)
    ref_ids, ref_stats = greedy(checkpoints[ORIGINAL])
    assert stats.engine == ref_stats.engine == "native_mtp"
    assert ids == ref_ids
    # the same head: the same drafts accepted, not only the same output
    assert stats.accepted_draft_tokens == ref_stats.accepted_draft_tokens


def test_the_last_stage_of_a_pipeline_mtp_instance_pulls_the_head_and_embedding(
    hub, tmp_path, monkeypatch
) -> None:
    """pipeline_mtp drafts on the last stage: its per-stage pull of a stripped conversion
    recovers the head into the sidecar and takes the embedding's shard; the first stage gets
    no head. (Each node has its own hub cache.)"""
    from node.inference.shard import load_shard

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "first-node"))
    first = pull_model(STRIPPED, layers=(0, N // 2), mtp_head=False, mtp_from=ORIGINAL)
    assert first.sidecar is None and first.probe is None
    assert not (first.snapshot / "mtp.safetensors").exists()
    assert hub.bytes_fetched(repo=ORIGINAL) == 0

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "last-node"))
    last = pull_model(STRIPPED, layers=(N // 2, N), mtp_head=True, mtp_from=ORIGINAL)
    assert last.sidecar is not None and last.sidecar.tensors == 15
    assert last.probe is not None and last.probe.available, last.probe
    index = json.loads((last.snapshot / "model.safetensors.index.json").read_text())
    embedding = index["weight_map"]["language_model.model.embed_tokens.weight"]
    assert (last.snapshot / embedding).is_file()
    shard = load_shard(last.snapshot, N // 2, N, keep_embedding=True)
    assert shard.embedding is not None


def test_a_stage_that_keeps_the_embedding_needs_its_shard(checkpoints, tmp_path) -> None:
    """A per-node download loads without the strict every-weight check, so a last stage that
    keeps the embedding for the MTP head must find the embedding's file, or it would draft
    with random weights."""
    from node.inference.shard import ShardError, load_shard

    directory = checkpoints[STRIPPED]
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    names = sorted(_sizes(directory))
    layers = (N // 2, N)
    only = tmp_path / "only"
    only.mkdir()
    for name in files_for_layers(names, index["weight_map"], layers, N, tied=False):
        (only / name).symlink_to(directory / name)
    embedding = index["weight_map"]["language_model.model.embed_tokens.weight"]
    assert not (only / embedding).exists()  # a plain last stage does not need it
    load_shard(only, *layers)
    with pytest.raises(ShardError, match=rf"lacks {embedding}"):
        load_shard(only, *layers, keep_embedding=True)
    with_head = files_for_layers(names, index["weight_map"], layers, N, tied=False, mtp_head=True)
    assert embedding in with_head


def test_models_listing_shows_the_hub_cache_and_where_the_head_came_from(hub) -> None:
    from node.cluster.catalog import list_models

    pull_model(STRIPPED, recover_mtp=False)
    entry = {e.id: e for e in list_models(None)}[STRIPPED]
    assert entry.source == "hub_cache" and entry.has_weights and entry.native_mtp is None
    assert f"macmesh pull {STRIPPED} --mtp-from" in entry.mtp_note
    result = pull_model(STRIPPED, mtp_from=ORIGINAL)
    entry = {e.id: e for e in list_models(None)}[STRIPPED]
    assert entry.native_mtp is not None
    assert f"fetched from {ORIGINAL}@" in entry.mtp_note and result.commit


def test_one_resolution_order_for_every_caller(hub, checkpoints, tmp_path) -> None:
    """Path, then models directory, then hub cache; the stage resolver, the coordinator's
    ``locate`` and ``resolve`` agree on the files, and the card comes from those files."""
    import shutil

    from node.cluster.catalog import locate
    from node.placement.resolve import MODELS_DIR, PATH, checkpoint_resolver

    pulled = pull_model(STRIPPED, recover_mtp=False)
    models = tmp_path / "models"
    flat = models / STRIPPED.replace("/", "--")
    shutil.copytree(checkpoints[ORIGINAL], flat)  # same name, other weights (with MTP)
    stage = checkpoint_resolver(models)
    assert resolve(STRIPPED, models).origin == MODELS_DIR  # models dir beats the hub cache
    assert stage(STRIPPED) == locate(STRIPPED, models).checkpoint == flat.resolve()
    assert resolve(STRIPPED, models).card.native_mtp.weights_in_checkpoint is True  # its card
    assert resolve(STRIPPED, None).origin == HUB_CACHE  # no models dir: the cache
    assert stage(f"{STRIPPED}@{pulled.commit}") == pulled.snapshot
    assert resolve(str(pulled.snapshot), models).origin == PATH  # a path is a path
    with pytest.raises(UnknownModelError, match=r"macmesh pull org/absent"):
        resolve("org/absent", models)

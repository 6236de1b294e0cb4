"""`launch --pull` on a real 2-node cluster: each node downloads only the files holding its
layers (plus config, tokenizer, index) from a real HTTP hub on 127.0.0.1, into its own hub
cache, with progress in the launch stream; then the pipeline serves requests."""

from __future__ import annotations

import json
import struct

import pytest
from helpers.cluster_client import generate
from helpers.daemons import PATIENCE_S, DaemonCluster
from helpers.hub_server import HubServer
from helpers.mlx_lm_reference import mlx_lm_greedy
from mlx_lm import load as mlx_lm_load
from typer.testing import CliRunner

from node import rpc
from node.checkpoints import CheckpointSpec, ensure_checkpoint
from node.cli import app
from node.client import InstanceInfo
from node.hub.shards import files_for_layers
from node.proto.macmesh.v1 import stage_pb2, stage_pb2_grpc

SPEC = CheckpointSpec(arch="dense", layout="stripped", num_hidden_layers=12, seed=7)
REPO = "mlx-community/Tiny-Stripped"


def test_each_stage_downloads_only_its_shards(tmp_path) -> None:
    checkpoint = ensure_checkpoint(SPEC)
    sizes = {p.name: p.stat().st_size for p in checkpoint.iterdir() if p.is_file()}
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    headers = {  # 8 bytes of length + the JSON header
        f: 8 + struct.unpack("<Q", (checkpoint / f).read_bytes()[:8])[0]
        for f in set(weight_map.values())
    }
    with HubServer() as hub, DaemonCluster(tmp_path) as cluster:
        commit = hub.add_repo(REPO, checkpoint)
        a, b = _two_nodes(hub, cluster, tmp_path)
        # The CLI, as a user runs it: one bar per node while the shards download.
        result = CliRunner().invoke(
            app, ["launch", REPO, "--pull", "--min-nodes", "2", "--node", a.address, "--json"]
        )
        assert result.exit_code == 0, result.output
        instance = InstanceInfo.model_validate_json(result.stdout)
        assert instance.engine == "pipeline"
        assert instance.model == f"{REPO}@{commit}"
        bars = [line.split() for line in result.stderr.splitlines() if "%" in line]
        # a finished bar per node, drawn from the launch's progress stream
        assert sorted(bar[0] for bar in bars if "100%" in bar) == ["a", "b"], result.stderr

        stages = {s.node_id: s for s in instance.stages}
        assert set(stages) == {a.node_id, b.node_id}
        held: set[str] = set()
        for tag, daemon in (("a", a), ("b", b)):
            stage = stages[daemon.node_id]
            layers = (stage.start_layer, stage.end_layer)
            wanted = files_for_layers(list(sizes), weight_map, layers, 12, tied=False)
            fetched = hub.files_fetched(tag)
            for name, n in fetched.items():
                # the coordinator also read every shard's header, to plan
                header = headers[name] if tag == "a" and name in headers else 0
                if name in wanted:  # what the stage holds: each file whole, once
                    assert n == sizes[name] + header, (tag, name, n)
                else:  # the other shards: the header only
                    assert n == header, (tag, name, n)
            assert set(wanted) <= set(fetched)
            total = sum(fetched.values())
            assert total < 0.8 * sum(sizes.values()), (tag, total)  # not the whole model
            held |= {f for f in wanted if f.endswith(".safetensors")}
        assert held == set(weight_map.values())  # between them, the whole model
        _, token_ids, final = generate(
            a.address, REPO + "@" + commit, max_tokens=6, ignore_eos=True
        )
        assert len(token_ids) == 6 and final.engine == "pipeline"


# A 12-layer model that keeps its MTP head: in the main shards (as mlx_lm.convert writes it)
# or in an mtp.safetensors sidecar next to stripped main shards.
MTP_SPECS = {
    layout: CheckpointSpec(
        arch="dense", layout=layout, agreement="high", num_hidden_layers=12, seed=7
    )
    for layout in ("mlx", "sidecar")
}


@pytest.mark.parametrize("layout", sorted(MTP_SPECS))
def test_pull_with_mtp_across_pipeline_gives_the_last_stage_the_head(tmp_path, layout) -> None:
    """`launch --pull --mtp-across-pipeline`: the last stage downloads the MTP head (the shard
    holding it, or the sidecar) and the embedding it drafts with, the first stage does not;
    the instance runs pipeline_mtp and its greedy output with drafts is mlx-lm's."""
    checkpoint = ensure_checkpoint(MTP_SPECS[layout])
    repo = f"mlx-community/Tiny-MTP-{layout}"
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    head_files = {f for t, f in weight_map.items() if ".mtp." in f".{t}"}
    if (checkpoint / "mtp.safetensors").is_file():
        head_files.add("mtp.safetensors")
    assert head_files
    prompt = [11, 402, 97, 150, 23, 7, 64, 301]
    expected = mlx_lm_greedy(mlx_lm_load(str(checkpoint))[0], prompt, 12)
    with HubServer() as hub, DaemonCluster(tmp_path) as cluster:
        commit = hub.add_repo(repo, checkpoint)
        a, b = _two_nodes(hub, cluster, tmp_path)
        args = ["launch", repo, "--pull", "--min-nodes", "2", "--mtp-across-pipeline"]
        result = CliRunner().invoke(app, [*args, "--node", a.address, "--json"])
        assert result.exit_code == 0, result.output
        instance = InstanceInfo.model_validate_json(result.stdout)
        assert instance.engine == "pipeline_mtp", instance.engine_reason
        tags = {a.node_id: ("a", a), b.node_id: ("b", b)}
        (first_tag, _), (last_tag, last) = (tags[s.node_id] for s in instance.stages)
        with rpc.channel(last.address) as channel:
            shard = (
                stage_pb2_grpc.StageServiceStub(channel)
                .Status(stage_pb2.StageStatusRequest(instance_id=instance.instance_id), timeout=10)
                .stages[0]
                .shard
            )
        assert shard.has_head and shard.has_mtp_head and shard.mtp_head_bytes > 0
        sizes = {p.name: p.stat().st_size for p in checkpoint.iterdir() if p.is_file()}
        on_last, on_first = hub.files_fetched(last_tag), hub.files_fetched(first_tag)
        embedding = {f for t, f in weight_map.items() if "embed_tokens" in t}
        for name in head_files | embedding:  # each whole (the header read to plan aside)
            assert on_last.get(name, 0) >= sizes[name], (name, on_last)
        first_layers = (instance.stages[0].start_layer, instance.stages[0].end_layer)
        first_needs = files_for_layers(list(sizes), weight_map, first_layers, 12, tied=False)
        for name in head_files - set(first_needs):  # never the head's: it does not draft
            assert on_first.get(name, 0) < sizes[name], (name, on_first)
        _, ids, final = generate(
            a.address, f"{repo}@{commit}", None, prompt_ids=prompt, max_tokens=12, mtp_k=2
        )
        assert final.engine == "pipeline_mtp" and final.proposed_draft_tokens > 0, final
        assert ids == expected


def _two_nodes(hub: HubServer, cluster: DaemonCluster, tmp_path) -> tuple:
    """Daemons a and b, connected, each with its own hub cache and its own tag at the hub."""

    def env(tag: str) -> dict[str, str]:
        return {"HF_ENDPOINT": hub.endpoint(tag), "HF_HUB_CACHE": str(tmp_path / f"hf-{tag}")}

    a = cluster.start("a", mdns=False, env=env("a"))
    b = cluster.start("b", mdns=False, peers=[a.address], env=env("b"))
    cluster.wait_connected([a, b], timeout=PATIENCE_S)
    return a, b

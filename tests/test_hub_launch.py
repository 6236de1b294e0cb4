"""`launch --pull` on a real 2-node cluster: each node downloads only the files holding its
layers (plus config, tokenizer, index) from a real HTTP hub on 127.0.0.1, into its own hub
cache, with progress in the launch stream; then the pipeline serves requests."""

from __future__ import annotations

import json
import struct

from helpers.cluster_client import generate
from helpers.daemons import DaemonCluster
from helpers.hub_server import HubServer
from typer.testing import CliRunner

from node.checkpoints import CheckpointSpec, ensure_checkpoint
from node.cli import app
from node.client import InstanceInfo
from node.hub.shards import files_for_layers

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

        def env(tag: str) -> dict[str, str]:
            return {"HF_ENDPOINT": hub.endpoint(tag), "HF_HUB_CACHE": str(tmp_path / f"hf-{tag}")}

        a = cluster.start("a", mdns=False, env=env("a"))
        b = cluster.start("b", mdns=False, peers=[a.address], env=env("b"))
        cluster.wait_connected([a, b], timeout=15)
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

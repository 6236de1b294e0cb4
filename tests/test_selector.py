"""The per-instance engine selector, every branch through real daemons (``macmesh run``).

Three single-node daemons: ``plain`` (defaults), ``env_off`` (``MACMESH_NATIVE_MTP=0``) and
``flag_off`` (``--no-native-mtp``). Real checkpoints: the bundled model (MTP head in its
shards), a stripped conversion (config declares MTP, no weights) and a checkpoint that
declares no MTP at all. The multi-node branch (``pipeline``) runs in tests/test_cluster.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest
from helpers.cluster_client import generate, launch, raw_generate, status_code
from helpers.daemons import DaemonCluster

from node.checkpoints import PRESETS, ensure_checkpoint
from node.client import MacmeshClient
from node.cluster.selector import (
    EngineRefused,
    choose_instance_engine,
    compatible,
    native_mtp_disabled_by,
    request_engine,
)
from node.inference.mtp.recovery import probe_mtp
from node.models import bundled_model_path
from node.placement import card_from_checkpoint
from node.proto.macmesh.v1 import inference_pb2 as pb


def _without_mtp_declared(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    for section in (config, config.get("text_config", {})):
        if "mtp_num_hidden_layers" in section:
            section["mtp_num_hidden_layers"] = 0
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("selector")
    models_dir = root / "models"
    models_dir.mkdir()
    stripped = ensure_checkpoint(PRESETS["dense-stripped"])
    (models_dir / "stripped").symlink_to(stripped, target_is_directory=True)
    no_mtp = _without_mtp_declared(stripped, models_dir / "no-mtp")
    return {"root": root, "stripped": stripped, "no-mtp": no_mtp}


@pytest.fixture(scope="module")
def daemons(models: dict[str, Path]):
    with DaemonCluster(models["root"]) as cluster:
        spawned = {
            "plain": cluster.spawn("plain", mdns=False),
            "env_off": cluster.spawn("env-off", mdns=False, env={"MACMESH_NATIVE_MTP": "0"}),
            "flag_off": cluster.spawn("flag-off", mdns=False, extra_args=["--no-native-mtp"]),
        }
        yield {name: cluster.wait_ready(d) for name, d in spawned.items()}


# -- the rule itself, on real checkpoint probes (no daemon) ------------------------------------


def test_choice_for_each_kind_of_checkpoint(models: dict[str, Path]) -> None:
    def choose(path: Path, stages: int = 1, enabled: bool = True):
        return choose_instance_engine(
            num_stages=stages,
            probe=probe_mtp(path),
            card=card_from_checkpoint(path),
            native_mtp_enabled=enabled,
            disabled_by="MACMESH_NATIVE_MTP=0",
        )

    bundled = bundled_model_path()
    assert choose(bundled).engine == "native_mtp"
    assert choose(bundled, stages=2).engine == "pipeline"
    off = choose(bundled, enabled=False)
    assert off.engine == "local" and "MACMESH_NATIVE_MTP=0" in off.reason
    stripped = choose(models["stripped"])
    assert stripped.engine == "local" and "stripped" in stripped.reason
    undeclared = choose(models["no-mtp"])
    assert undeclared.engine == "local" and "declares no MTP" in undeclared.reason


def test_request_overrides_and_who_to_blame() -> None:
    assert request_engine("", "native_mtp", "r", 1).engine == "native_mtp"
    assert request_engine("local", "native_mtp", "r", 1).reason == "local: requested (engine=local)"
    with pytest.raises(EngineRefused, match="disabled"):
        request_engine("native_mtp", "local", "local: native MTP disabled by X", 1)
    with pytest.raises(ValueError, match="turbo"):
        request_engine("turbo", "local", "r", 1)
    assert compatible("local", "native_mtp") and not compatible("local", "pipeline")
    assert native_mtp_disabled_by({"MACMESH_NATIVE_MTP": "0"}) == "MACMESH_NATIVE_MTP=0"
    assert "--no-native-mtp" in native_mtp_disabled_by({})


# -- through real daemons ------------------------------------------------------------------------


def test_native_mtp_instance_and_per_request_overrides(daemons) -> None:
    address = daemons["plain"].address
    lines, instance = launch(address, "macmesh-tiny")
    assert instance.engine == "native_mtp", instance
    assert "head recovered" in instance.engine_reason
    assert any("native MTP head ready" in line for line in lines), lines

    _, ids, stats = generate(address, "macmesh-tiny", max_tokens=10, ignore_eos=True)
    assert stats.engine == "native_mtp" and stats.drafter_kind == "native_mtp"
    assert stats.engine_reason == instance.engine_reason
    # which K the policy picks follows this machine's measured costs (K = 0 included)
    assert sum(stats.draft_k_histogram) >= 1
    _, _, pinned = generate(address, "macmesh-tiny", max_tokens=10, ignore_eos=True, mtp_k=2)
    assert pinned.proposed_draft_tokens > 0 and pinned.draft_k_histogram[2] >= 1
    assert [s.node_id for s in stats.stages] == [daemons["plain"].node_id]
    # Status shows the K the instance's policy chose last.
    with MacmeshClient(address) as client:
        status = client.cluster_status()
    (shown,) = [i for i in status.instances if i.instance_id == instance.instance_id]
    assert shown.current_mtp_k is not None and 0 <= shown.current_mtp_k <= 8

    # engine=local on the same instance: plain decode, same greedy tokens, says why.
    _, local_ids, local = generate(
        address, "macmesh-tiny", max_tokens=10, ignore_eos=True, engine="local"
    )
    assert local.engine == "local" and local.drafter_kind is None
    assert local.engine_reason == "local: requested (engine=local)"
    assert local_ids == ids  # greedy native MTP is exact

    code, details = status_code(
        lambda: raw_generate(
            address, pb.GenerateRequest(model="macmesh-tiny", text="x", engine="pipeline")
        )
    )
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "several nodes" in details
    code, details = status_code(
        lambda: raw_generate(
            address, pb.GenerateRequest(model="macmesh-tiny", text="x", engine="turbo")
        )
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "turbo" in details


def test_stripped_and_undeclared_checkpoints_run_local_with_the_reason(daemons) -> None:
    address = daemons["plain"].address
    _, stripped = launch(address, "stripped")
    assert stripped.engine == "local" and "stripped" in stripped.engine_reason
    _, _, stats = generate(address, "stripped", max_tokens=4)
    assert stats.engine == "local" and stats.engine_reason == stripped.engine_reason
    code, details = status_code(
        lambda: raw_generate(
            address, pb.GenerateRequest(model="stripped", text="x", engine="native_mtp")
        )
    )
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "stripped" in details

    _, undeclared = launch(address, "no-mtp")
    assert undeclared.engine == "local" and "declares no MTP" in undeclared.engine_reason


@pytest.mark.parametrize(
    ("daemon", "blamed"),
    [("env_off", "MACMESH_NATIVE_MTP=0"), ("flag_off", "--no-native-mtp")],
)
def test_opt_outs_turn_native_mtp_off_and_say_so(daemons, daemon: str, blamed: str) -> None:
    address = daemons[daemon].address
    _, instance = launch(address, "macmesh-tiny")
    assert instance.engine == "local" and blamed in instance.engine_reason
    _, _, stats = generate(address, "macmesh-tiny", max_tokens=4)
    assert stats.engine == "local" and blamed in stats.engine_reason
    code, details = status_code(
        lambda: raw_generate(
            address, pb.GenerateRequest(model="macmesh-tiny", text="x", engine="native_mtp")
        )
    )
    assert code is grpc.StatusCode.FAILED_PRECONDITION and blamed in details

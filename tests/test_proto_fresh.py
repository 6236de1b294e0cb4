"""The generated gRPC code in node/proto must be what scripts/gen_proto.py writes today."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_proto", REPO / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["gen_proto"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    gen = _load_generator()
    fresh_root = tmp_path / "proto"
    gen.generate(fresh_root)
    checked_in = REPO / "node" / "proto"
    fresh = {
        p.relative_to(fresh_root): p.read_bytes() for p in fresh_root.rglob("*") if p.is_file()
    }
    current = {
        p.relative_to(checked_in): p.read_bytes()
        for p in checked_in.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    stale = sorted(str(k) for k in fresh.keys() | current.keys() if fresh.get(k) != current.get(k))
    assert not stale, f"node/proto is stale, run scripts/gen_proto.py (differs: {stale})"


def test_generated_code_imports_inside_the_package() -> None:
    from node.proto.macmesh.v1 import node_pb2, node_pb2_grpc

    assert node_pb2.DESCRIPTOR.package == "macmesh.v1"
    assert hasattr(node_pb2_grpc, "NodeServiceStub")

"""macmesh runs mlx-lm's own forward, not a copy: for several architectures, the split steps
(hidden states, then the LM head) equal ``model(ids, cache)`` bit for bit, the local engine's
greedy output equals mlx-lm's ``generate_step``, and chained pipeline shards equal the whole
model. A change upstream that our code does not follow fails here."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
from helpers.stage_nodes import StageNodes
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from node.checkpoints import PRESETS, ensure_checkpoint
from node.checkpoints.plain import build_plain_checkpoint
from node.inference import forward
from node.inference.engine import LocalEngine
from node.inference.events import GenerationDone, TokenDelta
from node.inference.loading import load_checkpoint
from node.inference.pipeline import PipelineEngine, SimplePlacement
from node.inference.requests import GenerateRequest
from node.inference.shard import ShardError, load_shard

PROMPT = [5, 17, 99, 3, 250, 7, 8, 9, 42, 300, 11]


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("plain")
    return lambda model_type: build_plain_checkpoint(model_type, root / model_type, seed=3)


def checkpoint(name: str, plain_dir) -> Path:
    return ensure_checkpoint(PRESETS[name]) if name in PRESETS else plain_dir(name)


ARCHS = ["dense-hf", "moe-hf", "dense-tied", "llama", "ministral3"]


@pytest.mark.parametrize("name", ARCHS)
def test_split_steps_equal_the_models_own_forward(name: str, plain_dir) -> None:
    model, _ = load_model(checkpoint(name, plain_dir))
    ids = mx.array([PROMPT])
    ours = forward.logits(model, forward.hidden_states(model, ids, make_prompt_cache(model)))
    assert mx.array_equal(ours, model(ids, cache=make_prompt_cache(model))).item()


@pytest.mark.parametrize("name", ["llama", "ministral3"])
def test_local_engine_runs_other_architectures_exactly(name: str, plain_dir) -> None:
    path = checkpoint(name, plain_dir)
    loaded = load_checkpoint(path)
    request = GenerateRequest(prompt_ids=PROMPT, max_tokens=24, ignore_eos=True)
    ids: list[int] = []
    for event in LocalEngine(loaded).generate(request):
        if isinstance(event, TokenDelta):
            ids.extend(event.token_ids)
        assert not isinstance(event, GenerationDone) or event.stats.generation_tokens == 24
    model, _ = load_model(path)
    expected = [
        int(t)
        for t, _ in zip(
            (tok for tok, _ in generate_step(mx.array(PROMPT), model)), range(24), strict=False
        )
    ]
    assert ids == expected


def test_pipeline_shards_of_another_architecture_equal_the_whole_model(plain_dir) -> None:
    path = checkpoint("ministral3", plain_dir)
    model, _ = load_model(path)
    expected = model(mx.array([PROMPT]))
    h = mx.array([PROMPT])
    shards = [load_shard(path, a, b) for a, b in [(0, 1), (1, 3), (3, 4)]]
    for shard in shards:
        h = shard.forward(h, shard.make_cache())
        mx.eval(h)
    assert mx.array_equal(shards[-1].logits(h), expected).item()


def test_an_architecture_without_pipeline_support_is_named(plain_dir) -> None:
    with pytest.raises(ShardError, match="no pipeline support for model type 'llama'"):
        load_shard(checkpoint("llama", plain_dir), 0, 2)


def test_another_architecture_runs_across_real_stage_processes(plain_dir, tmp_path) -> None:
    """Ministral 3 over two stage processes on 127.0.0.1: greedy output equals mlx-lm's."""
    path = checkpoint("ministral3", plain_dir)
    model, _ = load_model(path)
    expected = [
        t
        for t, _ in zip(
            (t for t, _ in generate_step(mx.array(PROMPT), model)), range(16), strict=False
        )
    ]
    with StageNodes(tmp_path / "stages", count=2) as nodes:
        placement = SimplePlacement.even(4, ["coordinator", nodes[1].name])
        with PipelineEngine(
            path, placement, nodes.addresses, local_node_id="coordinator"
        ) as engine:
            events = list(
                engine.generate(GenerateRequest(prompt_ids=PROMPT, max_tokens=16, ignore_eos=True))
            )
    ids = [t for e in events if isinstance(e, TokenDelta) for t in e.token_ids]
    assert ids == [int(t) for t in expected]

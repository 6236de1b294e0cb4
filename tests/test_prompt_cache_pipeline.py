"""The prompt cache on pipeline instances, through real 2-node daemons.

Two pairs of ``macmesh run`` processes, each pair joined by static peers: on ``cached`` the
coordinator has the default budget, on ``plain`` the cache is off (``--prompt-cache-mb 0``).
Each pair runs a 2-stage pipeline of the same tiny checkpoints. The coordinator decides the
hits and names the snapshots; each stage keeps the payload of its own layers
(node.inference.stage_cache). Every turn of a multi-turn chat must give mlx-lm's tokens and
the uncached pipeline's, and the final stats say how many prompt tokens the cache served.
"""

from __future__ import annotations

import random

import pytest
from helpers.cluster_client import launch
from helpers.daemons import DaemonCluster, wait_for
from helpers.stage_nodes import StageNodes
from test_batching import loaded
from test_prompt_cache_daemon import _decode, mlx_lm_greedy, run, tokens

from node.checkpoints import PRESETS, ensure_checkpoint
from node.client import MacmeshClient
from node.inference.pipeline import PipelineEngine, SimplePlacement
from node.inference.requests import GenerateRequest
from node.placement.checkpoint import card_from_checkpoint
from node.proto.macmesh.v1 import inference_pb2 as pb


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("prompt-cache-pipeline")
    with DaemonCluster(root) as cluster:
        off = ["--prompt-cache-mb", "0"]
        pairs = {}
        for name, extra in (("cached", []), ("plain", off)):
            coord = cluster.start(f"{name}-a", mdns=False, extra_args=extra)
            other = cluster.start(f"{name}-b", mdns=False, peers=[coord.address], extra_args=extra)
            cluster.wait_connected([coord, other], timeout=60)
            pairs[name] = coord.address
        instances: dict[tuple[str, str], str] = {}

        def instance(pair: str, preset: str) -> tuple[str, str]:
            address = pairs[pair]
            if (pair, preset) not in instances:
                path = str(ensure_checkpoint(PRESETS[preset]))
                _, launched = launch(address, path, min_nodes=2)
                assert launched.engine == "pipeline" and len(launched.stages) == 2, launched
                instances[pair, preset] = launched.instance_id
            return address, instances[pair, preset]

        yield instance


@pytest.mark.parametrize("preset", ["dense-stripped", "moe-stripped"])
def test_pipeline_turns_equal_mlx_lm_and_resume_from_every_stages_snapshot(
    pipelines, preset: str
) -> None:
    rng = random.Random(f"pipeline-{preset}")
    cached, plain = pipelines("cached", preset), pipelines("plain", preset)
    model = loaded(preset).model

    def turn(prompt: list[int]) -> tuple[list[int], int]:
        got, final = run(cached, prompt_ids=pb.TokenIds(ids=prompt))
        reference, plain_final = run(plain, prompt_ids=pb.TokenIds(ids=prompt))
        expected = mlx_lm_greedy(model, prompt)
        assert got == reference == expected, f"{len(prompt)} prompt tokens"
        assert final.engine == plain_final.engine == "pipeline"
        assert len(final.stages) == 2
        assert plain_final.cached_prompt_tokens == 0
        hit = final.cached_prompt_tokens
        if hit:  # the output depends on the cached part (tiny models forget fast)
            changed = prompt[: hit - 8] + [(t + 1) % 500 for t in prompt[hit - 8 : hit]]
            assert mlx_lm_greedy(model, changed + prompt[hit:]) != expected
        return got, hit

    history = tokens(300, rng)
    answer, hit = turn(history)
    assert hit == 0
    first = history
    for _ in range(3):
        # The stages hold the whole conversation but the answer's newest token (never fed).
        previous = history + answer
        history = previous + tokens(1, rng)
        answer, hit = turn(history)
        assert hit == len(previous) - 1
    # The same prompt again: the prompt-end snapshot (all but its last token).
    _, hit = turn(history)
    assert hit == len(history) - 1
    # Diverging inside the first prompt: no snapshot boundary before it.
    _, hit = turn(first[:150] + tokens(40, rng))
    assert hit == 0
    # Idle again, no stage holds a request's caches (snapshots are copies of their own).
    with MacmeshClient(cached[0]) as client:
        status = client.cluster_status()
    (shown,) = [i for i in status.instances if i.instance_id == cached[1]]
    assert shown.batch_size == 0


def test_seeded_pipeline_chat_turns_are_the_same_with_and_without_the_cache(pipelines) -> None:
    """The last stage's payload carries the sampling history: penalties over the cached part
    and the seed's draws give the uncached pipeline's tokens turn after turn."""
    preset = "dense-stripped"
    cached, plain = pipelines("cached", preset), pipelines("plain", preset)
    sampling = pb.SamplingParams(
        temperature=0.9, top_p=0.95, repetition_penalty=1.3, presence_penalty=0.4, seed=5
    )
    messages = [pb.ChatMessage(role="system", content="You answer briefly. " * 20)]
    hits = []
    for i, question in enumerate(["How do I open a file?", "And close it?", "In Rust?"]):
        messages.append(pb.ChatMessage(role="user", content=f"{question} " * (4 + i)))
        request = dict(
            messages=pb.ChatMessages(messages=messages), sampling=sampling, max_tokens=16
        )
        got, final = run(cached, **request)
        reference, plain_final = run(plain, **request)
        assert got == reference, f"turn {i}"
        assert final.prompt_tokens == plain_final.prompt_tokens
        hits.append(final.cached_prompt_tokens)
        messages.append(pb.ChatMessage(role="assistant", content=_decode(preset, got)))
    assert hits[0] == 0 and all(h > 0 for h in hits[1:]), hits


def test_a_small_budget_evicts_and_every_stage_frees_what_the_coordinator_forgot(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A coordinator in this process (stage 0 here) with a budget of about three snapshots,
    the other stage a separate process: after more conversations than fit, the oldest is
    computed in full again (and right), the newest still hits, and each stage holds exactly
    the snapshots the coordinator's store still names — none leaks."""
    preset = "dense-stripped"
    path = ensure_checkpoint(PRESETS[preset])
    model = loaded(preset).model
    rng = random.Random(9)
    with StageNodes(tmp_path_factory.mktemp("pcache-stages"), count=1) as nodes:
        layers = PRESETS[preset].num_hidden_layers
        placement = SimplePlacement.even(layers, ["coordinator", nodes[0].name])
        # Room for three snapshots of these conversations (300-310 tokens each), not four,
        # counted as the coordinator counts them: the card's KV and GatedDeltaNet bytes.
        card = card_from_checkpoint(path)
        budget = 3 * (card.kv_bytes_per_token * 320 + card.linear_state_bytes)
        engine = PipelineEngine(
            path,
            placement,
            nodes.addresses,
            local_node_id="coordinator",
            prompt_cache_bytes=budget,
        )
        engine.load()
        try:

            def generate(prompt: list[int]) -> tuple[list[int], int]:
                request = GenerateRequest(prompt_ids=prompt, max_tokens=4, ignore_eos=True)
                done = list(engine.generate(request))[-1]
                assert done.token_ids == mlx_lm_greedy(model, prompt, 4)
                return done.token_ids, done.stats.cached_prompt_tokens

            conversations = []
            for _ in range(4):
                prompt = tokens(300, rng)
                answer, _ = generate(prompt)
                conversations.append(prompt + answer + tokens(1, rng))
            assert engine.prompt_cache is not None
            assert engine.prompt_cache.stats().evicted > 0
            _, hit = generate(conversations[0])
            assert hit == 0  # evicted: computed in full
            _, hit = generate(conversations[-1])
            assert hit == len(conversations[-1]) - 2

            def held() -> list[int]:
                return [s.prompt_cache_snapshots for s in engine.status()]

            entries = len(engine.prompt_cache)
            assert 0 < entries <= 3
            wait_for(lambda: held() == [entries, entries], 60, what=f"{entries} per stage")
            assert all(s.prompt_cache_bytes > 0 for s in engine.status())
        finally:
            engine.close()

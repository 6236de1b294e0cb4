"""The prompt cache across turns, through real daemons and the gRPC API.

Three ``macmesh run`` processes serve the same tiny dense and MoE checkpoints (qwen3_5:
GatedDeltaNet and full-attention layers): ``cached`` with the default budget, ``plain`` with
the cache off (``--prompt-cache-mb 0``), and ``small`` with a 1 MiB budget. The stripped
checkpoints run the ``local`` engine, the ones with an MTP head (``*-partial``: the head
accepts some drafts and rejects others) ``native_mtp``. Every turn of a multi-turn chat gets
the same tokens from all of them and from mlx-lm's own ``generate_step`` on the whole prompt;
the cached daemon's final stats say how many prompt tokens its cache served, and the number
is the one the snapshot rule predicts.
"""

from __future__ import annotations

import random

import mlx.core as mx
import pytest
from helpers.cluster_client import launch, stub
from helpers.daemons import DaemonCluster
from mlx_lm.generate import generate_step

from node.checkpoints import PRESETS, ensure_checkpoint
from node.inference import forward
from node.inference.loading import load_checkpoint
from node.inference.prompt_cache import freeze
from node.proto.macmesh.v1 import inference_pb2 as pb


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("prompt-cache")
    with DaemonCluster(root) as cluster:
        nodes = {
            "cached": cluster.start("cached", mdns=False),
            "plain": cluster.start("plain", mdns=False, extra_args=["--prompt-cache-mb", "0"]),
            "small": cluster.start("small", mdns=False, extra_args=["--prompt-cache-mb", "1"]),
        }
        instances: dict[tuple[str, str], str] = {}

        def instance(node: str, preset: str) -> tuple[str, str]:
            """(address, instance id) of ``preset`` on ``node``, launched on first use."""
            address = nodes[node].address
            if (node, preset) not in instances:
                _, launched = launch(address, str(ensure_checkpoint(PRESETS[preset])))
                instances[node, preset] = launched.instance_id
            return address, instances[node, preset]

        yield instance


@pytest.fixture(scope="module")
def models():
    cache: dict[str, object] = {}

    def model(preset: str):
        if preset not in cache:
            cache[preset] = load_checkpoint(ensure_checkpoint(PRESETS[preset])).model
        return cache[preset]

    return model


def run(
    where: tuple[str, str], max_tokens: int = 10, **fields
) -> tuple[list[int], pb.GenerationStats]:
    address, instance_id = where
    fields.setdefault("ignore_eos", True)
    channel, inference = stub(address)
    with channel:
        responses = list(
            inference.Generate(
                pb.GenerateRequest(model=instance_id, max_tokens=max_tokens, **fields), timeout=300
            )
        )
    ids = [t for r in responses if r.HasField("delta") for t in r.delta.token_ids]
    return ids, responses[-1].final


def mlx_lm_greedy(model, prompt: list[int], max_tokens: int = 10) -> list[int]:
    return [
        int(t)
        for t, _ in generate_step(
            mx.array(prompt), model, max_tokens=max_tokens, sampler=lambda x: mx.argmax(x, -1)
        )
    ]


def tokens(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(0, 500) for _ in range(n)]


@pytest.mark.parametrize("preset", ["dense-stripped", "moe-stripped"])
def test_every_turn_of_a_chat_equals_mlx_lm_and_reuses_the_previous_turn(
    daemons, models, preset: str
) -> None:
    rng = random.Random(preset)
    cached, plain = daemons("cached", preset), daemons("plain", preset)
    model = models(preset)

    def turn(prompt: list[int]) -> tuple[list[int], int]:
        got, final = run(cached, prompt_ids=pb.TokenIds(ids=prompt))
        reference, plain_final = run(plain, prompt_ids=pb.TokenIds(ids=prompt))
        expected = mlx_lm_greedy(model, prompt)
        assert got == reference == expected, f"{len(prompt)} prompt tokens"
        assert final.prompt_tokens == plain_final.prompt_tokens == len(prompt)
        assert plain_final.cached_prompt_tokens == 0
        hit = final.cached_prompt_tokens
        if hit:
            # The negative control: these tiny random models forget history within a few
            # tokens (hence new messages of 1-2 tokens here), so check that the output depends
            # on the cached part (changing its last 8 tokens changes it): a wrong seeded state
            # would have shown.
            changed = prompt[: hit - 8] + [(t + 1) % 500 for t in prompt[hit - 8 : hit]]
            assert mlx_lm_greedy(model, changed + prompt[hit:]) != expected
        return got, hit

    history = tokens(300, rng)
    answer, cached_tokens = turn(history)
    assert cached_tokens == 0  # a cold cache
    prompts = [history]
    for _ in range(3):
        # The next turn: the whole conversation so far (the answer included) and a new message.
        # The snapshot at the end of the previous generation holds all but the new message.
        previous = history + answer
        history = previous + tokens(2, rng)
        prompts.append(history)
        answer, cached_tokens = turn(history)
        assert cached_tokens == len(previous)

    # A prompt that shares the last prompt and the first token of its answer, then diverges:
    # the recurrent state at the generation's end is of no use; the snapshot at the end of the
    # prompt (its first n-1 tokens) is, though it ends before the shared prefix does.
    branch = history + answer[:1] + tokens(1, rng)
    _, cached_tokens = turn(branch)
    assert cached_tokens == len(history) - 1
    # Diverging inside the first prompt: no snapshot boundary lies before it.
    _, cached_tokens = turn(prompts[0][:150] + tokens(40, rng))
    assert cached_tokens == 0
    # The same request again: everything but its last token comes from the cache.
    _, cached_tokens = turn(branch)
    assert cached_tokens == len(branch) - 1


@pytest.mark.parametrize(
    ("preset", "engine"),
    [
        ("dense-stripped", "local"),
        ("moe-stripped", "local"),
        ("dense-partial", "native_mtp"),
        ("moe-partial", "native_mtp"),
    ],
)
def test_sampled_chat_turns_with_a_seed_are_the_same_with_and_without_the_cache(
    daemons, preset: str, engine: str
) -> None:
    """Through the chat template (messages), sampling with penalties and a seed: the cached
    daemon draws the same tokens as the one without a cache, turn after turn. Native MTP
    drafts (pinned K) and each of its draws is the target's own (the coupled rule)."""
    cached, plain = daemons("cached", preset), daemons("plain", preset)
    sampling = pb.SamplingParams(
        temperature=0.9, top_p=0.95, repetition_penalty=1.2, presence_penalty=0.2, seed=11
    )
    drafting = {"mtp_k": 2} if engine == "native_mtp" else {}
    messages = [pb.ChatMessage(role="system", content="You answer briefly. " * 20)]
    hits = []
    for i, question in enumerate(["How do I open a file?", "And close it?", "In Rust?"]):
        messages.append(pb.ChatMessage(role="user", content=f"{question} " * (4 + i)))
        request = dict(
            messages=pb.ChatMessages(messages=messages),
            sampling=sampling,
            max_tokens=16,
            **drafting,
        )
        got, final = run(cached, **request)
        reference, plain_final = run(plain, **request)
        assert final.engine == plain_final.engine == engine
        assert final.proposed_draft_tokens > 0 or engine == "local"
        assert got == reference, f"turn {i}"
        assert final.prompt_tokens == plain_final.prompt_tokens
        hits.append(final.cached_prompt_tokens)
        messages.append(pb.ChatMessage(role="assistant", content=_decode(preset, got)))
    # Later turns start from an earlier turn's snapshot: at least the previous prompt's.
    assert hits[0] == 0 and all(h > 0 for h in hits[1:]), hits


@pytest.mark.parametrize(
    ("preset", "mtp_k"), [("dense-partial", 2), ("dense-partial", None), ("moe-partial", 3)]
)
def test_native_mtp_turns_equal_mlx_lm_and_reuse_the_heads_state(
    daemons, models, preset: str, mtp_k: int | None
) -> None:
    """Native MTP (drafting at a pinned K, or at the K its policy picks) continues each turn
    from the previous generation's snapshot: the model's caches, the head's cache and the
    hidden states of its pending pairs. The snapshot holds all of the answer but its newest
    token (the caches have not seen it yet), and every turn equals mlx-lm's and the uncached
    daemon's tokens."""
    rng = random.Random(f"{preset}-{mtp_k}")
    cached, plain = daemons("cached", preset), daemons("plain", preset)
    model = models(preset)
    options = {} if mtp_k is None else {"mtp_k": mtp_k}

    def turn(prompt: list[int]) -> int:
        got, final = run(cached, prompt_ids=pb.TokenIds(ids=prompt), max_tokens=12, **options)
        reference, plain_final = run(
            plain, prompt_ids=pb.TokenIds(ids=prompt), max_tokens=12, **options
        )
        assert final.engine == plain_final.engine == "native_mtp"
        expected = mlx_lm_greedy(model, prompt, 12)
        assert got == reference == expected, f"{len(prompt)} tokens"
        if mtp_k is not None:
            assert final.proposed_draft_tokens > 0
        assert plain_final.cached_prompt_tokens == 0
        hit = final.cached_prompt_tokens
        # The output depends on the cached part (see the local test's negative control).
        changed = prompt[: hit - 8] + [(t + 1) % 500 for t in prompt[hit - 8 : hit]]
        assert mlx_lm_greedy(model, changed + prompt[hit:], 12) != expected
        return hit

    history = tokens(300, rng)
    answer, _ = run(cached, prompt_ids=pb.TokenIds(ids=history), max_tokens=12, **options)
    for _ in range(3):
        previous = history + answer
        history = previous + tokens(1, rng)  # 2 tokens to compute: the newest answer's and it
        assert turn(history) == len(previous) - 1
        answer, _ = run(cached, prompt_ids=pb.TokenIds(ids=history), max_tokens=12, **options)
    # The same prompt again: the snapshot at its end (all but its last token) serves it.
    assert turn(history) == len(history) - 1
    # A local request on the same instance starts from native MTP's snapshot (the model's
    # caches are the same); native MTP cannot start from a local one (no head state).
    got, final = run(cached, prompt_ids=pb.TokenIds(ids=history), engine="local")
    assert final.engine == "local" and final.cached_prompt_tokens == len(history) - 1
    assert got == mlx_lm_greedy(model, history)


def _decode(preset: str, ids: list[int]) -> str:
    return _tokenizer(preset).decode(ids)


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(preset: str):
    if preset not in _TOKENIZERS:
        _TOKENIZERS[preset] = load_checkpoint(ensure_checkpoint(PRESETS[preset])).tokenizer
    return _TOKENIZERS[preset]


def test_evicted_snapshots_are_recomputed_and_the_recent_ones_still_serve(daemons, models) -> None:
    """A 1 MiB budget: after enough other conversations the first one's snapshots are gone
    (its next turn is computed in full, and still right); the latest one's remain."""
    preset = "dense-stripped"
    small, plain = daemons("small", preset), daemons("plain", preset)
    model = models(preset)
    rng = random.Random(5)
    cache = model.make_cache()
    forward.hidden_states(model, mx.array(tokens(299, rng))[None], cache)
    snapshot = freeze(cache)
    assert snapshot is not None
    others = 2**20 // snapshot.nbytes + 1  # each stores two snapshots at least this big

    first = tokens(300, rng)
    answer, final = run(small, prompt_ids=pb.TokenIds(ids=first), max_tokens=4)
    follow_up = first + answer + tokens(4, rng)
    # While it is recent, the follow-up would hit; fill the cache with other conversations.
    last = None
    for _ in range(others):
        last = tokens(300, rng)
        last_answer, _ = run(small, prompt_ids=pb.TokenIds(ids=last), max_tokens=4)
    got, final = run(small, prompt_ids=pb.TokenIds(ids=follow_up))
    reference, _ = run(plain, prompt_ids=pb.TokenIds(ids=follow_up))
    assert final.cached_prompt_tokens == 0
    assert got == reference == mlx_lm_greedy(model, follow_up)
    assert last is not None
    recent = last + last_answer + tokens(4, rng)
    got, final = run(small, prompt_ids=pb.TokenIds(ids=recent))
    assert final.cached_prompt_tokens == len(last) + len(last_answer)
    assert got == mlx_lm_greedy(model, recent)

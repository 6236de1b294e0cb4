"""The prompt cache store: longest usable prefix, the trim rule, the byte budget, LRU order.

The store is pure bookkeeping over opaque snapshots, so these tests drive it directly with
labelled snapshots; ``freeze``/``thaw`` are checked on real mlx-lm caches of a real model:
a model seeded from a snapshot continues bit for bit like the model that never stopped.
"""

from __future__ import annotations

import random

import mlx.core as mx
import pytest

from node.checkpoints import PRESETS, ensure_checkpoint
from node.inference import forward
from node.inference.loading import load_checkpoint
from node.inference.prompt_cache import PromptCache, Snapshot, freeze, thaw, thaw_extras


def snap(label: str, nbytes: int = 10, trimmable: bool = False) -> Snapshot:
    return Snapshot(caches=[label], nbytes=nbytes, trimmable=trimmable)


def label(hit) -> str | None:
    return None if hit is None else hit.snapshot.caches[0]


def test_recurrent_snapshots_serve_only_prompts_that_contain_them_whole() -> None:
    store = PromptCache(budget_bytes=1000)
    store.insert([1, 2, 3], snap("prompt-end"))
    store.insert([1, 2, 3, 4, 5, 6], snap("generation-end"))
    # The next turn extends the generation: the deeper snapshot wins.
    hit = store.lookup([1, 2, 3, 4, 5, 6, 7, 8])
    assert (label(hit), hit.length, hit.stored_length) == ("generation-end", 6, 6)
    # Diverging inside the generation (after 5 shared tokens): the recurrent state at 6 is
    # useless, the prompt-end snapshot at 3 (before the shared prefix's end) serves.
    hit = store.lookup([1, 2, 3, 4, 5, 9, 9])
    assert (label(hit), hit.length) == ("prompt-end", 3)
    # The same prompt again: at most n-1 tokens come from the cache.
    assert label(store.lookup([1, 2, 3])) is None
    assert store.lookup([1, 2, 3, 4]).length == 3
    # Nothing shared, or too short to leave a token to compute.
    assert store.lookup([7, 8, 9]) is None
    assert store.lookup([1]) is None
    assert store.lookup([1, 2]) is None


def test_kv_snapshots_trim_to_the_shared_prefix() -> None:
    store = PromptCache(budget_bytes=1000)
    store.insert([1, 2, 3, 4, 5, 6], snap("kv", trimmable=True))
    hit = store.lookup([1, 2, 3, 4, 9])
    assert (label(hit), hit.length, hit.stored_length) == ("kv", 4, 6)
    # A prompt equal to the snapshot, or a prefix of it: all but its last token.
    assert store.lookup([1, 2, 3, 4, 5, 6]).length == 5
    assert store.lookup([1, 2, 3]).length == 2
    # Storing a longer trimmable snapshot drops the prefixes it can stand in for.
    store.insert([1, 2, 3, 4, 5, 6, 7, 8], snap("longer", trimmable=True))
    assert len(store) == 1 and store.nbytes == 10
    assert label(store.lookup([1, 2, 3, 4, 5, 6, 0])) == "longer"


def test_the_deeper_of_a_whole_prefix_and_a_trimmed_one_wins() -> None:
    store = PromptCache(budget_bytes=1000)
    store.insert([1, 2], snap("short"))
    store.insert([1, 2, 3, 4, 5], snap("kv", trimmable=True))
    assert (label(h := store.lookup([1, 2, 3, 4, 0])), h.length) == ("kv", 4)
    assert (label(h := store.lookup([1, 2, 0, 0])), h.length) == ("short", 2)


def test_an_owner_finds_only_the_snapshots_it_can_use() -> None:
    """Native MTP needs the head's state with the caches; the local engine can use any."""
    store = PromptCache(budget_bytes=1000)
    with_head = Snapshot(caches=["mtp"], nbytes=10, trimmable=False, extras={"mtp_cache": 1})
    store.insert([1, 2, 3], with_head)
    store.insert([1, 2, 3, 4, 5], snap("local"))
    store.insert([7, 8, 9, 10], snap("kv", trimmable=True))
    mtp = lambda s: "mtp_cache" in s.extras  # noqa: E731
    assert label(store.lookup([1, 2, 3, 4, 5, 6])) == "local"
    assert (label(h := store.lookup([1, 2, 3, 4, 5, 6], usable=mtp)), h.length) == ("mtp", 3)
    assert store.lookup([7, 8, 9, 0], usable=mtp) is None  # a trimmable one is skipped too
    assert label(store.lookup([7, 8, 9, 0])) == "kv"


def test_budget_evicts_least_recently_used_first() -> None:
    store = PromptCache(budget_bytes=30)
    store.insert([1, 1], snap("a"))
    store.insert([2, 2], snap("b"))
    store.insert([3, 3], snap("c"))
    assert store.lookup([1, 1, 0]) is not None  # a is now the most recent
    store.insert([4, 4], snap("d"))  # over budget: b, the least recently used, goes
    assert store.lookup([2, 2, 0]) is None
    assert {label(store.lookup([k, k, 0])) for k in (1, 3, 4)} == {"a", "c", "d"}
    assert store.nbytes == 30 and len(store) == 3
    # A snapshot larger than the whole budget is refused, and evicts nothing.
    assert not store.insert([5, 5], snap("huge", nbytes=31))
    assert len(store) == 3
    # Replacing a snapshot keeps the byte count right.
    store.insert([1, 1], snap("a2", nbytes=5))
    assert store.nbytes == 25 and label(store.lookup([1, 1, 0])) == "a2"
    stats = store.stats()
    assert stats.evicted == 1 and stats.entries == 3 and stats.budget_bytes == 30
    assert stats.hits == 5 and stats.hit_tokens == 10 and stats.lookups == 6
    store.clear()
    assert len(store) == 0 and store.nbytes == 0 and store.lookup([1, 1, 0]) is None


def test_the_owner_hears_of_every_snapshot_the_store_lets_go() -> None:
    """A pipeline's coordinator keeps the index and its stages the payload: it must learn of
    each snapshot evicted, replaced, made redundant by a longer trimmable one, or cleared."""
    released: list[str] = []
    store = PromptCache(budget_bytes=20, on_evict=lambda s: released.append(s.caches[0]))
    store.insert([1, 2], snap("a"))
    store.insert([1, 2], snap("a2"))  # replaced
    store.insert([3, 4], snap("b"))
    store.insert([5, 6], snap("c"))  # over budget: a2 goes
    store.insert([5, 6, 7], snap("c-longer", nbytes=5, trimmable=True))
    store.insert([5, 6, 7, 8], snap("c-longest", nbytes=5, trimmable=True))  # c-longer redundant
    assert released == ["a", "a2", "b", "c-longer"]
    store.clear()
    assert sorted(released[4:]) == ["c", "c-longest"] and store.nbytes == 0


def test_random_operations_match_a_brute_force_reference() -> None:
    """The radix trie finds what a scan over every stored sequence finds."""
    rng = random.Random(7)
    store = PromptCache(budget_bytes=10**9)
    stored: dict[tuple[int, ...], bool] = {}
    for step in range(600):
        seq = tuple(rng.randrange(3) for _ in range(rng.randrange(1, 9)))
        if rng.random() < 0.5:
            trimmable = rng.random() < 0.5
            store.insert(seq, snap(str(seq), trimmable=trimmable))
            stored[seq] = trimmable
            if trimmable:  # the store drops trimmable prefixes of a trimmable snapshot
                for k in range(1, len(seq)):
                    if stored.get(seq[:k]):
                        del stored[seq[:k]]
            continue
        limit = len(seq) - 1
        best = 0
        for t, trim in stored.items():
            common = 0
            while common < min(len(t), len(seq)) and t[common] == seq[common]:
                common += 1
            if common == len(t) and len(t) <= limit:
                best = max(best, len(t))
            elif trim:
                best = max(best, min(common, limit))
        hit = store.lookup(seq)
        got = hit.length if hit is not None else 0
        assert got == best, (step, seq, hit)
        if hit is not None:
            t = tuple(int(x) for x in hit.snapshot.caches[0].strip("()").split(",") if x)
            assert t[: hit.length] == seq[: hit.length]
            assert hit.stored_length == len(t)
    assert len(store) == len(stored)


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(ensure_checkpoint(PRESETS["dense-stripped"])).model


def test_a_thawed_snapshot_continues_like_the_caches_it_was_frozen_from(model) -> None:
    """Freeze after a prompt, run the original caches on, then seed new caches from the
    snapshot: the same tokens give the same hidden states, bit for bit, and the snapshot
    itself is untouched by either."""
    rng = random.Random(1)
    prompt = [rng.randrange(500) for _ in range(40)]
    more = [rng.randrange(500) for _ in range(9)]
    cache = model.make_cache()
    forward.hidden_states(model, mx.array(prompt)[None], cache)
    frozen = freeze(cache)
    assert frozen is not None and not frozen.trimmable  # qwen3_5: GatedDeltaNet layers
    assert frozen.nbytes == sum(c.nbytes for c in frozen.caches) > 0
    before = [mx.array(a) for c in frozen.caches for a in _arrays(c)]
    reference = forward.hidden_states(model, mx.array(more)[None], cache)

    store = PromptCache(10**9)
    store.insert(prompt, frozen)
    hit = store.lookup(prompt + more)
    assert hit is not None and hit.length == len(prompt)
    seeded = thaw(hit)
    got = forward.hidden_states(model, mx.array(more)[None], seeded)
    assert mx.array_equal(got, reference).item()
    after = [a for c in frozen.caches for a in _arrays(c)]
    assert all(mx.array_equal(a, b).item() for a, b in zip(before, after, strict=True))
    # A trim is refused for recurrent state instead of silently restoring the wrong prefix.
    with pytest.raises(ValueError, match="cannot trim"):
        thaw(type(hit)(length=10, snapshot=frozen, stored_length=len(prompt)))


def test_trimmed_kv_snapshot_equals_the_shorter_prefix_computed_directly(model) -> None:
    """The full-attention layers alone (KV caches): a snapshot of 40 tokens trimmed to 25
    holds exactly the keys and values of those 25 tokens."""
    rng = random.Random(2)
    prompt = [rng.randrange(500) for _ in range(40)]
    cache = model.make_cache()
    forward.hidden_states(model, mx.array(prompt)[None], cache)
    kv_layers = [c for c in cache if c.is_trimmable()]
    frozen = freeze(kv_layers)
    assert frozen is not None and frozen.trimmable
    store = PromptCache(10**9)
    store.insert(prompt, frozen)
    hit = store.lookup([*prompt[:25], 0, 0])
    assert (hit.length, hit.stored_length) == (25, 40)
    for seeded, full in zip(thaw(hit), kv_layers, strict=True):
        assert seeded.offset == 25
        k, v = seeded.keys_and_values()
        assert k.shape[2] == 25 and mx.array_equal(k, full.keys[..., :25, :]).item()
        assert mx.array_equal(v, full.values[..., :25, :]).item()
    assert all(c.offset == 40 for c in frozen.caches)  # the stored snapshot is not trimmed


def test_extras_are_copied_counted_and_make_a_snapshot_exact_only(model) -> None:
    """Native MTP keeps the last hidden state with the caches: it is copied, counted in the
    budget, and a snapshot carrying one is never trimmed (the hidden belongs to its end)."""
    cache = model.make_cache()
    kv_only = [c for c in cache if c.is_trimmable()]
    forward.hidden_states(model, mx.array(list(range(30)))[None], cache)
    hidden = mx.ones((1, 1, 64))
    frozen = freeze(kv_only, extras={"hidden": hidden})
    assert frozen is not None and not frozen.trimmable
    assert frozen.nbytes == sum(c.nbytes for c in frozen.caches) + hidden.nbytes > hidden.nbytes
    assert frozen.extras["hidden"] is not hidden
    assert mx.array_equal(frozen.extras["hidden"], hidden).item()
    # A cache among the extras (the MTP head's) is frozen like the others and thaws fresh.
    head = kv_only[0]
    with_head = freeze(kv_only, extras={"mtp_cache": head, "hidden": hidden})
    assert with_head is not None
    frozen_head = with_head.extras["mtp_cache"]
    assert frozen_head is not head and frozen_head.keys.shape[2] == 30  # a copy of its entries
    assert with_head.nbytes == frozen.nbytes + frozen_head.nbytes > frozen.nbytes
    thawed = thaw_extras(with_head)
    assert thawed["mtp_cache"] is not with_head.extras["mtp_cache"]
    assert thawed["mtp_cache"].offset == head.offset == 30
    assert mx.array_equal(thawed["mtp_cache"].keys, head.keys[..., :30, :]).item()
    assert thawed["hidden"] is with_head.extras["hidden"]  # arrays are shared, never written


def _arrays(c):
    if hasattr(c, "keys"):
        return [c.keys, c.values]
    return [a for a in c.cache if a is not None]

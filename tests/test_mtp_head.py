"""The MTP head forward and the exact cache rollback, checked against independent computations:
the builders' reference head, and the target's own step-by-step forward."""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import pytest

from node.checkpoints import PRESETS, ensure_checkpoint
from node.checkpoints.reference_mtp import load_reference_mtp
from node.inference import forward
from node.inference.loading import LoadedModel, load_checkpoint
from node.inference.mtp.engine import _restore_linear, _snapshot_linear
from node.inference.mtp.gdn import commit_verified, verify_forward


@cache
def loaded(name: str) -> LoadedModel:
    return load_checkpoint(ensure_checkpoint(PRESETS[name]))


def tokens(n: int, seed: int) -> mx.array:
    return mx.random.randint(0, 500, (1, n), key=mx.random.key(seed))


@pytest.mark.parametrize("name", ["dense-hf", "moe-sidecar", "dense-tied", "moe-mlx-q4"])
def test_head_matches_reference_head(name: str) -> None:
    """Same inputs, same caches: our head and the builders' reference head agree, over a
    multi-token call (prefill-like) and a chained single-token call."""
    lm = loaded(name)
    ours = lm.mtp_head()
    ref = load_reference_mtp(lm.path, lm.model)
    ids = tokens(12, 0)
    hidden = forward.hidden_states(lm.model, ids, lm.model.make_cache())
    emb = forward.embed(lm.model, ids[:, 1:])
    c1, c2 = ours.make_cache(), ref_cache()
    a = ours(emb, hidden[:, :-1], c1)
    b = ref(hidden[:, :-1], emb, c2)
    assert mx.allclose(a, b, atol=1e-5).item()
    # chained: the head's own output as the hidden, a drafted token as the embedding
    draft = mx.argmax(forward.logits(lm.model, a[:, -1:]), axis=-1)
    a2 = ours(forward.embed(lm.model, draft), a[:, -1:], c1)
    b2 = ref(b[:, -1:], forward.embed(lm.model, draft), c2)
    assert mx.allclose(a2, b2, atol=1e-5).item()
    assert c1.offset == c2.offset == 12


def ref_cache():
    from mlx_lm.models.cache import KVCache

    return KVCache()


@pytest.mark.parametrize("name", ["dense-partial", "moe-hf"])
@pytest.mark.parametrize("n_accept", [1, 2, 3, 5])
def test_verify_then_commit_equals_stepwise_forward(name: str, n_accept: int) -> None:
    """Verify 5 tokens, keep the first n: every cache (KV and GatedDeltaNet conv + recurrent
    state) equals feeding only those n tokens, and so does what comes next.

    Equal to float32 rounding, not bit for bit: with OpenBLAS preloaded (as ./scripts/test
    does) a 5-row matmul can round differently from a 3-row one (seen on the MoE shared
    expert). A wrong rollback is off by whole tokens of state, far above this tolerance."""
    model = loaded(name).model
    tm = forward.text_model(model)
    prompt, verify, after = tokens(9, 1), tokens(5, 2), tokens(3, 3)
    plain, spec = model.make_cache(), model.make_cache()
    tm(prompt, plain)
    tm(prompt, spec)

    expected = tm(verify[:, :n_accept], plain)
    hidden, pending = verify_forward(tm, verify, spec)
    commit_verified(spec, pending, n_accept, 5)
    assert same(hidden[:, :n_accept], expected)
    for a, b in zip(plain, spec, strict=True):
        if a.is_trimmable():
            assert a.offset == b.offset == 9 + n_accept
        else:
            assert same(a[0], b[0])  # conv state
            assert same(a[1], b[1])  # recurrent state
    assert same(tm(after, plain), tm(after, spec))


def same(a: mx.array, b: mx.array) -> bool:
    return a.shape == b.shape and mx.allclose(a, b, rtol=1e-5, atol=1e-5).item()


def test_snapshot_copies_the_live_state_list() -> None:
    """ArraysCache.state is the live list the next forward rebinds; the snapshot must survive
    a forward and restore the pre-forward state exactly."""
    model = loaded("dense-hf").model
    tm = forward.text_model(model)
    a, b = model.make_cache(), model.make_cache()
    tm(tokens(6, 4), a)
    tm(tokens(6, 4), b)
    snapshot = _snapshot_linear(b)
    tm(tokens(4, 5), b)  # mutates the lists in place
    _restore_linear(b, snapshot)
    for c in b:
        if c.is_trimmable():
            c.trim(4)
    nxt = tokens(2, 6)
    assert mx.array_equal(tm(nxt, a), tm(nxt, b)).item()

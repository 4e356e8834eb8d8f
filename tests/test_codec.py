"""shards.codec: property tests of the top-k encoding against naive float64 references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shards import codec
from shards.codec import Codebook
from tests.shards_helpers import (
    FLOAT32_SLACK,
    log_softmax64,
    quantization_bound,
    random_distributions,
    topk_of,
)

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def orders_for(mode: str, ids: np.ndarray, vocab: int, rng: np.random.Generator):
    """(order, rank_of) of a vocabulary ranking: built from the ids, random, or identity."""
    if mode == "built":
        order = codec.build_rank_order(ids, vocab)
        # What a reader gets back from the file's schema metadata.
        order = codec.unpack_order(codec.pack_order(order, ids), vocab)
    elif mode == "random":
        order = rng.permutation(vocab).astype(np.uint32)
    else:
        order = np.arange(vocab, dtype=np.uint32)
    return order, codec.invert_order(order)


def round_trip(ids, lps, resp, tok, vocab, k, mode, rng, codebook=None):
    codebook = codebook or Codebook.for_k(k)
    order, rank_of = orders_for(mode, ids, vocab, rng)
    enc = codec.encode_tokens(ids, lps, resp, tok, rank_of, codebook)
    dec = codec.decode_tokens(enc, resp, k, order, codebook)
    return enc, dec, codebook


def check_decoded(dec, ids, lps, resp, tok, full, codebook):
    n, k = ids.shape
    assert dec.ids.shape == (n, k) and dec.logprobs.shape == (n, k)
    assert dec.tail_logprob.shape == (n,) and dec.token_logprob.shape == (n,)
    assert dec.ids.dtype == np.int32 and dec.logprobs.dtype == np.float32
    for i in range(n):
        # The set of ids is kept, their order is not: compare sorted, values moved with ids.
        a, b = np.argsort(ids[i]), np.argsort(dec.ids[i])
        np.testing.assert_array_equal(dec.ids[i][b], ids[i][a], err_msg=f"token {i} id set")
        target, bound = quantization_bound(codebook, lps[i][a])
        err = np.abs(dec.logprobs[i][b].astype(np.float64) - target)
        assert (err <= bound).all(), (i, err.max(), bound[np.argmax(err - bound)])
    # The decoded logprobs are codebook levels.
    assert np.isin(dec.logprobs, codebook.table).all()
    # token_logprob
    target, bound = quantization_bound(codebook, tok)
    assert (np.abs(dec.token_logprob.astype(np.float64) - target) <= bound).all()
    # tail against a float64 reference from the exact distribution, in probability
    top64 = np.take_along_axis(full, np.asarray(ids, dtype=np.int64), axis=1)
    ref_tail = np.maximum(1.0 - np.exp(top64).sum(axis=1), 0.0)
    got_tail = np.exp(dec.tail_logprob.astype(np.float64))
    np.testing.assert_allclose(got_tail, ref_tail, rtol=0, atol=1e-3)


@st.composite
def cases(draw):
    vocab = draw(
        st.one_of(
            st.integers(1, 64),
            st.integers(65, 5000),
            st.sampled_from([65535, 65536, 65537, 70000]),
        )
    )
    k = draw(
        st.one_of(
            st.just(1),
            st.just(min(2, vocab)),
            st.integers(1, min(40, vocab)),
            st.just(min(vocab, 300)),  # == vocab for small vocabularies
        )
    )
    n = draw(st.integers(0, max(0, min(12, 20000 // k))))
    return dict(
        vocab=vocab,
        k=k,
        n=n,
        seed=draw(st.integers(0, 2**32 - 1)),
        p_in=draw(st.sampled_from([0.0, 0.5, 1.0])),
        mode=draw(st.sampled_from(["built", "random", "identity"])),
        give_token_lp=draw(st.booleans()),
    )


@PROPERTY
@given(cases())
def test_round_trip(case):
    rng = np.random.default_rng(case["seed"])
    vocab, k, n = case["vocab"], case["k"], case["n"]
    full = random_distributions(rng, n, vocab)
    ids, lps, resp, tok, in_topk = topk_of(rng, full, k, p_in_topk=case["p_in"])
    given_tok = tok if (case["give_token_lp"] or not in_topk.all()) else None
    enc, dec, cb = round_trip(ids, lps, resp, given_tok, vocab, k, case["mode"], rng)
    np.testing.assert_array_equal(enc["token_in_topk"], in_topk)
    assert len(enc["extra_level"]) == (~in_topk).sum()
    assert len(enc["topk_level_lo"]) == n * (k - 1)
    check_decoded(dec, ids, lps, resp, tok, full, cb)


@pytest.mark.parametrize("mode", ["identity", "random"])
def test_rank_delta_high_byte(mode):
    """Rank deltas above 65535 need the upper byte of the uint16 high plane."""
    vocab, k, n = 70000, 2, 64
    rng = np.random.default_rng(7)
    full = random_distributions(rng, n, vocab)
    ids, lps, resp, tok, _ = topk_of(rng, full, k, p_in_topk=0.5)
    # Force ids at both ends of the vocabulary into every token's top-k.
    ids[:, 0], ids[:, 1] = rng.integers(0, 100, n), rng.integers(vocab - 100, vocab, n)
    resp = np.where(rng.random(n) < 0.5, ids[:, 0], rng.integers(100, vocab - 100, n))
    lps = np.take_along_axis(full, ids, axis=1).astype(np.float32)
    tok = full[np.arange(n), resp].astype(np.float32)
    if mode == "identity":
        order = np.arange(vocab, dtype=np.uint32)
    else:
        order = np.concatenate([ids[:, 0], ids[:, 1]])
        order = np.concatenate([np.setdiff1d(np.arange(vocab), order), np.unique(order)])
    rank_of = codec.invert_order(order)
    cb = Codebook.for_k(k)
    enc = codec.encode_tokens(ids, lps, resp, tok, rank_of, cb)
    deltas = enc["topk_rank_delta_lo"].astype(np.int64) | (
        enc["topk_rank_delta_hi"].astype(np.int64) << 8
    )
    assert enc["topk_rank_delta_hi"].max() > 255
    assert deltas.max() > 65535
    dec = codec.decode_tokens(enc, resp, k, order.astype(np.int32), cb)
    check_decoded(dec, ids, lps, resp, tok, full, cb)


def test_zero_tokens():
    cb = Codebook.for_k(8)
    order = np.arange(100, dtype=np.uint32)
    empty = np.zeros((0, 8), np.int64)
    enc = codec.encode_tokens(
        empty, np.zeros((0, 8), np.float32), np.zeros(0, np.int64), None, order, cb
    )
    assert all(len(v) == 0 for v in enc.values())
    dec = codec.decode_tokens(enc, np.zeros(0, np.int32), 8, order, cb)
    assert dec.ids.shape == (0, 8) and dec.tail_logprob.shape == (0,)


def test_minus_infinity_logprobs_decode_to_the_lowest_level():
    """Engines report masked tokens as -inf: stored as the codebook's floor, not an error."""
    cb = Codebook.for_k(3)
    order = np.arange(10, dtype=np.uint32)
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    lps = np.array([[-0.1, -np.inf, -3.0], [-0.5, -1.0, -np.inf]], np.float32)
    resp = np.array([1, 9])
    tok = np.array([-0.1, -np.inf], np.float32)
    enc = codec.encode_tokens(ids, lps, resp, tok, codec.invert_order(order), cb)
    dec = codec.decode_tokens(enc, resp, 3, order, cb)
    lowest = np.float32(cb.levels[-1])
    got = {
        (i, int(t)): lp for i in range(2) for t, lp in zip(dec.ids[i], dec.logprobs[i], strict=True)
    }
    assert got[(0, 2)] == lowest and got[(1, 6)] == lowest
    assert dec.token_logprob[1] == lowest
    assert np.isfinite(dec.tail_logprob).all()


def test_batch_decode_equals_per_row_decode():
    """decode_tokens on the concatenated streams of several rows == row by row."""
    rng = np.random.default_rng(3)
    vocab, k = 500, 16
    cb = Codebook.for_k(k)
    order = codec.build_rank_order(rng.integers(0, vocab, 5000), vocab)
    rank_of = codec.invert_order(order)
    encs, resps, decs = [], [], []
    for t in (5, 0, 17, 1):
        ids, lps, resp, tok, _ = topk_of(rng, random_distributions(rng, t, vocab), k, 0.6)
        enc = codec.encode_tokens(ids, lps, resp, tok, rank_of, cb)
        encs.append(enc)
        resps.append(resp)
        decs.append(codec.decode_tokens(enc, resp, k, order, cb))
    whole = codec.decode_tokens(
        {c: np.concatenate([e[c] for e in encs]) for c in encs[0]},
        np.concatenate(resps),
        k,
        order,
        cb,
    )
    for field in ("ids", "logprobs", "tail_logprob", "token_logprob"):
        np.testing.assert_array_equal(
            getattr(whole, field), np.concatenate([getattr(d, field) for d in decs])
        )


def test_token_logprob_from_topk_when_not_given():
    rng = np.random.default_rng(5)
    full = random_distributions(rng, 20, 300)
    ids, lps, resp, tok, _ = topk_of(rng, full, 10, p_in_topk=1.0)
    _, dec, cb = round_trip(ids, lps, resp, None, 300, 10, "built", rng)
    check_decoded(dec, ids, lps, resp, tok, full, cb)


def test_quantization_bound_is_tight():
    """The reference bound is not vacuous: a wrong level would exceed it."""
    cb = Codebook.for_k(16)
    levels = cb.levels
    for j in (0, 10, 100, len(levels) // 2, len(levels) - 2):
        mid = (levels[j] + levels[j + 1]) / 2
        _, bound = quantization_bound(cb, np.array([mid]))
        assert bound[0] == pytest.approx((levels[j] - levels[j + 1]) / 2 + FLOAT32_SLACK)
        assert abs(levels[j + 2] - mid) > bound[0] if j + 2 < len(levels) else True


# ---- errors name the token -------------------------------------------------------------------


def _valid(n=6, k=5, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    full = random_distributions(rng, n, vocab)
    ids, lps, resp, tok, _ = topk_of(rng, full, k, p_in_topk=1.0)
    return ids, lps, resp, tok, codec.invert_order(np.arange(vocab)), Codebook.for_k(k)


@pytest.mark.parametrize("bad", [1, 3, 5])
def test_error_nan_logprob(bad):
    ids, lps, resp, tok, rank_of, cb = _valid()
    lps[bad, 2] = np.nan
    with pytest.raises(ValueError, match=rf"^token {bad}: .*NaN"):
        codec.encode_tokens(ids, lps, resp, tok, rank_of, cb)


@pytest.mark.parametrize("bad", [0, 4])
def test_error_positive_logprob(bad):
    ids, lps, resp, tok, rank_of, cb = _valid()
    lps[bad, 1] = 0.5
    with pytest.raises(ValueError, match=rf"^token {bad}: .*positive"):
        codec.encode_tokens(ids, lps, resp, tok, rank_of, cb)


@pytest.mark.parametrize("bad", [0, 2, 5])
@pytest.mark.parametrize("response_dup", [False, True])
def test_error_duplicate_ids(bad, response_dup):
    ids, lps, resp, tok, rank_of, cb = _valid()
    j = int(np.flatnonzero(ids[bad] == resp[bad])[0])
    src = j if response_dup else (j + 1) % ids.shape[1]
    dst = (src + 2) % ids.shape[1]
    ids[bad, dst] = ids[bad, src]
    with pytest.raises(ValueError, match=rf"^token {bad}: duplicate ids"):
        codec.encode_tokens(ids, lps, resp, tok, rank_of, cb)


@pytest.mark.parametrize("value", [-1, 50, 10**6])
@pytest.mark.parametrize("bad", [1, 5])
def test_error_out_of_vocab(bad, value):
    ids, lps, resp, tok, rank_of, cb = _valid()
    ids[bad, 0 if ids[bad, 0] != resp[bad] else 1] = value
    with pytest.raises(ValueError, match=rf"^token {bad}: top-k id outside the vocabulary"):
        codec.encode_tokens(ids, lps, resp, tok, rank_of, cb)


def test_error_response_not_in_topk_without_token_logprobs():
    rng = np.random.default_rng(1)
    full = random_distributions(rng, 6, 50)
    ids, lps, resp, tok, _ = topk_of(rng, full, 5, p_in_topk=1.0)
    resp[4] = np.setdiff1d(np.arange(50), ids[4])[0]
    with pytest.raises(ValueError, match=r"^token 4: response token not in the top-k"):
        codec.encode_tokens(
            ids, lps, resp, None, codec.invert_order(np.arange(50)), Codebook.for_k(5)
        )


# ---- rank order -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    vocab=st.integers(1, 70000),
    n_ids=st.integers(0, 3000),
    skew=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_rank_order_round_trip(vocab, n_ids, skew, seed):
    rng = np.random.default_rng(seed)
    # Zipf-like ids, so that counts differ and ties happen.
    weights = 1.0 / np.arange(1, vocab + 1) ** skew
    ids = rng.permutation(vocab)[
        np.minimum(rng.choice(vocab, n_ids, p=weights / weights.sum()), vocab - 1)
    ]
    order = codec.build_rank_order(ids, vocab)
    assert order.shape == (vocab,)
    np.testing.assert_array_equal(np.sort(order), np.arange(vocab))
    counts = np.bincount(ids, minlength=vocab)
    # Naive reference: by count descending, then id ascending.
    ref = sorted(range(vocab), key=lambda i: (-counts[i], i))
    np.testing.assert_array_equal(order, ref)
    rank_of = codec.invert_order(order)
    np.testing.assert_array_equal(order[rank_of], np.arange(vocab))
    back = codec.unpack_order(codec.pack_order(order, ids), vocab)
    np.testing.assert_array_equal(back, order)


def test_unpack_order_refuses_wrong_vocab():
    ids = np.array([5, 5, 9, 1])
    blob = codec.pack_order(codec.build_rank_order(ids, 10), ids)
    with pytest.raises(ValueError, match="vocab_size"):
        codec.unpack_order(blob, 8)


# ---- KL of the whole encoding on realistic distributions --------------------------------------


def lm_like_distributions(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    """Zipf-shaped logprobs like a language model's next-token distribution.

    Random token identities, a random Zipf exponent and noise per token: from flat (top-1
    p ~ 0.1) to peaked (top-1 p > 0.99), median top-1 p ~ 0.75.
    """
    log_rank = np.log(np.arange(1, vocab + 1))
    out = np.empty((n, vocab))
    for i in range(n):
        slope = rng.uniform(0.8, 1.6) * rng.uniform(1.0, 4.0)
        logits = -slope * log_rank + rng.gumbel(size=vocab) * rng.uniform(0.2, 1.5)
        out[i] = log_softmax64(rng.permutation(logits))
    return out


def mean_kl(full: np.ndarray, k: int, codebook: Codebook, seed: int) -> tuple[float, float]:
    """Mean KL(decoded || float32 top-k + tail bucket), normalized and generalized, float64."""
    rng = np.random.default_rng(seed)
    ids, lps, resp, tok, _ = topk_of(rng, full, k, p_in_topk=0.8)
    _, dec, _ = round_trip(ids, lps, resp, tok, full.shape[1], k, "built", rng, codebook)
    q = np.exp(np.take_along_axis(lps, np.argsort(ids, axis=1), axis=1).astype(np.float64))
    p = np.exp(
        np.take_along_axis(dec.logprobs, np.argsort(dec.ids, axis=1), axis=1).astype(np.float64)
    )
    q = np.concatenate([q, np.maximum(1.0 - q.sum(1), 1e-30)[:, None]], axis=1)
    p = np.concatenate([p, np.exp(dec.tail_logprob.astype(np.float64))[:, None]], axis=1)
    generalized = (p * np.log(p / q) - p + q).sum(axis=1).mean()
    p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
    return float((p * np.log(p / q)).sum(axis=1).mean()), float(generalized)


@pytest.fixture(scope="module")
def lm_distributions():
    return lm_like_distributions(np.random.default_rng(2024), 300, 8000)


@pytest.mark.parametrize("k", [20, 64, 128])
def test_mean_kl_below_1e4(lm_distributions, k):
    kl, generalized = mean_kl(lm_distributions, k, Codebook.for_k(k), seed=k)
    assert 0 <= kl < 1e-4, kl
    assert 0 <= generalized < 1e-4, generalized


def test_mean_kl_check_detects_a_coarse_codebook(lm_distributions):
    """A codebook 4x coarser than for_k's gives ~16x the KL: the check above can fail."""
    fine = Codebook.for_k(64)
    coarse = Codebook(step_top=fine.step_top * 4, step_max=fine.step_max)
    assert mean_kl(lm_distributions, 64, coarse, seed=64)[0] > 1e-4


@pytest.mark.parametrize("k", [1, 2, 20, 64, 128, 1000])
def test_quantize_grid_equals_binary_search(k):
    """The grid lookup gives np.searchsorted's level for every value: random ones, the
    boundaries themselves and their float neighbours, the levels, and out-of-range ones."""
    book = Codebook.for_k(k)
    bnd = book._boundaries
    rng = np.random.default_rng(k)
    vals = np.concatenate(
        [
            -bnd,
            -np.nextafter(bnd, np.inf),
            -np.nextafter(bnd, -np.inf),
            book.levels,
            rng.uniform(-70, 0.5, 20000),
            -np.abs(rng.standard_normal(5000)) * 1e-3,
            [0.0, -0.0, 1e-3, 2.0, -64.0, -64.5, -1e9, -np.inf, np.inf, np.nan],
        ]
    )
    for x in (vals, vals.astype(np.float32)):
        neg = -np.nan_to_num(np.asarray(x, dtype=np.float64), neginf=codec.LOWEST_LOGPROB)
        want = np.searchsorted(bnd, neg).astype(np.uint16)
        got = book.quantize(x)
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(book.quantize(x.reshape(-1, 1)), want.reshape(-1, 1))


def _encode_reference(ids, lps, resp, token_lp, rank_of, book):
    """encode_tokens' streams built token by token with Python sorts (float64-free, naive)."""
    vocab, k = len(rank_of), ids.shape[1]
    m = k - 1
    out = {n: [] for n in ("delta", "level", "in", "tok", "extra_delta", "extra_level")}
    levels = np.searchsorted(book._boundaries, -np.asarray(lps, np.float64))
    for t in range(len(ids)):
        entries = sorted(
            (vocab if ids[t, j] == resp[t] else int(rank_of[ids[t, j]]), j) for j in range(k)
        )
        ranks = [r for r, _ in entries]
        lev = [int(levels[t, j]) for _, j in entries]
        prev = 0
        for r in ranks[:m]:
            out["delta"].append(r - prev)
            prev = r
        out["level"] += lev[:m]
        hit = ranks[-1] == vocab
        out["in"].append(hit)
        if not hit:
            out["extra_delta"].append(ranks[m] - (ranks[m - 1] if m else 0))
            out["extra_level"].append(lev[m])
    return out


@pytest.mark.parametrize("k", [1, 2, 16, 64])
def test_encode_equals_a_per_token_reference(k):
    """The packed-key sort orders each token's top-k as a per-token Python sort by rank."""
    rng = np.random.default_rng(k)
    vocab, n = 5000, 300
    full = random_distributions(rng, n, vocab)
    ids = np.argsort(-full, axis=1)[:, :k]
    lps = np.take_along_axis(full, ids, axis=1).astype(np.float32)
    resp = np.where(rng.random(n) < 0.7, ids[np.arange(n), rng.integers(0, k, n)], vocab - 1)
    token_lp = full[np.arange(n), resp].astype(np.float32)
    order = codec.build_rank_order(ids.ravel(), vocab)
    rank_of = codec.invert_order(order)
    book = Codebook.for_k(k)
    got = codec.encode_tokens(ids, lps, resp, token_lp, rank_of, book)
    ref = _encode_reference(ids, lps, resp, token_lp, rank_of, book)
    delta = got["topk_rank_delta_lo"].astype(np.int64) | (
        got["topk_rank_delta_hi"].astype(np.int64) << 8
    )
    level = got["topk_level_lo"].astype(np.int64) | (got["topk_level_hi"].astype(np.int64) << 8)
    np.testing.assert_array_equal(delta, ref["delta"])
    np.testing.assert_array_equal(level, ref["level"])
    np.testing.assert_array_equal(got["token_in_topk"], ref["in"])
    np.testing.assert_array_equal(got["extra_rank_delta"], ref["extra_delta"])
    np.testing.assert_array_equal(got["extra_level"], ref["extra_level"])

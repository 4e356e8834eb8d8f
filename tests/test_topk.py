"""shards.topk: vLLM's flat logprobs, and the engine's arrays kept by vllm_engine/arrays.py,
converted with array operations equal the per-token loop over vLLM's dicts, on logprobs laid
out by vLLM's own code (`append_logprobs_for_next_position`, `LogprobsProcessor`) from
distributions full of ties."""

from __future__ import annotations

from operator import attrgetter

import numpy as np
import pytest

pytest.importorskip("vllm")
import torch  # noqa: E402

from shards.topk import TopKError, topk_arrays, topk_from_flat  # noqa: E402
from vllm_engine import output_processor as vproc  # noqa: E402
from vllm_engine.topk import topk_from_logprob_arrays  # noqa: E402

VOCAB = 40


def engine_like(rng: np.random.Generator, t_len: int, k: int, prompt: bool = False):
    """(flat, dicts, tokens) as vLLM's output processor builds them for t_len positions.

    Logits are multiples of 0.25 drawn from a few values, so tokens tie often, also with
    the chosen token and at the k-th place; the chosen token is drawn from the whole
    vocabulary, so it is often outside the top k. As in vLLM's sampler: torch.topk (sorted),
    the chosen token's logprob gathered from the same log_softmax, its rank = count(>=).
    """
    # Prompt logprobs start with None for the first token.
    flat, dicts = vproc.logprob_container(True, prompt), vproc.logprob_container(False, prompt)
    logits = torch.tensor(rng.integers(0, 8, (t_len, VOCAB)) * 0.25, dtype=torch.float32)
    lp = torch.log_softmax(logits, dim=-1)
    top_lp, top_ids = torch.topk(lp, k, dim=-1)
    tokens = rng.integers(0, VOCAB, t_len)
    # Half the time the chosen token is the best: then it is in the top k, often tied.
    tokens = np.where(rng.random(t_len) < 0.5, top_ids[:, 0].numpy(), tokens)
    chosen = torch.tensor(tokens)[:, None]
    chosen_lp = lp.gather(1, chosen)
    ranks = (lp >= chosen_lp).sum(-1)
    ids_all = torch.cat([chosen, top_ids], dim=1)
    lps_all = torch.cat([chosen_lp, top_lp], dim=1)
    for t in range(t_len):
        for container in (flat, dicts):
            vproc.append_position(
                container, ids_all[t].tolist(), lps_all[t].tolist(), int(ranks[t]), k
            )
    return flat, dicts, tokens.tolist()


def convert_flat(flat, tokens, k, first=0):
    return topk_from_flat(
        flat.token_ids, flat.logprobs, flat.start_indices, flat.end_indices, tokens, k, first
    )


@pytest.mark.parametrize("k", [1, 3, 8, 20])
def test_flat_equals_the_dict_loop_with_ties(k):
    rng = np.random.default_rng(k)
    flat, dicts, tokens = engine_like(rng, 400, k)
    ids, lps, tok = convert_flat(flat, tokens, k)
    ref_ids, ref_lps, ref_tok = topk_arrays(dicts, tokens, k, logprob=attrgetter("logprob"))
    assert ids.dtype == np.int32 and lps.dtype == np.float32 and tok.dtype == np.float32
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(lps, ref_lps)
    np.testing.assert_array_equal(tok, ref_tok)
    # The data exercises the tie rule: rows where the chosen token moves ahead of the
    # torch.topk order, both from inside the top k and from outside it.
    top_ids = np.asarray(flat.token_ids).reshape(-1, k + 1)[:, 1:]
    moved = (ids != top_ids).any(axis=1)
    in_top = (top_ids == np.asarray(tokens)[:, None]).any(axis=1)
    if k > 1:
        assert (moved & in_top).any() and (moved & ~in_top).any()


def test_flat_prompt_positions_skip_the_first_none():
    """Score mode: position 0 of the prompt logprobs is None; `first` selects the response."""
    rng = np.random.default_rng(0)
    k = 5
    flat, dicts, tokens = engine_like(rng, 60, k, prompt=True)
    assert dicts[0] is None and flat.start_indices[0] == flat.end_indices[0]
    # Positions 1..60 are the distributions; the "response" is the last 25.
    first = 61 - 25
    got = convert_flat(flat, tokens[-25:], k, first)
    ref = topk_arrays(dicts[first:], tokens[-25:], k, logprob=attrgetter("logprob"))
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TopKError, match="token 0: 0 logprob entries"):
        convert_flat(flat, tokens[:3], k, 0)


def test_flat_result_is_a_top_k():
    """Independent of the old loop: the k values are sorted and no dropped value beats one."""
    rng = np.random.default_rng(7)
    k = 6
    flat, _, tokens = engine_like(rng, 300, k)
    ids, lps, tok = convert_flat(flat, tokens, k)
    all_ids = np.asarray(flat.token_ids).reshape(-1, k + 1)
    all_lps = np.asarray(flat.logprobs, dtype=np.float64).reshape(-1, k + 1)
    for t in range(len(tokens)):
        kept = dict(zip(ids[t].tolist(), lps[t].tolist(), strict=True))
        assert len(kept) == k
        assert list(lps[t]) == sorted(lps[t], reverse=True)
        for i, v in zip(all_ids[t], all_lps[t], strict=True):
            assert i in kept or v <= min(kept.values())
        assert tok[t] == np.float32(all_lps[t, 0])


def test_flat_refuses_bad_layouts():
    rng = np.random.default_rng(1)
    k = 4
    flat, _, tokens = engine_like(rng, 10, k)
    with pytest.raises(TopKError, match="token 3: the engine's chosen token"):
        convert_flat(flat, tokens[:3] + [(tokens[3] + 1) % VOCAB] + tokens[4:], k)
    with pytest.raises(TopKError, match="expected 4"):
        convert_flat(flat, tokens, k - 1)
    with pytest.raises(TopKError, match="positions 5..14 asked of 10"):
        convert_flat(flat, tokens, k, 5)
    empty = convert_flat(flat, [], k, 10)
    assert empty[0].shape == (0, k) and empty[2].shape == (0,)


def test_batch_equals_one_request_at_a_time():
    """One engine call's requests converted together: each gets its own rows, as alone."""
    from shards.topk import FlatRequest, topk_from_flat_batch

    rng = np.random.default_rng(3)
    k = 6
    shapes = [(30, False), (1, False), (17, True), (44, False)]
    made = [engine_like(rng, n, k, prompt=prompt) for n, prompt in shapes]
    # Score mode: position j + 1 predicts tokens[j]; the "response" is tokens[5:].
    reqs = [
        FlatRequest.of(flat, tokens[5:], 6) if prompt else FlatRequest.of(flat, tokens)
        for (flat, _, tokens), (_, prompt) in zip(made, shapes, strict=True)
    ]
    reqs.insert(2, FlatRequest.of(made[0][0], [], 30))  # an empty response
    got = topk_from_flat_batch(reqs, k)
    assert [len(g[0]) for g in got] == [30, 1, 0, 12, 44]
    for r, g in zip(reqs, got, strict=True):
        alone = convert_flat(r, list(r.tokens), k, r.first)
        for a, b in zip(g, alone, strict=True):
            np.testing.assert_array_equal(a, b)
    bad = list(reqs)
    bad[3] = FlatRequest.of(made[2][0], [(made[2][2][6] + 1) % VOCAB, *made[2][2][7:]], 6)
    with pytest.raises(TopKError, match="request 3 token 0: the engine's chosen token"):
        topk_from_flat_batch(bad, k)


def processed_arrays(rows, k: int, prompt: bool, pad: int = 0):
    """rows = (ids (T, k + 1), lps (T, k + 1)) through vLLM's LogprobsProcessor with
    vllm_engine.arrays installed, as the engine hands them over: sample logprobs one
    decoding step at a time, prompt logprobs in two prefill chunks; `pad` extra columns, as
    when another request of the engine's batch asked for more logprobs."""
    ids, lps = rows
    ids = np.concatenate([ids, np.full((len(ids), pad), 7, ids.dtype)], axis=1)
    lps = np.concatenate([lps, np.full((len(lps), pad), -99.0, lps.dtype)], axis=1)
    proc = vproc.make_logprobs_processor(k, "arrays", prompt=prompt)
    ranks = np.zeros(len(ids), np.int64)
    if prompt:
        half = len(ids) // 2
        for a, b in ((0, half), (half, len(ids))):
            vproc.feed_prompt(proc, vproc.prompt_chunk(ids[a:b], lps[a:b], ranks[a:b]))
        return proc.prompt_logprobs
    for t in range(len(ids)):
        vproc.feed_sample(proc, vproc.sample_step(ids[t : t + 1], lps[t : t + 1], ranks[t : t + 1]))
    np.testing.assert_allclose(proc.cumulative_logprob, lps[:, 0].astype(np.float64).sum())
    return proc.logprobs


@pytest.mark.parametrize("prompt", [False, True])
@pytest.mark.parametrize("k", [1, 3, 8, 20])
def test_engine_arrays_equal_the_dict_loop_with_ties(k, prompt):
    """vllm_engine/arrays.py keeps vLLM's arrays instead of lists: converted with
    topk_from_rows they equal the per-token loop over vLLM's dicts of the same positions."""
    rng = np.random.default_rng(10 + k)
    flat, dicts, tokens = engine_like(rng, 300, k, prompt=prompt)
    first = 1 if prompt else 0  # position 0 of prompt logprobs has none
    t_len = len(flat) - first
    rows = (
        np.asarray(flat.token_ids, np.int32).reshape(t_len, k + 1),
        np.asarray(flat.logprobs, np.float32).reshape(t_len, k + 1),
    )
    arrays = processed_arrays(rows, k, prompt, pad=3)
    assert len(arrays) == len(flat)
    resp = tokens[-120:] if prompt else tokens  # score mode: the response is the end
    at = len(flat) - len(resp)
    (got,) = topk_from_logprob_arrays([(arrays, resp, at)], k)
    ref = topk_arrays(dicts[at:], resp, k, logprob=attrgetter("logprob"))
    assert got.topk_ids.dtype == np.int32 and got.topk_logprobs.dtype == np.float32
    for a, b in zip((got.topk_ids, got.topk_logprobs, got.token_logprobs), ref, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeError, match="token 2: the engine's chosen token"):
        topk_from_logprob_arrays([(arrays, [*resp[:2], (resp[2] + 1) % VOCAB], at)], k)
    with pytest.raises(RuntimeError, match=f"asked of {len(flat)}"):
        topk_from_logprob_arrays([(arrays, resp, at + 1)], k)
    with pytest.raises(RuntimeError, match=r"expected \(3, 3\)"):
        topk_from_logprob_arrays([(arrays, resp[:3], at)], 2)  # rows of k + 1, not 3

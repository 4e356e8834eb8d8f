"""A teacher's per-token logprobs to the top-k arrays the shards and losses use.

vLLM gives, per response token, the chosen token and the top k. Two layouts:

* flat (`SamplingParams(flat_logprobs=True)`, vLLM's `FlatLogprobs`): per position k + 1
  entries in four flat lists, the chosen token first (with its logprob and vocabulary rank),
  then the top k in descending logprob (ranks 1..k), even when the chosen token is among
  them. `topk_from_flat` converts it with whole-array operations, no loop over tokens.
* dicts (the default, and the server's JSON): per position a map id -> logprob built from the
  same entries in the same order, so the chosen token is the first key and, when it is in
  the top k, it is one entry, not two. `topk_arrays` converts it with a loop and a sort per
  token; the on-policy teacher client, which parses the server's JSON, uses it.

Both give the same result on the same engine output (tests/test_topk.py): the k entries with
the highest logprobs, where a tie is won by the earlier entry, the chosen token first. vLLM's
top k come from `torch.topk`, sorted, so the flat top k are returned as they are except in
the rare rows where the chosen token ties with a top-k value ahead of it; only those rows are
re-sorted. Precompute reads the engine's output, the on-policy trainer the server's JSON;
both phases depend on shards/, never on each other, so the conversion lives here once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np


class TopKError(ValueError):
    """A logprob map that cannot give k values, or lacks the chosen token."""


def topk_arrays(
    entries: Sequence[Mapping[int, object] | None],
    tokens: Sequence[int],
    k: int,
    logprob: Callable[[object], float] = float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (T, k) int64, logprobs (T, k) float32, token logprob (T,) float32).

    The top k by logprob are the stored top-k; the chosen token's logprob is kept separately,
    whether or not it is among them. `logprob` reads a map's value (vLLM's Logprob objects
    carry it in an attribute).
    """
    t_len = len(tokens)
    ids = np.empty((t_len, k), np.int64)
    lps = np.empty((t_len, k), np.float32)
    tok_lp = np.empty(t_len, np.float32)
    for t, (entry, tok) in enumerate(zip(entries, tokens, strict=True)):
        if not entry or len(entry) < k:
            raise TopKError(f"token {t}: {len(entry or ())} logprobs, expected {k}")
        if tok not in entry:
            raise TopKError(f"token {t}: the response token {tok} is not in the answer")
        items = sorted(entry.items(), key=lambda kv: -logprob(kv[1]))[:k]
        ids[t] = [i for i, _ in items]
        lps[t] = [logprob(v) for _, v in items]
        tok_lp[t] = logprob(entry[tok])
    return ids, lps, tok_lp


def topk_from_flat(
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    start_indices: Sequence[int],
    end_indices: Sequence[int],
    tokens: Sequence[int],
    k: int,
    first: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (T, k) int32, logprobs (T, k) float32, token logprob (T,) float32) from flat lists.

    token_ids, logprobs, start_indices, end_indices: the lists of a vLLM `FlatLogprobs`
    (position i holds entries start_indices[i]:end_indices[i]); positions first ..
    first + T - 1 are converted, T = len(tokens), and position first + t must hold k + 1
    entries whose first is tokens[t]. Raises TopKError naming the token otherwise.
    """
    t_len = len(tokens)
    if first < 0 or first + t_len > len(start_indices):
        raise TopKError(
            f"positions {first}..{first + t_len - 1} asked of {len(start_indices)} positions"
        )
    if t_len == 0:
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros(0, np.float32)
    width = k + 1
    starts = np.fromiter(start_indices[first : first + t_len], np.int64, t_len)
    ends = np.fromiter(end_indices[first : first + t_len], np.int64, t_len)
    counts = ends - starts
    if (counts != width).any():
        t = int(np.argmax(counts != width))
        raise TopKError(
            f"token {t}: {counts[t]} logprob entries, expected {width} (the chosen token "
            f"and the top {k})"
        )
    if t_len > 1 and (starts[1:] != ends[:-1]).any():
        raise TopKError("flat logprobs whose positions are not contiguous")
    lo, n = int(starts[0]), t_len * width
    # fromiter over the list itself when it is all used (generation): a slice copies it first.
    ids_src = token_ids if lo == 0 and len(token_ids) == n else token_ids[lo : lo + n]
    lps_src = logprobs if lo == 0 and len(logprobs) == n else logprobs[lo : lo + n]
    ids = np.fromiter(ids_src, np.int64, n).reshape(t_len, width)
    lps = np.fromiter(lps_src, np.float64, n).reshape(t_len, width)
    chosen = ids[:, 0]
    resp = np.asarray(tokens, dtype=np.int64)
    if (chosen != resp).any():
        t = int(np.argmax(chosen != resp))
        raise TopKError(f"token {t}: the engine's chosen token {chosen[t]} is not {resp[t]}")
    top_ids, top_lps = ids[:, 1:], lps[:, 1:]
    dup = top_ids == chosen[:, None]
    in_top = dup.any(axis=1)
    at = np.argmax(dup, axis=1)
    # A dict keeps the first position of a repeated key and its last value: the chosen
    # token's logprob is the top-k entry's (vLLM reads both from one tensor: equal).
    tok_lp = np.where(in_top, top_lps[np.arange(t_len), at], lps[:, 0])
    ahead = (top_lps > tok_lp[:, None]).sum(axis=1)
    sorted_ok = (top_lps[:, 1:] <= top_lps[:, :-1]).all(axis=1)  # False where NaN
    # Where the chosen token sorts where it already is (or below the top k), the top k are
    # the result; else it ties with entries ahead of it, and the earlier entry wins.
    redo = np.flatnonzero(~sorted_ok | (ahead != np.where(in_top, at, k)))
    out_ids = top_ids.astype(np.int32)
    out_lps = top_lps.astype(np.float32)
    if len(redo):
        r_ids = ids[redo].copy()
        r_lps = lps[redo].copy()
        r_lps[:, 0] = tok_lp[redo]
        gone = np.zeros(r_ids.shape, bool)
        gone[:, 1:] = dup[redo]
        # Stable, by (repeated entry last, descending logprob): np.lexsort's last key leads.
        order = np.lexsort((-r_lps, gone), axis=1)[:, :k]
        out_ids[redo] = np.take_along_axis(r_ids, order, axis=1)
        out_lps[redo] = np.take_along_axis(r_lps, order, axis=1)
    return out_ids, out_lps, tok_lp.astype(np.float32)

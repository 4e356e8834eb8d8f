"""A teacher's per-token logprobs to the top-k arrays the shards and losses use.

vLLM gives, per response token, the chosen token and the top k. Three layouts:

* rows (vllm_engine/arrays.py keeps the engine's own arrays): per position a row of
  k + 1 ids and logprobs, the chosen token first (with its logprob), then the top k in
  descending logprob, even when the chosen token is among them. `topk_from_rows` converts
  them with whole-array operations.
* flat (`SamplingParams(flat_logprobs=True)`, vLLM's `FlatLogprobs`): the same entries in
  four flat Python lists per request. `topk_from_flat_batch` reads the lists into arrays
  (most of its time) and goes on as `topk_from_rows`.
* dicts (vLLM's default, and the server's JSON): per position a map id -> logprob built from
  the same entries in the same order, so the chosen token is the first key and, when it is in
  the top k, it is one entry, not two. `topk_arrays` converts it with a loop and a sort per
  token; the on-policy teacher client, which parses the server's JSON, uses it (there
  json.loads alone costs more than this loop, and both are a small part of an on-policy
  step: not worth a second layout; figures in BENCHMARKS.md, "Precompute host path").

All give the same result on the same engine output (tests/test_topk.py,
tests/test_precompute_vllm.py): the k entries with the highest logprobs, where a tie is won
by the earlier entry, the chosen token first. vLLM's top k come from `torch.topk`, sorted,
so the rows' top k are returned as they are except in the rare rows where the chosen token
ties with a top-k value ahead of it; only those rows are re-sorted. Precompute reads the
engine's output, the on-policy trainer the server's JSON; both phases depend on shards/,
never on each other, so the conversion lives here once.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np


class TopKError(ValueError):
    """A logprob map that cannot give k values, or lacks the chosen token."""


@dataclass
class Scored:
    """One response with the teacher's signal on each of its T tokens (raw logprobs): what a
    teacher engine returns (vllm_engine.teacher, precompute.hf_backend) and a shard row keeps."""

    token_ids: np.ndarray  # (T,) int: the response tokens, as the teacher saw them
    topk_ids: np.ndarray  # (T, k) int32
    topk_logprobs: np.ndarray  # (T, k) float32
    token_logprobs: np.ndarray  # (T,) float32: logprob of token_ids[t]
    finish_reason: str | None = None


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


@dataclass(frozen=True)
class FlatRequest:
    """Positions first .. first + len(tokens) - 1 of one request's flat logprobs.

    token_ids, logprobs, start_indices, end_indices: the lists of a vLLM `FlatLogprobs`
    (position i holds entries start_indices[i]:end_indices[i]); position first + t must hold
    k + 1 entries whose first is tokens[t].
    """

    token_ids: Sequence[int]
    logprobs: Sequence[float]
    start_indices: Sequence[int]
    end_indices: Sequence[int]
    tokens: Sequence[int]
    first: int = 0

    @classmethod
    def of(cls, flat, tokens: Sequence[int], first: int = 0) -> FlatRequest:
        """From a vLLM FlatLogprobs (or anything with its four lists)."""
        return cls(
            flat.token_ids, flat.logprobs, flat.start_indices, flat.end_indices, tokens, first
        )


def topk_from_flat(
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    start_indices: Sequence[int],
    end_indices: Sequence[int],
    tokens: Sequence[int],
    k: int,
    first: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (T, k) int32, logprobs (T, k) float32, token logprob (T,) float32) of one request;
    see `FlatRequest` for the arguments and `topk_from_flat_batch`."""
    req = FlatRequest(token_ids, logprobs, start_indices, end_indices, tokens, first)
    return topk_from_flat_batch([req], k)[0]


def topk_from_flat_batch(
    requests: Sequence[FlatRequest], k: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per request (ids (T, k) int32, logprobs (T, k) float32, token logprob (T,) float32).

    All requests are converted together (one engine call's outputs): the fixed cost of each
    array operation is paid once per batch, not per request. Raises TopKError naming the
    request and token of a position that does not hold the chosen token then the top k.
    """
    width = k + 1
    lens = [len(r.tokens) for r in requests]
    for i, r in enumerate(requests):
        if r.first < 0 or r.first + lens[i] > len(r.start_indices):
            raise TopKError(
                f"request {i}: positions {r.first}..{r.first + lens[i] - 1} asked of "
                f"{len(r.start_indices)} positions"
            )
    total = sum(lens)
    offsets = np.cumsum([0, *lens])

    def positions(name: str):
        return np.fromiter(
            chain.from_iterable(
                getattr(r, name)[r.first : r.first + n] for r, n in zip(requests, lens, strict=True)
            ),
            np.int64,
            total,
        )

    starts, ends = positions("start_indices"), positions("end_indices")
    counts = ends - starts
    if (counts != width).any():
        t = int(np.argmax(counts != width))
        raise TopKError(
            f"{_where(offsets, t)}: {counts[t]} logprob entries, expected {width} (the chosen "
            f"token and the top {k})"
        )
    if total > 1:
        broken = starts[1:] != ends[:-1]
        starts_of = offsets[1:-1]
        broken[starts_of[(starts_of > 0) & (starts_of < total)] - 1] = False  # own lists
        if broken.any():
            at = int(np.argmax(broken)) + 1
            raise TopKError(f"{_where(offsets, at)}: positions not contiguous")

    def entries(name: str):
        # The whole list when all of it is used (generation): slicing would copy it first.
        for r, n in zip(requests, lens, strict=True):
            src = getattr(r, name)
            if n == 0:
                continue
            lo = r.start_indices[r.first]
            yield src if lo == 0 and len(src) == n * width else src[lo : lo + n * width]

    ids = _unboxed(entries("token_ids"), "q", np.int64)
    lps = _unboxed(entries("logprobs"), "d", np.float64)
    if len(ids) != total * width or len(lps) != total * width:
        raise TopKError(f"{len(ids)} ids and {len(lps)} logprobs for {total * width} entries")
    ids, lps = ids.reshape(total, width), lps.reshape(total, width)
    resp = np.fromiter(chain.from_iterable(r.tokens for r in requests), np.int64, total)
    return _checked_topk(ids, lps, resp, offsets, k)


def topk_from_rows(
    requests: Sequence[tuple[np.ndarray, np.ndarray, Sequence[int]]], k: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per request (ids (T, k) int32, logprobs (T, k) float32, token logprob (T,) float32)
    from the engine's own rows: (ids (T, k + 1), logprobs (T, k + 1), tokens (T,)), per
    position the chosen token then the top k (vllm_engine.arrays). The same result as
    `topk_from_flat_batch` on the same engine output, without reading Python lists."""
    width = k + 1
    for i, (ids, lps, tokens) in enumerate(requests):
        if ids.shape != (len(tokens), width) or lps.shape != ids.shape:
            raise TopKError(
                f"request {i}: logprob rows {ids.shape} and {lps.shape} for {len(tokens)} "
                f"tokens, expected ({len(tokens)}, {width}) (the chosen token and the top {k})"
            )
    offsets = np.cumsum([0, *(len(t) for _, _, t in requests)])
    if not requests:
        return []
    ids = np.concatenate([r[0] for r in requests]).astype(np.int64, copy=False)
    lps = np.concatenate([r[1] for r in requests]).astype(np.float64, copy=False)
    resp = np.concatenate([np.asarray(r[2], np.int64).reshape(-1) for r in requests])
    return _checked_topk(ids, lps, resp, offsets, k)


def _checked_topk(ids: np.ndarray, lps: np.ndarray, resp: np.ndarray, offsets, k: int):
    """Rows (chosen, top k) of consecutive requests -> per request (ids, lps, token logprob),
    after checking that each row's chosen token is the response's."""
    chosen = ids[:, 0]
    if (chosen != resp).any():
        t = int(np.argmax(chosen != resp))
        raise TopKError(
            f"{_where(offsets, t)}: the engine's chosen token {chosen[t]} is not {resp[t]}"
        )
    out_ids, out_lps, tok_lp = _topk_rows(ids, lps, k)
    return [
        (out_ids[a:b], out_lps[a:b], tok_lp[a:b])
        for a, b in zip(offsets[:-1], offsets[1:], strict=True)
    ]


def _where(offsets, pos: int) -> str:
    """Row `pos` of consecutive requests (request i starts at offsets[i]) as request, token."""
    i = int(np.searchsorted(offsets, pos, side="right") - 1)
    return f"request {i} token {pos - int(offsets[i])}"


def _unboxed(lists, typecode: str, dtype) -> np.ndarray:
    """The Python lists' numbers, concatenated, as one array.

    array.array reads a list of Python ints or floats about twice as fast as np.fromiter over
    an iterator (12 against 27 ns per int here): vLLM's flat logprobs arrive as lists, and
    reading their 2 (k + 1) numbers per token is most of the conversion's time.
    """
    parts = [np.frombuffer(array(typecode, src), dtype) for src in lists]
    if not parts:
        return np.empty(0, dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _topk_rows(ids: np.ndarray, lps: np.ndarray, k: int):
    """The dict loop's result on rows of (chosen, top k): ids, lps (N, k + 1) -> (N, k)."""
    n = len(ids)
    chosen = ids[:, 0]
    top_ids, top_lps = ids[:, 1:], lps[:, 1:]
    dup = top_ids == chosen[:, None]
    in_top = dup.any(axis=1)
    at = np.argmax(dup, axis=1)
    # A dict keeps the first position of a repeated key and its last value: the chosen
    # token's logprob is the top-k entry's (vLLM reads both from one tensor: equal).
    tok_lp = np.where(in_top, top_lps[np.arange(n), at], lps[:, 0])
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

"""vLLM's logprob outputs to the teacher signal of each response (shards.topk.Scored).

Three layouts of the same engine output (vllm_engine/teacher.py picks one): the engine's own
arrays kept by vllm_engine/arrays.py, vLLM's FlatLogprobs, and vLLM's per-position dicts.
All give the same arrays (tests/test_topk.py, tests/test_precompute_vllm.py); the array
operations themselves live in shards/topk.py, which the trainer shares.
"""

from __future__ import annotations

from operator import attrgetter

import numpy as np

from shards.topk import (
    FlatRequest,
    Scored,
    TopKError,
    topk_arrays,
    topk_from_flat_batch,
    topk_from_rows,
)


def topk_from_entries(entries: list[dict], tokens, k: int) -> Scored:
    """vLLM's per-token dicts (id -> Logprob) to arrays (shards.topk.topk_arrays)."""
    try:
        ids, lps, tok_lp = topk_arrays(entries, tokens, k, logprob=attrgetter("logprob"))
    except TopKError as e:
        raise RuntimeError(f"the engine's logprobs (k={k}): {e}") from e
    return Scored(np.asarray(tokens, np.int64), ids.astype(np.int32), lps, tok_lp)


def topk_from_logprob_arrays(requests: list[tuple], k: int) -> list[Scored]:
    """vllm_engine.arrays' LogprobArrays to arrays, all requests of an engine call at
    once (shards.topk.topk_from_rows); equal to `topk_from_flat_logprobs`.

    requests: (LogprobArrays, tokens, first position) per response.
    """
    try:
        rows = [(*lp.rows(first, len(t)), t) for lp, t, first in requests]
        return _scored(requests, topk_from_rows(rows, k))
    except (TopKError, IndexError) as e:
        raise RuntimeError(f"the engine's logprobs (k={k}): {e}") from e


def topk_from_flat_logprobs(requests: list[tuple], k: int) -> list[Scored]:
    """vLLM's FlatLogprobs to arrays, all requests of an engine call at once, without a
    per-token loop (shards.topk.topk_from_flat_batch); equal to `topk_from_entries`.

    requests: (flat logprobs, tokens, first position) per response.
    """
    try:
        flat = [FlatRequest.of(f, t, first) for f, t, first in requests]
        return _scored(requests, topk_from_flat_batch(flat, k))
    except TopKError as e:
        raise RuntimeError(f"the engine's logprobs (k={k}): {e}") from e


def _scored(requests: list[tuple], arrays: list[tuple]) -> list[Scored]:
    """(logprobs, tokens, first position) per response and its (ids, lps, token lp)."""
    return [
        Scored(np.asarray(t, np.int64), ids, lps, tok_lp)
        for (_, t, _), (ids, lps, tok_lp) in zip(requests, arrays, strict=True)
    ]

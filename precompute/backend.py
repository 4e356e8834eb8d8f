"""What an engine returns, shared by the vLLM and transformers backends."""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

import numpy as np

from shards.topk import TopKError, topk_arrays, topk_from_flat


@dataclass
class Scored:
    """One response with the teacher's signal on each of its T tokens (raw logprobs)."""

    token_ids: np.ndarray  # (T,) int: the response tokens, as the teacher saw them
    topk_ids: np.ndarray  # (T, k) int32
    topk_logprobs: np.ndarray  # (T, k) float32
    token_logprobs: np.ndarray  # (T,) float32: logprob of token_ids[t]
    finish_reason: str | None = None


def topk_from_entries(entries: list[dict], tokens, k: int) -> Scored:
    """vLLM's per-token dicts (id -> Logprob) to arrays (shards.topk.topk_arrays)."""
    try:
        ids, lps, tok_lp = topk_arrays(entries, tokens, k, logprob=attrgetter("logprob"))
    except TopKError as e:
        raise RuntimeError(f"the engine's logprobs (k={k}): {e}") from e
    return Scored(np.asarray(tokens, np.int64), ids.astype(np.int32), lps, tok_lp)


def topk_from_flat_logprobs(flat, tokens, k: int, first: int = 0) -> Scored:
    """vLLM's FlatLogprobs (positions first .. first + T - 1) to arrays, without a per-token
    loop (shards.topk.topk_from_flat); equal to `topk_from_entries` on the same output."""
    try:
        ids, lps, tok_lp = topk_from_flat(
            flat.token_ids, flat.logprobs, flat.start_indices, flat.end_indices, tokens, k, first
        )
    except TopKError as e:
        raise RuntimeError(f"the engine's logprobs (k={k}): {e}") from e
    return Scored(np.asarray(tokens, np.int64), ids, lps, tok_lp)

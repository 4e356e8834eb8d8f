"""What an engine returns, shared by the vLLM and transformers backends."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Scored:
    """One response with the teacher's signal on each of its T tokens (raw logprobs)."""

    token_ids: np.ndarray  # (T,) int: the response tokens, as the teacher saw them
    topk_ids: np.ndarray  # (T, k) int32
    topk_logprobs: np.ndarray  # (T, k) float32
    token_logprobs: np.ndarray  # (T,) float32: logprob of token_ids[t]
    finish_reason: str | None = None


def topk_from_entries(entries: list[dict], tokens, k: int) -> Scored:
    """vLLM-style per-token dicts (id -> Logprob) to arrays.

    A dict holds k entries, or k + 1 when the chosen token is outside the top-k (it is always
    present with its true logprob). The top k by logprob are the stored top-k; the chosen
    token's logprob is kept separately, whether or not it is among them.
    """
    t = len(tokens)
    ids = np.empty((t, k), np.int32)
    lps = np.empty((t, k), np.float32)
    tok_lp = np.empty(t, np.float32)
    for i, (entry, tok) in enumerate(zip(entries, tokens, strict=True)):
        items = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:k]
        if len(items) < k:
            raise RuntimeError(f"the engine returned {len(items)} logprobs per token, k={k}")
        ids[i] = [a for a, _ in items]
        lps[i] = [b.logprob for _, b in items]
        tok_lp[i] = entry[tok].logprob
    return Scored(np.asarray(tokens, np.int64), ids, lps, tok_lp)

"""A teacher's per-token logprob maps to the top-k arrays the shards and losses use.

vLLM gives, per response token, a map id -> logprob holding the top k and the chosen token
(k + 1 entries when the chosen token is outside the top k). Precompute reads it from the
engine, the on-policy trainer from the server's JSON; both phases depend on shards/, never on
each other, so the conversion lives here once.
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

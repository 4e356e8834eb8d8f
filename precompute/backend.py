"""The teacher engine's interface (`Backend`) and what it returns (`Scored`), shared by the
vLLM backend (vllm_engine/teacher.py) and the transformers one (precompute/hf_backend.py)."""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Protocol

import numpy as np

from shards.topk import FlatRequest, TopKError, topk_arrays, topk_from_flat_batch, topk_from_rows

if TYPE_CHECKING:
    from precompute.config import SamplingConfig


@dataclass
class Scored:
    """One response with the teacher's signal on each of its T tokens (raw logprobs)."""

    token_ids: np.ndarray  # (T,) int: the response tokens, as the teacher saw them
    topk_ids: np.ndarray  # (T, k) int32
    topk_logprobs: np.ndarray  # (T, k) float32
    token_logprobs: np.ndarray  # (T,) float32: logprob of token_ids[t]
    finish_reason: str | None = None


class Backend(Protocol):
    """A started teacher engine that returns the raw top-k logprobs of every response token.

    `precompute.run` drives it; a backend holds its model until `close()`.
    """

    name: str
    k: int  # top-k width it was started for (vLLM's max_logprobs depends on it)
    vocab_size: int  # the logit dimension, which may exceed the tokenizer's vocabulary

    def generate(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        sampling: SamplingConfig,
        fixed_length: bool = False,
    ) -> list[list[Scored]]:
        """sampling.n samples per prompt, seeded per prompt where the engine can; with
        fixed_length (benchmarks) every sample runs to sampling.max_tokens past EOS."""
        ...

    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> list[Scored]:
        """Teacher forcing: the top-k of each given response token after its prompt."""
        ...

    def close(self) -> None:
        """Release the model (and vLLM's engine processes)."""
        ...


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

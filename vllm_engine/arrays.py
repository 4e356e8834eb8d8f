"""vLLM's top-k logprobs kept as the engine's arrays: precompute's host path without lists.

vLLM's output processor (`vllm.v1.engine.logprobs.LogprobsProcessor`) receives each step's
logprobs as arrays, per position the chosen token then the top k. It turns them into Python
lists (`tolist`) and appends them number by number to the request's logprobs container
(even the flat one, `FlatLogprobs`), and precompute then reads those numbers back into
arrays. Both halves cost more than the rest of the host path before zstd (figures in
BENCHMARKS.md, "Precompute host path").

`install()` makes LogprobsProcessor keep the arrays for the requests that ask for it with
`SamplingParams(extra_args={ARRAYS: True})`: their `logprobs` / `prompt_logprobs` is then a
`LogprobArrays`, read with array operations only (`shards.topk.topk_from_rows`). Other
requests go through vLLM's own code unchanged. This rests on three vLLM internals
(`from_new_request`, `_update_sample_logprobs`, `_update_prompt_logprobs`, as in vLLM 0.32):
where they are missing `install()` returns False and precompute asks for vLLM's flat lists.
tests/test_precompute_vllm.py checks that the layouts write the same shards on real engine
outputs.
"""

from __future__ import annotations

import numpy as np

ARRAYS = "kdshards_logprob_arrays"  # the SamplingParams.extra_args key
_installed = False


class LogprobArrays:
    """One request's logprobs as arrays: per position the chosen (or prompt) token's id and
    logprob, then the top k. Positions before `skipped` have none (a prompt's first token).
    """

    def __init__(self, width: int | None, skipped: int = 0):
        self.width, self.skipped = width, skipped
        self._ids: list[np.ndarray] = []
        self._lps: list[np.ndarray] = []
        self._n = skipped

    def add(self, ids_NW: np.ndarray, lps_NW: np.ndarray) -> None:
        """The next positions. Shape: (N, W), W >= width (the engine pads to the widest
        request of its batch). Copied: the engine may reuse the buffers they view."""
        if self.width is not None and ids_NW.shape[1] != self.width:
            ids_NW, lps_NW = ids_NW[:, : self.width], lps_NW[:, : self.width]
        self._ids.append(ids_NW.copy())
        self._lps.append(lps_NW.copy())
        self._n += len(ids_NW)

    def __len__(self) -> int:
        return self._n

    def rows(self, first: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """ids, logprobs of positions first .. first + n - 1. Shape: (n, width)."""
        lo, hi = first - self.skipped, first - self.skipped + n
        if lo < 0 or hi > self._n - self.skipped:
            raise IndexError(
                f"positions {first}..{first + n - 1} asked of {self._n} "
                f"({self.skipped} without logprobs)"
            )
        if len(self._ids) > 1:  # once: the engine hands one block per decoding step
            self._ids, self._lps = [np.concatenate(self._ids)], [np.concatenate(self._lps)]
        if not self._ids:
            return np.empty((0, self.width or 0), np.int64), np.empty((0, self.width or 0))
        return self._ids[0][lo:hi], self._lps[0][lo:hi]


def install() -> bool:
    """Make vLLM's LogprobsProcessor keep arrays for requests that ask (see the module
    docstring); idempotent. False where this vLLM lacks the internals it needs."""
    global _installed
    if _installed:
        return True
    try:
        from vllm.v1.engine.logprobs import LogprobsProcessor
    except ImportError:
        return False
    needed = ("from_new_request", "_update_sample_logprobs", "_update_prompt_logprobs")
    if not all(callable(getattr(LogprobsProcessor, n, None)) for n in needed):
        return False
    new_request = LogprobsProcessor.from_new_request.__func__
    update_sample = LogprobsProcessor._update_sample_logprobs
    update_prompt = LogprobsProcessor._update_prompt_logprobs

    def width(num: int) -> int | None:
        return None if num < 0 else num + 1  # -1: the whole vocabulary

    def from_new_request(cls, tokenizer, request):
        proc = new_request(cls, tokenizer, request)
        params = request.sampling_params
        if params is not None and (params.extra_args or {}).get(ARRAYS):
            if proc.logprobs is not None:
                proc.logprobs = LogprobArrays(width(proc.num_logprobs))
            if proc.prompt_logprobs is not None:  # no logprobs for the first prompt token
                proc.prompt_logprobs = LogprobArrays(width(proc.num_prompt_logprobs), 1)
        return proc

    def _update_sample_logprobs(self, logprobs_lists) -> None:
        if not isinstance(self.logprobs, LogprobArrays):
            return update_sample(self, logprobs_lists)
        ids, lps = logprobs_lists[0], logprobs_lists[1]
        self.logprobs.add(ids, lps)
        # As vLLM sums it, position by position in Python floats (one per decoding step).
        for lp in lps[:, 0].tolist():
            self.cumulative_logprob += lp

    def _update_prompt_logprobs(self, tensors) -> None:
        if not isinstance(self.prompt_logprobs, LogprobArrays):
            return update_prompt(self, tensors)
        self.prompt_logprobs.add(tensors[0].cpu().numpy(), tensors[1].cpu().numpy())

    LogprobsProcessor.from_new_request = classmethod(from_new_request)
    LogprobsProcessor._update_sample_logprobs = _update_sample_logprobs
    LogprobsProcessor._update_prompt_logprobs = _update_prompt_logprobs
    _installed = True
    return True

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
outside the tested versions (vllm_engine/version.py) or where their signatures differ,
`install()` says so in one line, returns False, and precompute asks for vLLM's flat lists.
tests/test_vllm_engine.py checks the hook's contract against the installed vLLM, and
tests/test_precompute_vllm.py that the layouts write the same shards on real engine outputs.
"""

from __future__ import annotations

import inspect
import sys

import numpy as np

from vllm_engine.version import outside_range

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


# The parameters of the LogprobsProcessor methods install() replaces, as in vLLM 0.32: the
# replacements call the originals with these arguments and read the same fields.
SIGNATURES = {
    "from_new_request": ("tokenizer", "request"),
    "_update_sample_logprobs": ("self", "logprobs_lists"),
    "_update_prompt_logprobs": ("self", "prompt_logprobs_tensors"),
}
FIELDS = (
    "logprobs",
    "prompt_logprobs",
    "cumulative_logprob",
    "num_logprobs",
    "num_prompt_logprobs",
)
_refusal: str | None = None  # why install() refused, said once per process


def processor_class():
    """vLLM's LogprobsProcessor, None where this vLLM has none."""
    try:
        from vllm.v1.engine.logprobs import LogprobsProcessor
    except ImportError:
        return None
    return LogprobsProcessor


def incompatible(processor=None, version: str | None = None) -> str | None:
    """Why the hook cannot go into this vLLM (its version, then the processor's methods and
    fields); None when it can. processor, version: the installed ones when None."""
    reason = outside_range(version)
    if reason:
        return reason
    processor = processor_class() if processor is None else processor
    if processor is None:
        return "vLLM has no vllm.v1.engine.logprobs.LogprobsProcessor"
    for name, params in SIGNATURES.items():
        method = getattr(processor, name, None)
        try:
            got = tuple(inspect.signature(method).parameters) if callable(method) else None
        except (TypeError, ValueError):
            got = None
        if got != params:
            return f"vLLM's LogprobsProcessor.{name} takes {got}, not {params}"
    fields = getattr(processor, "__dataclass_fields__", {})
    missing = [f for f in FIELDS if f not in fields]
    if missing:
        return f"vLLM's LogprobsProcessor has no field(s) {', '.join(missing)}"
    return None


def install() -> bool:
    """Make vLLM's LogprobsProcessor keep arrays for requests that ask (see the module
    docstring); idempotent. False, with one line on stderr saying why, where this vLLM is
    outside the tested range or its methods are not the ones replaced."""
    global _installed, _refusal
    if _installed:
        return True
    reason = incompatible()
    if reason:
        if reason != _refusal:
            _refusal = reason
            print(
                f"vllm_engine: {reason}; logprobs come through vLLM's public flat lists",
                file=sys.stderr,
                flush=True,
            )
        return False
    LogprobsProcessor = processor_class()
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

    def _update_prompt_logprobs(self, prompt_logprobs_tensors) -> None:
        tensors = prompt_logprobs_tensors  # the name vLLM's signature has (SIGNATURES)
        if not isinstance(self.prompt_logprobs, LogprobArrays):
            return update_prompt(self, tensors)
        self.prompt_logprobs.add(tensors[0].cpu().numpy(), tensors[1].cpu().numpy())

    LogprobsProcessor.from_new_request = classmethod(from_new_request)
    LogprobsProcessor._update_sample_logprobs = _update_sample_logprobs
    LogprobsProcessor._update_prompt_logprobs = _update_prompt_logprobs
    _installed = True
    return True

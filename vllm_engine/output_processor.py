"""vLLM's output processor driven by hand, as the engine drives it: the logprob containers
and the LogprobsProcessor of one request, fed one decoding step (or prefill chunk) at a time.

For tests and benchmarks that need vLLM's own layouts without starting an engine
(tests/test_topk.py, tests/test_vllm_engine.py, bench/precompute_host.py), so that they touch
no vLLM internals themselves: a vLLM upgrade changes this file, not them. Layouts: "arrays"
(vllm_engine/arrays.py, installed first), "flat" (vLLM's FlatLogprobs), "dicts" (a dict of
Logprob objects per position).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from vllm_engine import arrays

LAYOUTS = ("arrays", "flat", "dicts")


def logprob_container(flat: bool, prompt: bool = False):
    """An empty container of one request's logprobs, as vLLM makes it: FlatLogprobs (flat)
    or a list of dicts; a prompt's starts with an empty first position."""
    from vllm.logprobs import create_prompt_logprobs, create_sample_logprobs

    return create_prompt_logprobs(flat) if prompt else create_sample_logprobs(flat)


def append_position(container, ids: list[int], logprobs: list[float], rank: int, k: int) -> None:
    """One position: ids, logprobs = the chosen token then the top k; rank: the chosen
    token's rank in the vocabulary."""
    from vllm.logprobs import append_logprobs_for_next_position

    append_logprobs_for_next_position(container, ids, logprobs, itertools.repeat(None), rank, k)


def make_logprobs_processor(k: int, layout: str = "arrays", prompt: bool = False):
    """vLLM's LogprobsProcessor for one request asking for k logprobs (prompt: prompt
    logprobs), without a tokenizer (detokenize=False, as precompute asks); its `logprobs`
    (or `prompt_logprobs`) container has the layout's type."""
    from vllm.v1.engine.logprobs import LogprobsProcessor

    if layout not in LAYOUTS:
        raise ValueError(f"logprobs layout {layout!r}: expected one of {LAYOUTS}")
    if layout == "arrays":
        if not arrays.install():
            raise RuntimeError("this vLLM does not take vllm_engine/arrays.py's hook")
        container = arrays.LogprobArrays(k + 1, 1 if prompt else 0)
    else:
        container = logprob_container(layout == "flat", prompt)
    return LogprobsProcessor(
        tokenizer=None,
        logprobs=None if prompt else container,
        prompt_logprobs=container if prompt else None,
        cumulative_logprob=None if prompt else 0.0,
        num_logprobs=None if prompt else k,
        num_prompt_logprobs=k if prompt else None,
    )


def sample_step(ids_NW: np.ndarray, logprobs_NW: np.ndarray, ranks_N: np.ndarray):
    """What the engine hands the output processor for N generated positions (vLLM's
    LogprobsLists): per position the chosen token then the top k, and the chosen token's rank."""
    from vllm.v1.outputs import LogprobsLists

    return LogprobsLists(ids_NW, logprobs_NW, ranks_N)


def prompt_chunk(ids_NW: np.ndarray, logprobs_NW: np.ndarray, ranks_N: np.ndarray):
    """The same for N prompt positions of one prefill chunk (vLLM's LogprobsTensors)."""
    from vllm.v1.outputs import LogprobsTensors

    return LogprobsTensors(
        torch.from_numpy(ids_NW), torch.from_numpy(logprobs_NW), torch.from_numpy(ranks_N)
    )


def feed_sample(proc, step) -> None:
    """The processor takes one `sample_step`, as vLLM's output processor calls it."""
    proc._update_sample_logprobs(step)


def feed_prompt(proc, chunk) -> None:
    """The processor takes one `prompt_chunk`."""
    proc._update_prompt_logprobs(chunk)

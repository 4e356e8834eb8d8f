"""The teacher engine's interface (`Backend`), met by the vLLM backend
(vllm_engine/teacher.py) and the transformers one (precompute/hf_backend.py); both return
shards.topk.Scored (re-exported here for precompute's callers)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from shards.topk import Scored

if TYPE_CHECKING:
    from precompute.config import SamplingConfig

__all__ = ["Backend", "Scored"]


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

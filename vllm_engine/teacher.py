"""The vLLM engine: offline batched generation and teacher-forced scoring with raw top-k.

vLLM on the CPU spawns its engine processes, so callers need an `if __name__ == "__main__"`
guard (python -m precompute has one), and its KV-cache size needs a default
(vllm_engine/env.py).
"""

from __future__ import annotations

from typing import Protocol

from runtime.lifetime import guard_children
from shards.topk import Scored
from vllm_engine import arrays as vllm_arrays
from vllm_engine.engine_args import (
    EngineArgsError,
    check_engine_args,
    resolve_engine_args,
)
from vllm_engine.env import default_kvcache_space
from vllm_engine.topk import (
    topk_from_entries,
    topk_from_flat_logprobs,
    topk_from_logprob_arrays,
)

LOGPROBS_MODE = "raw_logprobs"
LAYOUTS = ("arrays", "flat", "dicts")


class Sampling(Protocol):
    """What generate reads of its sampling settings (precompute.config.SamplingConfig)."""

    n: int
    temperature: float
    top_p: float
    top_k: int  # 0: off
    max_tokens: int


class VLLMBackend:  # implements precompute.backend.Backend (which this package cannot import)
    name = "vllm"

    def __init__(
        self,
        model: str,
        k: int,
        engine_args: dict,
        per_request_seed: str = "auto",
        layout: str = "arrays",
    ):
        default_kvcache_space()
        reserved = sorted(set(engine_args) & {"model", "logprobs_mode"})
        if reserved:  # the backend sets them: the shards' meaning depends on them
            raise EngineArgsError(f"engine.{reserved[0]} is set by the teacher backend")
        check_engine_args(engine_args)
        from vllm import LLM

        # The device's dtype and eager mode where the config leaves them out.
        args = resolve_engine_args(engine_args)
        # prompt_logprobs / logprobs above max_logprobs are refused per request.
        args["max_logprobs"] = max(k, int(args.get("max_logprobs") or 0))
        # Raw: the full-vocabulary log_softmax of the logits, before temperature, top-p and
        # top-k; the trainer applies its own temperature.
        args["logprobs_mode"] = LOGPROBS_MODE
        # vLLM's engine processes must not outlive this one (kill -9 included).
        guard_children()
        self.llm = LLM(model=model, **args)
        from vllm.platforms import current_platform

        # vLLM 0.32 on the CPU: a seeded request whose prompt is prefilled over several steps
        # kills the engine (torch's CPU generator has no offset to rewind). There the engine's
        # own seed (engine.seed) makes runs reproducible, for the same batches.
        if per_request_seed == "auto":
            self.per_request_seed = not current_platform.is_cpu()
        else:
            self.per_request_seed = per_request_seed == "true"
        self.k = k
        # How vLLM hands over each request's logprobs (BENCHMARKS.md, "Precompute host
        # path"): "arrays", the engine's own arrays (vllm_engine/arrays.py; "flat" where
        # this vLLM lacks the internals it needs); "flat", a few flat Python lists per request
        # (SamplingParams(flat_logprobs=True)); "dicts", a dict of Logprob objects per
        # position. All three give the same shards (tests compare them).
        if layout not in LAYOUTS:
            raise ValueError(f"logprobs layout {layout!r}: expected one of {LAYOUTS}")
        if layout == "arrays" and not vllm_arrays.install():
            layout = "flat"
        self.layout = layout
        cfg = self.llm.llm_engine.model_config
        self.vocab_size = int(cfg.get_vocab_size())
        self.max_model_len = int(cfg.max_model_len)

    def generate(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        sampling: Sampling,
        fixed_length: bool = False,
    ) -> list[list[Scored]]:
        """Backend.generate with vLLM's sampler (seeded per request only where that is safe:
        see __init__)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else 0,
                # Never past the context window: vLLM refuses such a request.
                max_tokens=max(1, min(sampling.max_tokens, self.max_model_len - len(p))),
                seed=seed if self.per_request_seed else None,
                logprobs=self.k,
                **self._layout_params(),
                # Token ids are all we keep: decoding the text and the k candidate tokens of
                # every position would cost more CPU time than the 135M teacher itself.
                detokenize=False,
                ignore_eos=fixed_length,
            )
            for p, seed in zip(prompts, seeds, strict=True)
        ]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
        )
        completions = [sorted(out.outputs, key=lambda c: c.index) for out in outs]
        scored = iter(
            self._topk([(c.logprobs, list(c.token_ids), 0) for cs in completions for c in cs])
        )
        results = []
        for cs in completions:
            samples = []
            for c in cs:
                s = next(scored)
                s.finish_reason = c.finish_reason
                samples.append(s)
            results.append(samples)
        return results

    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> list[Scored]:
        """Teacher forcing: prompt_logprobs over prompt + response, one generated token."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=1,
            prompt_logprobs=self.k,
            **self._layout_params(),
            temperature=0.0,
            detokenize=False,
        )
        full = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=f) for f in full], params, use_tqdm=False
        )
        # Entry j is the distribution that predicted token j (entry 0, with no context, is
        # None); the response's tokens are positions len(p) .. len(p) + len(r) - 1.
        return self._topk(
            [
                (out.prompt_logprobs, list(r), len(p))
                for out, p, r in zip(outs, prompts, responses, strict=True)
            ]
        )

    def _layout_params(self) -> dict:
        if self.layout == "arrays":
            return {"flat_logprobs": True, "extra_args": {vllm_arrays.ARRAYS: True}}
        return {"flat_logprobs": self.layout == "flat"}

    def _topk(self, requests: list[tuple]) -> list[Scored]:
        """(logprobs, tokens, first position) per response -> arrays, positions first ..
        first + len(tokens) - 1; arrays and flat lists all at once."""
        if all(isinstance(lp, vllm_arrays.LogprobArrays) for lp, _, _ in requests):
            return topk_from_logprob_arrays(requests, self.k)
        if all(isinstance(lp, list) for lp, _, _ in requests):  # dicts
            return [topk_from_entries(lp[a : a + len(t)], t, self.k) for lp, t, a in requests]
        return topk_from_flat_logprobs(requests, self.k)

    def close(self) -> None:
        self.llm = None

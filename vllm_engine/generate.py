"""Plain generation with vLLM (evaluation, the demo data's teacher measurement): an engine for
one model with the device's settings, and token-id prompts in, token ids and text out.

vLLM on the CPU spawns its engine processes, so callers need an `if __name__ == "__main__"`
guard; the KV-cache default is set here, before vLLM is imported.
"""

from __future__ import annotations

import os

from runtime.lifetime import guard_children
from runtime.progress import line_progress_factory
from vllm_engine.engine_args import resolve_engine_args
from vllm_engine.env import default_kvcache_space


def start_llm(model: str, engine_args: dict):
    """A vllm.LLM for `model`: engine_args over the device's defaults (dtype, eager mode;
    vllm_engine.engine_args). Its engine processes die with this process (kill -9 too)."""
    default_kvcache_space()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    args = resolve_engine_args(engine_args)
    from vllm import LLM

    guard_children()
    return LLM(model=model, **args)


def generate(
    llm,
    prompts: list[list[int]],
    max_tokens: int,
    temperature: float,
    seed: int | list[int],
    progress: bool = True,
) -> list[tuple[list[int], str]]:
    """[(token_ids, text)] per prompt from a `vllm.LLM` already started; seeded only when
    sampling (temperature > 0): one seed for every request, or one per prompt (an episode's
    step: envs.policy). progress: vLLM's bar (prompts, tokens/s, ETA), as plain lines when the
    output is a log."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    max_len = int(llm.llm_engine.model_config.max_model_len)
    seeds = seed if isinstance(seed, list) else [seed] * len(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    params = [
        SamplingParams(
            temperature=temperature,
            # vLLM refuses a request that cannot fit in the context window.
            max_tokens=max(1, min(max_tokens, max_len - len(p))),
            seed=None if temperature == 0 else s,
        )
        for p, s in zip(prompts, seeds, strict=True)
    ]
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
        params,
        use_tqdm=line_progress_factory() if progress else False,
    )
    return [(list(o.outputs[0].token_ids), o.outputs[0].text) for o in outs]

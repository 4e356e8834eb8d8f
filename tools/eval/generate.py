"""Generation for evaluation: one model, a list of token-id prompts, greedy or sampled.

    python -m tools.eval.generate --model DIR --prompts prompts.json --out generations.json
        [--backend vllm|hf] [--max-tokens 64] [--temperature 0] [--seed 0]

`tools.eval` runs this once per model in its own process: vLLM's CPU engine does not give
its memory and worker processes back when a second engine starts in the same process, and
a fresh process per model also keeps one model's failure from taking the others down.

prompts.json: [{"id": ..., "prompt_ids": [...]}, ...]. The output holds, per prompt, the
generated token ids and text, and the generation's wall time without the engine start-up
(what `tools.eval` reports as tokens per second).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from vllm_engine.env import default_kvcache_space


def generate_vllm(llm, prompts: list[list[int]], max_tokens: int, temperature: float, seed: int):
    """[(token_ids, text)] per prompt from a `vllm.LLM` already started."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    max_len = int(llm.llm_engine.model_config.max_model_len)
    params = [
        SamplingParams(
            temperature=temperature,
            # vLLM refuses a request that cannot fit in the context window.
            max_tokens=max(1, min(max_tokens, max_len - len(p))),
            seed=None if temperature == 0 else seed,
        )
        for p in prompts
    ]
    from runtime.progress import line_progress_factory

    # vLLM's own bar (prompts, tokens/s, ETA), as plain lines when the output is a log.
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
        params,
        use_tqdm=line_progress_factory(),
    )
    return [(list(o.outputs[0].token_ids), o.outputs[0].text) for o in outs]


def generate_hf(
    model_dir: str,
    prompts: list[list[int]],
    max_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 16,
):
    """The same with transformers' `generate`, through precompute's transformers backend
    (left padding, cut after the end-of-sequence token), for machines without vLLM and for
    tests on tiny models."""
    from transformers import AutoTokenizer

    from precompute.config import SamplingConfig
    from precompute.hf_backend import HFBackend

    tok = AutoTokenizer.from_pretrained(model_dir)
    # k=1: the backend always returns top-k logprobs; evaluation needs only the tokens.
    backend = HFBackend(model_dir, k=1, batch_size=batch_size)
    sampling = SamplingConfig(n=1, temperature=temperature, max_tokens=max_tokens, seed=seed)
    seeds = [seed + i for i in range(len(prompts))]
    results = []
    for (sample,) in backend.generate(prompts, seeds, sampling):
        ids = [int(t) for t in sample.token_ids]
        results.append((ids, tok.decode(ids, skip_special_tokens=True)))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--backend", default="vllm", choices=("vllm", "hf"))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=2048)
    args = ap.parse_args(argv)
    rows = json.loads(args.prompts.read_text())
    prompts = [r["prompt_ids"] for r in rows]
    t_start = time.time()
    if args.backend == "vllm":
        default_kvcache_space()
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        from runtime.lifetime import guard_children

        guard_children()  # vLLM's engine processes must not outlive this one (kill -9 too)
        llm = LLM(
            model=args.model,
            dtype="float32",
            enforce_eager=True,
            max_model_len=args.max_model_len,
            seed=args.seed,
        )
        t0 = time.time()
        outs = generate_vllm(llm, prompts, args.max_tokens, args.temperature, args.seed)
    else:
        t0 = time.time()
        outs = generate_hf(args.model, prompts, args.max_tokens, args.temperature, args.seed)
    seconds = time.time() - t0
    result = {
        "model": args.model,
        "backend": args.backend,
        "seconds": seconds,
        "startup_seconds": t0 - t_start,
        "tokens": sum(len(ids) for ids, _ in outs),
        "rows": [
            {"id": r["id"], "token_ids": ids, "text": text}
            for r, (ids, text) in zip(rows, outs, strict=True)
        ],
    }
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(args.out)
    print(f"[eval] {args.model}: {result['tokens']} tokens in {seconds:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":  # vLLM spawns processes that re-import __main__
    raise SystemExit(main())

"""Generation for evaluation: one model, a list of token-id prompts, greedy or sampled.

    python -m tools.eval.generate --model DIR --prompts prompts.json --out generations.json
        [--backend vllm|hf] [--max-tokens 64] [--temperature 0] [--seed 0]
        [--dtype D] [--tensor-parallel-size N] [--enforce-eager | --no-enforce-eager]

`tools.eval` runs this once per model in its own process: vLLM's CPU engine does not give
its memory and worker processes back when a second engine starts in the same process, and
a fresh process per model also keeps one model's failure from taking the others down.

prompts.json: [{"id": ..., "prompt_ids": [...]}, ...]. The output holds, per prompt, the
generated token ids and text, and the generation's wall time without the engine start-up
(what `tools.eval` reports as tokens per second).

vLLM's dtype, tensor parallelism and eager mode default to the device's
(vllm_engine/engine_args.py: float32 and eager on the CPU; the model's dtype and CUDA graphs on
a GPU); the engine itself is vllm_engine/generate.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from precompute.config import SamplingConfig
from vllm_engine.generate import generate, start_llm


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
    # transformers (and the backend, which loads it) take seconds to import: only this
    # backend needs them, not vLLM runs nor tools.eval's parent process, which imports this file
    from transformers import AutoTokenizer

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


ENGINE_OPTIONS = ("dtype", "tensor_parallel_size", "enforce_eager")


def add_engine_options(ap: argparse.ArgumentParser) -> None:
    """vLLM's dtype, tensor parallelism and eager mode; unset: the device's default."""
    ap.add_argument("--dtype", help="vllm: model dtype (default: float32 on CPU, auto on GPU)")
    ap.add_argument("--tensor-parallel-size", type=int, help="vllm: GPUs per engine")
    ap.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        help="vllm: no CUDA graphs (default: on for CPU, off on GPU)",
    )


def engine_options(args: argparse.Namespace) -> dict:
    """The engine options given on the command line (None: not given)."""
    return {name: getattr(args, name) for name in ENGINE_OPTIONS}


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The given engine options as command-line flags again, for a generation process."""
    flags = []
    for name, value in engine_options(args).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            flags += [flag, str(value)]
    return flags


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
    add_engine_options(ap)
    args = ap.parse_args(argv)
    rows = json.loads(args.prompts.read_text())
    prompts = [r["prompt_ids"] for r in rows]
    t_start = time.time()
    if args.backend == "vllm":
        llm = start_llm(
            args.model,
            {**engine_options(args), "max_model_len": args.max_model_len, "seed": args.seed},
        )
        t0 = time.time()
        outs = generate(llm, prompts, args.max_tokens, args.temperature, args.seed)
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

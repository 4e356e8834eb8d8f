"""Teacher throughput: the vLLM backend against the transformers backend, in one run.

    python -m bench.precompute [--teacher models/smollm2-135m-instruct] [--prompts 32]
        [--tokens 256] [--k 64] [--hf-batch 32] [--out bench/results/precompute.json]

Both backends generate the same number of tokens from the same prompts (the teacher views
of the default data set, EOS ignored so every response has exactly --tokens tokens) and
return the top-k raw logprobs of every token, exactly what precompute asks of them. Each
gets one untimed warm-up call. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench import checkout_relative
from vllm_engine.env import default_kvcache_space

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "precompute.json"
DEFAULT_DATA = REPO / "data" / "default" / "train.jsonl"


def teacher_prompts(tokenizer, n: int) -> list[list[int]]:
    from precompute.config import ViewConfig
    from precompute.inputs import Example
    from precompute.views import make_views

    rows = []
    if DEFAULT_DATA.exists():
        rows = [json.loads(x) for x in DEFAULT_DATA.read_text().splitlines()[:n]]
    if len(rows) < n:
        from precompute.default_data import build_splits

        rows = build_splits("basic_arithmetic", n, 0, 0)["train"]
    prompts = []
    for i, r in enumerate(rows[:n]):
        ex = Example(
            i,
            r["id"],
            ({"role": "user", "content": r["question"]},),
            r["experience"],
            r["answer"],
            None,
            "",
        )
        prompts.append(make_views(tokenizer, ex, ViewConfig(), 0).teacher_prompt_ids)
    return prompts


def timed(backend, prompts, sampling) -> tuple[float, int]:
    backend.generate(prompts[:2], [0, 1], sampling, fixed_length=True)  # warm-up
    t = time.perf_counter()
    out = backend.generate(prompts, list(range(len(prompts))), sampling, fixed_length=True)
    dt = time.perf_counter() - t
    tokens = sum(len(s.token_ids) for samples in out for s in samples)
    return dt, tokens


def main(argv=None) -> int:
    default_kvcache_space()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(REPO / "models" / "smollm2-135m-instruct"))
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--hf-batch", type=int, default=32, help="transformers: prompts per call")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from precompute.config import SamplingConfig
    from precompute.hf_backend import HFBackend
    from vllm_engine.teacher import VLLMBackend

    tok = AutoTokenizer.from_pretrained(args.teacher)
    prompts = teacher_prompts(tok, args.prompts)
    sampling = SamplingConfig(n=1, temperature=1.0, max_tokens=args.tokens)
    results = {}
    vllm = VLLMBackend(
        args.teacher, args.k, {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048}
    )
    results["vllm"] = timed(vllm, prompts, sampling)
    vllm.close()
    del vllm
    hf = HFBackend(args.teacher, args.k, "float32", "cpu", args.hf_batch)
    results["transformers"] = timed(hf, prompts, sampling)

    rows = {
        name: {"seconds": round(dt, 3), "tokens": n, "tokens_per_s": round(n / dt, 1)}
        for name, (dt, n) in results.items()
    }
    ratio = rows["vllm"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"]
    report = {
        "teacher": Path(args.teacher).name,
        "prompts": args.prompts,
        "tokens_per_prompt": args.tokens,
        "k": args.k,
        "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
        "hf_batch": args.hf_batch,
        "dtype": "float32",
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "backends": rows,
        "vllm_over_transformers": round(ratio, 2),
        "target": ">= 5x",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(checkout_relative(report), indent=1) + "\n")
    print("\n| backend | tokens | seconds | tokens/s |\n| --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['tokens']} | {r['seconds']} | {r['tokens_per_s']} |")
    print(
        f"\nvLLM / transformers: {ratio:.2f}x (target >= 5x); "
        f"{args.prompts} prompts x {args.tokens} tokens, k={args.k}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":  # vLLM spawns processes that re-import __main__
    sys.exit(main())

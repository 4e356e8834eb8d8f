"""Precompute on one machine with 1, 2, ... local workers: which default is faster here.

    python -m bench.precompute_workers [--workers 1 2] [--limit 64] [--repeats 2]
        [--teacher models/smollm2-135m-instruct] [--data data/default/train.jsonl]
        [--out bench/results/precompute_workers.json]

Each run is the whole `python -m precompute --num-workers N` command on a fresh folder, as a
user runs it: reading the data, starting N vLLM engines (each worker its own; on a CPU each
bound to its own cores), generating greedily (the same work whatever the split) and writing
the shards. Wall time includes the engines' start-up, which a long job amortizes, so the
table also gives the teacher's tokens/s (tokens over the longest worker's engine time).
Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import checkout_relative

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "precompute_workers.json"
SUMMARY = re.compile(r"precompute: (\d+) examples .*?, (\d+) tokens, .* teacher (\d+) tokens/s")


def one_run(args, workers: int, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "precompute",
        "--config",
        str(REPO / "configs" / "precompute.yaml"),
        "--teacher",
        args.teacher,
        "--student",
        args.student or args.teacher,
        "--data",
        args.data,
        "--out",
        str(out),
        "--limit",
        str(args.limit),
        "--num-workers",
        str(workers),
        "--no-progress",
        "sampling.temperature=0",
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    m = SUMMARY.findall(proc.stderr)[-1]  # the job's line comes last
    examples, tokens, teacher_tps = map(int, m)
    return {
        "workers": workers,
        "examples": examples,
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s_wall": round(tokens / wall, 1),
        "teacher_tokens_per_s": teacher_tps,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--teacher", default=str(REPO / "models" / "smollm2-135m-instruct"))
    p.add_argument("--student", default="", help="default: the teacher (same tokenizer)")
    p.add_argument("--data", default=str(REPO / "data" / "default" / "train.jsonl"))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        for r in range(args.repeats):
            for w in args.workers:  # interleaved, so load changes hit both alike
                runs.append({"repeat": r, **one_run(args, w, Path(tmp) / f"r{r}-w{w}")})
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    print("| workers | examples | tokens | wall s (best) | tokens/s wall | teacher tokens/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    best = {}
    for w in args.workers:
        b = min((x for x in runs if x["workers"] == w), key=lambda x: x["wall_s"])
        best[w] = b
        print(
            f"| {w} | {b['examples']} | {b['tokens']} | {b['wall_s']} | "
            f"{b['tokens_per_s_wall']} | {b['teacher_tokens_per_s']} |"
        )
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "runs": runs,
        "best": best,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(checkout_relative(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

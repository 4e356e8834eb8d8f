"""make demo: the whole offline pipeline on the default models, on the CPU.

1. the default data (arithmetic questions with worked demonstrations as the experience),
2. the teacher (SmolLM2-135M-Instruct) runs once with vLLM on Q+E and writes shards,
3. a look into the shards (`python -m tools.shards stats`),
4. the student (every third layer of the teacher) trains from the shards with SKD, then
   again with SeqKD from the same shards: no teacher is loaded, nothing is recomputed.

Every stage is an ordinary command, printed before it runs, so each can be re-run alone.
Precompute and training resume where they stopped, so re-running the demo is cheap.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable


def stage(title: str, cmd: list[str]) -> None:
    print(f"\n=== {title}\n$ {shlex.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    print(f"--- {title}: {time.time() - t0:.0f} s", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="training steps per method")
    ap.add_argument("--shards", default="out/shards")
    ap.add_argument("--runs", default="runs/demo")
    args = ap.parse_args(argv)
    t0 = time.time()
    if not Path("data/default/train.jsonl").exists():
        stage("default data", [PY, "-m", "precompute.default_data"])
    stage("precompute: the teacher runs once", [PY, "-m", "precompute", "--out", args.shards])
    stage("inspect the shards", [PY, "-m", "tools.shards", "stats", args.shards])
    for method in ("skd", "seqkd"):
        stage(
            f"train {method} from the shards",
            [
                PY,
                "-m",
                "train",
                f"configs/train/{method}.yaml",
                f"data.shards={args.shards}",
                f"out_dir={args.runs}/{method}",
                f"max_steps={args.steps}",
                f"save_every={args.steps}",
                "resume=true",
            ],
        )
    print(f"\nDemo done in {time.time() - t0:.0f} s.")
    print(f"  shards:      {args.shards}  (python -m tools.shards inspect {args.shards})")
    for method in ("skd", "seqkd"):
        run = Path(args.runs) / method
        print(f"  {method:6s} run:  {run}/metrics.jsonl, checkpoints in {run}/checkpoints")


if __name__ == "__main__":
    main()

"""make demo: the whole offline pipeline on the default models, on the CPU, then the report.

1. the default data: arithmetic questions, each with three worked demonstrations as its
   experience; train, val (held-out loss) and test (held-out evaluation) are disjoint,
2. the teacher (SmolLM2-135M-Instruct) runs once with vLLM on Q+E and writes shards, for
   the train and the val questions,
3. a look into the shards (`python -m tools.shards stats`),
4. the student trains from the shards with SKD, then with SeqKD from the same shards: no
   teacher is loaded, nothing is recomputed. The student is SmolLM2-135M-Instruct itself,
   seeing the question alone (configs/train/skd.yaml says why),
5. evaluation on the held-out test questions (`python -m tools.eval`): teacher with and
   without the experience, the student before and after, with 95% intervals and plots.

Every stage is an ordinary command, printed before it runs, so each can be re-run alone
(tools/stages.py runs them; a stage's process tree dies with this process, kill -9
included). Precompute, training and evaluation resume or reuse what is done, so re-running
is cheap.
`--seed 1` (with other --shards/--runs/--report folders) repeats it with another teacher
sampling seed and training seed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tools.stages import Runner, Stage

PY = sys.executable
METHODS = ("skd", "seqkd")
DEMO_CONFIG = "configs/demo/precompute.yaml"  # its teacher, view, sampling and CPU engine


def stages(args) -> list[Stage]:
    val_shards = args.shards.rstrip("/") + "-val"
    data = Path("data/default")
    jobs = [
        Stage("data", "default data", cmd=[PY, "-m", "precompute.default_data"],
              done=(data / "val.jsonl").exists, outputs=[data / "val.jsonl"]),
    ]  # fmt: skip
    for split, out in (("train", args.shards), ("val", val_shards)):
        jobs.append(Stage(
            f"precompute-{split}",
            f"precompute ({split}): the teacher runs once, seeing the experience",
            cmd=[PY, "-m", "precompute", "--out", out, "--data", str(data / f"{split}.jsonl"),
                 "--no-progress", f"sampling.seed={args.seed}", "--config", DEMO_CONFIG],
            inputs=[data / f"{split}.jsonl"], outputs=[out],
        ))  # fmt: skip
    jobs.append(Stage("inspect", "inspect the shards",
                      cmd=[PY, "-m", "tools.shards", "stats", args.shards]))  # fmt: skip
    for method in METHODS:
        cmd = [
            PY, "-m", "train", f"configs/train/{method}.yaml", f"data.shards={args.shards}",
            f"data.eval_shards={val_shards}", "eval_every=5", f"out_dir={args.runs}/{method}",
            f"seed={args.seed}", "resume=true",
        ]  # fmt: skip
        if args.steps:
            cmd += [f"max_steps={args.steps}", f"save_every={args.steps}"]
        jobs.append(Stage(f"train-{method}", f"train {method} from the shards (no teacher loaded)",
                          cmd=cmd, inputs=[args.shards, val_shards]))  # fmt: skip
    evaluate = [PY, "-m", "tools.eval", "--runs", args.runs, "--out", args.report]
    jobs.append(Stage("eval", "evaluate on the held-out questions", cmd=evaluate))
    return jobs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="teacher sampling and training seed")
    ap.add_argument("--steps", type=int, default=0, help="training steps (0: the config's)")
    ap.add_argument("--shards", default="out/shards")
    ap.add_argument("--runs", default="runs", help="runs go to RUNS/<method>")
    ap.add_argument("--report", default="reports/demo")
    args = ap.parse_args(argv)
    t0 = time.time()
    # No state file: every stage resumes or reuses what is done by itself.
    Runner(None).run(stages(args))
    print(f"\nDemo done in {time.time() - t0:.0f} s.")
    print(f"  report:  {args.report}/comparison_report.md (+ results.json, CSV, PNG plots)")
    print(f"  shards:  {args.shards}  (python -m tools.shards inspect {args.shards})")
    print(f"  runs:    {', '.join(f'{args.runs}/{m}' for m in METHODS)}")
    print(
        "  re-train from the same shards, then re-evaluate into the same report:\n"
        f"    make train METHOD=jsd BETA=0.5 RUN={args.runs}/jsd && make eval "
        f"EVAL_ARGS='--runs {args.runs} --out {args.report}'"
    )


if __name__ == "__main__":
    main()

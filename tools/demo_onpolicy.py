"""make demo-onpolicy: does on-policy distillation pay off beyond SKD? Measured, per seed.

The setting is self-distillation with privileged information. Each arithmetic question's
experience is its own worked solution (`precompute.default_data --experience solution`):
the teacher, SmolLM2-135M-Instruct seeing Q+E, knows the answer; the student, the same
model seeing Q alone, must learn to find it. So the teacher stays far ahead of what SKD
reaches (the report checks the gap), and a method that learns more from it can show it.
Train, test (evaluation) questions are disjoint.

For every seed (teacher sampling, training, student sampling), five students:

- skd:       the teacher's shards, forward KL on its top-k (configs/train/skd.yaml);
- seqkd:     the same shards, cross-entropy on the teacher's responses;
- onpolicy:  live on-policy, lmbda = 1: every step the student samples with its colocated
             vLLM engine and a teacher server scores the samples (configs/train/onpolicy.yaml);
- two_stage: SKD, then the same live on-policy from SKD's final checkpoint;
- rounds:    on-policy as data (tools/rounds.py): the student samples all prompts, the
             teacher scores them, the student trains; twice.

Then `python -m tools.eval` per seed on the held-out questions, with SKD as the reference
row: paired differences with bootstrap intervals and McNemar's test. REPORT/summary.md
gathers both seeds, the wall time of every stage, and a plot of the differences.

Every stage is an ordinary command, printed before it runs. WORK/stages.json records the
finished ones with their wall time; a re-run skips them, and an interrupted stage resumes
with its own resume (precompute, train resume=true, rounds, the evaluation's cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from train.checkpoint import latest_model_dir

PY = sys.executable
METHODS = ("skd", "seqkd", "onpolicy", "two_stage", "rounds")
ONPOLICY = ("onpolicy", "two_stage", "rounds")
REFERENCE = "skd"
TEACHER_ROW = "teacher (Q+E)"
BEFORE_ROW = "student before"


@dataclass(frozen=True)
class Stage:
    """One command; `server` marks the ones that need the teacher server running."""

    name: str
    cmd: list[str]
    server: bool = False


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    ap.add_argument("--teacher", default="models/smollm2-135m-instruct")
    ap.add_argument("--student", default="models/smollm2-135m-instruct")
    ap.add_argument("--data", default="data/onpolicy", help="made here if missing")
    ap.add_argument("--train-questions", type=int, default=256)
    ap.add_argument("--test-questions", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=15, help="training steps of every method")
    ap.add_argument("--prompts", type=int, default=32, help="on-policy prompts per step")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="student samples' length")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--round-steps", type=int, default=8, help="training steps per round")
    ap.add_argument("--eval-max-tokens", type=int, default=48)
    ap.add_argument("--limit", type=int, default=0, help="evaluate on the first N only")
    ap.add_argument("--work", default="runs/demo-onpolicy", help="shards, runs, stages.json")
    ap.add_argument("--report", default="reports/demo-onpolicy")
    return ap


def data_stage(args) -> Stage:
    return Stage(
        "data",
        [
            PY, "-m", "precompute.default_data", "--out", args.data, "--experience", "solution",
            "--train", str(args.train_questions), "--test", str(args.test_questions),
            "--val", "0",
        ],
    )  # fmt: skip


def run_path(args, seed: int, method: str) -> Path:
    """Where the method's run of this seed ends up (what the evaluation reads)."""
    base = Path(args.work) / f"seed{seed}"
    if method == "rounds":
        return base / "rounds" / f"round-{args.rounds:03d}" / "train"
    return base / method


def seed_stages(args, seed: int, teacher_url: str = "{teacher_url}") -> list[Stage]:
    """The seed's commands in order. The two-stage run's start (SKD's final checkpoint) is
    resolved when the list is built, so build it again once SKD has finished."""
    work = Path(args.work) / f"seed{seed}"
    shards = str(work / "shards")
    train = f"{args.data}/train.jsonl"
    common = [f"seed={seed}", f"max_steps={args.steps}", f"save_every={args.steps}", "resume=true"]

    def trainer(method: str, config: str, *extra: str) -> list[str]:
        return [
            PY, "-m", "train", f"configs/train/{config}.yaml", f"model.path={args.student}",
            f"data.shards={shards}", f"out_dir={work / method}", *common, *extra,
        ]  # fmt: skip

    live = [
        f"onpolicy.teacher_url={teacher_url}", "onpolicy.lmbda=1", "onpolicy.sampler=vllm",
        f"onpolicy.max_prompts={args.prompts}", f"onpolicy.max_new_tokens={args.max_new_tokens}",
    ]  # fmt: skip
    skd_model = latest_model_dir(work / "skd")  # None until SKD has finished
    two_stage_start = "" if skd_model is None else str(skd_model)
    two_stage = trainer("two_stage", "onpolicy", *live)
    two_stage[two_stage.index(f"model.path={args.student}")] = f"model.path={two_stage_start}"
    return [
        Stage(
            "precompute",
            [
                PY,
                "-m",
                "precompute",
                "--config",
                "configs/demo/precompute.yaml",
                "--teacher",
                args.teacher,
                "--data",
                train,
                "--out",
                shards,
                "--no-progress",
                f"sampling.seed={seed}",
            ],
        ),  # fmt: skip
        Stage("skd", trainer("skd", "skd")),
        Stage("seqkd", trainer("seqkd", "seqkd")),
        Stage("onpolicy", trainer("onpolicy", "onpolicy", *live), server=True),
        Stage("two_stage", two_stage, server=True),
        Stage(
            "rounds",
            [
                PY,
                "-m",
                "tools.rounds",
                "--rounds",
                str(args.rounds),
                "--teacher",
                args.teacher,
                "--student",
                args.student,
                "--data",
                train,
                "--work",
                str(work / "rounds"),
                "--train-config",
                "configs/train/jsd.yaml",
                "--steps",
                str(args.round_steps),
                "--max-tokens",
                str(args.max_new_tokens),
                "--seed",
                str(seed),
            ],
        ),  # fmt: skip
        Stage("eval", eval_command(args, seed)),
    ]


def eval_command(args, seed: int) -> list[str]:
    report = Path(args.report)
    cmd = [
        PY, "-m", "tools.eval", "--data", f"{args.data}/test.jsonl",
        "--out", str(report / f"seed{seed}"), "--cache", str(report / "generations"),
        "--max-tokens", str(args.eval_max_tokens), "--reference", REFERENCE,
        "--model", f"{TEACHER_ROW}={args.teacher}@qe", "--model", f"{BEFORE_ROW}={args.student}",
    ]  # fmt: skip
    for method in METHODS:
        cmd += ["--model", f"{method}={run_path(args, seed, method)}"]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    return cmd


class Stages:
    """WORK/stages.json: {"seed0/skd": {"seconds": s, "command": "..."}}, written atomically
    after each finished stage."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}

    def finish(self, key: str, seconds: float, cmd: list[str]) -> None:
        self.done[key] = {"seconds": round(seconds, 1), "command": shlex.join(cmd)}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=1))
        os.replace(tmp, self.path)


def run_stage(stages: Stages, key: str, cmd: list[str]) -> None:
    if key in stages.done:
        print(f"=== {key}: done ({stages.done[key]['seconds']:.0f} s), skipped", flush=True)
        return
    print(f"\n=== {key}\n$ {shlex.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    stages.finish(key, time.time() - t0, cmd)
    print(f"--- {key}: {time.time() - t0:.0f} s", flush=True)


def run_seed(args, stages: Stages, seed: int) -> None:
    from vllm_engine.teacher_server import TeacherServer

    server = None
    try:
        for i in range(len(seed_stages(args, seed))):
            stage = seed_stages(args, seed)[i]  # rebuilt: two_stage starts from SKD's result
            key = f"seed{seed}/{stage.name}"
            if stage.server and key not in stages.done and server is None:
                t0 = time.time()
                log = Path(args.work) / f"seed{seed}" / "teacher-server.log"
                print(f"\n=== seed{seed}/teacher server ({args.teacher}, log {log})", flush=True)
                server = TeacherServer(args.teacher, max_model_len=2048, log=log).start()
                stages.finish(f"seed{seed}/teacher_server", time.time() - t0, [])
            if stage.server and server is not None:
                stage = seed_stages(args, seed, server.url)[i]
            if not stage.server and server is not None:
                server.kill()  # the scoring is over: free its cores and memory
                server = None
            run_stage(stages, key, stage.cmd)
    finally:
        if server is not None:
            server.kill()


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages(work / "stages.json")
    t0 = time.time()
    if not Path(args.data, "test.jsonl").exists():
        run_stage(stages, "data", data_stage(args).cmd)
    for seed in seeds:
        run_seed(args, stages, seed)
    from tools.demo_onpolicy_report import write_summary

    summary = write_summary(Path(args.report), seeds, stages.done, command=argv_command(argv))
    print(f"\nOn-policy demo done in {time.time() - t0:.0f} s. Summary: {summary}")
    return 0


def argv_command(argv) -> str:
    return shlex.join(["python", "-m", "tools.demo_onpolicy", *(argv or sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())

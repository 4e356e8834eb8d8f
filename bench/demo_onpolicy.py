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
- rounds:    on-policy as data (tools/onpolicy/rounds.py): the student samples all prompts, the
             teacher scores them, the student trains; twice.

Then `python -m tools.eval` per seed on the held-out questions, with SKD as the reference
row: paired differences with bootstrap intervals and McNemar's test. REPORT/summary.md
gathers both seeds, the wall time of every stage, and a plot of the differences.

Every stage is an ordinary command, printed before it runs (tools/stages.py runs them; a
stage's process tree dies with this process, kill -9 included). WORK/stages.json records the
finished ones with their wall time; a re-run skips them, and an interrupted stage resumes
with its own resume (precompute, train resume=true, rounds, the evaluation's cache).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from bench.demo_onpolicy_rows import BEFORE_ROW, METHODS, REFERENCE, TEACHER_ROW
from tools.stages import Runner, Service, Stage, later
from train.checkpoint import latest_model_dir

PY = sys.executable
DEMO_PRECOMPUTE = "configs/demo/precompute.yaml"  # the demo's teacher view, sampling and CPU engine


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
    """Made once, if missing."""
    return Stage(
        "data",
        cmd=[
            PY, "-m", "precompute.default_data", "--out", args.data, "--experience", "solution",
            "--train", str(args.train_questions), "--test", str(args.test_questions),
            "--val", "0",
        ],
        done=Path(args.data, "test.jsonl").exists,
        outputs=[Path(args.data, "test.jsonl")],
    )  # fmt: skip


def teacher_service(
    args, seed: int, max_model_len: int = 2048, dtype: str | None = None
) -> Service:
    """The seed's teacher server: up for the live stages, stopped before the next one (the
    agent demo's too); dtype None: the device's default."""

    def start():
        from vllm_engine.teacher_server import TeacherServer

        log = Path(args.work) / f"seed{seed}" / "teacher-server.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"teacher server: {args.teacher}, log {log}", flush=True)
        return TeacherServer(
            args.teacher, max_model_len=max_model_len, log=log, dtype=dtype
        ).start()

    return Service(f"seed{seed}/teacher_server", start)


def run_path(args, seed: int, method: str) -> Path:
    """Where the method's run of this seed ends up (what the evaluation reads; the agent
    demo's too)."""
    base = Path(args.work) / f"seed{seed}"
    if method == "rounds":
        return base / "rounds" / f"round-{args.rounds:03d}" / "train"
    return base / method


def skd_final(work: Path) -> Path:
    model = latest_model_dir(work / "skd")
    if model is None:
        raise SystemExit(f"{work / 'skd'}: no checkpoint; two_stage starts from SKD's")
    return model


def seed_stages(args, seed: int, teacher: Service | None = None) -> list[Stage]:
    """The seed's stages in order, named seed<S>/<stage>. The live ones need `teacher`
    (default: the seed's server, started when they run); two-stage starts from SKD's final
    checkpoint, found when it starts."""
    teacher = teacher or teacher_service(args, seed)
    work = Path(args.work) / f"seed{seed}"
    shards = work / "shards"
    train = f"{args.data}/train.jsonl"
    common = [f"seed={seed}", f"max_steps={args.steps}", f"save_every={args.steps}", "resume=true"]

    def trainer(method: str, config: str, *extra, start=f"model.path={args.student}"):
        return [
            PY, "-m", "train", f"configs/train/{config}.yaml", start,
            f"data.shards={shards}", f"out_dir={work / method}", *common, *extra,
        ]  # fmt: skip

    live = [
        later(lambda: f"onpolicy.teacher_url={teacher().url}"), "onpolicy.lmbda=1",
        "onpolicy.sampler=vllm", f"onpolicy.max_prompts={args.prompts}",
        f"onpolicy.max_new_tokens={args.max_new_tokens}",
    ]  # fmt: skip
    from_skd = later(lambda: f"model.path={skd_final(work)}")

    def stage(name, cmd, *inputs, services=()):
        return Stage(f"seed{seed}/{name}", cmd=cmd, inputs=inputs, services=services)

    return [
        stage("precompute", [PY, "-m", "precompute", "--config", DEMO_PRECOMPUTE,
                             "--teacher", args.teacher, "--data", train,
                             "--out", shards, "--no-progress", f"sampling.seed={seed}"], train),
        stage("skd", trainer("skd", "skd"), shards),
        stage("seqkd", trainer("seqkd", "seqkd"), shards),
        stage("onpolicy", trainer("onpolicy", "onpolicy", *live), shards, services=[teacher]),
        stage("two_stage", trainer("two_stage", "onpolicy", *live, start=from_skd),
              shards, work / "skd", services=[teacher]),
        stage("rounds", [PY, "-m", "tools.onpolicy.rounds", "--rounds", str(args.rounds),
                         "--teacher", args.teacher, "--student", args.student, "--data", train,
                         "--work", work / "rounds", "--train-config", "configs/train/jsd.yaml",
                         "--steps", str(args.round_steps), "--max-tokens",
                         str(args.max_new_tokens), "--seed", str(seed)], train),
        stage("eval", eval_command(args, seed)),
    ]  # fmt: skip


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


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(work / "stages.json")
    t0 = time.time()
    runner.run([data_stage(args), *(s for seed in seeds for s in seed_stages(args, seed))])
    from bench.demo_onpolicy_report import write_summary

    summary = write_summary(Path(args.report), seeds, runner.done, command=argv_command(argv))
    print(f"\nOn-policy demo done in {time.time() - t0:.0f} s. Summary: {summary}")
    return 0


def argv_command(argv) -> str:
    return shlex.join(["python", "-m", "bench.demo_onpolicy", *(argv or sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())

"""Rounds against live on-policy: the time to train on the same number of student samples.

python -m bench.rounds [--samples 32] [--max-prompts 4] [--max-new-tokens 48] [--k 64]

Live (`python -m train configs/train/onpolicy.yaml`, lmbda = 1, the Hugging Face sampler):
each step samples `max_prompts` answers with the trainer's student, has a vLLM teacher server
score them and updates; samples / max_prompts steps. Timed: the training command (model load
included) and, apart, the teacher server's start.

Rounds (`python -m tools.rounds --rounds 1`): the student samples all the prompts with vLLM,
the teacher scores them with vLLM (both through precompute), then the same number of steps
trains on them, `max_prompts` samples per step (data.max_rows). Timed: each of the three
commands, engine starts included.

Same student, teacher, prompts (the first `samples` questions of --data), max_new_tokens,
temperature (1), k, loss (configs/train/onpolicy.yaml: JSD(0.5)) and learning rate.
Results: bench/results/rounds.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench import checkout_relative
from bench.onpolicy import prompt_shards
from train.__main__ import main as train_main
from vllm_engine.teacher_server import TeacherServer

CACHE = Path("bench/cache/rounds")


def live(args, steps: int) -> dict:
    t0 = time.time()
    server = TeacherServer(
        args.teacher, max_model_len=2048, max_logprobs=args.k, log=CACHE / "server.log"
    ).start()
    server_s = time.time() - t0
    try:
        data = Path(args.data)
        shards = prompt_shards(
            CACHE / f"prompts-{args.samples}", data, args.teacher, server.url, args.samples, args.k
        )
        out = CACHE / "live"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        train_main(
            [
                "configs/train/onpolicy.yaml",
                f"model.path={args.student}",
                f"data.shards={shards}",
                f"out_dir={out}",
                f"max_steps={steps}",
                f"save_every={steps}",
                "optim.warmup_steps=0",
                f"onpolicy.teacher_url={server.url}",
                "onpolicy.lmbda=1",
                "onpolicy.temperature=1.0",
                f"onpolicy.max_prompts={args.max_prompts}",
                f"onpolicy.max_new_tokens={args.max_new_tokens}",
            ]
        )
        train_s = time.time() - t0
    finally:
        server.kill()
    log = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return {
        "teacher_server_start_s": server_s,
        "train_s": train_s,
        "total_s": server_s + train_s,
        "steps": len(log),
        "student_samples": sum(int(r.get("onpolicy", 0)) for r in log) * args.max_prompts,
        "generate_s": sum(r["gen_s"] for r in log),
        "teacher_wait_s": sum(r["teacher_wait_s"] for r in log),
    }


def rounds(args, steps: int) -> dict:
    data = CACHE / f"questions-{args.samples}.jsonl"
    data.write_text("".join(open(args.data).readlines()[: args.samples]))
    work = CACHE / "rounds"
    shutil.rmtree(work, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "tools.rounds", "--rounds", "1", "--teacher", args.teacher,
        "--student", args.student, "--data", str(data), "--work", str(work),
        "--train-config", "configs/train/onpolicy.yaml", "--steps", str(steps), "--n", "1",
        "--max-tokens", str(args.max_new_tokens), "--temperature", "1.0", "--k", str(args.k),
        "--train-args", f"data.max_rows={args.max_prompts} data.batch_tokens=1000000 "
        f"save_every={steps} optim.warmup_steps=0",
    ]  # fmt: skip
    t0 = time.time()
    out = subprocess.run(
        cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ).stdout
    total = time.time() - t0
    # tools.rounds prints "--- round 1: <title>: <seconds> s" after each command.
    titles = {"samples its": "sample_s", "scores the": "score_s", "trains on": "train_s"}
    times = {
        key: float(m.group(2))
        for m in re.finditer(r"^--- round 1: (.*): ([\d.]+) s$", out, re.M)
        for words, key in titles.items()
        if words in m.group(1)
    }
    # precompute's summaries: "... N tokens, ... teacher X tokens/s, wall Y s"; N / X is the
    # time in the engine's generate/score calls, the rest of a step is start-up.
    engine = [
        int(m.group(1)) / float(m.group(2))
        for m in re.finditer(r"(\d+) tokens, .*teacher ([\d.]+) tokens/s", out)
        if float(m.group(2)) > 0
    ]
    samples = sum(1 for _ in open(work / "round-001" / "responses.jsonl"))
    log = [json.loads(line) for line in open(work / "round-001" / "train" / "metrics.jsonl")]
    return {
        **times,
        "engine_calls_s": engine,  # [sampling, scoring]
        "total_s": total,
        "steps": len(log),
        "student_samples": samples,
        "trained_tokens": sum(r["tokens"] for r in log),
        "output": out[-4000:],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="models/smollm2-135m-instruct")
    ap.add_argument("--student", default="models/smollm2-student")
    ap.add_argument("--data", default="data/default/train.jsonl")
    ap.add_argument("--samples", type=int, default=32, help="student samples trained on")
    ap.add_argument("--max-prompts", type=int, default=4, help="samples per step")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--out", default="bench/results/rounds.json")
    args = ap.parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    steps = args.samples // args.max_prompts
    result = {
        "command": " ".join(["python -m bench.rounds", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "teacher": args.teacher,
        "student": args.student,
        "samples": args.samples,
        "max_prompts": args.max_prompts,
        "max_new_tokens": args.max_new_tokens,
        "k": args.k,
        "live_hf_sampler": live(args, steps),
        "rounds": rounds(args, steps),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(checkout_relative(result), indent=1))
    lv, rd = result["live_hf_sampler"], result["rounds"]
    print("| path | student samples | steps | wall s | parts |")
    print("| --- | ---: | ---: | ---: | --- |")
    print(
        f"| live, HF sampler | {lv['student_samples']} | {lv['steps']} | {lv['total_s']:.0f} | "
        f"server start {lv['teacher_server_start_s']:.0f} s, train {lv['train_s']:.0f} s "
        f"(generate {lv['generate_s']:.0f} s, teacher wait {lv['teacher_wait_s']:.0f} s) |"
    )
    print(
        f"| rounds (1 round) | {rd['student_samples']} | {rd['steps']} | {rd['total_s']:.0f} | "
        f"sample {rd['sample_s']:.0f} s, score {rd['score_s']:.0f} s, train {rd['train_s']:.0f} s |"
    )


if __name__ == "__main__":
    main()

"""On-policy distillation: wall time per step split into student generation, teacher scoring
(time blocked on the teacher server), weight sync and the update; side by side with TRL.

python -m bench.onpolicy [--steps 5] [--max-prompts 4] [--max-new-tokens 48] [--no-trl] [--only ...]

Starts a vLLM teacher server for --teacher (or uses --teacher-url), writes small prompt
shard folders (the default data's questions; the teacher view with its demonstrations, and
one whose teacher view is the question itself) under bench/cache/ if there are none, then
runs the real trainer (`python -m train configs/train/onpolicy.yaml`, lmbda = 1, one process
per setting, its peak RSS from wait4) for --steps steps per setting and reads the split from
its metrics.jsonl. Step 1 (warm-up) is left out. Settings: onpolicy.sampler hf (transformers
generate) and vllm (the colocated engine, weights pushed after every step), each with
grad_accum 1 and 2 (a step's micro-batches are sampled in one call; the teacher scores the
second while the first is trained). Then TRL's job, side by side: TRL's
DistillationTrainer (bench/trl_onpolicy.py) has no teacher view, so its teacher scores the
student's prompt; kdshards runs the same job (teacher view = Q) with the same student,
teacher, prompts, max_new_tokens, micro-batch, grad_accum 2 and steps. Results:
bench/results/onpolicy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench import checkout_relative
from shards.fingerprint import tokenizer_fingerprint, weights_fingerprint
from shards.schema import ShardMetadata
from shards.writer import ShardRow, ShardWriter
from train.checkpoint import checkpoint_root
from vllm_engine.teacher_client import TeacherClient
from vllm_engine.teacher_server import TeacherServer

CACHE = Path("bench/cache/onpolicy")


def prompt_shards(
    folder: Path, data: Path, teacher: str, url: str, n: int, k: int, demonstrations: bool
) -> Path:
    """n questions as shard rows: student view Q, teacher view E + Q (demonstrations) or Q
    (TRL's job: its teacher sees the student's prompt), the dataset's answer scored by the
    teacher (used only as prompts here, lmbda = 1)."""
    if any(folder.glob("manifest*.json")):
        return folder
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    client = TeacherClient(url, k)
    client.connect(tok)
    meta = ShardMetadata(
        k=k,
        vocab_size=len(tok),
        teacher=teacher,
        teacher_fingerprint=weights_fingerprint(teacher),
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
    )

    def render(text):
        chat = [{"role": "user", "content": text}]
        ids = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    with ShardWriter(folder, meta, batch_tokens=512) as w:
        for line in open(data).readlines()[:n]:
            ex = json.loads(line)
            q = render(ex["question"])
            tq = render(ex["experience"] + "\n\n" + ex["question"]) if demonstrations else q
            answer = tok(str(ex["answer"]), add_special_tokens=False)["input_ids"]
            resp = answer + [tok.eos_token_id]
            s = client.score(tq, resp)
            w.add(ShardRow(ex["id"], q, tq, resp, s.topk_ids, s.topk_logprobs, s.token_logprob))
    client.close()
    return folder


def tree_rss_gib(pid: int) -> float:
    """Resident memory of a process and its descendants now (the teacher server's engine)."""
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**30


def run_child(cmd: list[str], log: Path) -> int:
    """Run `cmd` (PYTHONPATH = here); return its peak RSS in bytes (wait4's ru_maxrss)."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed, see {log}")
    return usage.ru_maxrss * 1024


def run_setting(name, url, shards, args, grad_accum: int, sampler: str) -> dict:
    out = CACHE / f"run-{name}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        f"model.path={args.student}",
        f"data.shards={shards}",
        f"out_dir={out}",
        f"max_steps={args.steps + 1}",
        f"grad_accum={grad_accum}",
        "save_every=1000000",
        "data.sort_window=64",
        "optim.warmup_steps=0",
        f"onpolicy.teacher_url={url}",
        "onpolicy.lmbda=1",
        f"onpolicy.max_prompts={args.max_prompts}",
        f"onpolicy.max_new_tokens={args.max_new_tokens}",
        f"onpolicy.sampler={sampler}",
        f"optim.lr={args.lr}",
    ]
    cmd = [sys.executable, "-m", "train", "configs/train/onpolicy.yaml", *overrides]
    out.mkdir(parents=True, exist_ok=True)
    peak = run_child(cmd, CACHE / f"{name}.log")
    log = [json.loads(line) for line in open(out / "metrics.jsonl")]
    shutil.rmtree(checkpoint_root(out), ignore_errors=True)  # the final save: not timed, big
    steps = []
    for prev, r in zip(log, log[1:], strict=False):  # step 1 (warm-up) has no predecessor
        wall = r["time"] - prev["time"]
        steps.append(
            {
                "wall_s": wall,
                "generate_s": r["gen_s"],
                "teacher_wait_s": r["teacher_wait_s"],
                "sync_s": r["sync_s"],
                "update_s": wall - r["gen_s"] - r["teacher_wait_s"] - r["sync_s"],
                "tokens": r["tokens"],
            }
        )

    def med(key):
        return statistics.median(s[key] for s in steps)

    keys = ("wall_s", "generate_s", "teacher_wait_s", "sync_s", "update_s")
    summary = {k: med(k) for k in keys}
    summary["teacher_share"] = sum(s["teacher_wait_s"] for s in steps) / sum(
        s["wall_s"] for s in steps
    )
    summary["tokens_per_step"] = med("tokens")
    summary["peak_rss_gib"] = peak / 2**30
    return {"sampler": sampler, "grad_accum": grad_accum, "summary": summary, "steps": steps}


def run_trl(args, grad_accum: int) -> dict:
    """TRL's DistillationTrainer in its own process (bench/trl_onpolicy.py)."""
    result = CACHE / "trl.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.trl_onpolicy",
        f"--student={args.student}",
        f"--teacher={args.teacher}",
        f"--data={args.data}",
        f"--steps={args.steps + 1}",
        f"--batch={args.max_prompts}",
        f"--grad-accum={grad_accum}",
        f"--max-new-tokens={args.max_new_tokens}",
        f"--lr={args.lr}",
        f"--out={result}",
    ]
    peak = run_child(cmd, CACHE / "trl.log")
    r = json.loads(result.read_text())
    walls = r["step_s"][1:]  # step 1: warm-up
    summary = {"wall_s": statistics.median(walls), "peak_rss_gib": peak / 2**30}
    return {"trainer": r["trainer"], "grad_accum": grad_accum, "summary": summary, "step_s": walls}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="models/smollm2-135m-instruct")
    ap.add_argument("--student", default="models/smollm2-student")
    ap.add_argument("--teacher-url", default="", help="use a running server instead")
    ap.add_argument("--data", default="data/default/train.jsonl")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    ap.add_argument("--max-prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--no-trl", dest="trl", action="store_false", help="skip the TRL run")
    ap.add_argument("--out", default="bench/results/onpolicy.json")
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated settings to run (hf-ga1, hf-ga2, vllm-ga1, vllm-ga2, hf-ga2-q, "
        "vllm-ga2-q, trl); default all",
    )
    args = ap.parse_args(argv)
    only = {x for x in args.only.split(",") if x}

    def wanted(name: str) -> bool:
        return not only or name in only

    CACHE.mkdir(parents=True, exist_ok=True)
    server = None
    if not args.teacher_url:
        server = TeacherServer(
            args.teacher, max_model_len=2048, max_logprobs=args.k, log=CACHE / "server.log"
        ).start()
    url = args.teacher_url or server.url
    try:
        data = Path(args.data)
        shards = prompt_shards(CACHE / "prompts", data, args.teacher, url, 64, args.k, True)
        settings = {}
        for sampler in ("hf", "vllm"):
            for g in (1, 2):
                name = f"sampler={sampler}, grad_accum={g}"
                if wanted(f"{sampler}-ga{g}"):
                    settings[name] = run_setting(f"{sampler}-ga{g}", url, shards, args, g, sampler)
        # kdshards on TRL's job: the teacher scores the student's own prompt
        same = prompt_shards(CACHE / "prompts-q", data, args.teacher, url, 64, args.k, False)
        for sampler in ("hf", "vllm"):
            name = f"sampler={sampler}, grad_accum=2, teacher view = Q (TRL's job)"
            if wanted(f"{sampler}-ga2-q"):
                settings[name] = run_setting(f"{sampler}-ga2-q", url, same, args, 2, sampler)
        server_rss = tree_rss_gib(server.proc.pid) if server is not None else None
    finally:
        if server is not None:
            server.kill()
    trl = run_trl(args, 2) if args.trl and wanted("trl") else None
    result = {
        "command": " ".join(
            ["python -m bench.onpolicy", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "teacher": args.teacher,
        "student": args.student,
        "k": args.k,
        "max_prompts": args.max_prompts,
        "max_new_tokens": args.max_new_tokens,
        "steps_timed": args.steps,
        "lr": args.lr,
        "teacher_server_rss_gib": server_rss,
        "settings": settings,
        "trl": trl,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(checkout_relative(result), indent=1))
    print(
        "| setting | step s | generate s | teacher wait s | sync s | update s | teacher share "
        "| peak RSS GiB |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in settings.items():
        s = r["summary"]
        print(
            f"| {name} | {s['wall_s']:.2f} | {s['generate_s']:.2f} | {s['teacher_wait_s']:.2f} "
            f"| {s['sync_s']:.2f} | {s['update_s']:.2f} | {100 * s['teacher_share']:.0f}% "
            f"| {s['peak_rss_gib']:.2f} |"
        )
    if trl:
        s = trl["summary"]
        print(
            f"| TRL {trl['trainer']}, grad_accum=2 | {s['wall_s']:.2f} | | | | | "
            f"| {s['peak_rss_gib']:.2f} |"
        )


if __name__ == "__main__":
    main()

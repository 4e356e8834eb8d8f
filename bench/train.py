"""Training from cached teacher logits vs. running the teacher on every batch.

python -m bench.train [--shards out/shards] [--steps 12]

Both modes train the same student on the same batches with the same loss (SKD, forward KL
on the teacher's top-k + tail bucket). "shards" reads the teacher's top-k from the shard
folder; "live teacher" runs the teacher's forward pass on each batch's teacher view (Q+E +
response), the way TRL's GKDTrainer does with lmbda=0 (no student sampling), takes the
top-k of its log_softmax and computes the same loss. Reports response tokens per second of
each, their ratio, and where the time goes. Results: bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench import checkout_relative
from shards.reader import ShardReader
from train.batches import collate, plan_batches
from train.losses import KDSpec, TeacherSignal
from train.model import DistillModule


def batches_of_rows(folder: str, steps: int, batch_tokens: int, max_length: int):
    """The first `steps` length-sorted batches of rows, in file order."""
    rows = []
    for row in ShardReader(folder, shuffle=False, epochs=None):
        rows.append(row)
        if len(rows) >= steps * 64:
            break
    lengths = [min(len(r["prompt_ids"]) + len(r["response_ids"]), max_length) for r in rows]
    plan = plan_batches(lengths, batch_tokens, max_rows=64)
    plan = sorted(plan, key=len, reverse=True)[:steps]  # full batches, not the leftovers
    return [[rows[i] for i in b] for b in plan]


def teacher_signal(teacher, rows, k: int, max_length: int) -> TeacherSignal:
    """Live teacher: forward on Q+E + response, top-k of the full-vocabulary log_softmax."""
    seqs, spans = [], []
    for r in rows:
        prompt = r["teacher_prompt_ids"]
        student_prompt_len = min(len(r["prompt_ids"]), max_length - 1)
        t = min(len(r["response_ids"]), max_length - student_prompt_len)  # as collate() cuts
        seqs.append(torch.cat([prompt, r["response_ids"][:t]]).long())
        spans.append((len(prompt), t))
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)], mask[b, : len(s)] = s, 1
    with torch.no_grad():
        logits = teacher(input_ids=ids, attention_mask=mask).logits
        rows_lp = []
        for b, (p, t) in enumerate(spans):
            rows_lp.append(torch.log_softmax(logits[b, p - 1 : p - 1 + t].float(), -1))
        lp = torch.cat(rows_lp)
        values, top = lp.topk(k, -1)
        tail = torch.log1p(-values.exp().sum(-1).clamp(max=1 - 1e-7))
    return TeacherSignal(ids=top, logprobs=values, tail_logprob=tail)


def run_mode(student_dir, batches, *, teacher=None, k: int, max_length: int, chunk: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    module = DistillModule(lm, KDSpec(divergence="forward_kl", tail="tail_bucket"), chunk)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-5)
    timings = {"teacher": 0.0, "student": 0.0}
    tokens, losses = 0, []
    for i, rows in enumerate(batches):
        batch = collate(rows, max_length)
        t0 = time.perf_counter()
        if teacher is not None:
            sig = teacher_signal(teacher, rows, k, max_length)
            batch.topk_ids, batch.topk_logprobs, batch.tail_logprob = (
                sig.ids,
                sig.logprobs,
                sig.tail_logprob,
            )
        t1 = time.perf_counter()
        out = module(batch)
        (out.loss / batch.num_tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i > 0:  # the first step warms up allocators and kernels
            timings["teacher"] += t1 - t0
            timings["student"] += t2 - t1
            tokens += batch.num_tokens
        losses.append(float(out.loss.detach()) / batch.num_tokens)
    wall = timings["teacher"] + timings["student"]
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, **timings, "losses": losses}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", default="out/shards")
    ap.add_argument("--student", default="models/smollm2-student")
    ap.add_argument("--teacher", default="models/smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--out", default="bench/results/train.json")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    k = ShardReader(args.shards).metadata.k
    batches = batches_of_rows(args.shards, args.steps, args.batch_tokens, args.max_length)
    common = dict(k=k, max_length=args.max_length, chunk=args.chunk)
    offline = run_mode(args.student, batches, **common)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    live = run_mode(args.student, batches, teacher=teacher, **common)
    student_len = sum(
        min(len(r["prompt_ids"]) + len(r["response_ids"]), args.max_length)
        for b in batches[1:]
        for r in b
    )
    teacher_len = sum(
        len(r["teacher_prompt_ids"]) + len(r["response_ids"]) for b in batches[1:] for r in b
    )
    result = {
        "command": " ".join(["python -m bench.train", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "shards": args.shards,
        "k": k,
        "steps_timed": len(batches) - 1,
        "student_input_tokens": student_len,
        "teacher_input_tokens": teacher_len,
        "shards_mode": offline,
        "live_teacher_mode": live,
        "speedup": offline["tok_s"] / live["tok_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(checkout_relative(result), indent=1))
    print("| mode | response tok/s | teacher s | student step s |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in (("from shards", offline), ("live teacher (GKD, lmbda=0)", live)):
        print(f"| {name} | {r['tok_s']:.0f} | {r['teacher']:.2f} | {r['student']:.2f} |")
    print(
        f"\nspeedup {result['speedup']:.2f}x; teacher inputs {teacher_len} tokens vs "
        f"student inputs {student_len}; losses equal at step 0: "
        f"{offline['losses'][0]:.4f} vs {live['losses'][0]:.4f}"
    )


if __name__ == "__main__":
    main()

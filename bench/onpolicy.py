"""On-policy distillation: wall time per step split into student generation, teacher scoring
(time blocked on the teacher server) and the update.

python -m bench.onpolicy [--steps 5] [--max-prompts 4] [--max-new-tokens 48]

Starts a vLLM teacher server for --teacher (or uses --teacher-url), writes a small prompt
shard folder (the default data's questions, the teacher view with its demonstrations) under
bench/cache/ if there is none, then runs the real trainer (`python -m train
configs/train/onpolicy.yaml`, lmbda = 1) for --steps steps per setting and reads the split
from its metrics.jsonl. Step 1 (warm-up) is left out. Settings: grad_accum 1 (scoring waits
for the whole batch) and 2 (the second micro-batch is generated while the first is scored).
The student is sampled with Hugging Face `generate` (KV cache); a vLLM student is not built.
Results: bench/results/onpolicy.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from shards.fingerprint import tokenizer_fingerprint, weights_fingerprint
from shards.schema import ShardMetadata
from shards.writer import ShardRow, ShardWriter
from tests.fixtures.teacher_server import TeacherServer
from train.__main__ import main as train_main
from train.teacher_client import TeacherClient

CACHE = Path("bench/cache/onpolicy")


def prompt_shards(folder: Path, data: Path, teacher: str, url: str, n: int, k: int) -> Path:
    """n questions as shard rows: student view Q, teacher view E + Q, the dataset's answer
    scored by the teacher (used only as prompts here, lmbda = 1)."""
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
            q, tq = render(ex["question"]), render(ex["experience"] + "\n\n" + ex["question"])
            answer = tok(str(ex["answer"]), add_special_tokens=False)["input_ids"]
            resp = answer + [tok.eos_token_id]
            s = client.score(tq, resp)
            w.add(ShardRow(ex["id"], q, tq, resp, s.topk_ids, s.topk_logprobs, s.token_logprob))
    client.close()
    return folder


def run_setting(name, url, shards, args, grad_accum: int) -> dict:
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
    ]
    train_main(["configs/train/onpolicy.yaml", *overrides])
    log = [json.loads(line) for line in open(out / "metrics.jsonl")]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the final save: not timed, big
    steps = []
    for prev, r in zip(log, log[1:], strict=False):  # step 1 (warm-up) has no predecessor
        wall = r["time"] - prev["time"]
        steps.append(
            {
                "wall_s": wall,
                "generate_s": r["gen_s"],
                "teacher_wait_s": r["teacher_wait_s"],
                "update_s": wall - r["gen_s"] - r["teacher_wait_s"],
                "tokens": r["tokens"],
            }
        )

    def med(key):
        return statistics.median(s[key] for s in steps)

    summary = {k: med(k) for k in ("wall_s", "generate_s", "teacher_wait_s", "update_s")}
    summary["teacher_share"] = sum(s["teacher_wait_s"] for s in steps) / sum(
        s["wall_s"] for s in steps
    )
    summary["tokens_per_step"] = med("tokens")
    return {"grad_accum": grad_accum, "summary": summary, "steps": steps}


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
    ap.add_argument("--out", default="bench/results/onpolicy.json")
    args = ap.parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    server = None
    if not args.teacher_url:
        server = TeacherServer(
            args.teacher, max_model_len=2048, max_logprobs=args.k, log=CACHE / "server.log"
        ).start()
    url = args.teacher_url or server.url
    try:
        shards = prompt_shards(CACHE / "prompts", Path(args.data), args.teacher, url, 64, args.k)
        settings = {}
        for g in (1, 2):
            settings[f"hf-generate, grad_accum={g}"] = run_setting(f"ga{g}", url, shards, args, g)
    finally:
        if server is not None:
            server.kill()
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
        "vllm_student": "not built",
        "settings": settings,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| student sampler | step s | generate s | teacher wait s | update s | teacher share |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in settings.items():
        s = r["summary"]
        print(
            f"| {name} | {s['wall_s']:.2f} | {s['generate_s']:.2f} | {s['teacher_wait_s']:.2f} "
            f"| {s['update_s']:.2f} | {100 * s['teacher_share']:.0f}% |"
        )


if __name__ == "__main__":
    main()

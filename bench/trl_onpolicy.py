"""TRL's on-policy distillation on the same job as bench/onpolicy.py, for a side-by-side.

python -m bench.trl_onpolicy --student S --teacher T --data train.jsonl --steps N --out F

TRL 1.16's `DistillationTrainer` (on-policy: the student samples every batch, lmbda = 1 in
GKD terms; generalized JSD with `beta`) with the student and the teacher both loaded in
this process by transformers, student sampling with transformers `generate` (TRL's vLLM
colocate mode needs a CUDA device). The prompts are the questions of --data rendered with
the chat template, as kdshards' student view; TRL's teacher sees the same prompt (it has no
separate teacher view). Writes the wall time of every optimizer step to --out. Needs the
dev extra (`pip install trl==1.16.*`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4, help="prompts per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--beta", type=float, default=0.5, help="JSD beta, as loss.beta")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    # trl is in the dev extra only; it and its companions load in this worker process only.
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    rows = [json.loads(line) for line in open(args.data)]
    n = args.steps * args.batch * args.grad_accum
    prompts = [[{"role": "user", "content": r["question"]}] for r in (rows * n)[:n]]
    tok = AutoTokenizer.from_pretrained(args.student)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)

    marks: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if not marks:
                marks.append(time.monotonic())

        def on_step_end(self, a, state, control, **kw):
            marks.append(time.monotonic())

    out_dir = Path(args.out).parent / "trl-run"
    config = DistillationConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        beta=args.beta,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        shuffle_dataset=False,
        dataloader_num_workers=0,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tok,
        callbacks=[StepTimes()],
    )
    trainer.train()
    steps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    Path(args.out).write_text(json.dumps({"trainer": "DistillationTrainer", "step_s": steps}))


if __name__ == "__main__":
    main()

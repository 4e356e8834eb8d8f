"""The trainer's load-time cost for teacher-vocabulary rows (train/crosstok_rows.py), one core.

    python -m bench.crosstok_load --student-tokenizer DIR [--teacher-tokenizer DIR]
        [--rows 200] [--k 32]

Rows are built in memory as a teacher-vocabulary folder holds them (the teacher's ids of a
response text, their byte spans, a random top-k: the cost does not depend on the values), the
texts being the tiny model's corpus lines joined into responses of about 150 teacher tokens.
Reported: teacher response tokens per second per core for the whole conversion of a row
(student chat template + exact encoding + alignment + chain-rule blocks + top-k mapping), and
the share of student tokens that are one to one. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student-tokenizer", required=True)
    ap.add_argument("--teacher-tokenizer", default="models/smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args(argv)
    os.environ["RAYON_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from crosstok.tokens import token_table
    from tests.fixtures.tiny_model import _CORPUS_TEXT
    from train.crosstok_rows import KIND_MAPPED, CrossTokRows

    teacher = AutoTokenizer.from_pretrained(args.teacher_tokenizer)
    student = AutoTokenizer.from_pretrained(args.student_tokenizer)
    t0 = time.perf_counter()
    convert = CrossTokRows("bench", teacher, student)
    setup = time.perf_counter() - t0
    table = token_table(teacher)
    lines = [x for x in _CORPUS_TEXT.splitlines() if x.strip()]
    rng = np.random.default_rng(0)
    rows, tokens = [], 0
    for i in range(args.rows):
        text = " ".join(rng.choice(lines, 8))
        ids = teacher(text, add_special_tokens=False).input_ids
        ends = np.cumsum(table.lengths[ids])
        spans = np.stack([np.concatenate([[0], ends[:-1]]), ends], 1).tolist()
        top = np.stack([rng.choice(table.vocab_size, args.k, replace=False) for _ in ids])
        lp = np.sort(rng.standard_normal((len(ids), args.k)).astype(np.float32) - 6, 1)
        ct = {"prompt_messages": [{"role": "user", "content": f"Question {i}?"}]}
        ct.update(thinking=None, response_text=text, token_bytes=spans)
        rows.append(
            {
                "id": str(i),
                "meta": json.dumps({"crosstok": ct}),
                "response_ids": torch.tensor(ids),
                "teacher_prompt_ids": torch.zeros(1, dtype=torch.long),
                "topk_ids": torch.from_numpy(top),
                "topk_logprobs": torch.from_numpy(lp),
                "tail_logprob": torch.full((len(ids),), -1.0),
                "token_logprob": torch.from_numpy(lp[:, -1].copy()),
            }
        )
        tokens += len(ids)
    best, one, total = float("inf"), 0, 0
    for _ in range(3):
        t0 = time.perf_counter()
        out = [convert(r) for r in rows]
        best = min(best, time.perf_counter() - t0)
    for r in out:
        one += int((r["ct_kind"] == KIND_MAPPED).sum())
        total += len(r["ct_kind"])
    print(
        json.dumps(
            {
                "teacher": args.teacher_tokenizer,
                "student": args.student_tokenizer,
                "rows": args.rows,
                "teacher_tokens": tokens,
                "k": args.k,
                "setup_s (token tables + vocabulary map)": round(setup, 2),
                "teacher_tokens_per_s_per_core": round(tokens / best),
                "rows_per_s_per_core": round(args.rows / best),
                "student_one_to_one_share": round(one / total, 4),
                "vocabulary_mapped_share": round(convert.mapped_vocab, 4),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

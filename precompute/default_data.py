"""The demo's data set, generated offline: arithmetic questions with checkable answers.

    python -m precompute.default_data [--out data/default] [--train 256] [--test 300] [--val 64]
        [--experience qa|inline|solution]
    python -m precompute.default_data --measure [--task gsm_symbolic] [--n 100]

Questions come from reasoning-gym (`basic_arithmetic` by default: two terms of one or two
digits, + - *, small enough for a 135M teacher). train.jsonl, the held-out test.jsonl
(evaluation) and val.jsonl (the trainer's held-out loss) have disjoint questions. Each row
carries an `experience`: three worked demonstrations (drawn from a disjoint pool), which
the teacher sees before the question (configs/demo/precompute.yaml:
view.experience_position=prefix) and the student never sees. `--measure` runs the teacher
greedily on held-out questions without experience and with each experience style and
position, and reports reasoning-gym's mean score of each (numbers in docs/precompute.md).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from precompute.config import ViewConfig
from precompute.views import teacher_messages
from vllm_engine.generate import generate, start_llm

TASKS = {
    # Two terms, one or two digits, no parentheses or negation: a 135M model gets some right.
    "basic_arithmetic": dict(
        min_terms=2,
        max_terms=2,
        min_digits=1,
        max_digits=2,
        operators=("+", "-", "*"),
        allow_parentheses=False,
        allow_negation=False,
    ),
    "gsm_symbolic": {},
}
DEMOS = 3
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def solution(task: str, item: dict) -> str:
    """A worked answer in the format the demonstrations teach: reasoning, then the number."""
    if task == "basic_arithmetic":
        expr = item["metadata"]["expression"]
        return f"{expr} = {item['answer']}. The answer is {item['answer']}."
    cot = item["metadata"].get("answer_cot", "").strip()
    return f"{cot}\nThe answer is {item['answer']}."


STYLES = ("qa", "inline", "solution")


def experience(task: str, demos: list[dict], style: str = "qa") -> str:
    """Worked demonstrations as teacher-only text.

    qa: "Question: ... / Answer: ..." blocks; inline: one instruction and one solved
    example per line (see docs/precompute.md for what each does to the teacher's accuracy);
    solution: `demos` is the question itself and the text is its worked solution, the
    privileged information of self-distillation (make demo-onpolicy): the teacher knows the
    answer and the student, which never sees it, must learn to find it.
    """
    if style == "solution":
        (item,) = demos
        return (
            "A worked solution of the question you will be asked: "
            f"{solution(task, item)} Answer the same way, ending with 'The answer is N.'"
        )
    if style == "qa":
        shots = "\n\n".join(
            f"Question: {d['question']}\nAnswer: {solution(task, d)}" for d in demos
        )
        return (
            "You solve math questions. Work it out, then end with 'The answer is N.' "
            f"Solved examples:\n\n{shots}"
        )
    shots = "\n".join(f"- {d['question']} {solution(task, d)}" for d in demos)
    return (
        "Answer with the calculation and then 'The answer is N.', in one line. "
        f"Solved examples:\n{shots}"
    )


def extract_answer(text: str) -> str:
    """The number after the first 'answer is', else the last number in the text."""
    m = re.search(r"answer is\s*(" + NUMBER.pattern + ")", text, flags=re.I)
    if m:  # the first one: a small model may go on to invent more questions
        return m.group(1).replace(",", "").rstrip(".")
    nums = NUMBER.findall(text)
    return nums[-1].replace(",", "").rstrip(".") if nums else ""


def make_items(task: str, n: int, seed: int) -> list[dict]:
    import reasoning_gym  # imports every task it has (seconds): only the data commands need it

    ds = reasoning_gym.create_dataset(task, size=n, seed=seed, **TASKS[task])
    return [ds[i] for i in range(len(ds))]


def build_splits(
    task: str,
    train: int,
    test: int,
    seed: int,
    demo_pool: int = 64,
    style: str = "qa",
    val: int = 0,
) -> dict[str, list[dict]]:
    """{"train", "test", "val"} rows: disjoint questions, each with its own demonstrations.

    The train questions do not depend on the test and val sizes (they come first)."""
    items = make_items(task, 3 * (train + test + val + demo_pool), seed)
    unique, seen = [], set()
    for it in items:  # small arithmetic repeats itself: keep each question once
        if it["question"] not in seen:
            seen.add(it["question"])
            unique.append(it)
    if len(unique) < train + test + val + demo_pool:
        raise ValueError(f"{task}: only {len(unique)} distinct questions")
    rng = random.Random(seed)
    rng.shuffle(unique)
    demos = unique[:demo_pool]
    splits = {
        "train": unique[demo_pool : demo_pool + train],
        "test": unique[demo_pool + train : demo_pool + train + test],
        "val": unique[demo_pool + train + test : demo_pool + train + test + val],
    }
    out = {}
    for name, part in splits.items():
        rows = []
        for i, it in enumerate(part):
            shots = (
                [it]
                if style == "solution"
                else random.Random(f"{seed}:{name}:{i}").sample(demos, DEMOS)
            )
            rows.append(
                {
                    "id": f"{task}-{name}-{i:05d}",
                    "question": it["question"],
                    "experience": experience(task, shots, style),
                    "answer": it["answer"],
                    "task": task,
                    "metadata": json.dumps(it["metadata"], default=str),
                }
            )
        out[name] = rows
    return out


def write(
    out: Path, task: str, train: int, test: int, seed: int, val: int = 0, style: str = "qa"
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # Generated, never committed: the folder ignores itself.
    (out / ".gitignore").write_text("*\n")
    splits = build_splits(task, train, test, seed, val=val, style=style)
    for name, rows in splits.items():
        if not rows:
            continue
        tmp = out / f".{name}.jsonl.tmp"
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        tmp.replace(out / f"{name}.jsonl")
    sizes = ", ".join(f"{len(rows)} {name}" for name, rows in splits.items() if rows)
    print(f"wrote {sizes} questions ({task}) to {out}")


def score(task: str, row: dict, response: str) -> float:
    import reasoning_gym  # see make_items

    ds = reasoning_gym.create_dataset(task, size=1, seed=0, **TASKS[task])
    entry = {
        "question": row["question"],
        "answer": row["answer"],
        "metadata": json.loads(row["metadata"]),
    }
    return float(ds.score_answer(extract_answer(response), entry))


def measure(task: str, n: int, seed: int, teacher: str, max_tokens: int, train: int) -> dict:
    """Teacher accuracy (greedy, vLLM) on n held-out questions, with and without experience."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    # The held-out split's first n questions, with each experience style and position.
    llm = start_llm(teacher, {"max_model_len": 2048, "seed": 0})  # the device's dtype
    result = {"task": task, "n": n, "teacher": teacher, "max_tokens": max_tokens}
    variants = [("without", None, None)] + [
        (f"{style}_{pos}", style, pos) for style in STYLES for pos in ("system", "prefix")
    ]
    for name, style, pos in variants:
        test = build_splits(task, train, n, seed, style=style or "qa")["test"]
        prompts = []
        for r in test:
            view = ViewConfig(experience_position=pos or "system")
            msgs = teacher_messages(
                [{"role": "user", "content": r["question"]}],
                r["experience"] if style else "",
                view,
            )
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            prompts.append(tok(text, add_special_tokens=False)["input_ids"])
        outs = generate(llm, prompts, max_tokens, 0.0, 0, progress=False)
        texts = [text for _, text in outs]
        acc = sum(score(task, r, t) for r, t in zip(test, texts, strict=True)) / n
        result[name] = {
            "accuracy": acc,
            "first_response": texts[0],
            "mean_tokens": sum(len(ids) for ids, _ in outs) / n,
        }
        print(f"{task} {name}: accuracy {acc:.2f}", file=sys.stderr, flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="data/default", type=Path)
    p.add_argument("--task", default="basic_arithmetic", choices=sorted(TASKS))
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--test", type=int, default=300, help="held-out questions for evaluation")
    p.add_argument("--val", type=int, default=64, help="held-out questions for the eval loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--experience",
        default="qa",
        choices=STYLES,
        help="teacher-only text: demonstrations (qa, inline) or the question's own solution",
    )
    p.add_argument("--measure", action="store_true", help="teacher accuracy with/without")
    p.add_argument("--n", type=int, default=100, help="--measure: questions")
    p.add_argument("--teacher", default="models/smollm2-135m-instruct")
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args(argv)
    if args.measure:
        res = measure(args.task, args.n, args.seed, args.teacher, args.max_tokens, args.train)
        print(json.dumps(res, indent=1))
        return 0
    write(args.out, args.task, args.train, args.test, args.seed, args.val, args.experience)
    return 0


if __name__ == "__main__":
    sys.exit(main())

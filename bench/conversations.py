"""Scoring multi-turn conversations: one teacher pass per conversation against one per turn.

    python -m bench.conversations [--teacher models/smollm2-135m-instruct]
        [--conversations 200] [--turns 8 16] [--k 64] [--backend vllm] [--layers N]
        [--out bench/results/conversations.json]

Data: --conversations synthetic household-agent episodes (ALFWorld-style: a system message,
the task and first observation as the user's turn, then action / observation turns), each
with a number of assistant turns drawn uniformly from --turns, seeded (`episodes`).

Both arms run precompute's own `run()` in score mode on the same engine (started once,
untimed), with the same teacher, k and engine window:

* conversation: the episodes as `messages` rows: every assistant turn is a trained span, and
  the whole conversation is teacher-forced in one engine pass (precompute's conversation path);
* per turn: what a user had to do before: one `prompt_completion` row per assistant turn, the
  conversation up to that turn as the prompt and the turn as the completion, so each turn is
  a pass over its whole history (quadratic in the length).

--layers N scores with a copy of the teacher cut to its first N layers (same tokenizer,
vocabulary and chat template, so the same tokens and spans; less compute per token): on this
2-core machine the 30-layer SmolLM2-135M runs about 300 prompt tokens/s with top-64
logprobs, and the per-turn arm of 200 episodes is about 0.9M tokens.

Teacher tokens processed: the prompt and response tokens handed to the engine's `score`
(counted by wrapping the backend). vLLM computes prompt logprobs over every token of a
request; it does not serve a request that asks for prompt logprobs from its prefix cache, so
every token handed over is a token run through the model. Wall time: `run()` start to end
(rendering, engine, top-k, shard writing), engine start excluded. Also reported: the two
arms' top-k on the trained tokens, compared token by token (`compare`), which checks that one
pass gives what the per-turn passes give.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, TEACHER_DIR, header, log, write_result

DEFAULT_OUT = RESULTS / "conversations.json"

ROOMS = ("kitchen", "living room", "bathroom", "bedroom", "garage", "pantry")
PLACES = (
    "countertop 1", "countertop 2", "cabinet 1", "cabinet 3", "drawer 2", "shelf 1",
    "sinkbasin 1", "fridge 1", "table 1", "sofa 1", "dresser 1", "bed 1", "garbagecan 1",
)  # fmt: skip
OBJECTS = (
    "mug", "apple", "book", "pencil", "towel", "soapbar", "knife", "plate", "cd", "keychain",
    "pillow", "remotecontrol", "spraybottle", "lettuce", "egg", "tomato", "vase", "watch",
)  # fmt: skip
SYSTEM = (
    "You are a household agent. Each turn you see what happened; reply with exactly one "
    "action: go to X, open X, close X, take X from Y, put X in/on Y, use X, examine X."
)


def _seen(rng: random.Random) -> str:
    things = rng.sample(OBJECTS, rng.randint(1, 4))
    return ", ".join(f"a {t} {rng.randint(1, 3)}" for t in things)


def episode(index: int, turns: int, seed: int) -> list[dict]:
    """One synthetic episode of `turns` assistant turns (messages format)."""
    rng = random.Random(seed * 1_000_003 + index)
    obj, goal = rng.choice(OBJECTS), rng.choice(PLACES)
    room = rng.choice(ROOMS)
    around = ", ".join(rng.sample(PLACES, 6))
    msgs = [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": f"You are in the middle of a {room}. Looking quickly around you, you "
            f"see {around}.\nYour task is to: put a clean {obj} in {goal}.",
        },
    ]
    for t in range(turns):
        place = rng.choice(PLACES)
        kind = rng.random()
        if t == turns - 1:
            action, obs = f"put {obj} 1 in/on {goal}", f"You put the {obj} 1 in/on the {goal}."
        elif kind < 0.5:
            action = f"go to {place}"
            obs = f"You arrive at {place}. On the {place}, you see {_seen(rng)}."
        elif kind < 0.7:
            action = f"open {place}"
            obs = f"You open the {place}. The {place} is open. In it, you see {_seen(rng)}."
        elif kind < 0.85:
            action = f"take {obj} 1 from {place}"
            obs = f"You pick up the {obj} 1 from the {place}."
        else:
            action = f"examine {place}"
            obs = f"On the {place}, you see {_seen(rng)}. Nothing happens."
        msgs.append({"role": "assistant", "content": action})
        if t < turns - 1:
            msgs.append({"role": "user", "content": obs})
    return msgs


def write_inputs(folder: Path, n: int, turns: tuple[int, int], seed: int) -> tuple[Path, Path]:
    """The episodes as one `messages` file and as one `prompt_completion` file of turns."""
    conv, per_turn = folder / "conversations.jsonl", folder / "per_turn.jsonl"
    rng = random.Random(seed)
    with open(conv, "w") as fc, open(per_turn, "w") as ft:
        for i in range(n):
            msgs = episode(i, rng.randint(*turns), seed)
            fc.write(json.dumps({"id": f"ep{i}", "messages": msgs}) + "\n")
            for j, m in enumerate(msgs):
                if m["role"] == "assistant":
                    row = {"id": f"ep{i}-{j}", "prompt": msgs[:j], "completion": [m]}
                    ft.write(json.dumps(row) + "\n")
    return conv, per_turn


class Counting:
    """A backend that counts the tokens handed to `score` (and passes everything on)."""

    def __init__(self, backend):
        self.backend, self.tokens, self.calls = backend, 0, 0

    def score(self, prompts, responses):
        self.calls += 1
        self.tokens += sum(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
        return self.backend.score(prompts, responses)

    def __getattr__(self, name):
        return getattr(self.backend, name)


def run_arm(name: str, data: Path, out: Path, args, backend) -> dict:
    from precompute.config import load_config
    from precompute.run import run

    cfg = load_config(
        None,
        [
            f"teacher={args.teacher}",
            f"data.path={data}",
            f"out={out}",
            f"k={args.k}",
            "mode=score",
            f"backend={args.backend}",
            "progress=false",
            *([f"engine.max_model_len={args.max_model_len}"] if args.backend == "vllm" else []),
        ],
    )
    counting = Counting(backend)
    t = time.perf_counter()
    summary = run(cfg, backend=counting, log=lambda m: log(f"[{name}] {m}"))
    wall = time.perf_counter() - t
    return {
        "rows": summary.rows,
        "trained_tokens": summary.tokens,
        "teacher_tokens": counting.tokens,
        "engine_calls": counting.calls,
        "wall_s": round(wall, 2),
        "engine_s": round(summary.engine_s, 2),
    }


def compare(conv_out: Path, turn_out: Path) -> dict:
    """The per-turn rows' top-k against the conversation rows' spans, token by token: same
    target token, same top-1, same top-k set, and the total variation distance between the
    two top-k distributions (0.5 * sum over the union of ids of |p_a - p_b|, an id missing
    from one top-k counting as 0 there). Probabilities, not logprobs: the codebook's levels
    are coarse far in the tail (docs/shard-format.md), where a tiny difference in the engine's
    value can move a stored logprob of -20 by a whole level."""
    import torch

    from shards.reader import read_rows

    conv = {r["id"]: r for r in read_rows(conv_out)}
    out = {"tokens_compared": 0, "same_token": 0, "top1_equal": 0, "topk_set_equal": 0}
    tv_all = []
    for r in read_rows(turn_out):
        episode_id, turn = r["id"].rsplit("-", 1)
        c = conv[episode_id]
        # Spans are in message order, one per assistant turn: this turn's is the index of
        # its message among the assistant messages.
        assistants = [j for j, role in enumerate(c["turn_roles"]) if role == "assistant"]
        span = assistants.index(int(turn))
        offset = int(c["span_lengths"][:span].sum())
        n = min(len(r["response_ids"]), int(c["span_lengths"][span]))
        ids_a, ids_b = r["topk_ids"][:n].long(), c["topk_ids"][offset : offset + n].long()
        resp_c = c["response_ids"][int(c["span_starts"][span]) - len(c["prompt_ids"]) :][:n]
        out["same_token"] += int((r["response_ids"][:n] == resp_c).sum())
        # Top-k ids are stored as a set, in the file's rank order (shards/codec.py): the
        # top-1 is the id of the largest logprob, not the first column.
        top_a = ids_a.gather(1, r["topk_logprobs"][:n].argmax(dim=1, keepdim=True))
        top_b = ids_b.gather(1, c["topk_logprobs"][offset : offset + n].argmax(dim=1, keepdim=True))
        out["top1_equal"] += int((top_a == top_b).sum())
        out["topk_set_equal"] += int(
            (ids_a.sort(dim=1).values == ids_b.sort(dim=1).values).all(dim=1).sum()
        )
        vocab = int(max(ids_a.max(), ids_b.max())) + 1
        pa = torch.zeros(n, vocab).scatter_(1, ids_a, r["topk_logprobs"][:n].double().exp().float())
        pb = torch.zeros(n, vocab).scatter_(
            1, ids_b, c["topk_logprobs"][offset : offset + n].double().exp().float()
        )
        tv_all.append(0.5 * (pa - pb).abs().sum(dim=1))
        out["tokens_compared"] += n
    tv = torch.cat(tv_all) if tv_all else torch.zeros(0)
    out["tv_max"] = round(float(tv.max()), 5) if len(tv) else 0.0
    out["tv_mean"] = float(f"{float(tv.mean()):.3g}") if len(tv) else 0.0
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default=str(TEACHER_DIR))
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--turns", type=int, nargs=2, default=(8, 16), metavar=("MIN", "MAX"))
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--backend", choices=("vllm", "hf"), default="vllm")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=0, help="teacher cut to N layers (0: whole)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    result = header("bench.conversations", argv)
    teacher_name = Path(args.teacher).name + (
        f" (first {args.layers} layers)" if args.layers else ""
    )
    with tempfile.TemporaryDirectory(prefix="kd-bench-conv-") as tmp:
        tmp = Path(tmp)
        conv, per_turn = write_inputs(tmp, args.conversations, tuple(args.turns), args.seed)
        if args.layers:
            args.teacher = cut_teacher(args.teacher, args.layers, tmp / "teacher")
        log(f"[bench] {args.conversations} episodes; starting the {args.backend} teacher")
        backend = start_backend(args)
        try:
            arms = {
                "conversation": run_arm("conversation", conv, tmp / "conv", args, backend),
                "per_turn": run_arm("per_turn", per_turn, tmp / "turns", args, backend),
            }
        finally:
            backend.close()
        agreement = compare(tmp / "conv", tmp / "turns")
    c, t = arms["conversation"], arms["per_turn"]
    result.update(
        {
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "teacher")},
            "teacher": teacher_name,
            "arms": arms,
            "teacher_token_ratio": round(t["teacher_tokens"] / c["teacher_tokens"], 2),
            "wall_ratio": round(t["wall_s"] / c["wall_s"], 2),
            "agreement": agreement,
        }
    )
    print("| arm | rows | trained tokens | teacher tokens | engine calls | wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, a in arms.items():
        print(
            f"| {name} | {a['rows']} | {a['trained_tokens']} | {a['teacher_tokens']} | "
            f"{a['engine_calls']} | {a['wall_s']} |"
        )
    print(
        f"per turn / conversation: {result['teacher_token_ratio']}x teacher tokens, "
        f"{result['wall_ratio']}x wall; of {agreement['tokens_compared']} trained tokens: "
        f"{agreement['same_token']} same token, {agreement['top1_equal']} same top-1, "
        f"{agreement['topk_set_equal']} same top-k set; total variation between the two "
        f"top-k distributions mean {agreement['tv_mean']}, max {agreement['tv_max']}"
    )
    print(f"wrote {write_result(args.out, result)}", file=sys.stderr)
    return 0


def cut_teacher(teacher: str, layers: int, folder: Path) -> str:
    """A copy of `teacher` with its first `layers` layers (tokenizer files copied as they are)."""
    import shutil

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype="float32")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.save_pretrained(folder)
    for f in Path(teacher).iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens", "generation")):
            shutil.copy(f, folder / f.name)
    return str(folder)


def start_backend(args):
    if args.backend == "vllm":
        from vllm_engine.teacher import VLLMBackend

        engine = {"seed": 0, "max_model_len": args.max_model_len}
        return VLLMBackend(args.teacher, args.k, engine, False)
    from precompute.hf_backend import HFBackend

    return HFBackend(args.teacher, args.k, "float32", "cpu", 8)


if __name__ == "__main__":
    sys.exit(main())

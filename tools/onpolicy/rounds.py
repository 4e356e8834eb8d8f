"""On-policy rounds, the offline form of on-policy distillation: every round is data.

    python -m tools.onpolicy.rounds --rounds R --teacher T --student S --data Q.jsonl --work DIR
    (make onpolicy-rounds ROUNDS=R TEACHER=T STUDENT=S DATA=Q.jsonl WORK=DIR)

Round r (1-based) runs four stages (tools/stages.py), each printed before it runs:

1. samples: the current student (S in round 1, then the final checkpoint of round r-1)
   generates responses to the student view Q with vLLM (`python -m precompute` in generate
   mode, `teacher=` the student's folder, `generator_view=student`, k=1: the student's own
   top-k is not needed);
2. responses (in this process): those samples become a score-mode input file, each
   response as its exact token ids (`score.response_ids_field`, no re-tokenization), beside
   the example's messages, experience and answer;
3. shards: the teacher scores the samples on the teacher view Q+E (`python -m precompute`
   in score mode, `source=student`); the metadata's `extra.tags` records the round and the
   student's folder and weights fingerprint;
4. train: `python -m train` from the student of step 1 on this round's shards, mixed (see
   train/mixture.py) with the earlier rounds' shards (`--previous-weight`, split evenly) and
   the teacher's own shards (`--teacher-shards`, `--teacher-weight`): the offline analogue
   of on-policy's lmbda. Each round is a fresh run of `--steps` steps in its own folder,
   starting from the previous round's weights (a fresh optimizer state per round).

Episodes (`--env-config ENV.yaml [--experience EXP.json]` instead of --data; the fold must
be train): round r's steps are episodes (the student plays the game's seeds, `--n` episodes
each: tools/onpolicy/episodes.py), views (the episodes as precompute's two files, the student
view and the teacher's with the experience, joined by Episode.id), shards (the teacher
scores each whole episode in one pass, every action a trained span; rows carry the episode's
id, sample and record, metadata extra["env"] and extra["experience"] as a teacher rollout's)
and train, as
above. docs/onpolicy.md, "Episodes in an environment".

Resume: `DIR/rounds.json` (the stage runner's state, written atomically and durably) lists
the finished stages, round-RRR/<step>; a re-run skips them, so a finished round is never
redone, and continues the interrupted step with the step's own resume: precompute skips the
examples of committed files, train continues from its latest checkpoint (resume=true).
Nothing is lost or duplicated. Re-running with a larger --rounds adds rounds; other settings
than the first run's are refused. A command's whole process tree (precompute's workers,
vLLM's EngineCore) dies with this process, kill -9 included, so a re-run never runs beside
a leftover of the killed one.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from functools import partial
from pathlib import Path

from envs.config import env_record
from envs.experience import load_experience
from precompute.config import load_config
from precompute.inputs import read_examples
from shards.fingerprint import weights_fingerprint
from shards.reader import read_rows
from tools.onpolicy.episodes import load_env_config, write_views
from tools.stages import Runner, Stage, later, write_durably
from train.checkpoint import latest_model_dir

PY = sys.executable
STATE = "rounds.json"
DEMO_PRECOMPUTE = "configs/demo/precompute.yaml"
# Episode rounds' own settings: in the state file only when given, so that the state files
# of prompt rounds made before them still match.
ENV_IDENTITY = ("env_config", "experience", "episodes_args")
# Settings that decide what the rounds produce: a re-run must use the same ones.
IDENTITY = (
    "teacher",
    "student",
    "data",
    "train_config",
    "precompute_config",
    "steps",
    "n",
    "max_tokens",
    "temperature",
    "k",
    "seed",
    "teacher_shards",
    "teacher_weight",
    "previous_weight",
    "backend",
    "precompute_args",
    "train_args",
)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m tools.onpolicy.rounds", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--rounds", type=int, required=True, help="rounds to have finished")
    ap.add_argument("--teacher", required=True, help="teacher model folder (scores on Q+E)")
    ap.add_argument("--student", required=True, help="initial student model folder (not LoRA)")
    ap.add_argument(
        "--data", default="", help="prompts: a precompute input (question, ...); or --env-config"
    )
    ap.add_argument("--work", required=True, help="folder of the rounds' shards, runs, state")
    ap.add_argument("--train-config", default="configs/train/jsd.yaml", help="KD method YAML")
    ap.add_argument(
        "--env-config",
        default="",
        help="episodes instead of prompts: YAML of envs.config.EnvConfig fields (train fold)",
    )
    ap.add_argument(
        "--experience",
        default="",
        help="with --env-config: the teacher's experience file (envs.experience); '': none",
    )
    ap.add_argument(
        "--episodes-args",
        default="",
        help="with --env-config: more tools.onpolicy.episodes options, e.g. '--engine "
        "max_model_len=4096 --batch-size 8'",
    )
    ap.add_argument(
        "--precompute-config",
        default=None,
        help=f"precompute YAML ('': none; default {DEMO_PRECOMPUTE}, with --env-config none)",
    )
    ap.add_argument("--steps", type=int, default=20, help="training steps per round")
    ap.add_argument("--n", type=int, default=1, help="student samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=128, help="student response length limit")
    ap.add_argument("--temperature", type=float, default=1.0, help="student sampling")
    ap.add_argument("--k", type=int, default=64, help="teacher top-k per token")
    ap.add_argument("--seed", type=int, default=0, help="round r samples with seed + r")
    ap.add_argument("--teacher-shards", default="", help="the teacher's own shards, to mix in")
    ap.add_argument("--teacher-weight", type=float, default=0.0, help="their mixture weight")
    ap.add_argument(
        "--previous-weight",
        type=float,
        default=0.0,
        help="mixture weight of the earlier rounds' shards (split evenly); this round's is 1",
    )
    ap.add_argument("--backend", default="vllm", choices=["vllm", "hf"], help="precompute engine")
    ap.add_argument(
        "--precompute-args",
        default="",
        help="key=value for both precompute steps (data.* ones: the samples step only)",
    )
    ap.add_argument("--train-args", default="", help="key=value for every round's training")
    return ap


def round_dir(work: Path, r: int) -> Path:
    return work / f"round-{r:03d}"


def student_of(args, work: Path, r: int) -> Path:
    """Round r's sampler: the initial student, then the final checkpoint of round r-1."""
    if r == 1:
        return Path(args.student)
    model = latest_model_dir(round_dir(work, r - 1) / "train")
    if model is None:
        raise SystemExit(f"round {r - 1} is marked finished but has no checkpoint")
    return model


def split_args(text: str) -> tuple[list[str], list[str]]:
    """(data.* overrides, the others) of a precompute argument string."""
    items = shlex.split(text)
    return [a for a in items if a.startswith("data.")], [
        a for a in items if not a.startswith("data.")
    ]


def write_responses(args, samples: Path, out: Path) -> int:
    """The samples as a score-mode input: one row per sample, its token ids exact."""
    # transformers takes seconds to import: only this stage needs it, not --help or the others
    from transformers import AutoTokenizer

    data_args, _ = split_args(args.precompute_args)
    cfg = load_config(precompute_config(args) or None, [f"data.path={args.data}", *data_args])
    examples = {ex.id: ex for ex in read_examples(cfg.data, "generate")[0]}
    tok = AutoTokenizer.from_pretrained(args.teacher)
    rows = sorted(read_rows(samples, verify="full"), key=lambda r: (r["id"], r["sample_index"]))
    lines = []
    for row in rows:
        ex = examples[row["id"]]
        ids = [int(i) for i in row["response_ids"]]
        text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        lines.append(
            json.dumps(
                {
                    "id": f"{ex.id}#s{row['sample_index']}",
                    "messages": list(ex.messages),
                    "experience": ex.experience or "",
                    "answer": ex.answer,
                    # For people and for the input check only (it must not be blank): the
                    # teacher scores response_ids as they are.
                    "response": text if text.strip() else f"<{len(ids)} token ids>",
                    "response_ids": ids,
                },
                ensure_ascii=False,
            )
        )
    write_durably(out, "".join(line + "\n" for line in lines))
    print(f"{len(lines)} samples -> {out}", flush=True)
    return len(lines)


def mixture(args, work: Path, r: int) -> str:
    """data.shards of round r: this round's shards, earlier rounds', the teacher's."""
    parts = [(round_dir(work, r) / "shards", 1.0)]
    if args.previous_weight > 0 and r > 1:
        parts += [
            (round_dir(work, p) / "shards", args.previous_weight / (r - 1)) for p in range(1, r)
        ]
    if args.teacher_shards and args.teacher_weight > 0:
        parts.append((Path(args.teacher_shards), args.teacher_weight))
    if len(parts) == 1:
        return str(parts[0][0])
    return ",".join(f"{p}:{w:.6g}" for p, w in parts)


def precompute_config(args) -> str:
    """--precompute-config, or its default: the demo's for prompts, none for episodes."""
    if args.precompute_config is not None:
        return args.precompute_config
    return "" if args.env_config else DEMO_PRECOMPUTE


def settings(args) -> dict:
    out = {k: getattr(args, k) for k in IDENTITY}
    out["precompute_config"] = precompute_config(args)
    return {**out, **{k: getattr(args, k) for k in ENV_IDENTITY if getattr(args, k)}}


def round_stages(args, work: Path, r: int) -> list[Stage]:
    if args.env_config:
        return episode_round_stages(args, work, r)
    return prompt_round_stages(args, work, r)


def prompt_round_stages(args, work: Path, r: int) -> list[Stage]:
    """Round r's four stages, named round-RRR/<step>. The sampler of a round after the
    first is the previous round's final checkpoint: a `later` argument, found when the
    stage starts."""
    d = round_dir(work, r)

    def sampler() -> Path:  # known once round r-1 has trained
        return student_of(args, work, r)

    student = later(sampler)
    _, common = split_args(args.precompute_args)
    first = [args.student] if r == 1 else [round_dir(work, r - 1) / "train"]
    return [
        Stage(
            f"{d.name}/samples", f"round {r}: the student samples its responses to Q",
            cmd=[PY, "-m", "precompute", "--mode", "generate", "--backend", args.backend,
                 "--config", precompute_config(args), "--teacher", student,
                 "--student", student, "--data", args.data, "--out", d / "samples",
                 "--k", "1", "--n", str(args.n), "--no-progress", "generator_view=student",
                 "source=student", f"sampling.max_tokens={args.max_tokens}",
                 f"sampling.temperature={args.temperature}", f"sampling.seed={args.seed + r}",
                 f"tags.round={r}", *shlex.split(args.precompute_args)],
            inputs=[args.data, *first], outputs=[d / "samples"],
        ),
        Stage(
            f"{d.name}/responses", f"round {r}: the samples become the teacher's input",
            fn=partial(write_responses, args, d / "samples", d / "responses.jsonl"),
            inputs=[d / "samples"], outputs=[d / "responses.jsonl"],
        ),
        Stage(
            f"{d.name}/shards", f"round {r}: the teacher scores the samples on Q+E",
            cmd=[PY, "-m", "precompute", "--mode", "score", "--backend", args.backend,
                 "--config", precompute_config(args), "--teacher", args.teacher,
                 "--student", student,
                 "--data", d / "responses.jsonl", "--out", d / "shards",
                 "--k", str(args.k), "--no-progress", "source=student",
                 "score.response_ids_field=response_ids", "score.append_eos=false",
                 "data.id_field=id", "data.messages_field=messages",
                 "data.experience_field=experience", "data.answer_field=answer",
                 "data.response_field=response", f"tags.round={r}",
                 later(lambda: f"tags.student={sampler()}"),
                 later(lambda: f"tags.student_fingerprint={weights_fingerprint(sampler())}"),
                 *common],
            inputs=[d / "responses.jsonl"], outputs=[d / "shards"],
        ),
        train_stage(args, work, r, sampler, "the scored samples"),
    ]  # fmt: skip


def train_stage(args, work: Path, r: int, sampler, what: str) -> Stage:
    """Round r's training: from round r's sampler, on its shards mixed with the others."""
    d = round_dir(work, r)
    return Stage(
        f"{d.name}/train", f"round {r}: the student trains on {what}",
        cmd=[PY, "-m", "train", args.train_config,
             later(lambda: f"model.path={sampler()}"),
             f"data.shards={mixture(args, work, r)}", f"out_dir={d / 'train'}",
             f"max_steps={args.steps}", f"seed={args.seed + r}", "resume=true",
             "onpolicy.teacher_url=",  # offline: the teacher's scores are in the shards
             *shlex.split(args.train_args)],
        inputs=[d / "shards"], outputs=[d / "train"],
    )  # fmt: skip


def env_tags(args) -> tuple[str, str]:
    """tags.env and tags.experience of an episodes round's shards (YAML flow values): the
    game, its params, fold and step limit; the experience's source (null: none). Precompute
    records them as a rollout's metadata does, as extra["env"] and extra["experience"]."""
    env = env_record(load_env_config(args.env_config))
    source = load_experience(args.experience).source if args.experience else None
    return f"tags.env={json.dumps(env)}", f"tags.experience={json.dumps(source)}"


def episode_round_stages(args, work: Path, r: int) -> list[Stage]:
    """Round r of episodes: the student plays (tools/onpolicy/episodes.py), its episodes
    become the two views' files, the teacher scores each whole episode in its view
    (precompute score mode, two files, one pass per episode), the student trains."""
    d = round_dir(work, r)

    def sampler() -> Path:
        return student_of(args, work, r)

    student = later(sampler)
    first = [args.student] if r == 1 else [round_dir(work, r - 1) / "train"]
    experience = load_experience(args.experience) if args.experience else None
    return [
        Stage(
            f"{d.name}/episodes", f"round {r}: the student plays its episodes",
            cmd=[PY, "-m", "tools.onpolicy.episodes", "--model", student,
                 "--env-config", args.env_config, "--out", d / "episodes.jsonl",
                 "--backend", args.backend, "--samples", str(args.n),
                 "--max-tokens", str(args.max_tokens), "--temperature", str(args.temperature),
                 "--seed", str(args.seed + r), *shlex.split(args.episodes_args)],
            inputs=[args.env_config, *first], outputs=[d / "episodes.jsonl"],
        ),
        Stage(
            f"{d.name}/views", f"round {r}: the episodes in the student's and the teacher's view",
            fn=partial(write_views, d / "episodes.jsonl", experience, d / "student.jsonl",
                       d / "teacher.jsonl"),
            inputs=[d / "episodes.jsonl"], outputs=[d / "student.jsonl", d / "teacher.jsonl"],
        ),
        Stage(
            f"{d.name}/shards", f"round {r}: the teacher scores each episode in its view",
            cmd=[PY, "-m", "precompute", "--mode", "score", "--backend", args.backend,
                 "--config", precompute_config(args), "--teacher", args.teacher,
                 "--student", student, "--data", d / "student.jsonl", "--out", d / "shards",
                 "--k", str(args.k), "--no-progress", "source=student",
                 f"data.teacher_path={d / 'teacher.jsonl'}", "data.id_field=id",
                 "data.messages_field=messages", "data.meta_field=meta",
                 "data.sample_index_field=sample", "data.train_turns=all",
                 f"tags.round={r}", *env_tags(args),
                 later(lambda: f"tags.student={sampler()}"),
                 later(lambda: f"tags.student_fingerprint={weights_fingerprint(sampler())}"),
                 *shlex.split(args.precompute_args)],
            inputs=[d / "student.jsonl", d / "teacher.jsonl"], outputs=[d / "shards"],
        ),
        train_stage(args, work, r, sampler, "its scored episodes"),
    ]  # fmt: skip


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if bool(args.data) == bool(args.env_config):
        raise SystemExit("give either --data (prompts) or --env-config (episodes)")
    if args.env_config:
        env = load_env_config(args.env_config)
        if env.fold != "train":
            raise SystemExit(
                f"{args.env_config}: fold {env.fold}: rounds train on their episodes, so they "
                "play train-fold seeds (dev and test are for measuring)"
            )
    elif args.experience or args.episodes_args:
        raise SystemExit("--experience and --episodes-args go with --env-config")
    if "view.thinking=mixed" in args.precompute_args:
        # The draw is per row index, and the scoring input's rows are not the prompts' rows.
        raise SystemExit("view.thinking=mixed: a round's two views would draw differently")
    if "model.lora=true" in args.train_args:
        raise SystemExit("rounds sample with vLLM from full checkpoints: model.lora=true is not")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(work / STATE, settings=settings(args))
    t0 = time.time()
    stages = []
    for r in range(1, args.rounds + 1):
        todo = round_stages(args, work, r)
        if all(runner.is_done(s.name) for s in todo):
            print(f"round {r}: finished earlier", flush=True)
        else:
            stages += todo
    runner.run(stages)
    print(
        f"\n{args.rounds} round(s) in {time.time() - t0:.0f} s; the student: "
        f"{student_of(args, work, args.rounds + 1)}",
        flush=True,
    )


if __name__ == "__main__":
    main()

"""A model plays episodes in an environment, and its episodes become the two views' rows: the
first two steps of an episodes round (tools/onpolicy/rounds.py --env-config), a command too.

    python -m tools.onpolicy.episodes --model S --env-config ENV.yaml --out EPISODES.jsonl
        [--backend vllm|hf] [--samples N] [--max-tokens T] [--temperature X] [--seed S]

ENV.yaml holds envs.config.EnvConfig's fields (game, params, fold, seeds or seed_offset and
num_seeds, step_limit); unknown keys are errors. The model plays every configured seed
`--samples` times (envs.runner.play, one engine call per step for the whole batch), with
envs.policy.ChatPolicy: the prompt is the student view (envs.prompt, no experience) rendered
with the model's chat template (datafiles.views.render), and each request is seeded from
(--seed, the episode's identity, its step), so an episode's replies do not depend on what it
was batched with.

Resume: each finished episode is appended to --out as one JSON line (Episode.to_dict()),
flushed and fsynced before the next one is written. A re-run reads the file, cuts a torn last
line (a kill during a write) and plays only the episodes not in it: none is lost or written
twice. An episode whose environment died twice is rejected by name (envs.runner) and not
written (its line says why); the run goes on.

`write_views` turns the episodes into precompute's two-file input (datafiles/pairs.py),
joined by id = Episode.id: the student file's `messages` is envs.prompt.episode_messages(ep)
(no experience), with `meta` = {"episode": Episode.record()} and `sample` = the episode's
sample (precompute's data.meta_field / data.sample_index_field); the teacher file's is
episode_messages(ep, experience). Precompute's score mode then scores each whole episode in
one teacher pass, every action a trained span.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from envs.base import Episode, episode_id
from envs.config import EnvConfig
from envs.config import load_env_config as env_config_of
from envs.experience import Experience
from envs.policy import ChatPolicy, Complete
from envs.prompt import episode_messages
from envs.runner import EnvPool, EpisodeKey, PlayResult, default_keys, play
from tools.stages import write_durably


def load_env_config(path: str | Path) -> EnvConfig:
    """envs.config.load_env_config, its one line as a command's exit."""
    try:
        return env_config_of(path)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def episode_from_dict(d: dict) -> Episode:
    """The Episode of an Episode.to_dict() record (its derived counts dropped)."""
    fields = {k: v for k, v in d.items() if k not in ("steps", "invalid", "mapped")}
    fields["valid_actions"] = [tuple(v) for v in fields["valid_actions"]]
    return Episode(**fields)


def read_episodes(path: str | Path, repair: bool = False) -> list[Episode]:
    """The episodes of an episodes file. A last line without its newline is a write cut
    short by a kill: with repair=True it is cut off the file, else an error names it; any
    other bad line is an error naming file and line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        if not repair:
            raise ValueError(f"{path}: its last line is cut short (a killed writer)")
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    out = []
    for n, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        try:
            out.append(episode_from_dict(json.loads(line)))
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path}:{n}: not an episode record: {e}") from None
    return out


class EpisodeLog:
    """An episodes file open for appending: one durable line per finished episode."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done = {ep.id for ep in read_episodes(self.path, repair=True)}
        self.file = open(self.path, "a", encoding="utf-8")

    def __call__(self, ep: Episode) -> None:
        if ep.id in self.done:
            raise ValueError(f"{self.path}: episode {ep.id} is already in the file")
        self.file.write(json.dumps(ep.to_dict(), ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.done.add(ep.id)

    def close(self) -> None:
        self.file.close()


def play_to_file(
    config: EnvConfig,
    render: Callable[[list[dict]], list[int]],
    complete: Complete,
    out: str | Path,
    *,
    seed: int = 0,
    samples: int = 1,
    batch_size: int = 16,
    pool: EnvPool | None = None,
    log: Callable[[str], None] = print,
) -> PlayResult:
    """Play the config's seeds x samples not yet in `out` and append each as it finishes."""
    own = pool is None
    pool = EnvPool(config) if own else pool
    episodes = EpisodeLog(out)
    try:
        env = pool.take()
        try:
            keys = default_keys(config, env, samples)
        finally:
            pool.give(env)
        todo = [k for k in keys if _key_id(config, k) not in episodes.done]
        if len(todo) < len(keys):
            log(f"episodes: resuming, {len(keys) - len(todo)} of {len(keys)} done in {out}")
        policy = ChatPolicy(config, render, complete, seed)
        return play(
            config,
            policy,
            keys=todo,
            batch_size=batch_size,
            pool=pool,
            on_episode=episodes,
            policy_keys=True,
        )
    finally:
        episodes.close()
        if own:
            pool.close()


def _key_id(config: EnvConfig, key: EpisodeKey) -> str:
    return episode_id(config.game, config.game_params(), config.fold, key.seed, key.sample)


def unusable(ep: Episode) -> str | None:
    """Why an episode cannot be a conversation row, or None. An empty reply is sent to the
    game as an empty action (envs/actions.py), and a conversation row refuses an empty
    assistant turn (datafiles/messages.py): such an episode is left out, by name."""
    if not ep.actions:
        return "no action"
    for i, action in enumerate(ep.actions):
        if not action.strip():
            return f"action {i} is empty (the reply was {ep.replies[i]!r})"
    return None


def write_views(
    episodes_path: str | Path,
    experience: Experience | None,
    student_out: str | Path,
    teacher_out: str | Path,
    log: Callable[[str], None] = print,
) -> int:
    """The episodes as precompute's two-file input (module docstring), in (seed, sample)
    order; returns the rows written. An episode that cannot be a row (`unusable`) is left
    out with one line naming it, and the count is printed."""
    episodes = sorted(read_episodes(episodes_path), key=lambda e: (e.seed, e.sample))
    text = experience.text if experience is not None else None
    student, teacher, left_out = [], [], 0
    for ep in episodes:
        if (why := unusable(ep)) is not None:
            log(f"episodes: {ep.id} left out: {why}")
            left_out += 1
            continue
        student.append(
            {
                "id": ep.id,
                "messages": episode_messages(ep),
                "meta": {"episode": ep.record()},
                "sample": ep.sample,
            }
        )
        teacher.append({"id": ep.id, "messages": episode_messages(ep, text)})
    for path, rows in ((teacher_out, teacher), (student_out, student)):
        write_durably(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    log(f"episodes: {len(student)} rows in {student_out} and {teacher_out}, {left_out} left out")
    return len(student)


# ---- samplers ---------------------------------------------------------------------------


def hf_sampler(model: str, max_tokens: int, temperature: float) -> Complete:
    """complete() with transformers, one request at a time (each its own seed): for small
    models and tests; vLLM batches the requests."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @torch.no_grad()
    def complete(prompts: list[list[int]], seeds: list[int]) -> list[str]:
        out = []
        for p, s in zip(prompts, seeds, strict=True):
            torch.manual_seed(s)
            ids = lm.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_tokens,
                pad_token_id=pad,
            )[0, len(p) :]
            out.append(tok.decode(ids, skip_special_tokens=True))
        return out

    return complete


def vllm_sampler(model: str, max_tokens: int, temperature: float, engine: dict) -> Complete:
    from vllm_engine.generate import generate, start_llm

    llm = start_llm(model, engine)

    def complete(prompts: list[list[int]], seeds: list[int]) -> list[str]:
        return [t for _, t in generate(llm, prompts, max_tokens, temperature, seeds, False)]

    return complete


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m tools.onpolicy.episodes", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--model", required=True, help="the model folder that plays (a student)")
    ap.add_argument("--env-config", required=True, help="YAML of envs.config.EnvConfig fields")
    ap.add_argument("--out", required=True, help="episodes file (JSON lines), appended to")
    ap.add_argument("--backend", default="vllm", choices=["vllm", "hf"], help="sampling engine")
    ap.add_argument("--samples", type=int, default=1, help="episodes per seed")
    ap.add_argument("--max-tokens", type=int, default=32, help="reply length limit")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    ap.add_argument("--seed", type=int, default=0, help="the requests' seeds derive from it")
    ap.add_argument("--batch-size", type=int, default=16, help="episodes played at once")
    ap.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="vLLM engine argument (repeatable), e.g. max_model_len=4096",
    )
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    config = load_env_config(args.env_config)
    from transformers import AutoTokenizer

    from datafiles.views import render as render_chat

    tok = AutoTokenizer.from_pretrained(args.model)
    if args.backend == "hf":
        complete = hf_sampler(args.model, args.max_tokens, args.temperature)
    else:
        engine = {}
        for item in args.engine:
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"--engine {item}: expected KEY=VALUE")
            engine[key] = yaml.safe_load(value)
        complete = vllm_sampler(args.model, args.max_tokens, args.temperature, engine)
    t0 = time.time()
    result = play_to_file(
        config,
        lambda m: render_chat(tok, m),
        complete,
        args.out,
        seed=args.seed,
        samples=args.samples,
        batch_size=args.batch_size,
    )
    eps = result.episodes
    won = sum(e.success for e in eps)
    print(
        f"episodes: {len(eps)} played ({won} won, {sum(e.steps for e in eps)} actions, "
        f"{sum(e.invalid for e in eps)} invalid), {len(result.rejected)} rejected, "
        f"{time.time() - t0:.0f} s (policy {result.policy_seconds:.0f} s, environment "
        f"{result.env_seconds:.0f} s) -> {args.out}",
        flush=True,
    )
    if result.rejected:  # each named above by the runner; the others are kept
        print(f"episodes: {len(result.rejected)} rejected (not written)", flush=True)


if __name__ == "__main__":
    main()

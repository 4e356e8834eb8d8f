"""One model plays the evaluation's episodes: a vLLM engine, the chat policy, the batch runner.

    python -m tools.eval.agent_play --job JOB.json

`python -m tools.eval agent` runs this once per model in its own process (as
tools/eval/generate.py: vLLM's CPU engine does not give its memory back to a process that
starts another). JOB.json (written by tools/eval/agent.py) names the model folder, the
environment config, the experience file (teacher view) or null, the sampling settings, the
batch size, the engine arguments and the two output files:

- `partial`: one JSON line per finished episode, appended (and fsynced) as it finishes, so a
  run killed at any moment resumes with the episodes not yet there: nothing played twice,
  nothing lost (a torn last line is cut off and that episode played again);
- `out`: the model's results (every episode, rejected episodes by name, the timings),
  written atomically once all episodes are in; `partial` is then removed.

The policy is envs.policy.ChatPolicy: each prompt (envs.prompt, with the experience in the
system message when given) is rendered by the model's own chat template
(datafiles.views.render, generation prompt included) and completed by
vllm_engine.generate.generate with one seed per request from the episode's identity and step.
Prefix caching is on: step t's prompt extends step t-1's, so an episode's history is not
prefilled again at every step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from envs.base import Episode, Rejected, episode_id
from envs.config import EnvConfig
from envs.experience import load_experience
from envs.policy import ChatPolicy, Complete, Render
from envs.runner import EnvPool, default_keys, play
from runtime.typed_config import build


def episode_entry(ep: Episode) -> dict:
    """What a results file keeps of an episode: its id, its record() (the shard rows' meta
    too), and what the record leaves out to rebuild the conversation (task, observations,
    valid actions)."""
    return {
        "id": ep.id,
        "episode": ep.record(),
        "task": ep.task,
        "observations": list(ep.observations),
        "valid_actions": [list(v) for v in ep.valid_actions],
    }


def entry_episode(entry: dict) -> Episode:
    """The Episode of a results-file entry (episode_entry's inverse)."""
    r = entry["episode"]
    return Episode(
        game=r["game"], params=r["params"], fold=r["fold"], seed=r["seed"], sample=r["sample"],
        task=entry["task"], observations=list(entry["observations"]),
        valid_actions=[tuple(v) for v in entry["valid_actions"]], replies=list(r["replies"]),
        actions=list(r["actions"]), action_kinds=list(r["action_kinds"]),
        rewards=list(r["rewards"]), score=r["score"], success=r["success"], done=r["done"],
        restarts=r["restarts"],
    )  # fmt: skip


def read_partial(path: Path) -> dict[str, dict]:
    """{episode id: entry} of the episodes a killed run finished. A torn last line (killed
    mid-write) is cut off the file, so appending goes on from a whole line."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    out = {}
    for n, line in enumerate(whole.decode("utf-8").splitlines(), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n}: not a JSON episode entry ({e})") from None
        out[entry["id"]] = entry
    return out


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


def play_model(
    job: dict,
    render: Render,
    complete: Complete,
    make_env: Callable | None = None,
    extra: dict | None = None,
) -> dict:
    """Play the job's episodes not yet in its partial file, then write and return its results.

    extra: what the caller measured (engine start, prefix caching) for the results' timings."""
    t_start = time.perf_counter()
    # None is "not set" (num_seeds), which a config file says by leaving the key out.
    config = build(EnvConfig, {k: v for k, v in job["env"].items() if v is not None}, "env.")
    experience = load_experience(job["experience"]).text if job.get("experience") else None
    partial, out = Path(job["partial"]), Path(job["out"])
    done = read_partial(partial)
    policy = ChatPolicy(config, render, complete, seed=job["seed"])
    with EnvPool(config, make_env) as pool, open(partial, "a", encoding="utf-8") as log:

        def keep(ep: Episode) -> None:
            log.write(json.dumps(episode_entry(ep)) + "\n")
            log.flush()
            os.fsync(log.fileno())  # on disk before the next episode counts on it
            done[ep.id] = episode_entry(ep)
            if len(done) % every == 0 or len(done) == len(keys):
                print(f"[eval agent] {len(done)}/{len(keys)} episodes", file=sys.stderr,
                      flush=True)  # fmt: skip

        env = pool.take()
        keys = default_keys(config, env, job.get("samples", 1))
        pool.give(env)
        resumed = len(done)
        every = max(1, len(keys) // 10)
        todo = [k for k in keys if _key_id(config, k) not in done]
        if resumed:
            print(f"[eval agent] resuming: {resumed} episodes done, {len(todo)} to play",
                  file=sys.stderr, flush=True)  # fmt: skip
        result = play(
            config, policy, keys=todo, batch_size=job["batch_size"], experience=experience,
            pool=pool, on_episode=keep, policy_keys=True,
        )  # fmt: skip
    ids = [_key_id(config, k) for k in keys]
    doc = {
        "job": {k: v for k, v in job.items() if k not in ("out", "partial")},
        "episodes": [done[i] for i in ids if i in done],
        "rejected": [r.line() for r in result.rejected],
        "rejected_ids": [_rejected_id(r) for r in result.rejected],
        "timing": {
            **(extra or {}),
            "play_s": time.perf_counter() - t_start,
            "policy_s": result.policy_seconds,
            "env_s": result.env_seconds,
            "policy_calls": result.policy_calls,
            "mean_batch": sum(result.batch_sizes) / max(len(result.batch_sizes), 1),
            "episodes_played": len(result.episodes),
            "episodes_resumed": resumed,
        },
    }
    write_json(out, doc)
    partial.unlink(missing_ok=True)
    return doc


def _key_id(config: EnvConfig, key) -> str:
    return episode_id(config.game, config.game_params(), config.fold, key.seed, key.sample)


def _rejected_id(r: Rejected) -> str:
    return episode_id(r.game, r.params, r.fold, r.seed, r.sample)


def prefix_cache_stats(llm) -> dict:
    """Prefix-cache queries and hits (tokens) from the engine's metrics; {} without them."""
    try:
        metrics = {m.name: m for m in llm.get_metrics()}
    except Exception:  # metrics are informative; an engine without them still evaluates
        return {}
    out = {}
    for name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):
        if name in metrics and hasattr(metrics[name], "value"):
            out[name.split(":")[1] + "_tokens"] = int(metrics[name].value)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", required=True, type=Path)
    args = ap.parse_args(argv)
    job = json.loads(args.job.read_text())
    t0 = time.perf_counter()
    # Seconds to import, and only this process needs them (the parent only reads results).
    from transformers import AutoTokenizer

    from datafiles.views import render
    from vllm_engine.generate import generate, start_llm

    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    llm = start_llm(job["model_dir"], job["engine"])
    engine_s = time.perf_counter() - t0
    cache = llm.llm_engine.vllm_config.cache_config

    def complete(prompts: list[list[int]], seeds: list[int]) -> list[str]:
        outs = generate(llm, prompts, job["max_tokens"], job["temperature"], seeds, progress=False)
        return [text for _, text in outs]

    extra = {"engine_start_s": engine_s, "prefix_caching": bool(cache.enable_prefix_caching)}
    doc = play_model(job, lambda m: render(tok, m), complete, extra=extra)
    doc["timing"].update(prefix_cache_stats(llm))
    write_json(Path(job["out"]), doc)
    t = doc["timing"]
    print(
        f"[eval agent] {job['model_dir']}: {len(doc['episodes'])} episodes, engine start "
        f"{engine_s:.1f} s, policy {t['policy_s']:.1f} s, environments {t['env_s']:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return 0


if __name__ == "__main__":  # vLLM spawns processes that re-import __main__
    raise SystemExit(main())

"""The teacher with experience against the same model without it, on the DEV fold:
`python -m bench.agent_experience` -> bench/results/agent_experience.json.

The teacher and the student are one model (SmolLM2-135M-Instruct); only the view differs.
Every arm plays the same dev-fold seeds greedily through envs.runner.play with a ChatPolicy
over one vLLM engine (started once, shared by all arms); the experience of an arm is built
by envs.experience from train-fold gold episodes only. Each arm with experience is compared
with the arm without it (`none`) of the same game config on the same seeds: success rates,
their difference, and the exact McNemar test on the paired successes.

An arm is `BUILDER` or `BUILDER@CONFIG`, CONFIG a name in CONFIGS (default --config).
"""

from __future__ import annotations

import argparse
import math
import time

from bench.common import RESULTS, TEACHER_DIR, header, log, write_result
from envs.config import EnvConfig
from envs.experience import BUILDERS, build_experience, for_episode, train_gold_episodes
from envs.policy import ChatPolicy
from envs.runner import EnvPool, EpisodeKey, play
from tools.eval.paired import mcnemar_p

TWC1 = {"numLocations": 1, "numItemsToPutAway": 1, "includeDoors": 0, "limitInventorySize": 0}
TWC2 = {**TWC1, "numItemsToPutAway": 2}
COIN2 = {"numLocations": 2, "numDistractorItems": 0, "includeDoors": 0, "limitInventorySize": 0}
CONFIGS = {
    "twc1": ("twc", TWC1),
    "twc2": ("twc", TWC2),
    "coin2": ("coin", COIN2),
    "arithmetic": ("arithmetic", {}),
    "sorting": ("sorting", {}),
}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided McNemar p for b, c discordant pairs (only with experience wins, only
    without): tools.eval.paired's test (exact binomial below 25 discordant pairs)."""
    return mcnemar_p(b, c)[0]


def summary(episodes) -> dict:
    n = len(episodes)
    steps = sum(e.steps for e in episodes)
    return {
        "episodes": n,
        "success": sum(e.success for e in episodes) / n,
        "mean_score": sum(e.score for e in episodes) / n,
        "mean_steps": steps / n,
        "invalid_rate": sum(e.invalid for e in episodes) / max(1, steps),
        "successes": [int(e.success) for e in episodes],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(TEACHER_DIR))
    ap.add_argument("--config", default="twc1", choices=sorted(CONFIGS))
    ap.add_argument("--arms", default="none,nearest", help="comma-separated BUILDER[@CONFIG]")
    ap.add_argument("--episodes", type=int, default=100, help="dev-fold seeds per arm")
    ap.add_argument("--train-seeds", type=int, default=300, help="train-fold gold episodes")
    ap.add_argument("--step-limit", type=int, default=6)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--out", default=str(RESULTS / "agent_experience.json"))
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from datafiles.views import render
    from vllm_engine.generate import generate, start_llm

    arms = []
    for arm in args.arms.split(","):
        builder, _, cname = arm.partition("@")
        if builder != "none" and builder not in BUILDERS:
            raise SystemExit(f"--arms: unknown builder {builder!r}; valid: none, {BUILDERS}")
        arms.append((builder, cname or args.config))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t0 = time.time()
    llm = start_llm(args.model, {"max_model_len": 4096, "seed": 0, "enable_prefix_caching": True})
    log(f"engine started in {time.time() - t0:.0f} s")

    def complete(prompts, seeds):
        return [t for _, t in generate(llm, prompts, args.max_tokens, 0.0, seeds, progress=False)]

    results, pools = [], {}
    try:
        for builder, cname in arms:
            game, params = CONFIGS[cname]
            config = EnvConfig(game=game, params=params, fold="dev", step_limit=args.step_limit)
            if cname not in pools:
                pools[cname] = EnvPool(config)
            pool = pools[cname]
            env = pool.take()
            try:
                dev = env.fold_seeds("dev")[: args.episodes]
                experience, text = None, None
                if builder != "none":
                    train = env.fold_seeds("train")[: args.train_seeds]
                    experience = build_experience(
                        builder, train_gold_episodes(env, train), game, config.game_params()
                    )
                    text = experience.text
                    if experience.source.get("per_episode"):
                        text = lambda obs, e=experience: for_episode(e, obs.valid_actions)  # noqa: E731
            finally:
                pool.give(env)
            policy = ChatPolicy(config, lambda m: render(tokenizer, m), complete)
            t = time.time()
            played = play(
                config,
                policy,
                keys=[EpisodeKey(s) for s in dev],
                batch_size=args.batch,
                experience=text,
                pool=pool,
                policy_keys=True,
            )
            row = {
                "arm": builder,
                "config": cname,
                "game": game,
                "params": config.game_params(),
                "step_limit": args.step_limit,
                "experience_source": None if experience is None else experience.source,
                "experience_chars": None if experience is None else len(experience.text),
                "seconds": time.time() - t,
                **summary(played.episodes),
                "first_episode": played.episodes[0].record(),
            }
            if experience is not None and experience.source.get("per_episode"):
                row["first_episode_experience"] = for_episode(
                    experience, played.episodes[0].valid_actions[0]
                )
            base = next((r for r in results if r["arm"] == "none" and r["config"] == cname), None)
            if base is not None and builder != "none":
                a, b = base["successes"], row["successes"]
                only_exp = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
                only_base = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
                row["gap"] = row["success"] - base["success"]
                row["mcnemar_p"] = mcnemar_exact(only_exp, only_base)
                row["discordant"] = [only_exp, only_base]
            results.append(row)
            log(
                f"{cname} {builder}: success {row['success']:.3f} score {row['mean_score']:.3f} "
                f"steps {row['mean_steps']:.1f} invalid {row['invalid_rate']:.2f} "
                f"gap {row.get('gap', math.nan):+.3f} p {row.get('mcnemar_p', math.nan):.4f}"
                f" ({row['seconds']:.0f} s)"
            )
    finally:
        for pool in pools.values():
            pool.close()
    out = {
        "header": header("bench.agent_experience", argv),
        "model": args.model,
        "fold": "dev",
        "greedy": True,
        "arms": results,
    }
    write_result(args.out, out)
    return 0


if __name__ == "__main__":  # vLLM spawns processes that re-import __main__
    raise SystemExit(main())

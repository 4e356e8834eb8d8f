"""Environment speed and the action rule: `python -m bench.envs` -> bench/results/envs.json.

Speed (TextWorldExpress twc, one room, two items, 10 steps, train seeds; a scripted policy
that plays each seed's gold actions, so the figures are the environments' alone):
- start: one engine (Java process + py4j + game load), median of --starts fresh ones;
- warm: a pool of --batch engines started `threads` at a time (EnvPool.warm), for 1 and 4;
- steps/s: --episodes episodes, --batch at a time, through envs.runner.play, with the pool
  already started (what a caller that keeps its pool sees) and with a pool made in the call.

Action rule (envs/actions.py): the gold actions of --rule-seeds train seeds of twc and
cookingworld rewritten the ways small models write them, each reply parsed by candidate
similarity rules; the share mapped to the intended action per kind of rewrite (for garbage
and echoed observations: the share left invalid), and the mean over the kinds.
"""

from __future__ import annotations

import argparse
import difflib
import random
import statistics
import time

from bench.common import RESULTS, header, log, write_result
from envs.actions import MAP_THRESHOLD, normalize, parse_action, token_f1
from envs.config import EnvConfig
from envs.runner import EnvPool, EpisodeKey, play
from envs.textworld import TextWorldEnv

TWC = {"numLocations": 1, "numItemsToPutAway": 2, "includeDoors": 0, "limitInventorySize": 0}
COOKING = {"numLocations": 1, "numDistractorItems": 0, "includeDoors": 0, "numIngredients": 2}


def gold_policy(env: TextWorldEnv, seeds: list[int], fold: str):
    scripts = {}
    for seed in seeds:
        actions = env.gold_actions(seed, fold)
        scripts[env.reset(seed, fold).text.strip()] = actions

    def policy(prompts):
        return [
            scripts[p[1]["content"].split("\n\nValid actions:")[0]][
                sum(m["role"] == "assistant" for m in p)
            ]
            for p in prompts
        ]

    return policy


def speed(args) -> dict:
    config = EnvConfig(game="twc", params=TWC, fold="train", step_limit=10)
    starts = []
    for _ in range(args.starts):
        t = time.perf_counter()
        env = TextWorldEnv(config)
        env.reset(0, "train")
        starts.append(time.perf_counter() - t)
        env.close()
    log(f"start: median {statistics.median(starts):.2f} s over {args.starts}")
    env = TextWorldEnv(config)
    seeds = env.fold_seeds("train")[: args.episodes]
    policy = gold_policy(env, seeds, "train")
    env.close()
    keys = [EpisodeKey(s) for s in seeds]
    out = {"start_s": starts, "start_median_s": statistics.median(starts)}
    for threads in (1, 4):
        with EnvPool(config) as pool:
            t = time.perf_counter()
            pool.warm(args.batch, threads=threads)
            out[f"warm_{args.batch}_threads{threads}_s"] = time.perf_counter() - t
            if threads == 4:
                t = time.perf_counter()
                result = play(config, policy, keys=keys, batch_size=args.batch, pool=pool)
                wall = time.perf_counter() - t
                steps = sum(e.steps for e in result.episodes)
                assert all(e.success for e in result.episodes)
                out["warm_pool"] = {
                    "episodes": len(result.episodes),
                    "steps": steps,
                    "wall_s": wall,
                    "steps_per_s": steps / wall,
                    "policy_calls": result.policy_calls,
                }
        log(f"warm {args.batch} engines, {threads} threads: "
            f"{out[f'warm_{args.batch}_threads{threads}_s']:.2f} s")  # fmt: skip
    t = time.perf_counter()
    result = play(config, policy, keys=keys, batch_size=args.batch)
    wall = time.perf_counter() - t
    steps = sum(e.steps for e in result.episodes)
    out["cold_pool"] = {"steps": steps, "wall_s": wall, "steps_per_s": steps / wall}
    log(f"steps/s: warm pool {out['warm_pool']['steps_per_s']:.0f}, "
        f"pool made in the call {steps / wall:.1f}")  # fmt: skip
    return out


FILLER = ["I will", "I think I should", "Next, I", "Let's", "OK,", "The best action is to"]
GARBAGE = ["I don't know.", "What should I do?", "Hello!", "The room is quiet.", "Thanks!"]


def rewrites(game: str, params: dict, n_seeds: int, rng: random.Random) -> list[tuple]:
    """(kind, reply, valid actions, intended action or None) along n_seeds gold paths."""
    env = TextWorldEnv(EnvConfig(game=game, params=params, fold="train", step_limit=100))
    cases = []
    try:
        for seed in env.fold_seeds("train")[:n_seeds]:
            actions = env.gold_actions(seed, "train")
            obs = env.reset(seed, "train")
            for a in actions:
                if a in obs.valid_actions:
                    w, cut = a.split(), rng.randrange(len(a))
                    for kind, reply in {
                        "article": " ".join([w[0], "the", *w[1:]]),
                        "filler": f"{rng.choice(FILLER)} {a}.",
                        "echo+action": f"{obs.text.split('. ')[0]}. {a}",
                        "dropped word": " ".join(w[:1] + w[2:]) if len(w) > 2 else a,
                        "typo": a[:cut] + a[cut + 1 :],
                        "synonym verb": a.replace("take ", "pick up ")
                        .replace("put ", "place ")
                        .replace("move ", "go "),
                        "plan appended": f"{a} and then look around",
                    }.items():
                        cases.append((kind, reply, obs.valid_actions, a))
                    cases.append(("garbage", rng.choice(GARBAGE), obs.valid_actions, None))
                    echo = obs.text.strip().split("\n")[0][:200]
                    cases.append(("echoed observation", echo, obs.valid_actions, None))
                obs = env.step(a)
    finally:
        env.close()
    return cases


def ratio(reply: str, action: str) -> float:
    return difflib.SequenceMatcher(None, normalize(reply), normalize(action)).ratio()


def recall(reply: str, action: str) -> float:
    said = set(normalize(reply).split())
    words = normalize(action).split()
    return sum(w in said for w in words) / len(words)


RULES = {  # name -> (similarity, threshold); ties broken by difflib ratio
    "difflib ratio >= 0.5": (ratio, 0.5),
    "difflib ratio >= 0.6": (ratio, 0.6),
    "token recall >= 0.5": (recall, 0.5),
    "token recall >= 0.67": (recall, 0.67),
    "token F1 >= 0.4 (chosen)": (token_f1, 0.4),
    "token F1 >= 0.5": (token_f1, 0.5),
}


def pick(reply: str, valid, sim, threshold: float) -> str | None:
    """parse_action's structure with another similarity: exact, else the best (ties: difflib
    ratio, then the alphabetically first) at or above the threshold, else None (invalid)."""
    for v in valid:
        if normalize(v) == normalize(reply):
            return v
    best = None
    for v in sorted(valid):
        key = (sim(reply, v), ratio(reply, v))
        if best is None or key > best[0]:
            best = (key, v)
    return best[1] if best is not None and best[0][0] >= threshold else None


def score_rules(cases) -> dict:
    out = {}
    for name, (sim, threshold) in RULES.items():
        right: dict[str, list[bool]] = {}
        for kind, reply, valid, want in cases:
            got = pick(reply, valid, sim, threshold)
            if sim is token_f1 and threshold == MAP_THRESHOLD:  # the rule envs/ uses
                parsed = parse_action(reply, valid)
                assert got == (None if parsed.kind == "invalid" else parsed.action), reply
            right.setdefault(kind, []).append(got == want)
        by_kind = {k: sum(v) / len(v) for k, v in right.items()}
        out[name] = {"mean": statistics.mean(by_kind.values()), "by_kind": by_kind}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--starts", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--rule-seeds", type=int, default=40)
    p.add_argument("--out", default=str(RESULTS / "envs.json"))
    args = p.parse_args(argv)
    result = header("bench.envs", argv)
    result["speed"] = speed(args)
    rng = random.Random(0)
    result["action_rule"] = {}
    for game, params in (("twc", TWC), ("cookingworld", COOKING)):
        cases = rewrites(game, params, args.rule_seeds, rng)
        scores = score_rules(cases)
        result["action_rule"][game] = {"params": params, "cases": len(cases), "rules": scores}
        for name, s in scores.items():
            log(f"{game} {name}: mean {s['mean']:.3f} "
                + " ".join(f"{k}={v:.2f}" for k, v in s["by_kind"].items()))  # fmt: skip
    log(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()

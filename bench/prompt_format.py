"""Which prompt format lets a small chat model write valid actions:
`python -m bench.prompt_format` -> bench/results/prompt_format.json.

SmolLM2-135M-Instruct, greedy, on twc (one room, two items, no doors) dev-fold seeds. Each
variant is a function with the signature of envs.prompt.messages; one vLLM engine serves
all of them. Two phases:

1. screen: the FIRST prompt of each of --screen dev seeds under every variant, one
   generate call per variant: the share of replies exact / mapped / invalid
   (envs.actions.parse_action) and the commonest reply. An episode whose first reply is no
   action cannot start, so this separates formats cheaply.
2. episodes: --episodes dev seeds played to the end (--step-limit) under the variants
   named by --play (default: the screen's best ones and `current`): success, mean score,
   exact / mapped / invalid shares of all replies. play() builds its prompts with
   envs.runner.messages, which this benchmark swaps for the variant while it plays.

Also measured on every reply: the "contains" rule (a reply that contains a valid action as
a whole-word phrase, mapped to the longest such action) -- how many invalid replies it
would rescue, and how many of those are echoes of the observation (which must stay invalid).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from unittest import mock

import envs.runner
from bench.common import RESULTS, TEACHER_DIR, header, log, write_result
from envs.actions import normalize, parse_action
from envs.config import EnvConfig
from envs.policy import ChatPolicy
from envs.runner import EnvPool, EpisodeKey, play

PARAMS = {"numLocations": 1, "numItemsToPutAway": 2, "includeDoors": 0, "limitInventorySize": 0}
CUE = "Your next action:"
OLD_RULES = (
    "Each turn you see what happened and the list of valid actions. Reply with one action "
    "from the list, written exactly as it appears there, and nothing else."
)


def _conversation(system, first_prefix, user, observations, valid_actions, actions):
    out = [] if system is None else [{"role": "system", "content": system}]
    for i, obs in enumerate(observations):
        content = user(obs.strip(), list(valid_actions[i]))
        if i == 0 and first_prefix:
            content = f"{first_prefix}\n\n{content}"
        out.append({"role": "user", "content": content})
        if i < len(actions):
            out.append({"role": "assistant", "content": actions[i]})
    return out


def _bullets(actions):
    return "\n".join(f"- {a}" for a in actions)


def _commas(actions):
    return ", ".join(actions)


def _old_system(task, experience):
    text = f"You are playing a text game. {task.strip()}\n\n{OLD_RULES}"
    if experience:
        text += f"\n\nExperience from earlier games:\n{experience.strip()}"
    return text


def _short_system(task, experience):
    text = f"{task.strip()} Reply with one valid action."
    if experience:
        text += f"\n\nExperience from earlier games:\n{experience.strip()}"
    return text


def variant(system, user, first_prefix=None):
    """A messages() function: system(task, experience) -> str | None; user(obs, actions)."""

    def build(task, observations, valid_actions, actions, experience=None):
        s = None if system is None else system(task, experience)
        p = None if first_prefix is None else first_prefix(task, experience)
        return _conversation(s, p, user, observations, valid_actions, actions)

    return build


VARIANTS = {
    # the format in envs/prompt.py before this benchmark
    "current": variant(_old_system, lambda o, a: f"{o}\n\nValid actions:\n{_bullets(a)}"),
    "cue_end": variant(_old_system, lambda o, a: f"{o}\n\nValid actions:\n{_bullets(a)}\n\n{CUE}"),
    "actions_first_cue": variant(
        _old_system, lambda o, a: f"Valid actions:\n{_bullets(a)}\n\n{o}\n\n{CUE}"
    ),
    "commas_cue": variant(
        _old_system, lambda o, a: f"{o}\n\nValid actions: {_commas(a)}.\n\n{CUE}"
    ),
    "short_system_cue": variant(
        _short_system, lambda o, a: f"{o}\n\nValid actions:\n{_bullets(a)}\n\n{CUE}"
    ),
    "short_system_commas_cue": variant(
        _short_system, lambda o, a: f"{o}\n\nValid actions: {_commas(a)}.\n\n{CUE}"
    ),
    # no system message: the template's default ("You are a helpful AI assistant named
    # SmolLM") and the task + rule in the first user turn
    "default_system_cue": variant(
        None,
        lambda o, a: f"{o}\n\nValid actions:\n{_bullets(a)}\n\n{CUE}",
        first_prefix=lambda t, e: _old_system(t, e),
    ),
    "fewshot_cue": variant(
        lambda t, e: _old_system(t, e) + "\n\nExample reply: look around",
        lambda o, a: f"{o}\n\nValid actions:\n{_bullets(a)}\n\n{CUE}",
    ),
    "choose_one": variant(
        _short_system,
        lambda o, a: f"{o}\n\nChoose one of: {_commas(a)}.\nAction:",
    ),
    "question": variant(
        _short_system,
        lambda o, a: f"{o}\n\nWhich action do you take? Options: {_commas(a)}.",
    ),
    # the question at the very end, in a few forms
    "question_end": variant(
        _short_system,
        lambda o, a: f"{o}\n\nValid actions: {_commas(a)}.\n\nWhich action do you take?",
    ),
    "question_end_bullets": variant(
        _short_system,
        lambda o, a: f"{o}\n\nValid actions:\n{_bullets(a)}\n\nWhich action do you take?",
    ),
    "question_old_system": variant(
        _old_system,
        lambda o, a: f"{o}\n\nWhich action do you take? Options: {_commas(a)}.",
    ),
    "question_no_system": variant(
        None,
        lambda o, a: f"{o}\n\nWhich action do you take? Options: {_commas(a)}.",
        first_prefix=lambda t, e: _short_system(t, e),
    ),
    "question_labeled": variant(
        _short_system,
        lambda o, a: f"Observation: {o}\n\nWhich action do you take? Options: {_commas(a)}.",
    ),
    "question_actions_first": variant(
        _short_system,
        lambda o, a: f"Options: {_commas(a)}.\n\n{o}\n\nWhich action do you take?",
    ),
    "question_answer_only": variant(
        _short_system,
        lambda o, a: (
            f"{o}\n\nWhich action do you take? Options: {_commas(a)}. Answer with the action only."
        ),
    ),
    "what_next": variant(
        _short_system,
        lambda o, a: f"{o}\n\nWhat do you do next? Pick one: {_commas(a)}.",
    ),
    "question_robot": variant(
        lambda t, e: "You are a household robot. " + _short_system(t, e),
        lambda o, a: f"{o}\n\nWhich action do you take? Options: {_commas(a)}.",
    ),
    "question_old_system_bullets": variant(
        _old_system,
        lambda o, a: f"{o}\n\nWhich action do you take? Options:\n{_bullets(a)}",
    ),
    "question_old_system_valid": variant(
        _old_system,
        lambda o, a: f"{o}\n\nWhich action do you take? Valid actions: {_commas(a)}.",
    ),
}


def contains_action(reply: str, valid_actions) -> str | None:
    """The longest valid action that occurs in the reply as a whole-word phrase."""
    said = f" {normalize(reply)} "
    found = [a for a in valid_actions if f" {normalize(a)} " in said]
    return max(found, key=lambda a: (len(normalize(a)), a), default=None)


def is_echo(reply: str, observation: str) -> bool:
    """The reply repeats the observation (its first 25 normalised characters are in it)."""
    r = normalize(reply)
    return len(r) >= 25 and r[:25] in normalize(observation)


def reply_stats(triples) -> dict:
    """triples: (reply, observation, valid_actions) -> shares and the contains rule."""
    kinds = Counter()
    rescued = rescued_echo = 0
    for reply, obs, valid in triples:
        kind = parse_action(reply, valid).kind
        kinds[kind] += 1
        if kind == "invalid" and contains_action(reply, valid) is not None:
            rescued += 1
            rescued_echo += is_echo(reply, obs)
    n = max(1, sum(kinds.values()))
    return {
        "replies": sum(kinds.values()),
        "exact": kinds["exact"] / n,
        "mapped": kinds["mapped"] / n,
        "invalid": kinds["invalid"] / n,
        "contains_rescues": rescued,
        "contains_rescues_echo": rescued_echo,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(TEACHER_DIR))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--screen", type=int, default=32, help="dev seeds in the first-step screen")
    ap.add_argument("--play", default="", help="variants played to the end (default: best 3)")
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--step-limit", type=int, default=10)
    ap.add_argument("--batch", type=int, default=50, help="episodes played at once")
    ap.add_argument("--experience", default="", help="an experience JSON for a played arm too")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", default=str(RESULTS / "prompt_format.json"))
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    for n in names + [p for p in args.play.split(",") if p]:
        if n not in VARIANTS:
            raise SystemExit(f"unknown variant {n!r}; valid: {', '.join(VARIANTS)}")

    from transformers import AutoTokenizer

    from datafiles.views import render
    from vllm_engine.generate import generate, start_llm

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t0 = time.time()
    llm = start_llm(
        args.model,
        {
            "max_model_len": 4096,
            "dtype": "float32",
            "enforce_eager": True,
            "enable_prefix_caching": True,
        },
    )
    log(f"engine started in {time.time() - t0:.0f} s")

    def complete(prompts, seeds):
        return [t for _, t in generate(llm, prompts, args.max_tokens, 0.0, seeds, progress=False)]

    config = EnvConfig(game="twc", params=PARAMS, fold="dev", step_limit=args.step_limit)
    result = {
        **header("bench.prompt_format", argv),
        "model": str(args.model),
        "game": "twc",
        "params": config.game_params(),
        "fold": "dev",
        "greedy": True,
        "max_tokens": args.max_tokens,
        "screen": [],
        "episodes": [],
    }
    with EnvPool(config) as pool:
        env = pool.take()
        dev = env.fold_seeds("dev")
        firsts = [env.reset(s, "dev") for s in dev[: args.screen]]
        pool.give(env)
        for name in names:
            fn = VARIANTS[name]
            t = time.time()
            prompts = [
                render(tokenizer, fn(o.task, [o.text], [o.valid_actions], [])) for o in firsts
            ]
            replies = complete(prompts, [0] * len(prompts))
            row = {
                "variant": name,
                "seeds": len(firsts),
                "seconds": round(time.time() - t, 1),
                **reply_stats(
                    (r, o.text, o.valid_actions) for r, o in zip(replies, firsts, strict=True)
                ),
                "commonest": Counter(replies).most_common(3),
                "example_prompt": fn(
                    firsts[0].task, [firsts[0].text], [firsts[0].valid_actions], []
                ),
            }
            log(
                f"screen {name}: exact {row['exact']:.2f} mapped {row['mapped']:.2f} "
                f"invalid {row['invalid']:.2f} ({row['seconds']} s) {row['commonest'][0]}"
            )
            result["screen"].append(row)
        if args.play:
            played_names = args.play.split(",")
        else:
            ranked = sorted(result["screen"], key=lambda r: r["invalid"])
            played_names = list(dict.fromkeys(["current"] + [r["variant"] for r in ranked[:3]]))
        arms = [(n, None) for n in played_names]
        if args.experience:
            from envs.experience import load_experience

            exp = load_experience(args.experience)
            arms += [(n, exp) for n in played_names if n != "current"]
        for name, exp in arms:
            policy = ChatPolicy(config, lambda m: render(tokenizer, m), complete)
            t = time.time()
            with mock.patch.object(envs.runner, "messages", VARIANTS[name]):
                out = play(
                    config,
                    policy,
                    keys=[EpisodeKey(s) for s in dev[: args.episodes]],
                    batch_size=args.batch,
                    experience=None if exp is None else exp.text,
                    pool=pool,
                    policy_keys=True,
                )
            eps = out.episodes
            triples = [
                (r, o, v)
                for e in eps
                for r, o, v in zip(e.replies, e.observations, e.valid_actions, strict=False)
            ]
            row = {
                "variant": name,
                "experience": None if exp is None else exp.source,
                "episodes": len(eps),
                "seconds": round(time.time() - t, 1),
                "success": sum(e.success for e in eps) / len(eps),
                "mean_score": sum(e.score for e in eps) / len(eps),
                "mean_steps": sum(e.steps for e in eps) / len(eps),
                **reply_stats(triples),
                "successes": [int(e.success) for e in eps],
                "scores": [e.score for e in eps],
                "first_episode": eps[0].record(),
            }
            log(
                f"play {name} exp={exp is not None}: success {row['success']:.3f} score "
                f"{row['mean_score']:.3f} exact {row['exact']:.2f} mapped {row['mapped']:.2f} "
                f"invalid {row['invalid']:.2f} ({row['seconds']} s)"
            )
            result["episodes"].append(row)
            write_result(args.out, result)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

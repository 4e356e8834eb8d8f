"""The agent evaluation's files: agent_results.json, models/NAME.json, agent_report.md and
agent_success.png.

The report answers "which model acts better?": each model's success rate and mean score
with their 95% intervals, mean steps, invalid and mapped rates; every model against the
reference on the same episodes (McNemar on success, paired bootstrap on score); one whole
episode per model (the first seed: the conversation the model saw, each reply as written
and the action the game got); the wall time of each model's play, split into engine
start, policy and environments.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from envs.prompt import user_message

ROW_COLORS = {"teacher": "#999999", "before": "#a6c8e6"}


def fmt_ci(value: float, ci: list[float], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(value)} [{f.format(ci[0])}, {f.format(ci[1])}]"


def plot_success(path: Path, models: list[dict], settings: dict) -> None:
    """One bar per model: success rate with its 95% Wilson interval."""
    import matplotlib  # optional: only figures need it, and Agg must be chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = np.array([m["summary"]["success_rate"] for m in models], dtype=np.float64)
    lo = np.array([m["summary"]["success_ci95"][0] for m in models])
    hi = np.array([m["summary"]["success_ci95"][1] for m in models])
    colors = [
        next((c for word, c in ROW_COLORS.items() if word in m["name"]), "#2f6aa8") for m in models
    ]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(models)), 4.2))
    x = np.arange(len(models))
    ax.bar(x, rates, color=colors, yerr=[rates - lo, hi - rates], capsize=4)
    for xi, r, top in zip(x, rates, hi, strict=True):  # above the interval, not on it
        ax.text(xi, top + 0.005, f"{r:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [m["name"] for m in models], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("success rate (95% Wilson CI)")
    env = settings["env"]
    n = models[0]["summary"]["episodes"] if models else 0
    ax.set_title(f"{env['game']} {env['fold']} fold: {n} episodes per model")
    ax.set_ylim(0, min(1.05, max(float(hi.max()) * 1.2 if len(hi) else 0.1, 0.1)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def episode_lines(model: dict) -> list[str]:
    """The model's episode on its first seed, turn by turn."""
    if not model["episodes"]:
        return ["(no episode finished)", ""]
    e = model["episodes"][0]
    r = e["episode"]
    lines = [
        f"`{e['id']}`: {'success' if r['success'] else 'no success'}, score {r['score']:.2f}, "
        f"{r['steps']} steps ({r['invalid']} invalid, {r['mapped']} mapped)"
        + (f"; experience from `{model['experience']}`" if model.get("experience") else ""),
        "",
        f"Task: {e['task'].strip()}",
        "",
    ]
    for i in range(r["steps"]):
        lines += ["```text", user_message(e["observations"][i], e["valid_actions"][i]), "```"]
        reply = r["replies"][i].strip().replace("\n", " \u21b5 ")
        lines += [
            f"- reply: `{reply}`",
            f"- action ({r['action_kinds'][i]}): `{r['actions'][i]}`, reward {r['rewards'][i]:g}",
            "",
        ]
    if len(e["observations"]) > r["steps"]:
        lines += ["```text", e["observations"][r["steps"]].strip(), "```", ""]
    return lines


def markdown(models: list[dict], settings: dict, reference: str, paired: dict) -> str:
    env = settings["env"]
    params = ", ".join(f"{k}={v}" for k, v in sorted(env["params"].items()))
    sampling = "greedy" if settings["temperature"] == 0 else f"T={settings['temperature']}"
    lines = [
        "# Agent evaluation",
        "",
        f"Game `{env['game']}` ({params or 'no parameters'}), {env['fold']} fold, step limit "
        f"{env['step_limit']}; {sampling}, at most {settings['max_tokens']} tokens per reply. "
        "Success: 95% Wilson interval; score: 95% percentile bootstrap over episodes "
        f"({settings['n_boot']} resamples). Invalid and mapped: shares of all actions taken "
        "(envs/actions.py: a reply that is no valid action is mapped to the closest one, "
        "or sent as written and counted invalid).",
        "",
        f"Made by: `{settings['command']}`",
        "",
    ]
    head = ["model", "episodes", "success [95% CI]", "mean score [95% CI]", "mean steps",
            "invalid", "mapped", "rejected"]  # fmt: skip
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        s = m["summary"]
        name = m["name"] + (" (experience)" if m.get("experience") else "")
        cells = [
            name, str(s["episodes"]), fmt_ci(s["success_rate"], s["success_ci95"]),
            fmt_ci(s["mean_score"], s["score_ci95"]), f"{s['mean_steps']:.2f}",
            f"{s['invalid_rate']:.3f}", f"{s['mapped_rate']:.3f}", str(len(m["rejected"])),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![success rate per model](agent_success.png)", ""]
    if paired:
        lines += [
            f"## Paired against {reference}",
            "",
            "Per episode (same game, seed and sample), the model minus the reference. "
            "Intervals: paired bootstrap over episodes. Wins: episodes the model solves and "
            "the reference does not; losses: the reverse; McNemar's test on those (exact "
            "binomial below 25, else chi-square with continuity correction). Score p: "
            "two-sided paired bootstrap test (differences shifted to mean zero).",
            "",
            "| model | n | success diff [95% CI] | wins | losses | McNemar p "
            "| score diff [95% CI] | score p |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, d in paired.items():
            if not d["n"]:
                lines.append(f"| {name} | 0 | (no common episodes) | | | | | |")
                continue
            s, c = d["success"], d["score"]
            lines.append(
                f"| {name} | {d['n']} | {fmt_ci(s['diff'], s['ci95'], True)} | {s['wins']} | "
                f"{s['losses']} | {s['mcnemar_p']:.3g} | {fmt_ci(c['diff'], c['ci95'], True)} "
                f"| {c['p']:.3g} |"
            )
        lines.append("")
    lines += [
        "## Wall time",
        "",
        "Of the run that played each model's episodes (a cached model shows its first run's). "
        "Policy: rendering and generation; environments: engine start-up, resets and steps.",
        "",
        "| model | episodes played | engine start (s) | policy (s) | environments (s) "
        "| play (s) | policy calls | mean batch | prefix caching |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        t = m["timing"]
        hits = ""
        if t.get("prefix_cache_queries_tokens"):
            hits = f" ({t['prefix_cache_hits_tokens'] / t['prefix_cache_queries_tokens']:.0%} hit)"
        lines.append(
            f"| {m['name']} | {t.get('episodes_played', '')} | "
            f"{t.get('engine_start_s', 0.0):.1f} | {t['policy_s']:.1f} | {t['env_s']:.1f} | "
            f"{t['play_s']:.1f} | {t.get('policy_calls', '')} | {t.get('mean_batch', 0.0):.1f} | "
            f"{t.get('prefix_caching', '')}{hits} |"
        )
    lines += ["", "## One episode per model (the first seed)", ""]
    for m in models:
        lines += [f"### {m['name']}", ""] + episode_lines(m)
    for m in models:
        for line in m["rejected"]:
            lines.append(f"- {m['name']}: {line}")
    return "\n".join(lines) + "\n"


def write_agent_report(
    out: Path, models: list[dict], settings: dict, reference: str, paired: dict
) -> Path:
    """Writes the files (module docstring); returns the markdown report's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    files: dict[str, str] = {}
    for m in models:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", m["name"]).strip("_") or "model"
        if f"models/{name}.json" in files.values():  # two names, one file name: keep both
            name += f"-{len(files)}"
        path = out / "models" / f"{name}.json"
        path.write_text(json.dumps({"settings": settings, **m}))
        files[m["name"]] = str(path.relative_to(out))
    doc = {
        "settings": settings,
        "reference": reference,
        "paired": paired,
        "models": [
            {**{k: v for k, v in m.items() if k != "episodes"}, "file": files[m["name"]]}
            for m in models
        ],
    }
    (out / "agent_results.json").write_text(json.dumps(doc, indent=1))
    plot_success(out / "agent_success.png", models, settings)
    report = out / "agent_report.md"
    report.write_text(markdown(models, settings, reference, paired))
    return report

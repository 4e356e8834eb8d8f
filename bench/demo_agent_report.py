"""The agent demo's summary: the dev-fold gap, every seed's test-fold evaluation against the
student before, the on-policy variants against SKD, and the wall time of every stage.

Reads REPORT/dev/ and REPORT/seed<S>/ (written by `python -m tools.eval agent`:
agent_results.json with the paired numbers against the student before, models/NAME.json with
every episode's record) and WORK/stages.json (every stage's seconds), and writes
REPORT/summary.md and REPORT/summary.json. The on-policy variants against SKD are paired here,
on the episodes both played, with the evaluation's own statistics
(tools/eval/agent_stats.paired_episodes, same bootstrap size and seed).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from bench.demo_agent_rows import BEFORE_ROW, METHODS, ONPOLICY, REFERENCE, SKD, TEACHER_ROW
from tools.eval.agent_stats import paired_episodes

MIN_GAP = 0.15  # issue 22: the teacher with experience must lead the student by this much


def load_eval(folder: Path) -> dict:
    """One evaluation: {"settings", "models": {name: summary}, "paired": {name: vs reference},
    "episodes": {name: {episode id: record}}}."""
    doc = json.loads((folder / "agent_results.json").read_text())
    episodes = {}
    for m in doc["models"]:
        entries = json.loads((folder / m["file"]).read_text())["episodes"]
        episodes[m["name"]] = {e["id"]: e["episode"] for e in entries}
    return {
        "settings": doc["settings"],
        "reference": doc["reference"],
        "models": {m["name"]: m["summary"] for m in doc["models"]},
        "paired": doc["paired"],
        "episodes": episodes,
    }


def against_skd(ev: dict) -> dict[str, dict]:
    """The on-policy variants paired with SKD on the episodes both played."""
    s = ev["settings"]
    eps = ev["episodes"]
    if SKD not in eps:
        return {}
    return {
        m: paired_episodes(eps[m], eps[SKD], s.get("n_boot", 2000), s.get("seed", 0))
        for m in ONPOLICY
        if m in eps
    }


def above(d: dict | None, metric: str) -> bool:
    """The paired interval lies above zero."""
    return bool(d) and d.get("n", 0) > 0 and d[metric]["ci95"][0] > 0


def verdict(dev: dict | None, per_seed: dict[int, dict]) -> dict:
    out: dict = {}
    if dev is not None:
        d = dev["paired"].get(TEACHER_ROW)
        out["dev_gap"] = d["success"]["diff"] if d and d.get("n") else None
        out["gap_ok"] = out["dev_gap"] is not None and out["dev_gap"] >= MIN_GAP
    # A method counts over the seeds that trained it (--methods may leave it out of some).
    ran = {m: [s for s, ev in per_seed.items() if m in ev["models"]] for m in METHODS}
    out["seeds_trained"] = ran
    for metric in ("success", "score"):
        out[f"beat_before_every_seed_{metric}"] = [
            m for m in METHODS
            if ran[m] and all(above(per_seed[s]["paired"].get(m), metric) for s in ran[m])
        ]  # fmt: skip
        out[f"beat_skd_every_seed_{metric}"] = [
            m for m in ONPOLICY
            if ran[m] and all(above(per_seed[s]["vs_skd"].get(m), metric) for s in ran[m])
        ]  # fmt: skip
    return out


def fmt_rate(value: float, ci: list[float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def fmt_diff(d: dict, p_key: str) -> str:
    lo, hi = d["ci95"]
    return f"{d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}], p {d[p_key]:.3g}"


def paired_cells(d: dict | None) -> list[str]:
    if not d or not d.get("n"):
        return ["", ""]
    return [fmt_diff(d["success"], "mcnemar_p"), fmt_diff(d["score"], "p")]


def model_cells(ev: dict, name: str) -> list[str]:
    m = ev["models"].get(name)
    if m is None:
        return ["", ""]
    return [
        fmt_rate(m["success_rate"], m["success_ci95"]),
        fmt_rate(m["mean_score"], m["score_ci95"]),
    ]


def stage_seconds(stages: dict) -> list[tuple[str, float, str]]:
    """(stage, seconds, note) in the order they ran; services included."""
    return [
        (name, float(s.get("seconds") or 0.0),
         s["command"] if str(s.get("command", "")).startswith("(skipped") else "")
        for name, s in stages.items()
    ]  # fmt: skip


def game_line(settings: dict) -> str:
    env = settings["env"]
    params = ", ".join(f"{k}={v}" for k, v in sorted(env["params"].items())) or "none"
    return (
        f"{env['game']} ({params}), step limit {env['step_limit']}, "
        f"{settings['max_tokens']} tokens per reply, greedy"
    )


def write_summary(report: Path, seeds: list[int], stages: dict, command: str) -> Path:
    dev = load_eval(report / "dev") if (report / "dev" / "agent_results.json").exists() else None
    per_seed = {}
    for seed in seeds:
        ev = load_eval(report / f"seed{seed}")
        ev["vs_skd"] = against_skd(ev)
        per_seed[seed] = ev
    v = verdict(dev, per_seed)
    first = per_seed[seeds[0]]
    n_test = first["models"][REFERENCE]["episodes"]
    lines = [
        "# Agent distillation in a text game",
        "",
        f"Game: {game_line(first['settings'])}. Per-seed reports with every row, the paired "
        "table, the success plot and one whole episode per model: "
        + ", ".join(f"[seed {s}](seed{s}/agent_report.md)" for s in seeds)
        + ("; dev fold: [dev](dev/agent_report.md)." if dev else "."),
        "",
        f"Made by: `{command}`",
        "",
    ]
    if dev is not None:
        n_dev = dev["models"][REFERENCE]["episodes"]
        lines += [
            f"## Dev fold ({n_dev} episodes): the teacher with experience against the student",
            "",
            "| row | success [95% Wilson] | mean score [95% bootstrap] | success vs. student "
            "before [paired 95%], McNemar p | score vs. student before [paired 95%], p |",
            "|---|---|---|---|---|",
        ]
        for name in (TEACHER_ROW, BEFORE_ROW):
            cells = [*model_cells(dev, name), *(
                ["(reference)", ""] if name == REFERENCE else paired_cells(dev["paired"].get(name))
            )]  # fmt: skip
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        gap = v["dev_gap"]
        lines += [
            "",
            "Teacher minus student before in success rate: "
            + ("n/a" if gap is None else f"{gap:+.3f}")
            + f" (the demo needs at least +{MIN_GAP}: "
            + ("met)." if v["gap_ok"] else "**NOT met**)."),
            "",
        ]
    lines += [
        f"## Test fold ({n_test} episodes): every model against the student before",
        "",
        "Success rate [95% Wilson] and mean score [95% bootstrap]; against the student before on "
        "the same episodes: the paired difference [paired bootstrap 95%] with McNemar's p "
        "(success) or the bootstrap p (score).",
        "",
        "| model | " + " | ".join(
            f"seed {s}: success | seed {s}: score | seed {s}: success vs. before "
            f"| seed {s}: score vs. before" for s in seeds
        ) + " |",
        "|---|" + "---|---|---|---|" * len(seeds),
    ]  # fmt: skip
    for name in (TEACHER_ROW, BEFORE_ROW, *METHODS):
        cells = []
        for s in seeds:
            ev = per_seed[s]
            ref = name == REFERENCE
            paired = ["(reference)", ""] if ref else paired_cells(ev["paired"].get(name))
            if name not in ev["models"]:
                paired = ["not trained (see the stage times)", ""]
            cells += [*model_cells(ev, name), *paired]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## On-policy against SKD (paired on the same test episodes)",
        "",
        "| variant | " + " | ".join(
            f"seed {s}: success vs. SKD | seed {s}: score vs. SKD" for s in seeds
        ) + " |",
        "|---|" + "---|---|" * len(seeds),
    ]  # fmt: skip
    for name in ONPOLICY:
        cells = [c for s in seeds for c in paired_cells(per_seed[s]["vs_skd"].get(name))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    def listed(key: str) -> str:
        named = [f"{m} (seeds {', '.join(map(str, v['seeds_trained'][m]))})" for m in v[key]]
        return ", ".join(named) or "**none**"

    lines += [
        "",
        "## Verdicts (every seed that trained it, 95% paired interval above zero)",
        "",
        "- Trained methods above the student before in success: "
        f"{listed('beat_before_every_seed_success')}; in score: "
        f"{listed('beat_before_every_seed_score')}.",
        "- On-policy (live, rounds) above SKD in success: "
        f"{listed('beat_skd_every_seed_success')}; in score: "
        f"{listed('beat_skd_every_seed_score')}.",
        "",
        "## Wall time of every stage on this machine (seconds)",
        "",
        "| stage | seconds | |",
        "|---|---:|---|",
    ]
    times = stage_seconds(stages)
    lines += [f"| {name} | {sec:.0f} | {note} |" for name, sec, note in times]
    lines += [f"| **total** | {sum(t for _, t, _ in times):.0f} | |", ""]
    report.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": command,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "dev": None if dev is None else {k: dev[k] for k in ("settings", "models", "paired")},
        "seeds": {
            s: {k: ev[k] for k in ("settings", "models", "paired", "vs_skd")}
            for s, ev in per_seed.items()
        },
        "verdict": v,
        "stages": stages,
    }
    (report / "summary.json").write_text(json.dumps(doc, indent=1, default=str))
    out = report / "summary.md"
    out.write_text("\n".join(lines) + "\n")
    return out

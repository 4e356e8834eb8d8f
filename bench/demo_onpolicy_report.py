"""The on-policy demo's summary: both seeds' evaluations side by side, against SKD.

Reads REPORT/seed<S>/results.json (written by `python -m tools.eval`, whose paired
statistics come from tools/eval/paired.py) and WORK/stages.json (the wall time of every
stage), and writes REPORT/summary.md, REPORT/summary.json and REPORT/paired_vs_skd.png.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

from bench.demo_onpolicy_rows import BEFORE_ROW, METHODS, ONPOLICY, REFERENCE, TEACHER_ROW

# What each method's wall time includes beyond its own command: the stages it needs.
PREREQUISITES = {
    "skd": ("precompute",),
    "seqkd": ("precompute",),
    "onpolicy": ("precompute", "teacher_server"),  # the shards give the prompts
    "two_stage": ("precompute", "skd", "teacher_server"),
    "rounds": (),
}
MIN_GAP = 0.15  # the teacher must beat SKD by this much for the comparison to mean anything
# How a response begins: with the calculation ("7 * 8 = 56. ..."), with the answer alone
# ("The answer is 56."), or otherwise ("To calculate ..."). A teacher that knows the answer
# may state it outright; a student that does not can only guess when it copies that.
OPENINGS = {
    "calculation": re.compile(r"\s*-?\d+\s*[-+*/]\s*-?\d+\s*="),
    "answer": re.compile(r"\s*the answer is", re.I),
}


def opening(response: str) -> str:
    return next((name for name, rx in OPENINGS.items() if rx.match(response)), "other")


def openings(examples: list[dict]) -> dict[str, dict]:
    """{opening: {"share": fraction of responses, "exact_match": mean score within}}."""
    groups: dict[str, list[float]] = {name: [] for name in (*OPENINGS, "other")}
    for e in examples:
        groups[opening(e["response"])].append(e["score"])
    n = max(len(examples), 1)
    return {
        name: {"share": len(g) / n, "exact_match": sum(g) / len(g) if g else None}
        for name, g in groups.items()
    }


def load_seed(report: Path, seed: int) -> dict:
    doc = json.loads((report / f"seed{seed}" / "results.json").read_text())
    models = {m["name"]: m for m in doc["models"]}
    (task,) = {t for m in doc["models"] for t in m["tasks"]}
    return {
        "task": task,
        "n": models[REFERENCE]["tasks"][task]["n"],
        "score": {name: m["tasks"][task] for name, m in models.items()},
        "paired": {name: per_task[task] for name, per_task in doc["paired"].items()},
        "reference": doc["reference"],
        "openings": {name: openings(m["examples"]) for name, m in models.items()},
    }


def wall_times(stages: dict, seed: int) -> dict[str, dict]:
    """{method: {"own": s, "total": s}}; total adds the prerequisite stages of the seed."""
    out = {}
    for method in METHODS:
        own = stages.get(f"seed{seed}/{method}", {}).get("seconds")
        if own is None:
            continue
        needs = PREREQUISITES[method]
        extra = [stages.get(f"seed{seed}/{p}", {}).get("seconds", 0.0) for p in needs]
        out[method] = {"own": own, "total": own + sum(extra)}
    return out


def verdict(per_seed: dict[int, dict]) -> dict:
    """Which on-policy variants beat SKD with a 95% interval above zero in every seed, and
    whether the teacher was far enough ahead of SKD in every seed."""
    wins = [
        m
        for m in ONPOLICY
        if all(m in s["paired"] and s["paired"][m]["ci95"][0] > 0 for s in per_seed.values())
    ]
    gaps = {
        seed: s["score"][TEACHER_ROW]["mean"] - s["score"][REFERENCE]["mean"]
        for seed, s in per_seed.items()
    }
    return {"beat_skd_every_seed": wins, "teacher_minus_skd": gaps,
            "gap_ok": all(g >= MIN_GAP for g in gaps.values())}  # fmt: skip


def fmt_score(s: dict) -> str:
    lo, hi = s["ci95"]
    return f"{s['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def fmt_diff(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"{d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def plot(path: Path, per_seed: dict[int, dict]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [m for m in (BEFORE_ROW, *METHODS, TEACHER_ROW) if m != REFERENCE]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) * len(per_seed) + 1.2))
    y = 0
    ticks, labels = [], []
    for name in rows:
        for seed, s in per_seed.items():
            d = s["paired"].get(name)
            if d is None:
                continue
            lo, hi = d["ci95"]
            ax.errorbar(d["diff"], y, xerr=[[d["diff"] - lo], [hi - d["diff"]]], fmt="o",
                        color=f"C{seed % 10}", capsize=3)  # fmt: skip
            ticks.append(y)
            labels.append(f"{name}, seed {seed}")
            y += 1
        y += 0.5
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(ticks, labels)
    ax.invert_yaxis()
    n = next(iter(per_seed.values()))["n"]
    ax.set_xlabel(f"exact match minus SKD's (n = {n} questions, 95% paired bootstrap)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def openings_table(per_seed: dict[int, dict], seeds: list[int]) -> list[str]:
    """How each row's responses begin, and how often each beginning is right."""

    def cell(o: dict) -> str:
        em = "-" if o["exact_match"] is None else f"{o['exact_match']:.2f}"
        return f"{o['share']:.2f} ({em})"

    kinds = (*OPENINGS, "other")
    lines = [
        "## How the answers begin",
        "",
        "Share of responses that begin with the calculation (`a op b = ...`), with the answer "
        "alone (`The answer is ...`), or otherwise; in brackets the exact match of those "
        "responses.",
        "",
        "| row | " + " | ".join(f"seed {s}: {k}" for s in seeds for k in kinds) + " |",
        "|---|" + "---:|" * (len(kinds) * len(seeds)),
    ]
    for name in (TEACHER_ROW, BEFORE_ROW, *METHODS):
        if not all(name in per_seed[s]["openings"] for s in seeds):
            continue
        cells = [cell(per_seed[s]["openings"][name][k]) for s in seeds for k in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_summary(report: Path, seeds: list[int], stages: dict, command: str) -> Path:
    per_seed = {seed: load_seed(report, seed) for seed in seeds}
    times = {seed: wall_times(stages, seed) for seed in seeds}
    v = verdict(per_seed)
    first = per_seed[seeds[0]]
    lines = [
        "# On-policy distillation against SKD",
        "",
        f"Held-out: {first['n']} questions ({first['task']}), greedy; every method is compared "
        "with SKD of the same seed on the same questions (paired bootstrap 95% interval, "
        "McNemar's test). Per-seed reports with every row, samples and plots: "
        + ", ".join(f"[seed {s}](seed{s}/comparison_report.md)" for s in seeds)
        + ".",
        "",
        f"Made by: `{command}`",
        "",
        "| method | "
        + " | ".join(
            f"seed {s}: exact match | seed {s}: vs. SKD | seed {s}: McNemar p" for s in seeds
        )
        + " |",  # fmt: skip
        "|---|" + "---|---|---:|" * len(seeds),
    ]
    for name in (TEACHER_ROW, BEFORE_ROW, *METHODS):
        cells = []
        for s in seeds:
            score = per_seed[s]["score"].get(name)
            d = per_seed[s]["paired"].get(name)
            cells += [
                fmt_score(score) if score else "",
                "(reference)" if name == REFERENCE else (fmt_diff(d) if d else ""),
                "" if name == REFERENCE or not d else f"{d['mcnemar_p']:.3g}",
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    gaps = ", ".join(f"seed {s}: {g:+.3f}" for s, g in v["teacher_minus_skd"].items())
    lines += [
        "",
        f"Teacher (Q+E) minus SKD: {gaps} (the comparison needs at least +{MIN_GAP}: "
        f"{'met' if v['gap_ok'] else 'NOT met'}).",
        "",
        "On-policy variants above SKD with an interval excluding zero in every seed: "
        + (", ".join(v["beat_skd_every_seed"]) or "**none**")
        + ".",
        "",
        "![paired differences against SKD](paired_vs_skd.png)",
        "",
        *openings_table(per_seed, seeds),
        "## Wall time on this machine (seconds)",
        "",
        "Own: the method's command. Total: with the stages it needs (teacher shards for the "
        "offline methods and as prompts for live on-policy, the teacher server start, SKD "
        "before two-stage).",
        "",
        "| method | " + " | ".join(f"seed {s}: own | seed {s}: total" for s in seeds) + " |",
        "|---|" + "---:|---:|" * len(seeds),
    ]
    for method in METHODS:
        cells = []
        for s in seeds:
            t = times[s].get(method)
            cells += [f"{t['own']:.0f}", f"{t['total']:.0f}"] if t else ["", ""]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    shared = {
        name: [stages.get(f"seed{s}/{name}", {}).get("seconds") for s in seeds]
        for name in ("precompute", "teacher_server", "eval")
    }
    lines += [""] + [
        f"- {name}: "
        + ", ".join(f"seed {s} {t:.0f} s" for s, t in zip(seeds, ts, strict=True) if t)
        for name, ts in shared.items()
    ]
    report.mkdir(parents=True, exist_ok=True)
    has_plot = plot(report / "paired_vs_skd.png", per_seed)
    if not has_plot:
        lines.remove("![paired differences against SKD](paired_vs_skd.png)")
    doc = {
        "command": command,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "seeds": per_seed,
        "wall_s": times,
        "verdict": v,
        "stages": stages,  # every stage's command and seconds
    }
    (report / "summary.json").write_text(json.dumps(doc, indent=1, default=str))
    out = report / "summary.md"
    out.write_text("\n".join(lines) + "\n")
    return out

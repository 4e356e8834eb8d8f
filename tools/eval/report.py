"""The evaluation's files: results.json, model_comparison.csv, comparison_report.md, plots.

The report answers "did it work?": each row's metric with its 95% interval, and, against the
baseline row (the student before distillation), the margin and whether the two intervals
are disjoint. Against a reference row (by default the same baseline) every row also gets the
paired difference on the same questions, with its paired bootstrap interval and McNemar's
p-value (tools/eval/paired.py). Training curves come from each run's metrics.jsonl (written
by the trainer).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from tools.eval.paired import paired_differences

BASELINE = "student before (Q)"
CURVES = ("loss", "kd", "ce", "eval_loss")


def read_metrics(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not run_dir or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def task_names(results: list[dict]) -> list[str]:
    names: list[str] = []
    for r in results:
        names += [t for t in r["tasks"] if t not in names]
    return names


def margins(results: list[dict], baseline: str) -> dict[str, dict]:
    """Per model and task: mean minus the baseline's, and whether the 95% intervals are
    disjoint (the model's lower bound above the baseline's upper bound)."""
    base = next((r for r in results if r["name"] == baseline), None)
    if base is None:
        return {}
    out = {}
    for r in results:
        for task, t in r["tasks"].items():
            b = base["tasks"].get(task)
            if b is None or r is base:
                continue
            out.setdefault(r["name"], {})[task] = {
                "margin": t["mean"] - b["mean"],
                "intervals_disjoint": t["ci95"][0] > b["ci95"][1] or t["ci95"][1] < b["ci95"][0],
            }
    return out


def write_csv(path: Path, results: list[dict], tasks: list[str]) -> None:
    cols = ["model", "view", "path"]
    for t in tasks:
        cols += [f"{t}_metric", f"{t}", f"{t}_ci_lo", f"{t}_ci_hi", f"{t}_n"]
    cols += ["mean_response_tokens", "gen_tokens_per_s"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in results:
            row = [r["name"], r["view"], r["path"]]
            for t in tasks:
                v = r["tasks"].get(t)
                row += (
                    [v["metric"], f"{v['mean']:.4f}", f"{v['ci95'][0]:.4f}", f"{v['ci95'][1]:.4f}",
                     v["n"]]
                    if v else [""] * 5
                )  # fmt: skip
            row += [f"{r['mean_response_tokens']:.1f}", f"{r['tokens_per_s']:.1f}"]
            w.writerow(row)


def plot_metrics(path: Path, results: list[dict], tasks: list[str]) -> None:
    """One bar per model and task, with the 95% interval as error bars."""
    import matplotlib  # optional: only figures need it, and Agg must be chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(max(6, 1.3 * len(results)) * len(tasks), 4.5),
                             squeeze=False)  # fmt: skip
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = [r for r in results if task in r["tasks"]]
        means = np.array([r["tasks"][task]["mean"] for r in rows])
        lo = np.array([r["tasks"][task]["ci95"][0] for r in rows])
        hi = np.array([r["tasks"][task]["ci95"][1] for r in rows])
        # Teachers grey, the baseline light, distilled students dark.
        colors = [
            "#999999" if "teacher" in r["name"] else "#a6c8e6" if "before" in r["name"]
            else "#2f6aa8" for r in rows
        ]  # fmt: skip
        x = np.arange(len(rows))
        ax.bar(x, means, color=colors, yerr=[means - lo, hi - means], capsize=4)
        for xi, m in zip(x, means, strict=True):
            ax.text(xi, m + 0.01, f"{m:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [r["name"] for r in rows], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(f"{rows[0]['tasks'][task]['metric']} (95% CI)")
        ax.set_title(f"{task}: n = {rows[0]['tasks'][task]['n']} held-out")
        ax.set_ylim(0, min(1.05, max(hi.max() * 1.2, 0.1)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_paired(path: Path, paired: dict[str, dict], tasks: list[str], reference: str) -> bool:
    """Each row's paired difference to the reference with its 95% interval, per task."""
    tasks = [t for t in tasks if any(t in d and d[t]["n"] for d in paired.values())]
    if not tasks:
        return False
    import matplotlib  # optional: only figures need it, and Agg must be chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(paired)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 0.45 * len(names) + 1.6),
                             squeeze=False)  # fmt: skip
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = [(i, paired[n].get(task, {})) for i, n in enumerate(names)]
        rows = [(i, d) for i, d in rows if d.get("n")]
        for i, d in rows:
            # Dark when the interval excludes zero.
            c = "#2f6aa8" if d["ci95"][0] > 0 or d["ci95"][1] < 0 else "#999999"
            err = [[d["diff"] - d["ci95"][0]], [d["ci95"][1] - d["diff"]]]
            ax.errorbar([d["diff"]], [i], xerr=err, fmt="o", color=c, capsize=4)
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"paired difference vs. {reference} (95% bootstrap CI)")
        ax.set_title(f"{task}: n = {rows[0][1]['n']} paired questions")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def paired_table(paired: dict[str, dict], tasks: list[str], reference: str) -> list[str]:
    head = ["model", "task", "n", "difference [95% CI]", "wins", "losses", "McNemar p"]
    lines = [
        f"## Paired differences against {reference}",
        "",
        "Per question, the row's score minus the reference's; the interval is a paired "
        "bootstrap over questions. Wins: questions the row gets right and the reference "
        "wrong; losses: the reverse. McNemar's test on those (exact binomial below "
        "25 discordant questions, else chi-square with continuity correction).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, per_task in paired.items():
        for task in tasks:
            d = per_task.get(task)
            if not d or not d["n"]:
                continue
            cells = [name, task, str(d["n"]),
                     f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"]  # fmt: skip
            if "mcnemar_p" in d:
                cells += [str(d["wins"]), str(d["losses"]), f"{d['mcnemar_p']:.3g}"]
            else:
                cells += ["", "", "(not 0/1 scores)"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def plot_curves(path: Path, results: list[dict]) -> bool:
    """Loss parts and eval loss against steps, one line per training run."""
    runs = [(r["name"], read_metrics(r["run_dir"])) for r in results if r["run_dir"]]
    runs = [(n, m) for n, m in runs if m]
    keys = [k for k in CURVES if any(k in rec for _, m in runs for rec in m)]
    if not keys:
        return False
    import matplotlib  # optional: only figures need it, and Agg must be chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    # One colour per run in every panel (a run without a metric must not shift the others').
    colors = {name: f"C{i}" for i, (name, _) in enumerate(runs)}
    for ax, key in zip(axes[0], keys, strict=True):
        for name, m in runs:
            pts = [(rec["step"], rec[key]) for rec in m if key in rec]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="." if len(pts) < 30 else None,
                        label=name, color=colors[name])  # fmt: skip
        notes = {"eval_loss": " (held-out shards)", "kd": " per token (each run's divergence)"}
        ax.set_title(key + notes.get(key, " per token"))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[n], label=n) for n, _ in runs]
    axes[0][-1].legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(results: list[dict], tasks: list[str], settings: dict, diffs: dict,
             has_curves: bool, paired: dict, reference: str,
             has_paired_plot: bool) -> str:  # fmt: skip
    lines = [
        "# Model comparison",
        "",
        f"Held-out: `{settings['data']}`, {settings['examples']} examples, "
        f"{'greedy' if settings['temperature'] == 0 else 'T=' + str(settings['temperature'])}, "
        f"at most {settings['max_tokens']} new tokens, generated with {settings['backend']}. "
        "Q: the question alone (the student's view); Q+E: with the experience (the teacher's "
        "view in precompute). Intervals: 95% Wilson (binary scores) or bootstrap.",
        "",
        f"Made by: `{settings['command']}`",
        "",
    ]
    head = ["model", "view"] + [f"{t} ({results[0]['tasks'].get(t, {}).get('metric', '')})"
                                for t in tasks]  # fmt: skip
    head += ["vs. student before", "mean response tokens", "gen tokens/s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["name"], r["view"]]
        for t in tasks:
            v = r["tasks"].get(t)
            cells.append(f"{v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]" if v else "")
        d = diffs.get(r["name"], {})
        cells.append(
            "; ".join(
                f"{x['margin']:+.3f}" + (" (CIs disjoint)" if x["intervals_disjoint"] else "")
                for x in d.values()
            )
        )
        cells += [f"{r['mean_response_tokens']:.1f}", f"{r['tokens_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![metric per model](metric_by_model.png)", ""]
    if paired:
        lines += paired_table(paired, tasks, reference)
    if has_paired_plot:
        lines += ["![paired differences](paired_differences.png)", ""]
    if has_curves:
        lines += ["![training curves](training_curves.png)", ""]
    lines += ["## Sample responses (first held-out examples)", ""]
    for r in results:
        lines.append(f"**{r['name']}**")
        lines.append("")
        for ex in r["examples"][:2]:
            text = ex["response"].strip().replace("\n", " ")[:200]
            lines.append(f"- `{ex['id']}` (score {ex['score']:.0f}): {text}")
        lines.append("")
    return "\n".join(lines)


def write_report(
    out: Path, results: list[dict], settings: dict, baseline: str = BASELINE,
    reference: str | None = None,
) -> Path:  # fmt: skip
    """reference: the row every other row is compared with, question by question (default:
    the baseline)."""
    out.mkdir(parents=True, exist_ok=True)
    tasks = task_names(results)
    diffs = margins(results, baseline)
    reference = reference or baseline
    paired = paired_differences(results, reference, seed=settings.get("seed", 0))
    doc = {
        "settings": settings,
        "baseline": baseline,
        "margins": diffs,
        "reference": reference,
        "paired": paired,
        "models": results,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    write_csv(out / "model_comparison.csv", results, tasks)
    plot_metrics(out / "metric_by_model.png", results, tasks)
    has_curves = plot_curves(out / "training_curves.png", results)
    has_paired_plot = plot_paired(out / "paired_differences.png", paired, tasks, reference)
    report = out / "comparison_report.md"
    report.write_text(
        markdown(results, tasks, settings, diffs, has_curves, paired, reference, has_paired_plot)
    )
    return report

"""Agent evaluation statistics: one model's episodes, and two models on the same episodes.

Input: episode records (envs.base.Episode.record(): success, score, steps, invalid, mapped).

Per model (`summarize`):
- success rate with its 95% Wilson interval (scorers.wilson_interval: stays inside [0, 1]
  and is not empty at 0/n or n/n, where a bootstrap of a 0/1 mean collapses to a point);
- mean score with a 95% percentile bootstrap interval over episodes (scores lie in [0, 1]
  but are not 0/1: no closed form);
- mean steps per episode; invalid-action and mapped rates over all actions taken (pooled:
  an action is the unit the parsing rule acts on, so a 10-step episode counts ten times).

Against a reference model (`paired_episodes`), on the episodes both played (matched by
episode id: game, params, fold, seed, sample):
- success: the paired difference of rates with a paired bootstrap interval, and McNemar's
  test on the discordant episodes (paired.mcnemar_p: exact below 25 of them);
- score: the mean paired difference with a paired bootstrap interval and a two-sided
  bootstrap p-value: the differences are shifted to mean zero (the null hypothesis) and p is
  the share of resampled means at least as far from zero as the observed one, (k + 1) /
  (B + 1) so that it is never exactly 0 (Efron & Tibshirani 1993, 16.4). The interval and
  p come from the same resamples.
"""

from __future__ import annotations

import math

import numpy as np

from tools.eval.paired import mcnemar_p
from tools.eval.scorers import bootstrap_means, wilson_interval

N_BOOT = 2000
# A resampled mean equal in size to the observed one counts as "as extreme"; the two are
# summed in different orders, so equal can differ in the last bits.
TIE = 1e-12


def summarize(records: list[dict], n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """The per-model numbers of the report from its episode records."""
    n = len(records)
    wins = sum(1 for r in records if r["success"])
    scores = [float(r["score"]) for r in records]
    actions = sum(int(r["steps"]) for r in records)
    out = {
        "episodes": n,
        "successes": wins,
        "success_rate": wins / n if n else math.nan,
        "success_ci95": list(wilson_interval(wins, n)),
        "success_ci_method": "wilson",
        "mean_score": sum(scores) / n if n else math.nan,
        "score_ci95": list(percentile_interval(bootstrap_means(scores, n_boot, seed)))
        if n
        else [math.nan, math.nan],
        "score_ci_method": "bootstrap",
        "mean_steps": actions / n if n else math.nan,
        "actions": actions,
        "invalid_rate": sum(int(r["invalid"]) for r in records) / actions if actions else 0.0,
        "mapped_rate": sum(int(r["mapped"]) for r in records) / actions if actions else 0.0,
    }
    return out


def percentile_interval(means, level: float = 0.95) -> tuple[float, float]:
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)


def paired_bootstrap(diffs: list[float], n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Mean of per-episode differences, its 95% paired bootstrap interval and two-sided
    p-value (module docstring)."""
    means = bootstrap_means(diffs, n_boot, seed)
    mean = float(np.mean(np.asarray(diffs, dtype=np.float64)))
    lo, hi = percentile_interval(means)
    # Centred resamples are the null distribution of the mean difference.
    extreme = int(np.count_nonzero(np.abs(means - mean) >= abs(mean) - TIE))
    return {"diff": mean, "ci95": [lo, hi], "p": (extreme + 1) / (n_boot + 1)}


def paired_episodes(
    model: dict[str, dict], reference: dict[str, dict], n_boot: int = N_BOOT, seed: int = 0
) -> dict:
    """model, reference: {episode id: record}. The paired numbers on their common ids."""
    ids = [i for i in model if i in reference]
    if not ids:
        return {"n": 0}
    a = [model[i] for i in ids]
    b = [reference[i] for i in ids]
    wins = sum(1 for x, y in zip(a, b, strict=True) if x["success"] and not y["success"])
    losses = sum(1 for x, y in zip(a, b, strict=True) if y["success"] and not x["success"])
    p, method = mcnemar_p(wins, losses)
    success = paired_bootstrap(
        [float(x["success"]) - float(y["success"]) for x, y in zip(a, b, strict=True)],
        n_boot,
        seed,
    )
    score = paired_bootstrap(
        [float(x["score"]) - float(y["score"]) for x, y in zip(a, b, strict=True)], n_boot, seed
    )
    return {
        "n": len(ids),
        "success": {
            "diff": success["diff"],
            "ci95": success["ci95"],
            "wins": wins,
            "losses": losses,
            "mcnemar_p": p,
            "mcnemar_method": method,
        },
        "score": score,
    }

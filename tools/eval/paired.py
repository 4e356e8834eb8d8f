"""Paired comparisons: every row against a reference row, on the same held-out questions.

Two rows scored on the same questions are not independent samples: the questions that one
model finds hard, the other mostly does too. Comparing their separate intervals (do they
overlap?) throws that away and misses real differences; comparing per question does not.
For each row, task and the reference row:

- the paired difference: the mean over questions of (row's score - reference's score);
- its 95% paired bootstrap interval: questions are resampled with replacement and both
  rows' scores come along together (`scorers.bootstrap_interval` of the per-question
  differences, deterministic given the seed);
- for 0/1 scores, McNemar's test of "both are equally good" on the discordant questions:
  `wins` (row right, reference wrong) and `losses` (the reverse). With fewer than
  EXACT_BELOW discordant questions the exact two-sided binomial test (wins ~ Bin(n, 1/2)),
  else the chi-square test with continuity correction. Concordant questions do not count.

Questions are matched by example id; only ids both rows scored are used (`n`).
"""

from __future__ import annotations

import math

from tools.eval.scorers import bootstrap_interval

# The usual rule: below this many discordant pairs the chi-square approximation is poor.
EXACT_BELOW = 25


def mcnemar_p(wins: int, losses: int) -> tuple[float, str]:
    """(two-sided p-value, method) of McNemar's test for `wins` vs `losses` discordant pairs."""
    n = wins + losses
    if n == 0:
        return 1.0, "exact"
    if n < EXACT_BELOW:
        k = min(wins, losses)
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
        return min(1.0, 2.0 * tail), "exact"
    stat = (abs(wins - losses) - 1.0) ** 2 / n
    # Chi-square with one degree of freedom: P(X > stat) = P(|Z| > sqrt(stat)).
    return math.erfc(math.sqrt(stat / 2.0)), "chi2-cc"


def scores_by_id(result: dict, task: str) -> dict[str, float]:
    return {ex["id"]: float(ex["score"]) for ex in result["examples"] if ex["task"] == task}


def paired_difference(
    scores: dict[str, float], reference: dict[str, float], n_boot: int = 2000, seed: int = 0
) -> dict:
    """The paired statistics of one row against the reference, on their common ids."""
    ids = [i for i in scores if i in reference]
    diffs = [scores[i] - reference[i] for i in ids]
    if not diffs:
        return {"n": 0}
    lo, hi = bootstrap_interval(diffs, n_boot=n_boot, seed=seed)
    out = {"n": len(ids), "diff": sum(diffs) / len(diffs), "ci95": [lo, hi]}
    values = set(scores.values()) | set(reference.values())
    if values <= {0.0, 1.0}:
        wins = sum(1 for i in ids if scores[i] == 1.0 and reference[i] == 0.0)
        losses = sum(1 for i in ids if scores[i] == 0.0 and reference[i] == 1.0)
        p, method = mcnemar_p(wins, losses)
        out |= {"wins": wins, "losses": losses, "mcnemar_p": p, "mcnemar_method": method}
    return out


def paired_differences(results: list[dict], reference: str, seed: int = 0) -> dict[str, dict]:
    """{row name: {task: paired statistics against the reference row}}; empty when no row
    has the reference's name."""
    ref = next((r for r in results if r["name"] == reference), None)
    if ref is None:
        return {}
    out: dict[str, dict] = {}
    for r in results:
        if r is ref:
            continue
        for task in r["tasks"]:
            if task in ref["tasks"]:
                out.setdefault(r["name"], {})[task] = paired_difference(
                    scores_by_id(r, task), scores_by_id(ref, task), seed=seed
                )
    return out

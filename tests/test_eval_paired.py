"""Paired comparisons in tools.eval, against naive float64 computations written here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.test_eval import result
from tools.eval.paired import EXACT_BELOW, mcnemar_p, paired_difference, paired_differences
from tools.eval.report import write_report


def naive_bootstrap(diffs: list[float], n_boot: int, seed: int) -> tuple[float, float]:
    """Resample questions one at a time (numpy's stream gives the same draws in bulk)."""
    rng = np.random.default_rng(seed)
    n = len(diffs)
    means = []
    for _ in range(n_boot):
        total = 0.0
        for _ in range(n):
            total += float(diffs[int(rng.integers(0, n))])
        means.append(total / n)
    means.sort()

    def quantile(q: float) -> float:  # linear interpolation between order statistics
        pos = q * (n_boot - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n_boot - 1)
        return means[lo] + (pos - lo) * (means[hi] - means[lo])

    return quantile(0.025), quantile(0.975)


def naive_mcnemar(a: list[float], b: list[float]) -> float:
    wins = losses = 0
    for x, y in zip(a, b, strict=True):
        if x == 1 and y == 0:
            wins += 1
        elif x == 0 and y == 1:
            losses += 1
    n = wins + losses
    if n == 0:
        return 1.0
    if n < 25:  # exact: twice the smaller binomial tail under p = 1/2, capped at 1
        tail = 0.0
        for i in range(min(wins, losses) + 1):
            pmf = 1.0
            for j in range(i):
                pmf *= (n - j) / (j + 1)
            tail += pmf * 0.5**n
        return min(1.0, 2 * tail)
    # Chi-square (1 df) with continuity correction; P(X > s) = 1 - integral of its density,
    # with x = u^2: the integral of 2 * exp(-u^2 / 2) / sqrt(2 pi) over [0, sqrt(s)].
    s = (abs(wins - losses) - 1) ** 2 / n
    steps, top = 200_000, math.sqrt(s)
    h = top / steps
    area = 0.0
    for i in range(steps):
        u = (i + 0.5) * h
        area += 2 * math.exp(-u * u / 2) / math.sqrt(2 * math.pi) * h
    return 1.0 - area


@pytest.mark.parametrize(
    "n, p_row, p_ref, seed",
    [(40, 0.5, 0.3, 0), (120, 0.35, 0.3, 3), (300, 0.4, 0.2, 7), (30, 0.6, 0.6, 1)],
)
def test_paired_statistics_match_the_naive_computation(n, p_row, p_ref, seed):
    rng = np.random.default_rng(100 + seed)
    ref = (rng.random(n) < p_ref).astype(float)
    # Correlated with the reference, as two models on the same questions are.
    row = np.where(rng.random(n) < 0.6, ref, (rng.random(n) < p_row).astype(float))
    ids = [f"q{i}" for i in range(n)]
    scores, reference = dict(zip(ids, row, strict=True)), dict(zip(ids, ref, strict=True))
    got = paired_difference(scores, reference, n_boot=400, seed=seed)
    diffs = [float(x) - float(y) for x, y in zip(row, ref, strict=True)]
    assert got["n"] == n
    assert got["diff"] == pytest.approx(sum(diffs) / n, abs=1e-12)
    lo, hi = naive_bootstrap(diffs, 400, seed)
    assert got["ci95"] == pytest.approx([lo, hi], abs=1e-12)
    assert got["wins"] == sum(1 for x, y in zip(row, ref, strict=True) if x > y)
    assert got["losses"] == sum(1 for x, y in zip(row, ref, strict=True) if x < y)
    assert got["mcnemar_p"] == pytest.approx(naive_mcnemar(list(row), list(ref)), abs=1e-7)
    want = "exact" if got["wins"] + got["losses"] < EXACT_BELOW else "chi2-cc"
    assert got["mcnemar_method"] == want


def test_mcnemar_known_values():
    assert mcnemar_p(1, 9) == (pytest.approx(2 * 11 / 1024), "exact")
    assert mcnemar_p(0, 0) == (1.0, "exact")
    assert mcnemar_p(5, 5)[0] == 1.0  # capped: both tails hold the middle term
    p, method = mcnemar_p(30, 10)  # (|30 - 10| - 1)^2 / 40 = 9.025
    assert method == "chi2-cc" and p == pytest.approx(0.002663, abs=2e-6)


def test_pairs_are_matched_by_id_and_partial_scores_skip_mcnemar():
    ref = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}
    row = {"d": 1.0, "c": 1.0, "a": 0.0, "x": 1.0}  # other order, one id the reference lacks
    got = paired_difference(row, ref, n_boot=50)
    assert (got["n"], got["diff"], got["wins"], got["losses"]) == (3, 0.0, 1, 1)
    partial = paired_difference({"a": 0.5, "b": 1.0}, {"a": 1.0, "b": 0.0}, n_boot=50)
    assert partial["diff"] == pytest.approx(0.25) and "mcnemar_p" not in partial
    assert paired_difference({"a": 1.0}, {"b": 1.0}) == {"n": 0}


def test_report_has_the_paired_table_plot_and_json(tmp_path):
    rng = np.random.default_rng(5)
    before = (rng.random(200) < 0.2).astype(int).tolist()
    skd = [1 if b or rng.random() < 0.15 else 0 for b in before]  # only gains
    results = [
        result("student before (Q)", before),
        result("skd (Q)", skd),
        result("other (Q)", before[::-1]),
    ]
    settings = {"data": "d", "examples": 200, "backend": "hf", "max_tokens": 8,
                "temperature": 0.0, "seed": 0, "command": "python -m tools.eval"}  # fmt: skip
    report = write_report(tmp_path / "rep", results, settings)
    doc = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert doc["reference"] == "student before (Q)"
    assert doc["paired"] == json.loads(json.dumps(paired_differences(results, doc["reference"])))
    skd_vs = doc["paired"]["skd (Q)"]["arith"]
    assert skd_vs["losses"] == 0 and skd_vs["ci95"][0] > 0 and skd_vs["mcnemar_p"] < 1e-3
    text = report.read_text()
    assert "## Paired differences against student before (Q)" in text
    d = skd_vs["diff"]
    assert f"| skd (Q) | arith | 200 | {d:+.3f} [" in text
    assert (tmp_path / "rep" / "paired_differences.png").read_bytes()[:4] == b"\x89PNG"
    # Another reference row: the rows are compared with it instead.
    write_report(tmp_path / "rep2", results, settings, reference="skd (Q)")
    doc2 = json.loads((tmp_path / "rep2" / "results.json").read_text())
    assert set(doc2["paired"]) == {"student before (Q)", "other (Q)"}
    assert doc2["paired"]["student before (Q)"]["arith"]["diff"] == pytest.approx(-d)


def test_an_unknown_reference_row_is_refused_before_generating(tmp_path):
    from tests.precompute_helpers import write_jsonl
    from tools.eval import run as ev

    data = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "question": "1 + 1?", "answer": "2"}])
    argv = ["--config", str(tmp_path / "none.yaml"), "--data", str(data), "--out",
            str(tmp_path / "rep"), "--model", "m=/nowhere", "--reference", "skd (Q)"]  # fmt: skip
    with pytest.raises(SystemExit, match="--reference 'skd \\(Q\\)' is none of the rows"):
        ev.main(argv)
    assert not list((tmp_path / "rep" / "generations").glob("*.json"))

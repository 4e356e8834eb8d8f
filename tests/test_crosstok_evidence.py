"""bench/crosstok_evidence.py: its stages and its summary, on a made-up evaluation report."""

from __future__ import annotations

import json

import pytest

from bench.crosstok_evidence import BEFORE_ROW, parser, row, stages, summarize


def result(name: str, scores: list[float]) -> dict:
    examples = [{"id": f"q{i}", "task": "arith", "score": s} for i, s in enumerate(scores)]
    mean = sum(scores) / len(scores)
    task = {"metric": "exact_match", "n": len(scores), "mean": mean, "ci95": [0.0, 1.0]}
    return {"name": name, "tasks": {"arith": task}, "examples": examples,
            "mean_response_tokens": 3.0}  # fmt: skip


def test_summary_pairs_each_seeds_skd_with_its_seqkd(tmp_path):
    rows = {
        BEFORE_ROW: [0, 0, 0, 0],
        row("skd", 0): [1, 1, 0, 0],
        row("seqkd", 0): [0, 1, 1, 0],
        row("skd", 1): [1, 1, 1, 1],
        row("seqkd", 1): [0, 0, 0, 0],
    }
    doc = {"models": [result(n, s) for n, s in rows.items()], "paired": {}, "settings": {}}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    out = summarize(tmp_path, [0, 1], {"eval": {"seconds": 5.0}}, "cmd")
    # seed 0: q0 won, q2 lost -> mean 0; seed 1: four wins -> +1 (naive per-question means)
    seed0, seed1 = out["skd_minus_seqkd"]["seed0"], out["skd_minus_seqkd"]["seed1"]
    assert seed0["diff"] == 0.0 and (seed0["wins"], seed0["losses"]) == (1, 1)
    assert seed1["diff"] == 1.0 and seed1["ci95"] == [1.0, 1.0]
    assert out["scores"][row("skd", 1)]["mean"] == 1.0
    assert out["stage_seconds"] == {"eval": 5.0}


def test_every_seed_trains_both_methods_from_the_one_shard_folder():
    args = parser().parse_args(["--seeds", "0,1", "--steps", "3", "--work", "w"])
    jobs = {j.name: j for j in stages(args, [0, 1])}
    assert list(jobs) == ["model", "data", "precompute", "seed0/skd", "seed0/seqkd",
                          "seed1/skd", "seed1/seqkd", "eval"]  # fmt: skip
    assert "--student" in jobs["precompute"].argv()
    for name in ("seed1/skd", "seed1/seqkd"):
        argv = jobs[name].argv()
        assert "data.shards=w/shards" in argv and "seed=1" in argv and "max_steps=3" in argv
    models = [a for a in jobs["eval"].argv() if "=" in a and a.split("=")[0] in
              (BEFORE_ROW, row("skd", 0), row("seqkd", 1))]  # fmt: skip
    assert len(models) == 3


@pytest.mark.parametrize("seeds", [[0]])
def test_a_missing_row_is_a_key_error_not_a_silent_skip(tmp_path, seeds):
    doc = {"models": [result(BEFORE_ROW, [0, 1])], "paired": {}, "settings": {}}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    with pytest.raises(KeyError):
        summarize(tmp_path, seeds, {}, "cmd")

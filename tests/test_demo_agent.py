"""make demo-agent (bench/demo_agent.py): its options, its plan of stages, and its summary
built from the stages' real evaluation files (tools.eval agent run in-process on a
pure-Python game with a fake engine, as tests/test_eval_agent.py does), without a model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from bench import demo_agent as demo
from bench.demo_agent_report import write_summary
from envs.config import EnvConfig
from envs.experience import Experience, save_experience
from tests.test_eval_agent import FakeEngine, Steps, make_model, render
from tools.eval import agent
from tools.eval.agent_play import play_model
from tools.stages import Runner
from vllm_engine.env import KVCACHE_SPACE_VAR

REPO = Path(__file__).resolve().parents[1]
GOOD = {"teacher + experience", "skd", "rounds"}  # play every seed right; the others miss evens


def test_options_sizes_and_bad_values(capsys):
    small = demo.parse_args(["--small"])
    assert (small.test_episodes, small.steps, small.rounds) == (8, 2, 1)
    assert small.work == "runs/demo-agent-small" and small.seed_list == [0]
    full = demo.parse_args(["--seeds", "0,1", "--test-episodes", "500"])
    assert full.test_episodes == 500 and full.dev_episodes == demo.FULL["dev_episodes"]
    assert full.seed_list == [0, 1] and full.report == "reports/demo-agent"
    assert full.method_list == list(demo.METHODS)
    assert demo.parse_args(["--methods", "seqkd,skd"]).method_list == ["skd", "seqkd"]
    for bad, said in (
        (["--seeds", "0,x"], "expected comma-separated integers"),
        (["--seeds", "1,1"], "expected distinct integers >= 0"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--methods", "skd,sft"], "expected some of skd,seqkd,onpolicy,rounds"),
    ):
        with pytest.raises(SystemExit):
            demo.parse_args(bad)
        assert said in capsys.readouterr().err


def test_the_demo_configs_load_and_a_bad_key_is_one_line(tmp_path):
    cfg = demo.load_demo_config(REPO / demo.DEMO_CONFIG)
    assert cfg.env.game and cfg.play.max_tokens >= 1
    bad = tmp_path / "agent.yaml"
    bad.write_text("env: {game: twc}\nplay: {max_tokens: 8, tempreature: 1}\n")
    with pytest.raises(SystemExit, match=rf"{bad}: unknown config key\(s\) play.tempreature"):
        demo.load_demo_config(bad)


@pytest.fixture
def planned(tmp_path):
    """A demo of two seeds on the 6-seed pure-Python game, its stages planned."""
    teacher = make_model(tmp_path / "teacher")
    student = make_model(tmp_path / "student")
    args = demo.parse_args([
        "--seeds", "0,1", "--teacher", teacher, "--student", student,
        "--work", str(tmp_path / "w"), "--report", str(tmp_path / "r"),
        "--dev-episodes", "6", "--test-episodes", "6", "--train-episodes", "6",
    ])  # fmt: skip
    cfg = demo.AgentDemoConfig(env=EnvConfig(game="sorting", step_limit=8))
    Path(args.work).mkdir(parents=True)
    demo.write_env_files(args, cfg)
    runner = Runner(Path(args.work) / "stages.json", settings=demo.settings(args))
    return args, cfg, runner, demo.plan(args, cfg, runner)


def test_the_plan_rollouts_training_and_evaluations(planned):
    args, cfg, runner, stages = planned
    names = [s.name for s in stages]
    assert names[:2] == ["experience", "dev"]
    per_seed = ["rollouts", "skd", "seqkd", "onpolicy", "rounds", "eval"]
    assert names[2:] == [f"seed{s}/{n}" for s in (0, 1) for n in per_seed]
    by = {s.name: s for s in stages}
    env_train = (Path(args.work) / "env-train.yaml").read_text()
    assert "fold: train" in env_train and "num_seeds: 6" in env_train
    # One game for every phase: the rollouts' env is agent.yaml's, on the train fold.
    keep_all = by["seed0/rollouts"].argv()
    assert "rollout.keep=all" in keep_all
    assert f"rollout.max_tokens={cfg.play.max_tokens}" in keep_all  # one reply length
    assert {"env.game=sorting", "env.fold=train", "env.num_seeds=6", "env.step_limit=8",
            "sampling.seed=0"} <= set(keep_all)  # fmt: skip
    skd, seqkd = by["seed1/skd"].argv(), by["seed1/seqkd"].argv()
    assert f"data.shards={Path(args.work) / 'seed1/rollouts'}" in skd and "seed=1" in skd
    # SeqKD: the same teacher run, its solved episodes only (train/batches.py).
    assert f"data.shards={Path(args.work) / 'seed1/rollouts'}" in seqkd
    assert "data.keep=success" in seqkd and "data.keep=success" not in skd
    # SeqKD skips when the teacher solved nothing (here: the folder does not exist).
    assert "the teacher solved none of its 0 train episodes" in by["seed0/seqkd"].skip()
    rounds = by["seed0/rounds"].argv()
    assert rounds[rounds.index("--env-config") + 1] == str(Path(args.work) / "env-train.yaml")
    # The test evaluation leaves out a method whose stage was skipped.
    runner.record("seed0/seqkd", 0.0, "(skipped: no successful teacher episode)")
    ev = by["seed0/eval"].argv()
    assert [a for a in ev if a.startswith("--model=")] == [
        f"--model={m}={demo.run_path(args, 0, m)}" for m in ("skd", "onpolicy", "rounds")
    ]
    assert ev[ev.index("--reference") + 1] == "student before"
    assert "--model=seqkd=" in " ".join(by["seed1/eval"].argv())


def test_methods_plan_only_their_stages_and_models(planned, monkeypatch):
    monkeypatch.delenv(KVCACHE_SPACE_VAR, raising=False)
    args, cfg, runner, _ = planned
    for methods, per_seed in (
        ("seqkd,skd", ["rollouts", "skd", "seqkd", "eval"]),
        ("rounds", ["rounds", "eval"]),  # the student plays: no teacher rollouts
    ):
        args.method_list = demo.parse_args(["--methods", methods]).method_list
        stages = demo.plan(args, cfg, runner)
        assert [s.name for s in stages[2:]] == [f"seed{s}/{n}" for s in (0, 1) for n in per_seed]
        models = [a.split("=")[1] for a in stages[-1].argv() if a.startswith("--model=")]
        assert models == [m for m in demo.METHODS if m in args.method_list]
    # A larger KV cache for the stages that play a batch of episodes, and only for them.
    big = replace(cfg, engine=demo.EngineSpec(cpu_kv_cache_gib=4))
    args.method_list = list(demo.METHODS)
    by = {s.name: s for s in demo.plan(args, big, runner)}
    with_cache = {n for n, s in by.items() if s.env == {KVCACHE_SPACE_VAR: "4"}}
    assert with_cache == {"dev", "seed0/rollouts", "seed0/eval", "seed1/rollouts", "seed1/eval"}
    # The summary gathers the seeds evaluated in the folder, earlier runs' included.
    runner.record("seed3/eval", 1.0, "python ...")
    runner.record("seed3/skd", 1.0, "python ...")
    assert demo.evaluated_seeds(runner.done) == {3}


def test_a_seed_run_again_with_more_methods_is_evaluated_again_with_all(planned, capsys):
    """--seeds 1 --methods skd,seqkd, then --methods onpolicy,rounds: the second run's
    evaluation plays all four (the first two from the episode cache), not the new two alone,
    and a finished evaluation that already has every method is kept."""
    args, cfg, runner, _ = planned
    for m in ("skd", "seqkd"):
        runner.record(f"seed1/{m}", 1.0, "python -m train ...")
    runner.record("seed1/eval", 1.0, "python -m tools.eval agent --model=skd=a --model=seqkd=b")
    runner.record("seed0/eval", 1.0, "python -m tools.eval agent --model=skd=a")
    assert demo.forget_stale_evals(runner, [0, 1], ["skd"]) == []
    said = demo.forget_stale_evals(runner, [1], ["onpolicy", "rounds"])
    assert said == ["seed1/eval: evaluated again, for onpolicy, rounds"]
    assert "seed1/eval" not in runner.done and "seed0/eval" in runner.done
    assert "seed1/eval" not in json.loads((Path(args.work) / "stages.json").read_text())["done"]
    args.seed_list, args.method_list = [1], ["onpolicy", "rounds"]
    for m in ("onpolicy", "rounds"):  # as if this run had trained them
        runner.record(f"seed1/{m}", 1.0, "python ...")
    ev = demo.plan(args, cfg, runner)[-1]
    models = [a.split("=")[1] for a in ev.argv() if a.startswith("--model=")]
    assert models == ["skd", "seqkd", "onpolicy", "rounds"]
    # A method whose stage was skipped (SeqKD without a solved episode) is not asked for.
    runner.record("seed2/seqkd", 0.0, "(skipped: the teacher solved none)")
    runner.record("seed2/eval", 1.0, "python -m tools.eval agent --model=skd=a")
    assert demo.forget_stale_evals(runner, [2], ["skd", "seqkd"]) == []


def player(spec, job):
    """tools.eval agent's player, in-process: GOOD models stop on every seed."""

    class Engine(FakeEngine):
        def __call__(self, prompts, seeds):
            out = super().__call__(prompts, seeds)
            return ["stop" if r == "dance" and spec.name in GOOD else r for r in out]

    return play_model(job, render, Engine(), make_env=Steps, extra={"engine_start_s": 0.0})


def test_summary_from_the_stages_evaluations(planned):
    args, cfg, runner, stages = planned
    by = {s.name: s for s in stages}
    save_experience(
        Experience("count, then stop", {"builder": "test", "fold": "train"}),
        demo.experience_path(args),
    )
    for seed in (0, 1):
        for m in demo.METHODS:
            if not (seed == 0 and m == "seqkd"):
                demo.run_path(args, seed, m).parent.mkdir(parents=True, exist_ok=True)
                make_model(demo.run_path(args, seed, m))
    for name, seconds in (("experience", 3.0), ("dev", 40.0), ("seed0/skd", 12.5)):
        runner.record(name, seconds, "python ...")
    runner.record("seed0/seqkd", 0.0, "(skipped: no successful teacher episode)")
    for name in ("dev", "seed0/eval", "seed1/eval"):
        argv = by[name].argv()
        assert argv[1:4] == ["-m", "tools.eval", "agent"]
        assert agent.main([*argv[4:], "--n-boot", "200"], player=player) == 0
    report = Path(args.report)
    md = write_summary(report, [0, 1], runner.done, command="python -m bench.demo_agent")
    md = md.read_text()
    doc = json.loads((report / "summary.json").read_text())
    # Dev: the teacher solves 6 of 6, the student before the 3 odd seeds.
    assert doc["verdict"]["dev_gap"] == pytest.approx(0.5) and doc["verdict"]["gap_ok"]
    s0, s1 = doc["seeds"]["0"], doc["seeds"]["1"]
    assert s0["paired"]["skd"]["success"]["diff"] == pytest.approx(0.5)
    assert "seqkd" not in s0["models"] and s1["paired"]["seqkd"]["success"]["diff"] == 0
    # On-policy against SKD, paired on the same 6 episodes: live misses the 3 even seeds SKD
    # solves; rounds solves what SKD solves.
    live = s0["vs_skd"]["onpolicy"]["success"]
    assert (live["diff"], live["wins"], live["losses"]) == (pytest.approx(-0.5), 0, 3)
    assert s1["vs_skd"]["rounds"]["success"]["diff"] == 0
    assert doc["verdict"]["beat_skd_every_seed_success"] == []
    skd_lo = min(s["paired"]["skd"]["success"]["ci95"][0] for s in (s0, s1))
    assert ("skd" in doc["verdict"]["beat_before_every_seed_success"]) == (skd_lo > 0)
    assert "not trained (see the stage times)" in md
    # A method counts over the seeds that trained it.
    assert doc["verdict"]["seeds_trained"]["seqkd"] == [1]
    assert doc["verdict"]["seeds_trained"]["skd"] == [0, 1]
    assert "| seed0/seqkd | 0 | (skipped: no successful teacher episode) |" in md
    assert "| experience | 3 |" in md and "| **total** |" in md
    assert "(the demo needs at least +0.15: met)" in md
    assert "[seed 0](seed0/agent_report.md)" in md and "sorting (none), step limit 8" in md

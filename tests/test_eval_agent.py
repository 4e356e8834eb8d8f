"""python -m tools.eval agent: the statistics against naive float64 computations written here,
the report on fake episodes, the episode cache and resume, and the CLI end to end on a
pure-Python game with a fake engine (the real ChatPolicy and runner; no vLLM, no Java).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from envs.base import Observation
from envs.experience import Experience, save_experience
from tests.test_eval_paired import naive_bootstrap, naive_mcnemar
from tools.eval import agent
from tools.eval.agent_play import entry_episode, episode_entry, play_model, read_partial
from tools.eval.agent_stats import paired_bootstrap, paired_episodes, summarize

# --- statistics -------------------------------------------------------------------------


def fake_records(n: int, p: float, seed: int, like: list[dict] | None = None) -> list[dict]:
    """Episode records; with `like`, correlated with it (the same seeds are hard for both)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        success = bool(rng.random() < p)
        if like is not None and rng.random() < 0.6:
            success = like[i]["success"]
        steps = int(rng.integers(1, 11))
        invalid = int(rng.integers(0, steps + 1))
        mapped = int(rng.integers(0, steps - invalid + 1))
        score = 1.0 if success else float(rng.integers(0, 3)) / 4
        out.append({"success": success, "score": score, "steps": steps, "invalid": invalid,
                    "mapped": mapped})  # fmt: skip
    return out


def naive_wilson(k: int, n: int) -> tuple[float, float]:
    z = 1.96
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if k == 0 else center - half), (1.0 if k == n else center + half)


def naive_bootstrap_p(diffs: list[float], n_boot: int, seed: int) -> float:
    """Shift the differences to mean zero; the share of resampled means at least as far from
    zero as the observed mean, (k + 1) / (B + 1)."""
    rng = np.random.default_rng(seed)
    n = len(diffs)
    observed = sum(diffs) / n
    centred = [d - observed for d in diffs]
    k = 0
    for _ in range(n_boot):
        total = 0.0
        for _ in range(n):
            total += centred[int(rng.integers(0, n))]
        if abs(total / n) >= abs(observed) - 1e-12:
            k += 1
    return (k + 1) / (n_boot + 1)


@pytest.mark.parametrize("n, p, seed", [(60, 0.3, 0), (25, 0.0, 1), (40, 1.0, 2), (90, 0.55, 3)])
def test_summary_matches_the_naive_computation(n, p, seed):
    recs = fake_records(n, p, seed)
    got = summarize(recs, n_boot=300, seed=seed)
    k = sum(1 for r in recs if r["success"])
    assert got["episodes"] == n and got["successes"] == k
    assert got["success_rate"] == pytest.approx(k / n, abs=1e-15)
    assert got["success_ci95"] == pytest.approx(naive_wilson(k, n), abs=1e-12)
    scores = [r["score"] for r in recs]
    assert got["mean_score"] == pytest.approx(sum(scores) / n, abs=1e-12)
    assert got["score_ci95"] == pytest.approx(naive_bootstrap(scores, 300, seed), abs=1e-12)
    actions = sum(r["steps"] for r in recs)
    assert got["mean_steps"] == pytest.approx(actions / n, abs=1e-12)
    assert got["invalid_rate"] == pytest.approx(sum(r["invalid"] for r in recs) / actions)
    assert got["mapped_rate"] == pytest.approx(sum(r["mapped"] for r in recs) / actions)
    assert (got["success_ci_method"], got["score_ci_method"]) == ("wilson", "bootstrap")


@pytest.mark.parametrize("n, p_model, p_ref, seed", [(50, 0.6, 0.3, 0), (80, 0.35, 0.35, 4)])
def test_paired_statistics_match_the_naive_computation(n, p_model, p_ref, seed):
    ref = fake_records(n, p_ref, seed)
    mod = fake_records(n, p_model, seed + 1, like=ref)
    ids = [f"twc[]/test/{i}/0" for i in range(n)]
    # The reference has two more episodes and misses one of the model's: common ids only.
    ref_by_id = dict(zip(ids[1:], ref[1:], strict=True)) | {"x/1": ref[0], "x/2": ref[0]}
    got = paired_episodes(dict(zip(ids, mod, strict=True)), ref_by_id, n_boot=300, seed=seed)
    a, b = mod[1:], ref[1:]
    assert got["n"] == n - 1
    ds = [float(x["success"]) - float(y["success"]) for x, y in zip(a, b, strict=True)]
    dc = [x["score"] - y["score"] for x, y in zip(a, b, strict=True)]
    s, c = got["success"], got["score"]
    assert s["diff"] == pytest.approx(sum(ds) / len(ds), abs=1e-12)
    assert s["ci95"] == pytest.approx(naive_bootstrap(ds, 300, seed), abs=1e-12)
    assert s["wins"] == sum(1 for d in ds if d > 0) and s["losses"] == sum(1 for d in ds if d < 0)
    sa = [float(x["success"]) for x in a]
    sb = [float(y["success"]) for y in b]
    assert s["mcnemar_p"] == pytest.approx(naive_mcnemar(sa, sb), abs=1e-7)
    assert c["diff"] == pytest.approx(sum(dc) / len(dc), abs=1e-12)
    assert c["ci95"] == pytest.approx(naive_bootstrap(dc, 300, seed), abs=1e-12)
    assert c["p"] == pytest.approx(naive_bootstrap_p(dc, 300, seed), abs=1e-12)


def test_bootstrap_p_is_one_without_a_difference_and_small_with_a_clear_one():
    assert paired_bootstrap([0.0] * 30, n_boot=200)["p"] == 1.0
    assert paired_bootstrap([1.0, -1.0] * 15, n_boot=200)["p"] == 1.0
    clear = paired_bootstrap([0.5] * 40 + [0.0] * 10, n_boot=200)
    assert clear["p"] == pytest.approx(1 / 201) and clear["ci95"][0] > 0
    assert paired_episodes({"a": {}}, {"b": {}}) == {"n": 0}


# --- a pure-Python game and a fake engine ----------------------------------------------------


class Steps:
    """Seed s is won by "stop" after exactly s-1 "go"s; the score is the share of the way there
    (so scores are not only 0/1). Observations name the seed, so a fake engine can play."""

    def __init__(self, config):
        self.config = config

    def seeds(self):
        return self.config.select_seeds([1, 2, 3, 4, 5, 6])

    def reset(self, seed, fold):
        self.seed, self.n, self.goes = seed, 0, 0
        return self._obs(f"seed {seed}: you stand at the start", False, False)

    def step(self, action):
        self.n += 1
        won = action == "stop" and self.goes == self.seed - 1
        self.goes += action == "go"
        done = won or action == "stop" or self.n >= self.config.step_limit
        return self._obs(f"{action}: step {self.n}", done, won)

    def close(self):
        pass

    def _obs(self, text, done, won):
        score = 1.0 if won else min(self.goes, self.seed - 1) / self.seed
        return Observation("count to your seed", text, ("go", "stop"), 0.0, score, done, won,
                           self.n)  # fmt: skip


def render(messages: list[dict]) -> list[int]:
    """A 'chat template' whose token ids are the bytes of the messages' JSON."""
    return list(json.dumps(messages).encode())


class FakeEngine:
    """complete(prompt ids, seeds): with the experience in the system message it plays
    perfectly; without, it forgets to stop on even seeds. Replies are written loosely (the
    action rule maps them)."""

    def __init__(self):
        self.batches: list[int] = []
        self.jobs: list[dict] = []

    def __call__(self, prompts: list[list[int]], seeds: list[int]) -> list[str]:
        assert len(seeds) == len(prompts) and len(set(seeds)) == len(seeds)
        self.batches.append(len(prompts))
        out = []
        for ids in prompts:
            msgs = json.loads(bytes(ids).decode())
            seed = int(msgs[1]["content"].split(":")[0].split()[1])
            step = sum(m["role"] == "assistant" for m in msgs)
            knows = "Experience from earlier games" in msgs[0]["content"]
            if step < seed - 1:
                out.append("Go!" if step % 2 else "I go now")  # exact / mapped
            elif knows or seed % 2:
                out.append("stop")
            else:
                out.append("dance")  # invalid: the game answers, it costs a step
        return out


def make_model(path):
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "fake"}')
    (path / "model.safetensors").write_bytes(b"weights " + path.name.encode())
    return str(path)


def in_process(engine: FakeEngine):
    def player(spec, job):
        engine.jobs.append(job)
        return play_model(job, render, engine, make_env=Steps, extra={"engine_start_s": 0.0})

    return player


@pytest.fixture
def setup(tmp_path):
    exp = tmp_path / "exp.json"
    save_experience(Experience("count, then stop", {"builder": "test", "fold": "train"}), exp)
    teacher, student = make_model(tmp_path / "teacher"), make_model(tmp_path / "student")
    argv = [
        "--env-config", "game=sorting", "step_limit=8", "fold=test",
        "--model", f"teacher + experience={teacher}@experience={exp}",
        "--model", f"student before={student}",
        "--batch-size", "4", "--out", str(tmp_path / "out"), "--n-boot", "200",
    ]  # fmt: skip
    return argv, tmp_path


def test_cli_plays_reports_and_caches(setup):
    argv, tmp = setup
    engine = FakeEngine()
    assert agent.main(argv, player=in_process(engine)) == 0
    out = tmp / "out"
    doc = json.loads((out / "agent_results.json").read_text())
    assert doc["reference"] == "student before"
    teacher, student = doc["models"]
    assert teacher["summary"]["success_rate"] == 1.0 and teacher["summary"]["episodes"] == 6
    assert student["summary"]["successes"] == 3  # the odd seeds
    assert teacher["experience_source"] == {"builder": "test", "fold": "train"}
    assert student["experience"] is None
    # Seeds 1..6 take 1..6 actions; the first action of each is mapped ("I go now").
    assert teacher["summary"]["mean_steps"] == pytest.approx(3.5)
    assert teacher["summary"]["mapped_rate"] == pytest.approx(9 / 21)
    assert student["summary"]["invalid_rate"] > 0
    p = doc["paired"]["teacher + experience"]
    assert p["n"] == 6 and p["success"]["wins"] == 3 and p["success"]["losses"] == 0
    assert p["success"]["mcnemar_p"] == pytest.approx(0.25)  # exact: 2 * (1/2)^3
    assert p["score"]["diff"] > 0
    assert max(engine.batches) == 4  # episodes batched
    assert [j["engine"]["enable_prefix_caching"] for j in engine.jobs] == [True, True]
    assert engine.jobs[0]["experience"] and engine.jobs[1]["experience"] is None
    # Per model: every episode, re-readable as an Episode.
    per_model = json.loads((out / teacher["file"]).read_text())
    first = entry_episode(per_model["episodes"][0])
    assert first.id == per_model["episodes"][0]["id"] == "sorting[]/test/1/0"
    assert episode_entry(first) == per_model["episodes"][0]
    report = (out / "agent_report.md").read_text()
    assert "| teacher + experience (experience) | 6 | 1.000 [" in report
    assert "## Paired against student before" in report
    assert "- reply: `I go now`" not in report  # seed 1: stop at once
    assert "- reply: `stop`" in report and "- action (exact): `stop`" in report
    assert (
        "seed 1: you stand at the start" in report
        and "Which action do you take? Options:" in report
    )
    assert (out / "agent_success.png").stat().st_size > 1000
    # A rerun plays nothing; another experience (or sampling) is another key.
    again = FakeEngine()
    assert agent.main(argv, player=in_process(again)) == 0
    assert again.batches == []
    assert agent.main(argv + ["--temperature", "0.5"], player=in_process(again)) == 0
    assert sum(again.batches) == sum(engine.batches) == 21 + (1 + 3 + 5) + 3 * 8


def test_a_killed_model_resumes_without_replaying_or_losing_episodes(setup):
    argv, tmp = setup
    engine = FakeEngine()
    agent.main(argv, player=in_process(engine))
    key = json.loads((tmp / "out" / "agent_results.json").read_text())["models"][1]["cache_key"]
    student_file = tmp / "out" / "episodes" / f"{key}.json"
    whole = json.loads(student_file.read_text())
    job = {**whole["job"], "out": str(student_file), "partial": str(tmp / "p.jsonl")}
    # Killed after seeds 1, 2 and 4 were written, mid-write of the next line.
    lines = [json.dumps(whole["episodes"][i]) + "\n" for i in (0, 1, 3)]
    (tmp / "p.jsonl").write_text("".join(lines) + '{"id": "sorting[]/tes')
    assert len(read_partial(tmp / "p.jsonl")) == 3
    assert (tmp / "p.jsonl").read_text().endswith("}\n")  # the torn line is cut off
    again = FakeEngine()
    doc = play_model(job, render, again, make_env=Steps)
    assert sum(again.batches) == 3 + 5 + 8  # seeds 3, 5, 6 only (6: stops never, 8 steps)
    assert doc["episodes"] == whole["episodes"]  # the same episodes, in seed order
    assert doc["timing"]["episodes_resumed"] == 3 and not (tmp / "p.jsonl").exists()


def test_bad_input_is_one_line(setup, capsys):
    argv, tmp = setup
    with pytest.raises(SystemExit, match="env.params: unknown parameter 'size'"):
        agent.main(argv + ["--env-config", "params.size=1"], player=in_process(FakeEngine()))
    with pytest.raises(SystemExit, match=r"--reference 'nobody' is none of the rows"):
        agent.main(argv + ["--reference", "nobody"], player=in_process(FakeEngine()))
    with pytest.raises(SystemExit, match="expected NAME=PATH"):
        agent.main(argv + ["--model", "just-a-path"], player=in_process(FakeEngine()))
    with pytest.raises(ValueError, match=r"expected NAME=PATH\[@experience=FILE\]"):
        agent.parse_agent_model("a=b@qe")
    bad = tmp / "dev-exp.json"
    bad.write_text(json.dumps({"text": "x", "source": {"fold": "dev"}}))
    with pytest.raises(SystemExit, match="source.fold: 'dev'"):
        agent.main(argv + ["--model", f"x={tmp / 'student'}@experience={bad}"])
    with pytest.raises(SystemExit, match="no such file, and not key=value"):
        agent.main(["--env-config", "nothing.yaml", "--model", "a=b"])


def test_env_config_from_a_file_with_an_env_section(tmp_path):
    f = tmp_path / "agent.yaml"
    f.write_text("teacher: models/t\nenv:\n  game: twc\n  params: {numLocations: 1}\n")
    config, rest = agent.load_env_config([str(f), "params.numItemsToPutAway=2", "num_seeds=3"])
    assert config.game_params() == "numItemsToPutAway=2,numLocations=1"
    assert config.num_seeds == 3 and config.fold == "test" and rest == {"teacher": "models/t"}


def test_standard_rows_are_tools_evals_as_agents(tmp_path):
    rows = agent.standard_agent_models("models/t", "exp.json", "models/s", str(tmp_path / "none"))
    assert rows == [
        agent.AgentSpec("teacher + experience", "models/t", "exp.json"),
        agent.AgentSpec("teacher", "models/t"),
        agent.AgentSpec("student before", "models/s"),
    ]
    without = agent.standard_agent_models("models/t", None, "models/s", str(tmp_path / "none"))
    assert [r.name for r in without] == ["teacher", "student before"]

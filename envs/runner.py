"""The batch runner: plays many episodes with one policy call per step for all of them.

Up to batch_size episodes are active at once, each in its own environment (a game engine
process). Every round, the prompts of all active episodes go to the policy together
(`policy(list_of_messages) -> list_of_replies`; with policy_keys=True also the episodes'
keys, `policy(list_of_messages, keys)`, for per-episode sampling seeds), so an inference
engine sees one batch per step; each reply is parsed (actions.py) and its environment
stepped. A finished episode leaves the batch, its environment takes the next pending
episode, and `on_episode` gets it at once (a caller commits it then: nothing waits for
the slowest episode).

An environment that dies (EnvironmentDied) is replaced by a fresh one in which the episode
is replayed from its seed with the actions already taken (the games are deterministic: the
replayed observations must equal the recorded ones), and the step is retried. A second
death, or a replay that diverges, rejects the episode by name (game, params, fold, seed,
sample): one line to `log`, a Rejected record in the result, and the batch goes on.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from envs.actions import parse_action
from envs.base import Environment, EnvironmentDied, Episode, Observation, Rejected
from envs.config import EnvConfig
from envs.prompt import messages

Policy = Callable[[list[list[dict]]], list[str]]


@dataclass(frozen=True)
class EpisodeKey:
    """An episode within a config: its seed and its sample index (n episodes per seed)."""

    seed: int
    sample: int = 0


@dataclass
class PlayResult:
    episodes: list[Episode]  # finished, in the order of the keys
    rejected: list[Rejected]
    policy_calls: int = 0  # one per round: the batches the policy saw
    policy_seconds: float = 0.0
    env_seconds: float = 0.0  # engine start-up, resets, steps and replays
    batch_sizes: list[int] = field(default_factory=list)  # prompts per policy call


class EnvPool:
    """Started environments of one config, kept between play() calls: an engine starts in
    about a second, so a caller that plays every training step (live on-policy) pays for
    it once. play() takes environments from the pool and gives the live ones back."""

    def __init__(
        self, config: EnvConfig, make_env: Callable[[EnvConfig], Environment] | None = None
    ):
        if make_env is None:
            from envs.textworld import TextWorldEnv

            make_env = TextWorldEnv
        self.config, self.make_env = config, make_env
        self.free: list[Environment] = []
        self.started = 0  # environments made so far (replacements for dead ones included)

    def take(self) -> Environment:
        if self.free:
            return self.free.pop()
        self.started += 1
        return self.make_env(self.config)

    def warm(self, n: int, threads: int = 4) -> None:
        """Start environments until n are free, `threads` at a time (start-up is mostly the
        JVM's CPU time, so threads help little on two busy cores: 16 in 8.9 s against 9.9 s
        one by one, bench/envs.py)."""
        missing = n - len(self.free)
        if missing <= 0:
            return
        with ThreadPoolExecutor(min(threads, missing)) as ex:
            futures = [ex.submit(self.make_env, self.config) for _ in range(missing)]
        envs = [f.result() for f in futures if f.exception() is None]
        self.started += len(envs)
        self.free.extend(envs)
        for f in futures:
            if f.exception() is not None:
                raise f.exception()

    def give(self, env: Environment) -> None:
        self.free.append(env)

    def close(self) -> None:
        while self.free:
            self.free.pop().close()

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Reject(Exception):
    pass


@dataclass
class _Active:
    key: EpisodeKey
    env: Environment
    episode: Episode
    obs: Observation | None = None
    experience: str | None = None  # this episode's (the runner's, or its callable's answer)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def default_keys(config: EnvConfig, env, samples: int = 1) -> list[EpisodeKey]:
    """Every configured seed (env.seeds(): EnvConfig.select_seeds) times `samples`."""
    return [EpisodeKey(s, i) for s in env.seeds() for i in range(samples)]


def play(
    config: EnvConfig,
    policy: Policy,
    *,
    keys: Sequence[EpisodeKey] | None = None,
    samples: int = 1,
    batch_size: int = 16,
    experience: str | Callable[[Observation], str] | None = None,
    pool: EnvPool | None = None,
    make_env: Callable[[EnvConfig], Environment] | None = None,
    on_episode: Callable[[Episode], None] | None = None,
    policy_keys: bool = False,
    log: Callable[[str], None] = _stderr,
    on_reject: Callable[[Rejected], None] | None = None,
) -> PlayResult:
    """Play `keys` (default: the config's seeds x `samples`) with `policy`, batch_size
    episodes at a time. experience goes into the prompts' system message (teacher view):
    one text for every episode, or a callable of an episode's first observation that gives
    that episode's text (a per-episode experience, envs.experience.for_episode; called once
    per episode, after its reset, so it sees what the episode starts with and nothing later).
    pool: environments to reuse (left open, live ones given back); without one, a pool of
    make_env (default TextWorldEnv) is made for this call and closed at its end.
    policy_keys: call policy(prompts, keys) with each prompt's EpisodeKey (a sampler can
    then seed each episode's requests from its identity and step, so a resumed episode
    samples the same replies). on_reject gets each rejected episode at once (a caller that
    commits as it goes records it then)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pool is not None and pool.config != config:
        raise ValueError("pool: its environments were made for another config")
    own = pool is None
    pool = EnvPool(config, make_env) if own else pool
    try:
        call = policy if policy_keys else (lambda prompts, keys: policy(prompts))
        runner = _Runner(config, call, batch_size, experience, pool, on_episode, log)
        runner.on_reject = on_reject
        return runner.run(keys, samples)
    finally:
        if own:
            pool.close()


class _Runner:
    def __init__(self, config, policy, batch_size, experience, pool, on_episode, log):
        self.config, self.policy, self.batch_size = config, policy, batch_size
        self.experience, self.pool = experience, pool
        self.on_episode, self.log = on_episode, log
        self.on_reject: Callable[[Rejected], None] | None = None
        self.result = PlayResult([], [])
        self.held: list[Environment] = []  # taken from the pool, not yet given back

    def _new_env(self) -> Environment:
        t = time.perf_counter()
        env = self.pool.take()
        self.result.env_seconds += time.perf_counter() - t
        self.held.append(env)
        return env

    def _give(self, env: Environment) -> None:
        self.held.remove(env)
        self.pool.give(env)

    def _drop(self, env: Environment) -> None:
        self.held.remove(env)
        env.close()

    def run(self, keys, samples) -> PlayResult:
        active: list[_Active] = []
        try:
            if keys is None:
                env = self._new_env()
                self._give(env)
                keys = default_keys(self.config, env, samples)
            order = {k: i for i, k in enumerate(keys)}
            if len(order) != len(keys):
                raise ValueError("keys: an episode (seed, sample) is listed twice")
            t = time.perf_counter()
            self.pool.warm(min(self.batch_size, len(keys)))
            self.result.env_seconds += time.perf_counter() - t
            pending = deque(keys)
            while pending or active:
                while pending and len(active) < self.batch_size:
                    act = self._start(pending.popleft())
                    if act is not None:
                        active.append(act)
                if not active:
                    break
                active = self._round(active)
            self.result.episodes.sort(key=lambda e: order[EpisodeKey(e.seed, e.sample)])
            return self.result
        finally:
            while self.held:  # only after an error (a policy's, a callback's): unfinished
                self._give(self.held[-1])

    def _start(self, key: EpisodeKey) -> _Active | None:
        env = self._new_env()
        c = self.config
        episode = Episode(c.game, c.game_params(), c.fold, key.seed, key.sample, task="")
        act = _Active(key, env, episode)
        try:
            obs = self._guarded(act, lambda e: e.reset(key.seed, c.fold))
        except _Reject as r:
            self._reject(act, str(r))
            return None
        episode.task = obs.task
        act.experience = self.experience(obs) if callable(self.experience) else self.experience
        self._record(act, obs)
        return act

    def _round(self, active: list[_Active]) -> list[_Active]:
        prompts = [
            messages(
                a.episode.task,
                a.episode.observations,
                a.episode.valid_actions,
                a.episode.actions,
                a.experience,
            )
            for a in active
        ]
        t = time.perf_counter()
        replies = self.policy(prompts, [a.key for a in active])
        self.result.policy_seconds += time.perf_counter() - t
        self.result.policy_calls += 1
        self.result.batch_sizes.append(len(prompts))
        if len(replies) != len(prompts) or not all(isinstance(r, str) for r in replies):
            raise ValueError(
                f"policy: expected {len(prompts)} replies (strings) for {len(prompts)} "
                f"prompts, got {len(replies)}: {[type(r).__name__ for r in replies][:5]}"
            )
        still = []
        for act, reply in zip(active, replies, strict=True):
            parsed = parse_action(reply, act.obs.valid_actions)
            try:
                obs = self._guarded(act, lambda e, a=parsed.action: e.step(a))
            except _Reject as r:
                self._reject(act, str(r))
                continue
            ep = act.episode
            ep.replies.append(reply)
            ep.actions.append(parsed.action)
            ep.action_kinds.append(parsed.kind)
            ep.rewards.append(obs.reward)
            self._record(act, obs)
            if obs.done:
                self._give(act.env)
                self.result.episodes.append(ep)
                if self.on_episode is not None:
                    self.on_episode(ep)
            else:
                still.append(act)
        return still

    def _record(self, act: _Active, obs: Observation) -> None:
        act.obs = obs
        ep = act.episode
        ep.observations.append(obs.text)
        ep.valid_actions.append(obs.valid_actions)
        ep.score, ep.success, ep.done = obs.score, obs.success, obs.done

    def _guarded(self, act: _Active, call):
        """call(env), timed; a dead environment is replaced and the episode replayed once."""
        while True:
            t = time.perf_counter()
            try:
                out = call(act.env)
            except EnvironmentDied as e:
                self.result.env_seconds += time.perf_counter() - t
                if act.episode.restarts >= 1:
                    raise _Reject(f"the environment died again after one replay ({e})") from e
                act.episode.restarts += 1
                self.log(f"envs: {act.episode.name}: {e}; replaying it in a fresh environment")
                self._drop(act.env)
                act.env = self._new_env()
                t = time.perf_counter()
                try:
                    self._replay(act)
                finally:
                    self.result.env_seconds += time.perf_counter() - t
                continue
            self.result.env_seconds += time.perf_counter() - t
            return out

    def _replay(self, act: _Active) -> None:
        ep = act.episode
        try:
            obs = act.env.reset(ep.seed, ep.fold)
            for i, action in enumerate(ep.actions):
                if obs.text != ep.observations[i]:
                    raise _Reject(f"the replay diverged at step {i}")
                obs = act.env.step(action)
        except EnvironmentDied as e:
            raise _Reject(f"the environment died again during the replay ({e})") from e
        if ep.observations and obs.text != ep.observations[-1]:
            raise _Reject(f"the replay diverged at step {len(ep.actions)}")

    def _reject(self, act: _Active, reason: str) -> None:
        ep = act.episode
        rejected = Rejected(ep.game, ep.params, ep.fold, ep.seed, ep.sample, reason)
        self.result.rejected.append(rejected)
        self.log(rejected.line())
        self._drop(act.env)  # it died (or diverged): the pool makes a fresh one for the next
        if self.on_reject is not None:
            self.on_reject(rejected)

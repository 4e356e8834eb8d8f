"""The environment interface and the episode record.

An environment is reset to a seed of a fold and stepped with action strings; every call
returns an Observation. The step limit is the environment's (its config), so `done` covers
success, the game's own failure and running out of steps alike.

An adapter whose engine process dies raises EnvironmentDied; the runner (runner.py) then
replays the episode from its seed in a fresh environment once, or rejects it by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

ActionKind = Literal["exact", "mapped", "invalid"]


class EnvironmentDied(RuntimeError):
    """The engine behind an environment is gone (its process died or its connection broke)."""


@dataclass(frozen=True)
class Observation:
    """What the agent sees after a reset (steps=0, reward 0) or after an action."""

    task: str  # the task description (the same at every step of an episode)
    text: str  # the game's answer to the last action (after a reset: the start)
    valid_actions: tuple[str, ...]  # sorted, so a prompt does not depend on engine order
    reward: float  # score change from the last action
    score: float  # the game's score so far, in [0, 1]
    done: bool  # success, the game's failure, or step_limit actions taken
    success: bool
    steps: int  # actions taken so far


class Environment(Protocol):
    def reset(self, seed: int, fold: str) -> Observation: ...

    def step(self, action: str) -> Observation: ...

    def close(self) -> None: ...


@dataclass
class Episode:
    """One played episode. Identity: (game, params, fold, seed, sample).

    observations[i] and valid_actions[i] are what the agent saw before its i-th action
    (steps + 1 entries: the last is what the final action led to). replies[i] is the
    policy's reply as written; actions[i] is what the game got (actions.py), action_kinds[i]
    says how one became the other. The conversation the student trains on keeps actions[i]
    (see actions.py); prompt.episode_messages rebuilds it.
    """

    game: str
    params: str  # the engine's gameParams string (EnvConfig.game_params)
    fold: str
    seed: int
    sample: int
    task: str
    observations: list[str] = field(default_factory=list)
    valid_actions: list[tuple[str, ...]] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    action_kinds: list[ActionKind] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    score: float = 0.0
    success: bool = False
    done: bool = False
    restarts: int = 0  # times the environment died and the episode was replayed

    @property
    def steps(self) -> int:
        return len(self.actions)

    @property
    def invalid(self) -> int:
        return self.action_kinds.count("invalid")

    @property
    def mapped(self) -> int:
        return self.action_kinds.count("mapped")

    @property
    def name(self) -> str:
        return f"{self.game}[{self.params}] {self.fold} seed {self.seed} sample {self.sample}"

    @property
    def id(self) -> str:
        """The row id of the episode in shards and reports: game[params]/fold/seed/sample."""
        return episode_id(self.game, self.params, self.fold, self.seed, self.sample)

    def record(self) -> dict:
        """What a shard row's meta["episode"] and a report keep of an episode: identity,
        outcome, the replies as written and how each was parsed (the observations and the
        actions are the row's conversation itself)."""
        out = {
            k: getattr(self, k)
            for k in ("game", "params", "fold", "seed", "sample", "score", "success", "done")
        }
        out.update(
            steps=self.steps,
            invalid=self.invalid,
            mapped=self.mapped,
            restarts=self.restarts,
            replies=list(self.replies),
            actions=list(self.actions),
            action_kinds=list(self.action_kinds),
            rewards=list(self.rewards),
        )
        return out

    def to_dict(self) -> dict:
        """A JSON-able record (lists, not tuples), with the derived counts."""
        out = asdict(self)
        out["valid_actions"] = [list(v) for v in self.valid_actions]
        out.update(steps=self.steps, invalid=self.invalid, mapped=self.mapped)
        return out


def episode_id(game: str, params: str, fold: str, seed: int, sample: int) -> str:
    """An episode's identity as one string (a shard row id; resume skips the ids it finds)."""
    return f"{game}[{params}]/{fold}/{seed}/{sample}"


@dataclass(frozen=True)
class Rejected:
    """An episode given up on: its environment died again after one replay."""

    game: str
    params: str
    fold: str
    seed: int
    sample: int
    reason: str

    def line(self) -> str:
        return (
            f"envs: rejected episode {self.game}[{self.params}] {self.fold} seed {self.seed} "
            f"sample {self.sample}: {self.reason}"
        )

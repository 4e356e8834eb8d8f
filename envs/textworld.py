"""The TextWorldExpress adapter: one game engine (a Java process driven through py4j) per
environment; reset to any seed of the configured game, step with action strings.

The library's own step limit is set out of reach: the limit is EnvConfig.step_limit,
counted here, so `done` is true after exactly step_limit actions. An action the game does
not know is sent as is and answered by the game ("Unknown action: ..."); it costs a step.
"""

from __future__ import annotations

import logging

from envs.base import EnvironmentDied, Observation
from envs.config import EnvConfig
from envs.java import ensure_java

# py4j logs a traceback at ERROR for every call to a dead engine; EnvironmentDied carries
# the one line that matters, and the runner reports it.
logging.getLogger("py4j").setLevel(logging.CRITICAL)

FOLDS = ("train", "dev", "test")


class TextWorldEnv:
    """An Environment (envs.base) on TextWorldExpress for one EnvConfig."""

    def __init__(self, config: EnvConfig):
        ensure_java()
        from textworld_express import TextWorldExpressEnv

        self.config = config
        self._env = TextWorldExpressEnv(envStepLimit=10**9)
        try:
            self._env.load(gameName=config.game, gameParams=config.game_params())
        except ValueError as e:  # the engine checks parameter values (e.g. ranges)
            self.close()
            message = " ".join(str(e).split())
            raise ValueError(
                f"envs: game {config.game} with params {config.game_params()!r}: {message}"
            ) from None
        self._steps = 0
        self._task = ""

    @property
    def pid(self) -> int:
        """The engine's Java process id."""
        return self._env._gateway.java_process.pid

    def fold_seeds(self, fold: str) -> list[int]:
        """The fold's valid seeds, as the engine lists them (1,000 per fold)."""
        if fold not in FOLDS:
            raise ValueError(f"fold: expected one of train | dev | test, got {fold!r}")
        get = {
            "train": self._env.getValidSeedsTrain,
            "dev": self._env.getValidSeedsDev,
            "test": self._env.getValidSeedsTest,
        }[fold]
        return [int(s) for s in self._call(get)]

    def seeds(self) -> list[int]:
        """The configured seeds (EnvConfig.select_seeds over the configured fold)."""
        return self.config.select_seeds(self.fold_seeds(self.config.fold))

    def gold_actions(self, seed: int, fold: str) -> list[str]:
        """The game's gold action sequence for a seed (resets the environment to it)."""
        self._call(self._env.reset, seed=seed, gameFold=fold, generateGoldPath=True)
        self._steps = 0
        return list(self._call(self._env.getGoldActionSequence))

    def reset(self, seed: int, fold: str) -> Observation:
        if fold not in FOLDS:
            raise ValueError(f"fold: expected one of train | dev | test, got {fold!r}")
        text, info = self._call(self._env.reset, seed=seed, gameFold=fold)
        self._steps = 0
        self._task = info["taskDescription"]
        return self._observation(text, info, reward=0.0, done=False)

    def step(self, action: str) -> Observation:
        text, reward, done, info = self._call(self._env.step, action)
        self._steps += 1
        done = bool(done) or self._steps >= self.config.step_limit
        return self._observation(text, info, reward=float(reward), done=done)

    def close(self) -> None:
        """Stop the engine and wait for its process (so none outlives the run, and the
        library's own close in __del__ finds it gone instead of writing to a closed pipe)."""
        proc = self._env._gateway.java_process
        try:
            self._env.close()
        except Exception:  # a dead engine has nothing left to close
            pass
        try:
            proc.wait(timeout=10)
        except Exception:
            proc.kill()
            proc.wait()

    def _observation(self, text: str, info: dict, reward: float, done: bool) -> Observation:
        return Observation(
            task=self._task,
            text=text,
            valid_actions=tuple(sorted(info["validActions"])),
            reward=reward,
            score=float(info["score"]),
            done=done,
            success=bool(info["tasksuccess"]),
            steps=self._steps,
        )

    def _call(self, fn, *args, **kwargs):
        from py4j.protocol import Py4JError

        try:
            return fn(*args, **kwargs)
        except Py4JError as e:
            code = self._env._gateway.java_process.poll()
            state = "running" if code is None else f"exited with {code}"
            raise EnvironmentDied(
                f"TextWorldExpress engine (pid {self.pid}, {state}): {type(e).__name__}: "
                + " ".join(str(e).split())
            ) from e

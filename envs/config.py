"""The environment config: one frozen dataclass, checked without starting the game engine.

The games and their parameter names are TextWorldExpress 1.1.0's (each game's "Known
properties"); a wrong name fails here in one line that lists the valid ones, before any
Java process starts. Parameter values are the engine's to check (it knows the ranges):
textworld.py turns its complaint into one line too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from runtime.typed_config import build, option

# game -> its parameter names (TextWorldExpress 1.1.0). arithmetic and sorting take none.
GAMES: dict[str, tuple[str, ...]] = {
    "twc": ("numLocations", "numItemsToPutAway", "includeDoors", "limitInventorySize"),
    "cookingworld": (
        "numLocations",
        "numDistractorItems",
        "numIngredients",
        "includeDoors",
        "limitInventorySize",
    ),
    "coin": ("numLocations", "numDistractorItems", "includeDoors", "limitInventorySize"),
    "mapreader": (
        "numLocations",
        "maxDistractorItemsPerLocation",
        "includeDoors",
        "limitInventorySize",
        "maxDistanceApart",
    ),
    "arithmetic": (),
    "sorting": (),
}

Fold = Literal["train", "dev", "test"]


@dataclass(frozen=True)
class EnvConfig:
    game: str = option("twc", "the game: " + ", ".join(GAMES))
    params: dict = field(
        default_factory=dict,
        metadata={"help": "game parameters, name -> integer (e.g. numLocations: 1)"},
    )
    fold: Fold = option("test", "the fold whose seeds are played: train | dev | test")
    seeds: tuple[int, ...] = option((), "explicit seeds (each must be in the fold)")
    seed_offset: int = option(0, "without seeds: the first position in the fold's seed list")
    num_seeds: int | None = option(None, "without seeds: how many (default: the whole fold)")
    step_limit: int = option(10, "actions per episode before it ends unsolved")

    def __post_init__(self):
        if self.game not in GAMES:
            raise ValueError(f"game: unknown game {self.game!r}; valid games: {', '.join(GAMES)}")
        known = GAMES[self.game]
        for name, value in self.params.items():
            if name not in known:
                valid = ", ".join(known) if known else "none (this game takes no parameters)"
                raise ValueError(
                    f"params: unknown parameter {name!r} for game {self.game}; valid: {valid}"
                )
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"params.{name}: expected an integer >= 0, got {value!r}")
        if self.fold not in ("train", "dev", "test"):
            raise ValueError(f"fold: expected one of train | dev | test, got {self.fold!r}")
        if self.step_limit < 1:
            raise ValueError(f"step_limit must be >= 1, got {self.step_limit}")
        if self.seed_offset < 0:
            raise ValueError(f"seed_offset must be >= 0, got {self.seed_offset}")
        if self.num_seeds is not None and self.num_seeds < 1:
            raise ValueError(f"num_seeds must be >= 1, got {self.num_seeds}")
        if self.seeds and (self.seed_offset or self.num_seeds is not None):
            raise ValueError("seeds: give explicit seeds or seed_offset/num_seeds, not both")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: repeated seeds in {list(self.seeds)}")

    def game_params(self) -> str:
        """The engine's gameParams string, names sorted so one config has one spelling
        (it is part of an episode's identity: game, params, fold, seed, sample)."""
        return ",".join(f"{k}={self.params[k]}" for k in sorted(self.params))

    def select_seeds(self, fold_seeds: list[int]) -> list[int]:
        """The configured seeds out of the fold's valid seeds (from the engine)."""
        if self.seeds:
            valid = set(fold_seeds)
            for s in self.seeds:
                if s not in valid:
                    raise ValueError(
                        f"seeds: {s} is not a {self.fold}-fold seed of {self.game} "
                        f"({len(fold_seeds)} seeds, {min(fold_seeds)}..{max(fold_seeds)})"
                    )
            return list(self.seeds)
        stop = len(fold_seeds) if self.num_seeds is None else self.seed_offset + self.num_seeds
        if stop > len(fold_seeds):
            raise ValueError(
                f"num_seeds: seed_offset {self.seed_offset} + num_seeds {self.num_seeds} exceeds "
                f"the {len(fold_seeds)} seeds of the {self.fold} fold"
            )
        return list(fold_seeds[self.seed_offset : stop])


def env_record(env: EnvConfig) -> dict:
    """What a shard folder of episodes records as its metadata's extra["env"] (teacher
    rollouts, precompute/rollout.py, and scored episode rounds, tools/onpolicy/rounds.py,
    alike): which game the episodes are; the seeds say which of its episodes."""
    return {
        "game": env.game,
        "params": env.game_params(),
        "fold": env.fold,
        "step_limit": env.step_limit,
    }


def load_env_config(path: str | Path) -> EnvConfig:
    """The EnvConfig of a YAML file of its fields; ValueError naming the file for anything
    wrong (unreadable, not a mapping, an unknown key, a bad value)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of EnvConfig fields (game, params, ...)")
    try:
        return build(EnvConfig, data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None

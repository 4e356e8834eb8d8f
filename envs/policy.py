"""A chat policy for play() over any engine: each prompt's messages are rendered to token ids
(the caller's chat template), all prompts of a round go to the engine in one batch, and each
request is seeded from the episode's identity and step.

The seed of a request is derive_seed(seed, "episode", game, params, fold, episode seed,
sample, step), so a replayed or resumed episode samples the same replies whatever else was
in its batch. The engine is the caller's (precompute's teacher backend, an evaluation
engine, the on-policy student sampler): `complete(prompt_ids, seeds) -> reply texts`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from envs.config import EnvConfig
from runtime.seeds import derive_seed

# (token-id prompts, one seed per prompt) -> one reply text per prompt
Complete = Callable[[list[list[int]], list[int]], list[str]]
Render = Callable[[list[dict]], list[int]]


def step_of(messages: Sequence[dict]) -> int:
    """The step a prompt asks for: the actions (assistant turns) already in it."""
    return sum(1 for m in messages if m["role"] == "assistant")


@dataclass(frozen=True)
class ChatPolicy:
    """play(config, ChatPolicy(...), policy_keys=True): render, complete, reply texts."""

    config: EnvConfig
    render: Render  # messages -> prompt token ids, generation prompt included
    complete: Complete
    seed: int = 0

    def seeds(self, prompts: Sequence[Sequence[dict]], keys) -> list[int]:
        c = self.config
        return [
            derive_seed(
                self.seed, "episode", c.game, c.game_params(), c.fold, k.seed, k.sample, step_of(m)
            )
            for m, k in zip(prompts, keys, strict=True)
        ]

    def __call__(self, prompts: list[list[dict]], keys) -> list[str]:
        replies = self.complete([self.render(m) for m in prompts], self.seeds(prompts, keys))
        if len(replies) != len(prompts):
            raise ValueError(f"complete: {len(replies)} replies for {len(prompts)} prompts")
        return list(replies)

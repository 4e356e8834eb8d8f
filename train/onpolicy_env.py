"""Live on-policy distillation with episodes in an environment: the student plays, each
finished episode goes to the teacher server once, and the loss covers every action span.

For an on-policy micro-batch `LiveEpisodes.batch(step, index)` has the student play
`per_batch` episodes (envs.runner.play with envs.policy.ChatPolicy over the trainer's
sampler; the environments come from one envs.runner.EnvPool kept for the whole run), then
sends each finished episode to the teacher as ONE request: its whole conversation in the
teacher's view (envs.prompt.episode_messages with the experience), split as the client
scores it: prompt = the teacher view before the first action, response = from the first
action through the last one's end of turn. The teacher's top-k is kept at the action
spans only (the tokens between them, observations and valid actions, are context), and the
row trains every action span of the student's view (datafiles.conversation renders both
views and checks that each span has the same ids in both, as precompute does for
conversation rows). Rows are collated as shard rows with spans are (train/batches.py), so
the losses are the ones of every other method.

Which episodes: micro-batch b = step * grad_accum + index plays the config's seeds
[b * per_batch, (b + 1) * per_batch) in cyclic order, the sample index being the number of
times the seed list has been gone through: a resumed run plays the same episodes, and no
two micro-batches play the same (seed, sample). Each request is seeded from the episode's
identity and step (ChatPolicy), so an episode's replies do not depend on its batch.

Logged per step (pop_metrics): env_episodes played, env_s (engine start-ups, resets,
steps, replays), env_play_s (the student's generation while playing), teacher_wait_s, the
actions' env_invalid and env_mapped counts, env_skipped episodes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from datafiles.conversation import SpanError, aligned, render_conversation
from datafiles.views import render
from envs.base import Episode
from envs.config import EnvConfig
from envs.policy import ChatPolicy, Complete
from envs.prompt import episode_messages
from envs.runner import EnvPool, EpisodeKey, play
from shards.codec import tail_logprob_of
from train.batches import Batch, collate


@dataclass(frozen=True)
class EpisodeViews:
    """An episode's two renderings, cut as a conversation row is. Student conversation =
    prompt_ids + response_ids; spans (S,) are (start, length) in it, one per action."""

    prompt_ids: list[int]  # (P,) student view before the first action
    teacher_prompt_ids: list[int]  # (P',) teacher view before the first action
    response_ids: list[int]  # (T,) student view, first action through the last span
    teacher_response_ids: list[int]  # (T',) the same turns in the teacher's view
    spans: list[tuple[int, int]]
    teacher_offsets: list[int]  # (S,) each span's start in teacher_response_ids


def episode_views(tokenizer, ep: Episode, experience: str | None) -> EpisodeViews:
    """Raises SpanError (with the turn) when the views' spans do not hold or differ."""
    student = episode_messages(ep)
    teacher = episode_messages(ep, experience)
    # The experience goes into the system message: the same message indices in both views.
    trained = [j for j, m in enumerate(student) if m["role"] == "assistant"]
    s = render_conversation(tokenizer, student, trained)
    t = render_conversation(tokenizer, teacher, trained)
    aligned(tokenizer, s, t, trained)
    (s0, _), (t0, _) = s.spans[0], t.spans[0]
    return EpisodeViews(
        prompt_ids=s.ids[:s0],
        teacher_prompt_ids=t.ids[:t0],
        response_ids=s.ids[s0 : sum(s.spans[-1])],
        teacher_response_ids=t.ids[t0 : sum(t.spans[-1])],
        spans=list(s.spans),
        teacher_offsets=[a - t0 for a, _ in t.spans],
    )


def fit_teacher(v: EpisodeViews, max_model_len: int | None) -> EpisodeViews | None:
    """The views with the spans that the teacher's context holds (its prompt, the response
    and one more token), the later ones left out; None when not even the first fits."""
    if not max_model_len:
        return v
    room = max_model_len - 1 - len(v.teacher_prompt_ids)
    keep = sum(1 for o, (_, n) in zip(v.teacher_offsets, v.spans, strict=True) if o + n <= room)
    if keep == len(v.spans):
        return v
    if keep == 0:
        return None
    p = len(v.prompt_ids)
    start, n = v.spans[keep - 1]
    o = v.teacher_offsets[keep - 1]
    return EpisodeViews(
        v.prompt_ids,
        v.teacher_prompt_ids,
        v.response_ids[: start + n - p],
        v.teacher_response_ids[: o + n],
        v.spans[:keep],
        v.teacher_offsets[:keep],
    )


def span_positions(v: EpisodeViews) -> np.ndarray:
    """(N,) the span tokens' indices into teacher_response_ids, in span order."""
    return np.concatenate(
        [np.arange(o, o + n) for o, (_, n) in zip(v.teacher_offsets, v.spans, strict=True)]
    )


def episode_row(row_id: str, v: EpisodeViews, score) -> dict:
    """A collate row (train/batches.py) of an episode and the teacher's score of its
    teacher_response_ids (TeacherScore: topk_ids (T', K), topk_logprobs (T', K),
    token_logprob (T',)): the top-k kept at the span tokens, in span order."""
    at = span_positions(v)
    if len(score.topk_ids) != len(v.teacher_response_ids):
        raise ValueError(
            f"episode {row_id}: the teacher scored {len(score.topk_ids)} tokens, "
            f"{len(v.teacher_response_ids)} were sent"
        )
    conversation = v.prompt_ids + v.response_ids
    trained = [conversation[s + j] for s, n in v.spans for j in range(n)]
    if [v.teacher_response_ids[i] for i in at] != trained:  # aligned() checked it: a bug
        raise RuntimeError(f"episode {row_id}: the teacher's span tokens are not the student's")
    lps = np.asarray(score.topk_logprobs)[at]
    return {
        "id": row_id,
        "prompt_ids": torch.tensor(v.prompt_ids, dtype=torch.long),
        "teacher_prompt_ids": torch.tensor(v.teacher_prompt_ids, dtype=torch.long),
        "response_ids": torch.tensor(v.response_ids, dtype=torch.long),
        "span_starts": torch.tensor([s for s, _ in v.spans], dtype=torch.long),
        "span_lengths": torch.tensor([n for _, n in v.spans], dtype=torch.long),
        "topk_ids": torch.from_numpy(np.asarray(score.topk_ids)[at]),
        "topk_logprobs": torch.from_numpy(lps),
        "tail_logprob": torch.from_numpy(tail_logprob_of(lps)),
        "token_logprob": torch.from_numpy(np.asarray(score.token_logprob)[at]),
    }


def episode_keys(seeds: list[int], b: int, per_batch: int) -> list[EpisodeKey]:
    """Micro-batch b's episodes: positions [b * per_batch, (b + 1) * per_batch) of the seed
    list repeated, each sample the pass it is in (module docstring)."""
    out = []
    for pos in range(b * per_batch, (b + 1) * per_batch):
        out.append(EpisodeKey(seeds[pos % len(seeds)], pos // len(seeds)))
    return out


class LiveEpisodes:
    """Plays, scores and collates the episodes of on-policy micro-batches."""

    def __init__(
        self,
        config: EnvConfig,
        tokenizer,
        complete: Complete,
        client,
        *,
        experience: str | None,
        per_batch: int,
        grad_accum: int,
        max_length: int,
        seed: int = 0,
        pool: EnvPool | None = None,
        log: Callable[[str], None] = print,
    ):
        self.config, self.tokenizer, self.client = config, tokenizer, client
        self.experience, self.per_batch, self.grad_accum = experience, per_batch, grad_accum
        self.max_length, self.log = max_length, log
        self.pool = pool if pool is not None else EnvPool(config)
        self.policy = ChatPolicy(config, lambda m: render(tokenizer, m), complete, seed)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        env = self.pool.take()
        try:
            self.seeds = env.seeds() if hasattr(env, "seeds") else list(config.seeds)
        finally:
            self.pool.give(env)
        self._since = self._blank()

    @staticmethod
    def _blank() -> dict:
        return {
            "env_episodes": 0,  # played
            "env_s": 0.0,  # engine start-ups, resets, steps, replays
            "env_play_s": 0.0,  # the student's generation while playing
            "teacher_wait_s": 0.0,
            "env_invalid": 0,  # actions
            "env_mapped": 0,
            "env_skipped": 0,  # episodes rejected by the runner or left out (spans, context)
        }

    def play(self, step: int, index: int) -> list[Episode]:
        keys = episode_keys(self.seeds, step * self.grad_accum + index, self.per_batch)
        result = play(
            self.config,
            self.policy,
            keys=keys,
            batch_size=self.per_batch,
            pool=self.pool,
            policy_keys=True,
            log=self.log,
        )
        m = self._since
        m["env_s"] += result.env_seconds
        m["env_play_s"] += result.policy_seconds
        m["env_episodes"] += len(result.episodes)
        m["env_skipped"] += len(result.rejected)
        m["env_invalid"] += sum(e.invalid for e in result.episodes)
        m["env_mapped"] += sum(e.mapped for e in result.episodes)
        return result.episodes

    def rows(self, episodes: list[Episode]) -> list[dict]:
        """Each episode scored by the teacher in one request, as a collate row."""
        views = []
        for ep in episodes:
            try:
                v = episode_views(self.tokenizer, ep, self.experience)
            except SpanError as e:
                self.log(f"[train] live episode {ep.id} left out: {e}")
                self._since["env_skipped"] += 1
                continue
            fit = fit_teacher(v, getattr(self.client, "max_model_len", None))
            if fit is None:
                self.log(
                    f"[train] live episode {ep.id} left out: longer than the teacher's context"
                )
                self._since["env_skipped"] += 1
                continue
            views.append((ep, fit))
        futures = [
            self.client.submit(v.teacher_prompt_ids, v.teacher_response_ids) for _, v in views
        ]
        t0 = time.monotonic()
        scores = [f.result() for f in futures]
        self._since["teacher_wait_s"] += time.monotonic() - t0
        return [episode_row(ep.id, v, sc) for (ep, v), sc in zip(views, scores, strict=True)]

    def batch(self, step: int, index: int) -> Batch | None:
        """Micro-batch (step, index)'s live episodes as a Batch; None when none is left."""
        rows = self.rows(self.play(step, index))
        return collate(rows, self.max_length, self.pad_id) if rows else None

    def pop_metrics(self) -> dict:
        s, self._since = self._since, self._blank()
        return s

    def close(self) -> None:
        self.pool.close()


def live_episodes(cfg, tokenizer, complete: Complete, client, accelerator) -> LiveEpisodes:
    """The LiveEpisodes of a run (onpolicy.env_config, onpolicy.experience). Every rank plays
    the same episode keys, each with its own sampling seed (seed + rank)."""
    from envs.config import load_env_config
    from envs.experience import load_experience

    op = cfg.onpolicy
    config = load_env_config(op.env_config)
    if config.fold != "train":
        raise ValueError(
            f"onpolicy.env_config={op.env_config}: fold {config.fold}: the student trains on "
            "these episodes, so they are train-fold seeds (dev and test are for measuring)"
        )
    experience = load_experience(op.experience).text if op.experience else None
    live = LiveEpisodes(
        config,
        tokenizer,
        complete,
        client,
        experience=experience,
        per_batch=op.episodes,
        grad_accum=cfg.grad_accum,
        max_length=cfg.data.max_length,
        seed=cfg.seed + accelerator.process_index,
    )
    if accelerator.is_main_process:
        print(
            f"[train] live episodes: {config.game}[{config.game_params()}] {config.fold}, "
            f"{len(live.seeds)} seeds, {op.episodes} episodes per on-policy micro-batch, "
            f"experience {'from ' + op.experience if experience else 'none'}",
            flush=True,
        )
    return live

"""The two views of an example: the student's prompt (Q) and the teacher's (Q+E).

The student is trained on the teacher's responses given the question alone; the teacher
answered with the experience (hints, worked demonstrations) in its prompt. Both views go
through the same chat template with the same arguments, and the same thinking mode, so the
only difference between them is the experience.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from datafiles import views as chat
from datafiles.views import render
from precompute.config import ViewConfig
from precompute.inputs import Example


@dataclass(frozen=True)
class Views:
    prompt_ids: list[int]  # student view: chat-templated question
    teacher_prompt_ids: list[int]  # teacher view: chat-templated question + experience
    thinking: bool | None  # enable_thinking passed to the template, None when not passed


def derive_seed(seed: int, *key) -> int:
    """A 31-bit seed from (seed, key...), independent of batching and worker split."""
    blob = ":".join(map(str, (seed, *key))).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little") & 0x7FFFFFFF


def thinking_for(cfg: ViewConfig, seed: int, index: int) -> bool | None:
    if cfg.thinking == "none":
        return None
    if cfg.thinking in ("true", "false"):
        return cfg.thinking == "true"
    # mixed: a draw per example from its own seed, so a resumed run draws the same.
    rng = np.random.default_rng(derive_seed(seed, "thinking", index))
    return bool(rng.random() < cfg.thinking_prob)


def teacher_messages(messages: list[dict], experience: str, cfg: ViewConfig) -> list[dict]:
    """The student's chat with the experience added where the config says."""
    return chat.teacher_messages(
        messages, experience, cfg.experience_position, cfg.experience_template, cfg.separator
    )


def make_views(tokenizer, ex: Example, cfg: ViewConfig, seed: int) -> Views:
    thinking = thinking_for(cfg, seed, ex.index)
    kwargs = dict(cfg.chat_template_kwargs)
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    student = list(ex.messages)
    experience = ex.experience or cfg.default_experience
    return Views(
        prompt_ids=render(tokenizer, student, kwargs),
        teacher_prompt_ids=render(tokenizer, teacher_messages(student, experience, cfg), kwargs),
        thinking=thinking,
    )

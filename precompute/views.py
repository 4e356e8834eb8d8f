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
    msgs = [dict(m) for m in messages]
    if not experience:
        return msgs
    text = cfg.experience_template.replace("{experience}", experience)
    if cfg.experience_position == "system":
        if msgs[0]["role"] == "system":
            msgs[0]["content"] = msgs[0]["content"] + cfg.separator + text
        else:
            msgs.insert(0, {"role": "system", "content": text})
        return msgs
    # prefix / suffix: attach to the last user turn (the question being answered).
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    i = users[-1] if users else len(msgs) - 1
    q = msgs[i]["content"]
    if cfg.experience_position == "prefix":
        msgs[i]["content"] = text + cfg.separator + q
    else:
        msgs[i]["content"] = q + cfg.separator + text
    return msgs


def render(tokenizer, messages: list[dict], kwargs: dict) -> list[int]:
    """Chat template to text, then ids without adding special tokens a second time (the
    template already wrote BOS and the role markers)."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


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

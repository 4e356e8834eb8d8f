"""The two views of an example: the student's prompt (Q) and the teacher's (Q+E).

The student is trained on the teacher's responses given the question alone; the teacher
answered with the experience (hints, worked demonstrations) in its prompt. Both views go
through the same chat template with the same arguments, and the same thinking mode, so the
only difference between them is the experience.

A conversation row (score mode, `messages`) is rendered whole in both views, its trained
assistant spans found by datafiles/conversation.py and checked to have the same ids in both;
the prompts are then the tokens before the first span, and `Conversation` holds the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datafiles import views as chat
from datafiles.conversation import Rendered, SpanError, aligned, render_conversation
from datafiles.reading import BadField
from datafiles.views import render
from precompute.config import ViewConfig
from precompute.inputs import Example
from runtime.seeds import derive_seed


@dataclass(frozen=True)
class Conversation:
    """A conversation row's tokens from its first trained span on, in both views."""

    response_ids: list[int]  # (T,) student: first span's start through the last span's end
    teacher_response_ids: list[int]  # (T',) teacher: the same turns, its own rendering
    spans: list[tuple[int, int]]  # (start, length), student conversation coordinates
    teacher_offsets: list[int]  # each span's start in teacher_response_ids
    turns: list[tuple[int, str]]  # (start, role) of the student's messages before T ends


@dataclass(frozen=True)
class Views:
    prompt_ids: list[int]  # student view: chat-templated question
    teacher_prompt_ids: list[int]  # teacher view: chat-templated question + experience
    thinking: bool | None  # enable_thinking passed to the template, None when not passed
    conversation: Conversation | None = None  # a conversation row's spans (score mode)


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


def make_views(tokenizer, ex: Example, cfg: ViewConfig, seed: int, spans: bool = True) -> Views:
    """Both views of `ex`; with `spans` (score mode without given response ids) a
    conversation row's whole conversation and spans. Raises BadField for a conversation
    whose spans cannot be found or differ between the views."""
    thinking = thinking_for(cfg, seed, ex.index)
    kwargs = dict(cfg.chat_template_kwargs)
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    experience = ex.experience or cfg.default_experience
    if spans and ex.conversation:
        return _conversation_views(tokenizer, ex, cfg, kwargs, experience, thinking)
    student = list(ex.messages)
    # Two files: the teacher file's chat; one file: the student's with the experience added.
    teacher = list(ex.teacher_messages) if ex.teacher_messages is not None else student
    return Views(
        prompt_ids=render(tokenizer, student, kwargs),
        teacher_prompt_ids=render(tokenizer, teacher_messages(teacher, experience, cfg), kwargs),
        thinking=thinking,
    )


def _assistant_turns(messages) -> list[int]:
    return [j for j, m in enumerate(messages) if m["role"] == "assistant"]


def _conversation_views(tokenizer, ex: Example, cfg: ViewConfig, kwargs, experience, thinking):
    student = list(ex.conversation)
    base = list(ex.teacher_conversation) if ex.teacher_conversation is not None else student
    teacher = teacher_messages(base, experience, cfg)
    # The k-th assistant turn of one view is the k-th of the other (the experience may add a
    # system message; two files were checked to have the same assistant turns).
    ordinal = {j: n for n, j in enumerate(_assistant_turns(student))}
    t_turns = _assistant_turns(teacher)
    t_trained = [t_turns[ordinal[j]] for j in ex.trained]
    s = _rendered(tokenizer, student, list(ex.trained), kwargs, ex, "", {})
    # A teacher turn's problem is filed under the student's turn (the same assistant turn).
    to_student = {t_turns[n]: j for j, n in ordinal.items()}
    t = _rendered(tokenizer, teacher, t_trained, kwargs, ex, "teacher view ", to_student)
    try:
        aligned(tokenizer, s, t, list(ex.trained))
    except SpanError as e:
        raise BadField(f"{ex.prompt_field}[{e.turn}]", str(e)) from None
    (s0, _), (t0, _) = s.spans[0], t.spans[0]
    end, t_end = sum(s.spans[-1]), sum(t.spans[-1])
    return Views(
        prompt_ids=s.ids[:s0],
        teacher_prompt_ids=t.ids[:t0],
        thinking=thinking,
        conversation=Conversation(
            response_ids=s.ids[s0:end],
            teacher_response_ids=t.ids[t0:t_end],
            spans=list(s.spans),
            teacher_offsets=[a - t0 for a, _ in t.spans],
            # Turns after the last trained span are not stored (nor are their tokens).
            turns=[(a, role) for a, role in s.turns if a < end],
        ),
    )


def _rendered(tokenizer, messages, trained, kwargs, ex: Example, view: str, index) -> Rendered:
    try:
        return render_conversation(tokenizer, messages, trained, kwargs)
    except SpanError as e:
        field = f"{ex.prompt_field}[{index.get(e.turn, e.turn)}]"
        raise BadField(field, f"{view}turn {e.turn}: {e.reason}") from None

"""The two prompts of an example: the student's (Q) and the teacher's (Q+E), as token ids.

Both go through the same chat template with the same arguments, so the only difference
between them is the experience. precompute/views.py adds its config (position, template,
thinking); train/ renders on-policy prompts from a data file with the same functions.
"""

from __future__ import annotations

from typing import Literal

from datafiles.conversation import encode

Position = Literal["system", "prefix", "suffix"]


def teacher_messages(
    messages: list[dict],
    experience: str,
    position: Position = "system",
    template: str = "{experience}",
    separator: str = "\n\n",
) -> list[dict]:
    """The student's chat with the experience (formatted by `template`) added at
    `position`: in the system message, or before or after the first user turn (the task: in a
    conversation the later user turns are its observations and replies)."""
    msgs = [dict(m) for m in messages]
    if not experience:
        return msgs
    text = template.replace("{experience}", experience)
    if position == "system":
        if msgs[0]["role"] == "system":
            msgs[0]["content"] = msgs[0]["content"] + separator + text
        else:
            msgs.insert(0, {"role": "system", "content": text})
        return msgs
    # prefix / suffix: attach to the first user turn (the task; a single-turn chat's only
    # user turn is its question).
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    i = users[0] if users else len(msgs) - 1
    q = msgs[i]["content"]
    if position == "prefix":
        msgs[i]["content"] = text + separator + q
    else:
        msgs[i]["content"] = q + separator + text
    return msgs


def render(tokenizer, messages: list[dict], kwargs: dict | None = None) -> list[int]:
    """The prompt's ids: the chat template with the generation prompt, then ids without
    special tokens added a second time (the template already wrote BOS and role markers)."""
    return encode(tokenizer, messages, kwargs, generation_prompt=True)

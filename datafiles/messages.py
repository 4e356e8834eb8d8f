"""A `messages` row's conversation, checked message by message (OpenAI / Hugging Face chat).

Roles: system, user, assistant, tool. `content` is a string or a list of text parts
(`{type: text, text}`, joined without a separator, as OpenAI joins them); an assistant
message may carry `tool_calls` instead of (or beside) content, each
`{type: function, function: {name, arguments}}` with `arguments` a JSON object or a string
holding one (kept as given: the chat template renders it); a tool message answers an
earlier call (`tool_call_id`, `name` optional). `train: true|false` marks an assistant turn
for `data.train_turns=marked`. Keys that are None count as absent (Parquet fills a struct's
missing keys with nulls). A problem is a BadField naming `FIELD[j].key` and, in the reason,
the turn index j.
"""

from __future__ import annotations

import json

from datafiles.reading import BadField

ROLES = ("system", "user", "assistant", "tool")
TRAIN_TURNS = ("all", "last", "marked")


def _bad(name: str, j: int, role: str, key: str, reason: str) -> BadField:
    field = f"{name}[{j}]" + (f".{key}" if key else "")
    return BadField(field, f"turn {j} ({role}): {reason}")


def _content(m: dict, name: str, j: int, role: str) -> str | None:
    value = m.get("content")
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(
            name, j, role, "content", f"expected a string or text parts, got {type(value).__name__}"
        )
    texts = []
    for p, part in enumerate(value):
        if (
            not isinstance(part, dict)
            or part.get("type") != "text"
            or not isinstance(part.get("text"), str)
        ):
            raise _bad(
                name, j, role, f"content[{p}]", "expected a text part {type: text, text: str}"
            )
        texts.append(part["text"])
    return "".join(texts)


def _arguments(value, where: str, name: str, j: int):
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise _bad(
                name, j, "assistant", "tool_calls", f"{where}.arguments is not valid JSON: {e.msg}"
            ) from None
        if not isinstance(parsed, dict):
            raise _bad(
                name, j, "assistant", "tool_calls", f"{where}.arguments is not a JSON object"
            )
        return value
    if not isinstance(value, dict):
        got = type(value).__name__
        why = f"{where}.arguments: expected a JSON object or a string of one, got {got}"
        raise _bad(name, j, "assistant", "tool_calls", why)
    return value


def _tool_calls(m: dict, name: str, j: int) -> list[dict] | None:
    calls = m.get("tool_calls")
    if calls is None:
        return None
    if not isinstance(calls, list) or not calls:
        raise _bad(name, j, "assistant", "tool_calls", "expected a non-empty list of tool calls")
    out = []
    for c, call in enumerate(calls):
        where = f"tool_calls[{c}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") not in ("function", None):
            raise _bad(
                name,
                j,
                "assistant",
                "tool_calls",
                f"{where}: expected {{type: function, function: {{name, arguments}}}}",
            )
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(
                name,
                j,
                "assistant",
                "tool_calls",
                f"{where}.function.name: expected a non-empty string",
            )
        if fn.get("arguments") is None:
            raise _bad(name, j, "assistant", "tool_calls", f"{where}.function.arguments: missing")
        args = _arguments(fn["arguments"], f"{where}.function", name, j)
        kept = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            kept["id"] = call["id"]
        out.append(kept)
    return out


def _optional(m: dict, key: str, name: str, j: int, role: str) -> str | None:
    value = m.get(key)
    if value is not None and not isinstance(value, str):
        raise _bad(name, j, role, key, f"expected a string, got {type(value).__name__}")
    return value


def conversation(value, name: str) -> tuple[list[dict], list[bool | None]]:
    """The checked messages of a conversation (role, content, and tool_calls / tool_call_id /
    name where given; `train` taken out) and each message's `train` flag (None: absent)."""
    if not isinstance(value, list) or not value:
        raise BadField(name, f"expected a non-empty list of messages, got {type(value).__name__}")
    out, flags = [], []
    calls_made = 0  # tool calls of the last assistant turn (0: none since the last user turn)
    open_calls = 0  # of those, the ones no tool message has answered yet
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadField(
                f"{name}[{j}]", f"turn {j}: expected a message object, got {type(m).__name__}"
            )
        role = m.get("role")
        if role not in ROLES:
            raise _bad(
                name,
                j,
                str(role),
                "role",
                f"unknown role {role!r} (expected one of {', '.join(ROLES)})",
            )
        content = _content(m, name, j, role)
        msg = {"role": role, "content": content if content is not None else ""}
        if role == "assistant":
            calls = _tool_calls(m, name, j)
            if calls is None and not (content or "").strip():
                raise _bad(
                    name, j, role, "content", "an assistant turn needs content or tool_calls"
                )
            if calls is not None:
                msg["tool_calls"] = calls
            calls_made = open_calls = len(calls or [])
        elif m.get("tool_calls") is not None:
            raise _bad(name, j, role, "tool_calls", "only assistant turns make tool calls")
        elif role == "tool":
            if open_calls <= 0:
                why = (
                    f"more tool messages than the {calls_made} tool call(s) before them"
                    if calls_made
                    else "a tool message with no preceding tool call"
                )
                raise _bad(name, j, role, "", why)
            open_calls -= 1
            for key in ("tool_call_id", "name"):
                if (v := _optional(m, key, name, j, role)) is not None:
                    msg[key] = v
        else:
            if content is None:
                raise _bad(name, j, role, "content", "missing")
            calls_made = open_calls = 0
        flag = m.get("train")
        if flag is not None and not isinstance(flag, bool):
            raise _bad(name, j, role, "train", f"expected true or false, got {flag!r}")
        if flag and role != "assistant":
            raise _bad(name, j, role, "train", "only assistant turns are trained")
        out.append(msg)
        flags.append(flag)
    return out, flags


def trained_turns(messages: list[dict], flags: list[bool | None], which: str) -> list[int]:
    """The indices of the trained assistant turns: all of them, the last, or those marked
    (a missing `train` flag counts as true)."""
    turns = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
    if which == "last":
        return turns[-1:]
    if which == "marked":
        return [j for j in turns if flags[j] is not False]
    return turns

"""A conversation's token ids and its trained assistant spans, found by prefix renderings.

The whole conversation is rendered once by the chat template (the same arguments as the
views). An assistant turn's span starts where the rendering of the messages before it with
the generation prompt ends, which must be a token prefix of the whole rendering, and runs
through the turn's first EOS token (the template's end of turn) inclusive; without one in
the turn, through the turn's end. A template that renders a turn differently once later
turns follow breaks the prefix: the row is refused with the turn and the first differing
token (`SpanError`), never trained on tokens the model would not have been given.

Qwen3's template drops the reasoning (`<think>...</think>`) of assistant turns before the
last user query, so the turns before a later one render with a reasoning block that the
whole conversation lacks, and no prefix would hold. The rule applied (`drop_reasoning`):
an assistant turn whose reasoning the template drops from the whole conversation anyway (it
renders the same text without it) has it removed from the message itself, before any
rendering. Both views are rendered by the same template with the same turns, so such a turn
is trained without its reasoning in both, and `aligned` checks that every span has the same
ids in both views. With `enable_thinking=false` Qwen3's generation prompt ends in an empty
think block that an earlier turn's rendering lacks: those rows are refused.

Used by precompute's score mode and usable by train's on-policy path: it imports only what
datafiles/ imports.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass

# A reasoning block at the start of an assistant turn and the blank lines after it.
THINK = re.compile(r"^.*</think>\n*", re.S)


class SpanError(ValueError):
    """A conversation whose spans cannot be found or do not align: its turn and why."""

    def __init__(self, turn: int, reason: str):
        self.turn, self.reason = turn, reason
        super().__init__(f"turn {turn}: {reason}")


@dataclass(frozen=True)
class Rendered:
    ids: list[int]  # (L,) the whole conversation's tokens
    spans: list[tuple[int, int]]  # (start, length) in `ids` of each trained turn, in order
    turns: list[tuple[int, str]]  # (start, role) in `ids` of every message


def encode(tokenizer, messages: list[dict], kwargs: dict | None, generation_prompt: bool):
    """Chat template to text, then ids without special tokens added a second time."""
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt, **(kwargs or {})
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _token(tokenizer, ids: list[int], i: int) -> str:
    if i >= len(ids):
        return "the end"
    return f"{tokenizer.decode([ids[i]])!r} (id {ids[i]})"


def differ(tokenizer, what: str, a: list[int], b: list[int], at: int) -> str:
    """`what` differ at token `at`: a's token and b's, decoded."""
    return f"{what} at token {at}: {_token(tokenizer, a, at)} vs {_token(tokenizer, b, at)}"


def _text(tokenizer, messages: list[dict], kwargs: dict | None) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=False, **(kwargs or {})
    )


def drop_reasoning(tokenizer, messages: list[dict], kwargs: dict | None = None) -> list[dict]:
    """`messages` with the reasoning removed from every assistant turn whose reasoning the
    template drops from the whole conversation anyway (Qwen3: the turns before the last user
    query): rendering it without gives the same text. Other turns are kept as they are."""
    out = [dict(m) for m in messages]
    whole = None
    for j, m in enumerate(out):
        if m["role"] != "assistant" or "</think>" not in (m["content"] or ""):
            continue
        whole = _text(tokenizer, out, kwargs) if whole is None else whole
        trial = [*out[:j], {**m, "content": THINK.sub("", m["content"], count=1)}, *out[j + 1 :]]
        if _text(tokenizer, trial, kwargs) == whole:
            out = trial
    return out


class _Whole:
    """The whole conversation's text and ids, tokenized once: a prefix rendering is checked
    on the text and mapped to tokens through the offsets, instead of tokenizing each of the
    turns' prefixes (a 16-turn conversation of 16k tokens: 26 ms instead of 360 ms here)."""

    def __init__(self, tokenizer, text: str):
        self.text = text
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
        self.ids = list(enc["input_ids"])
        offsets = enc.get("offset_mapping") or []
        self.starts, self.ends = [a for a, _ in offsets], [b for _, b in offsets]
        self.added = set(getattr(tokenizer, "added_tokens_decoder", {}))

    def prefix_tokens(self, tokenizer, text: str) -> int | None:
        """k when `text` tokenizes as ids[:k]; None when that is not shown here (then the
        caller tokenizes it). A tokenizer splits its text at added tokens (the chat markers)
        and encodes the pieces between them alone, so ids[:k] is text's tokenization when the
        whole has a token boundary at len(text) and text's last piece after an added token
        encodes to the same ids."""
        if not self.ends or not self.text.startswith(text):
            return None
        c = len(text)
        k = bisect_right(self.ends, c)
        if k < len(self.ids) and self.starts[k] < c:
            return None  # no token boundary there
        j = k - 1
        while j >= 0 and self.ids[j] not in self.added:
            j -= 1
        head = self.ends[j] if j >= 0 else 0
        tail = (
            list(tokenizer(text[head:], add_special_tokens=False)["input_ids"]) if head < c else []
        )
        return k if tail == self.ids[j + 1 : k] else None


def render_conversation(
    tokenizer,
    messages: list[dict],
    trained: list[int],
    kwargs: dict | None = None,
    eos_ids: set[int] | None = None,
) -> Rendered:
    """The ids of `messages`, the span of each assistant turn in `trained` (message indices,
    ascending) and every message's start. Raises SpanError."""
    eos = eos_ids if eos_ids is not None else {tokenizer.eos_token_id}
    messages = drop_reasoning(tokenizer, messages, kwargs)
    whole = _Whole(tokenizer, _text(tokenizer, messages, kwargs))
    full = whole.ids
    gen_end = {}  # assistant index -> where its content starts (after the generation prompt)

    def prefix(i: int, generation_prompt: bool) -> tuple[int, list[int] | None]:
        """(its length, None) when messages[:i] render as a token prefix of the whole; else
        (the first differing token, the prefix's ids)."""
        text = tokenizer.apply_chat_template(
            list(messages[:i]),
            tokenize=False,
            add_generation_prompt=generation_prompt,
            **(kwargs or {}),
        )
        k = whole.prefix_tokens(tokenizer, text)
        if k is not None:
            return k, None
        before = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        at = _common(before, full)
        return (at, None) if at == len(before) else (at, before)

    def content_start(i: int) -> int:
        if i not in gen_end:
            at, before = prefix(i, True)
            if before is not None:
                raise SpanError(
                    i,
                    differ(
                        tokenizer,
                        "the turns before it with the generation prompt are not a prefix of "
                        "the whole conversation (whole vs prefix)",
                        full,
                        before,
                        at,
                    ),
                )
            gen_end[i] = at
        return gen_end[i]

    def eos_end(i: int, limit: int) -> int | None:
        for p in range(content_start(i), limit):
            if full[p] in eos:
                return p + 1
        return None

    starts = [0]
    for i in range(1, len(messages)):
        at, before = prefix(i, False)
        if before is None:
            start = at
        elif messages[i - 1]["role"] == "assistant":
            # A template that renders the last turn differently (Qwen3's empty think block):
            # the message before ends at its end-of-turn token.
            try:
                start = eos_end(i - 1, len(full)) or at
            except SpanError:  # an untrained turn: its start is for inspection only
                start = at
            # The whitespace a template writes after the end-of-turn token ("<|im_end|>\n")
            # belongs to the turn it ends, as it does where the prefix rendering holds.
            while start < len(full) and not tokenizer.decode([full[start]]).strip():
                start += 1
        else:
            start = at
        starts.append(max(start, starts[-1]))
    spans = []
    for i in trained:
        s = content_start(i)
        end = starts[i + 1] if i + 1 < len(messages) else len(full)
        e = eos_end(i, end) or end
        if e <= s:
            raise SpanError(i, "the assistant turn renders as no tokens")
        if spans and s < spans[-1][0] + spans[-1][1]:
            raise SpanError(i, "the assistant turn starts inside the previous one")
        spans.append((s, e - s))
    return Rendered(full, spans, [(s, m["role"]) for s, m in zip(starts, messages, strict=True)])


def span_ids(r: Rendered) -> list[list[int]]:
    return [r.ids[s : s + n] for s, n in r.spans]


def aligned(tokenizer, student: Rendered, teacher: Rendered, turns: list[int]) -> None:
    """Each trained span has the same ids in both views, else SpanError naming the turn
    (`turns`: the student's message index of each span) and the first differing token."""
    if len(student.spans) != len(teacher.spans):
        raise SpanError(turns[0], "the views have different numbers of trained turns")
    for turn, a, b in zip(turns, span_ids(student), span_ids(teacher), strict=True):
        if a != b:
            raise SpanError(
                turn,
                differ(
                    tokenizer,
                    "the assistant turn's tokens differ between the views (student vs teacher)",
                    a,
                    b,
                    _common(a, b),
                ),
            )

"""A row's trained spans in conversation coordinates, and the drop-turns overlong policy.

A shard row is a conversation, `prompt_ids ++ response_ids` (C tokens), with trained spans
(`span_starts`, `span_lengths`, offsets into the conversation; docs/shard-format.md). Its
per-token teacher signal (`topk_ids`, `topk_logprobs`, `tail_logprob`, `token_logprob`) has
one row per span token, N = sum(span_lengths), in span order. A row without `span_starts`
(a v1 file reads with one span; the live rows of train/onpolicy.py have none) trains its
whole response: one span (len(prompt_ids), len(response_ids)).

`drop_turns` shortens a conversation longer than `data.max_length` by removing whole turns,
the earliest first. A turn is an assistant message and the non-assistant messages after it
up to the next assistant message (the observation, tool result or user reply it led to);
the system message(s) and the first user message (the task), and anything before the first
assistant message after them, are always kept. Message boundaries come from the row's
`turn_starts` / `turn_roles`.
"""

from __future__ import annotations

import torch

from shards.spans import spans_of

# The per-token teacher signal of a row, one entry per span token (the last two: rows of
# teacher-vocabulary shards, train/crosstok_rows.py; a merged block never crosses a span).
PER_TOKEN = (
    "topk_ids",
    "topk_logprobs",
    "tail_logprob",
    "token_logprob",
    "ct_kind",
    "ct_block_logprob",
)


def conversation_length(row: dict) -> int:
    return len(row["prompt_ids"]) + len(row["response_ids"])


def drop_turns(row: dict, max_length: int) -> dict | None:
    """The row with its earliest turns removed until the conversation fits `max_length`
    tokens, or None when it cannot: no turns recorded, the task and the last turn alone are
    too long, or no trained span is left. A row that fits is returned as is.

    The removed turns' spans are not trained (their top-k rows go with them). The result's
    `prompt_ids` is the shortened conversation before its first remaining span; it keeps the
    original prompt as `sample_prompt_ids`, what on-policy sampling starts from (the teacher
    view `teacher_prompt_ids` is of that prompt; the teacher's rendering of the later turns
    is not stored). Raises ValueError on turns that do not describe the conversation.
    """
    total = conversation_length(row)
    if total <= max_length:
        return row
    starts = [int(s) for s in row.get("turn_starts", torch.zeros(0)).tolist()]
    roles = list(row.get("turn_roles", []))
    if not starts:
        return None
    if len(roles) != len(starts):
        raise ValueError(f"{len(starts)} turn_starts but {len(roles)} turn_roles")
    if starts != sorted(starts) or starts[0] < 0 or starts[-1] >= total:
        raise ValueError(f"turn_starts {starts} are not sorted offsets into {total} tokens")
    # The task (everything up to the first user message) is kept; turn i runs from the
    # i-th assistant message after it to the next assistant message.
    task = roles.index("user") if "user" in roles else -1
    turn = [s for m, s in enumerate(starts) if roles[m] == "assistant" and m > task]
    for b in turn[1:]:  # drop the turns in [turn[0], b): the earliest ones, fewest first
        if total - (b - turn[0]) <= max_length:
            return remove_range(row, turn[0], b)
    return None


def remove_range(row: dict, a: int, b: int) -> dict | None:
    """The row without conversation tokens [a, b) (whole messages), its spans there and
    their top-k rows; None if no span is left."""
    starts, lengths = spans_of(row)
    ends = starts + lengths
    inside = (starts >= a) & (ends <= b)
    crossing = ~inside & (starts < b) & (ends > a)
    if crossing.any():
        s, n = int(starts[crossing][0]), int(lengths[crossing][0])
        raise ValueError(f"trained span ({s}, {n}) crosses a message boundary at {a} or {b}")
    if inside.all():
        return None
    shift = torch.where(starts >= b, b - a, 0)
    new_starts, new_lengths = (starts - shift)[~inside], lengths[~inside]
    token_kept = torch.repeat_interleave(~inside, lengths)  # (N,) which top-k rows stay
    conv = torch.cat([row["prompt_ids"], row["response_ids"]])
    conv = torch.cat([conv[:a], conv[b:]])
    first = int(new_starts[0])
    turn_starts = row["turn_starts"].long()
    turn_kept = (turn_starts < a) | (turn_starts >= b)
    out = dict(row)
    out.update(
        prompt_ids=conv[:first],
        response_ids=conv[first:],
        span_starts=new_starts,
        span_lengths=new_lengths,
        turn_starts=torch.where(turn_starts >= b, turn_starts - (b - a), turn_starts)[turn_kept],
        turn_roles=[r for r, k in zip(row["turn_roles"], turn_kept.tolist(), strict=True) if k],
        sample_prompt_ids=row.get("sample_prompt_ids", row["prompt_ids"]),
        **{name: row[name][token_kept] for name in PER_TOKEN if name in row},
    )
    return out

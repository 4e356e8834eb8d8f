"""Trained spans of a conversation row: checking them, and finding their tokens.

A row's conversation is prompt_ids ++ response_ids (P + T tokens). Its spans are (start,
length) pairs in those conversation coordinates; the per-token teacher streams cover the
span tokens only, N = sum(lengths), in span order. A v1 row (no span columns) has one span,
(P, T), or none when T = 0.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from shards.errors import ShardError


def check_spans(spans, prompt_len: int, total: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts (S,), lengths (S,)) int64 of `spans`, a sequence of (start, length); ValueError
    with the reason if they are not sorted, non-overlapping spans of >= 1 token that start at
    prompt_len and end at `total` (the conversation's length)."""
    a = np.asarray(spans if len(spans) else np.zeros((0, 2)))
    if a.ndim != 2 or a.shape[1] != 2 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"must be (start, length) integer pairs, got shape {a.shape}")
    starts, lengths = a[:, 0].astype(np.int64), a[:, 1].astype(np.int64)
    if total == prompt_len:
        if len(starts):
            raise ValueError("the response is empty: no span can be trained")
        return starts, lengths
    if not len(starts):
        raise ValueError("no span: a non-empty response needs at least one")
    bad = np.flatnonzero(lengths < 1)
    if len(bad):
        raise ValueError(f"span {bad[0]}: length {lengths[bad[0]]} < 1")
    ends = starts + lengths
    bad = np.flatnonzero(starts[1:] < ends[:-1])
    if len(bad):
        j = int(bad[0]) + 1
        raise ValueError(
            f"span {j} starts at {starts[j]}, before span {j - 1} ends ({ends[j - 1]}): "
            "spans must be sorted and not overlap"
        )
    if starts[0] != prompt_len:
        raise ValueError(f"span 0 starts at {starts[0]}, not at len(prompt_ids) = {prompt_len}")
    if ends[-1] != total:
        raise ValueError(
            f"span {len(ends) - 1} ends at {ends[-1]}, not at the conversation's end {total}"
        )
    return starts, lengths


def check_turns(turns, total: int) -> list[tuple[int, str]]:
    """The (start, role) pairs of `turns` as (int, str); ShardError (field turn_starts or
    turn_roles, no path) unless each is a pair, the starts are sorted integers inside the
    conversation [0, total) and the roles non-empty strings."""
    out: list[tuple[int, str]] = []
    for j, turn in enumerate(turns):
        try:
            start, role = turn
        except (TypeError, ValueError):
            msg = f"turn {j}: expected a (start, role) pair, got {turn!r}"
            raise ShardError(None, msg, field="turn_starts") from None
        problem = None
        if isinstance(start, bool) or not isinstance(start, int | np.integer):
            problem = f"turn {j}: start {start!r} is not an integer"
        elif not 0 <= start < total:
            problem = f"turn {j}: start {start} outside the conversation [0, {total})"
        elif out and start < out[-1][0]:
            problem = f"turn {j}: start {start} before turn {j - 1}'s ({out[-1][0]})"
        if problem:
            raise ShardError(None, problem, field="turn_starts")
        if not isinstance(role, str) or not role:
            msg = f"turn {j}: role must be a non-empty string, got {role!r}"
            raise ShardError(None, msg, field="turn_roles")
        out.append((int(start), role))
    return out


def gather_index(
    row_of_span: np.ndarray, base: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    """Flat indices (N,) of span tokens: span j covers base[row_of_span[j]] + starts[j] + 0..
    lengths[j]-1, spans in order. With base = response offset - prompt length of each row,
    they index a batch's flat response_ids."""
    lengths = np.asarray(lengths, np.int64)
    first = base[row_of_span] + np.asarray(starts, np.int64)
    before = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
    return np.repeat(first - before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def batch_spans(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(span offsets (rows+1,), starts (S,), lengths (S,)) int64 of a record batch; a v1
    batch (no span columns) gets one span (P, T) per row with T > 0."""
    resp = batch.column("response_ids").offsets.to_numpy().astype(np.int64)
    if "span_starts" not in batch.schema.names:
        prompt = batch.column("prompt_ids").offsets.to_numpy().astype(np.int64)
        t = np.diff(resp)
        has = t > 0
        off = np.concatenate([[0], np.cumsum(has)])
        return off, np.diff(prompt)[has], t[has]
    col_s, col_l = batch.column("span_starts"), batch.column("span_lengths")
    off = col_s.offsets.to_numpy().astype(np.int64)
    s = col_s.values.to_numpy(zero_copy_only=False)[off[0] : off[-1]].astype(np.int64)
    lo = col_l.offsets.to_numpy().astype(np.int64)
    n = col_l.values.to_numpy(zero_copy_only=False)[lo[0] : lo[-1]].astype(np.int64)
    if not np.array_equal(off - off[0], lo - lo[0]):
        row = int(np.argmax((off - off[0]) != (lo - lo[0]))) - 1
        raise ShardError(
            None, "length disagrees with span_starts", row=max(row, 0), field="span_lengths"
        )
    return off - off[0], s, n


def batch_trained_index(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    """(trained offsets (rows+1,), flat indices (N,) into the batch's response_ids values
    relative to its first row) of the span tokens of every row of a record batch.
    ShardError (no path; row relative to the batch) if a span is not where check_spans
    allows."""
    resp = batch.column("response_ids").offsets.to_numpy().astype(np.int64)
    prompt = batch.column("prompt_ids").offsets.to_numpy().astype(np.int64)
    span_off, starts, lengths = batch_spans(batch)
    row_of_span = np.repeat(np.arange(len(span_off) - 1), np.diff(span_off))
    p, t = np.diff(prompt), np.diff(resp)
    _check_batch_spans(row_of_span, span_off, starts, lengths, p, t)
    trained_off = np.concatenate([[0], np.cumsum(lengths)])[span_off]
    return trained_off, gather_index(row_of_span, resp[:-1] - resp[0] - p, starts, lengths)


def _check_batch_spans(row_of_span, span_off, starts, lengths, p, t) -> None:
    """check_spans for all rows of a batch at once (a damaged file must not index outside
    its rows)."""
    ends = starts + lengths
    first, last = span_off[:-1], span_off[1:] - 1
    has = span_off[1:] > span_off[:-1]
    bad = lengths < 1
    bad[1:] |= (starts[1:] < ends[:-1]) & (row_of_span[1:] == row_of_span[:-1])
    bad |= (starts < p[row_of_span]) | (ends > (p + t)[row_of_span])
    row_bad = np.bincount(row_of_span, weights=bad, minlength=len(p)) > 0
    row_bad |= has != (t > 0)
    row_bad[has] |= (starts[first[has]] != p[has]) | (ends[last[has]] != (p + t)[has])
    if row_bad.any():
        raise ShardError(
            None,
            "spans are not sorted, non-overlapping spans of >= 1 token from the end of "
            "prompt_ids to the end of response_ids",
            row=int(np.argmax(row_bad)),
            field="span_starts",
        )


def spans_of(row: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts (S,), lengths (S,)) int64: a row's trained spans in conversation coordinates;
    one span, the whole response, for a row without `span_starts` (the rows train/ builds
    from live samples)."""
    if "span_starts" in row:
        return torch.as_tensor(row["span_starts"]).long(), torch.as_tensor(
            row["span_lengths"]
        ).long()
    p, t = len(row["prompt_ids"]), len(row["response_ids"])
    return torch.tensor([p]), torch.tensor([t])


def trained_index(row: dict) -> torch.Tensor:
    """(N,) int64: the conversation coordinate of each trained token, in span order (the
    order of the row's top-k rows)."""
    starts, lengths = spans_of(row)
    # Token j of the flat list sits at j + (start of its span - tokens of earlier spans).
    offset = starts - (torch.cumsum(lengths, 0) - lengths)
    return torch.arange(int(lengths.sum())) + torch.repeat_interleave(offset, lengths)


def trained_ids(row: dict) -> torch.Tensor:
    """The span tokens (N,) int64 of a row as the reader yields it, in span order."""
    p = len(row["prompt_ids"])
    return row["response_ids"].long()[trained_index(row) - p]


def trained_mask(row: dict) -> np.ndarray:
    """(P + T,) bool over the conversation: True at span tokens."""
    p, t = len(row["prompt_ids"]), len(row["response_ids"])
    mask = np.zeros(p + t, bool)
    for s, n in zip(row["span_starts"], row["span_lengths"], strict=True):
        mask[int(s) : int(s) + int(n)] = True
    return mask

"""Two files of the same conversations, joined by id: the student's (`data.path`, no
experience) and the teacher's (`data.teacher_path`, the experience anywhere in its system and
user turns), as agent data often comes (`noexp_..._train.jsonl` and `..._train.jsonl`).

The teacher view is the teacher file's chat as it is; the student view the student file's.
Their assistant turns must be equal (content and tool calls), in the same order, and marked
for training alike: what the student is trained on is what the teacher was scored on. A pair
that differs is rejected naming the student's first differing turn and the teacher's row;
a row without its partner is rejected at its own file and line; both files need ids.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from datafiles.formats import Example, Fields, Reject, raw_text, read_examples
from datafiles.reading import raw_rows


def _assistants(ex: Example) -> list[tuple[int, dict]]:
    """(message index, the turn's content and tool calls) of every assistant turn; a
    single-turn row's scored response counts as its last."""
    chat = ex.conversation or ex.messages
    turns = [
        (j, {"content": m["content"], "tool_calls": m.get("tool_calls")})
        for j, m in enumerate(chat)
        if m["role"] == "assistant"
    ]
    if not ex.conversation and ex.response is not None:
        turns.append((len(chat), {"content": ex.response, "tool_calls": None}))
    return turns


def _field(ex: Example, j: int) -> str:
    chat = ex.conversation or ex.messages
    return f"{ex.prompt_field}[{j}]" if j < len(chat) else "response"


def _mismatch(s: Example, t: Example) -> tuple[str, str] | None:
    """(field, reason) of the first difference between the pair's assistant turns."""
    a, b = _assistants(s), _assistants(t)
    where = t.where.short()
    for n, ((j, x), (k, y)) in enumerate(zip(a, b, strict=False)):
        for key in ("content", "tool_calls"):
            if x[key] != y[key]:
                return _field(s, j), (
                    f"turn {j} (assistant turn {n}): its {key} differs from the teacher "
                    f"file's turn {k} ({where}): {str(x[key])[:60]!r} vs {str(y[key])[:60]!r}"
                )
    if len(a) != len(b):
        j = a[len(b)][0] if len(a) > len(b) else len(s.conversation or s.messages)
        return _field(s, j) if len(a) > len(b) else s.prompt_field, (
            f"turn {j}: {len(a)} assistant turns, the teacher file's row ({where}) has {len(b)}"
        )
    ordinal = {j: n for n, (j, _) in enumerate(a)}
    t_ordinal = {k: n for n, (k, _) in enumerate(b)}
    mine = [ordinal[j] for j in s.trained]
    theirs = [t_ordinal[k] for k in t.trained]
    if mine != theirs:
        first = next((x for x, y in zip(mine, theirs, strict=False) if x != y), None)
        j = a[first if first is not None else min(len(mine), len(theirs))][0] if a else 0
        return _field(s, j), (
            f"turn {j}: trained assistant turns {mine} differ from the teacher file's "
            f"{theirs} ({where}): mark them alike"
        )
    return None


def _raw_texts(path, split: str, indices: set[int]) -> dict[int, str]:
    """The raw text of a file's rows at `indices` (a second pass: examples keep none)."""
    out = {}
    if indices:
        for index, (_, row, raw) in enumerate(raw_rows(Path(path), split)):
            if index in indices:
                out[index] = raw_text(row, raw)
    return out


def read_pairs(
    path: Path | str,
    teacher_path: Path | str,
    split: str,
    fields: Fields,
    mode: str,
    limit: int = 0,
) -> tuple[list[Example], list[Reject], int]:
    """The student file's examples, each with its teacher chat (`teacher_messages`,
    `teacher_conversation`) and the teacher row's experience, and the rejects of both files
    (the teacher file's numbered after the student's rows); the row count of both."""
    keyed = replace(fields, id_required=True)
    students, rejects, total = read_examples(path, split, keyed, mode)
    teachers, t_rejects, t_total = read_examples(teacher_path, split, keyed, mode)
    # Teacher-file rows are numbered after the student's: the worker split stays by index.
    rejects += [replace(r, index=total + r.index) for r in t_rejects]
    by_id = {t.id: t for t in teachers}
    out, paired, bad_s, bad_t = [], set(), [], []
    for s in students:
        t = by_id.get(s.id)
        if t is None:
            bad_s.append(
                (s, fields.id, f"no row with id {s.id!r} in the teacher file {teacher_path}")
            )
            continue
        paired.add(s.id)
        if s.experience:
            why = "two files (data.teacher_path): the experience belongs in the teacher's file"
            bad_s.append((s, fields.experience, why))
            continue
        if (bad := _mismatch(s, t)) is not None:
            bad_s.append((s, *bad))
            continue
        out.append(
            replace(
                s,
                experience=t.experience,
                teacher_messages=t.messages,
                teacher_conversation=t.conversation or None,
            )
        )
    for t in teachers:
        if t.id not in paired:
            bad_t.append((t, fields.id, f"no row with id {t.id!r} in the student file {path}"))
    for bad, file, base in ((bad_s, path, 0), (bad_t, teacher_path, total)):
        raws = _raw_texts(file, split, {ex.index for ex, _, _ in bad})
        rejects += [
            Reject.of(base + ex.index, ex.where, field, why, raws[ex.index])
            for ex, field, why in bad
        ]
    if limit:
        out = out[:limit]
    return out, sorted(rejects, key=lambda r: r.index), total + t_total

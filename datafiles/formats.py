"""The formats of a data file's rows, recognised from its columns, and each row's example.

Without field settings a file's format is recognised from its columns (a table's schema, a
CSV header, or the keys of a JSON file's first object), first match wins:

    question_answer    `question` (+ `answer`): kdshards' own, the question is the user's turn
    messages           `messages`: TRL's conversational, agent trajectories (tool calls, text
                       parts: datafiles/messages.py); a trailing assistant turn is the answer,
                       the turns before it the prompt; in score mode (without a response
                       field) the whole conversation, its assistant turns selected by
                       `train_turns` trained in place (datafiles/conversation.py)
    prompt_completion  `prompt` (+ `completion`): TRL's prompt-only and prompt-completion, in
                       both forms: standard (strings; the prompt is the user's turn) and
                       conversational (lists of messages); the completion is the answer and,
                       in score mode, the response

`experience` (teacher-only text), `id` and `answer` (the reference answer; it wins over a
completion or an assistant turn as the answer) are optional in every format. A table that
matches none is refused in one line that lists its columns and the formats looked for; TRL's
language-modeling `text` is named in it, having no prompt to answer. A setting wins over the
columns: `format` names the format, a `messages` field or a question field other than
`question` name theirs. A bad row is reported as FILE:LINE: FIELD: reason and rejected alone.

To add a format: a name in FORMATS, its columns in `detect`, its row mapping in `_FORMATS`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from datafiles.messages import conversation, trained_turns
from datafiles.reading import BadField, InputFileError, Where, file_rows, input_files

FORMATS = ("auto", "question_answer", "messages", "prompt_completion")
LOOKED_FOR = "question(+answer) | messages | prompt(+completion)"
# A rejects entry keeps the raw row up to this many characters (the rest is cut, and the
# entry says how long the row was), so that one huge row cannot blow up the rejects file.
RAW_CAP_CHARS = 64 * 1024


@dataclass(frozen=True)
class Fields:
    """Which format a file has and the names of its fields (precompute's `data.*`)."""

    format: str = "auto"  # one of FORMATS
    question: str = "question"
    messages: str = ""  # "" : `messages`, when the columns say so
    experience: str = "experience"
    answer: str = "answer"
    id: str = "id"
    response: str = ""  # score mode: the response's field ("": the format's own)
    prompt: str = "prompt"
    completion: str = "completion"
    train_turns: str = (
        "all"  # datafiles.messages.TRAIN_TURNS: the assistant turns score mode trains
    )
    id_required: bool = False  # two files (datafiles/pairs.py) are joined by id
    meta: str = ""  # a JSON object kept in the row's meta ("": none)
    sample_index: str = ""  # the row's sample_index ("": 0)


@dataclass(frozen=True)
class Example:
    """One validated input example (the chat before the experience is added)."""

    index: int  # position among the input's rows: seeds and the worker split derive from it
    id: str
    messages: tuple[dict, ...]  # the student view's chat: the question alone
    experience: str
    answer: str | None
    response: str | None  # score mode: the response to score
    where: Where
    prompt_field: str = "question"  # the field the prompt came from, for later rejects
    # Score mode, `messages` format without data.response_field: the whole conversation
    # (every message, the trailing assistant turn included) and the indices of its trained
    # assistant turns; empty for the single-turn path (prompt `messages` + `response`).
    conversation: tuple[dict, ...] = ()
    trained: tuple[int, ...] = ()
    # Two files (datafiles/pairs.py): the teacher file's chat, the same shape as `messages`
    # (its prompt) and `conversation`; None: the teacher view adds `experience` instead.
    teacher_messages: tuple[dict, ...] | None = None
    teacher_conversation: tuple[dict, ...] | None = None
    # Fields.meta / Fields.sample_index: kept in the shard row as given (e.g. an episode's
    # record and sample, tools/onpolicy/episodes.py).
    meta: dict | None = None
    sample_index: int = 0


# Keys precompute writes into a row's meta itself: a row's own meta may not use them.
RESERVED_META = (
    "index",
    "answer",
    "finish_reason",
    "retokenize_mismatch",
    "turns",
    "trained_turns",
)


def _row_meta(row: dict, f: Fields) -> tuple[dict | None, int]:
    meta = None
    if f.meta and row.get(f.meta) is not None:
        meta = row[f.meta]
        if not isinstance(meta, dict):
            raise BadField(f.meta, f"expected a JSON object, got {type(meta).__name__}")
        if clash := sorted(set(meta) & set(RESERVED_META)):
            raise BadField(f.meta, f"key(s) {', '.join(clash)} are precompute's own row meta")
    sample = 0
    if f.sample_index and row.get(f.sample_index) is not None:
        sample = row[f.sample_index]
        if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
            raise BadField(f.sample_index, f"expected an integer >= 0, got {sample!r}")
    return meta, sample


@dataclass(frozen=True)
class Reject:
    index: int
    where: Where
    field: str
    reason: str
    raw: str  # the raw row, cut to RAW_CAP_CHARS
    raw_chars: int = -1  # the raw row's full length, when it was cut

    @classmethod
    def of(cls, index: int, where: Where, field: str, reason: str, raw: str) -> Reject:
        if len(raw) > RAW_CAP_CHARS:
            return cls(index, where, field, reason, raw[:RAW_CAP_CHARS], len(raw))
        return cls(index, where, field, reason, raw)

    def message(self) -> str:
        return f"{self.where.short()}: {self.field}: {self.reason}"


class InputError(ValueError):
    """Invalid input rows; the message names file, line or row, and field of each."""

    def __init__(self, rejects: list[Reject], total: int):
        self.rejects = rejects
        self.total = total
        shown = "\n  ".join(r.message() for r in rejects[:20])
        more = f"\n  ... and {len(rejects) - 20} more" if len(rejects) > 20 else ""
        super().__init__(
            f"{len(rejects)} invalid input row(s) of {total}:\n  {shown}{more}\n"
            "Fix them, or pass --skip-invalid to write them to a rejects file and go on."
        )


# ---- recognising a format -----------------------------------------------------------------


def _required(fields: Fields, fmt: str) -> str:
    """The column every row of format `fmt` needs."""
    return {
        "question_answer": fields.question,
        "messages": fields.messages or "messages",
        "prompt_completion": fields.prompt,
    }[fmt]


def detect(path: Path | str, columns, fields: Fields) -> str:
    """The format of a file with these columns (None: unknown, as for a JSON file without
    one object), or a one-line InputFileError naming its columns."""
    if fields.format != "auto":
        fmt = fields.format
    elif fields.messages:
        fmt = "messages"
    elif fields.question != Fields.question:
        fmt = "question_answer"
    elif columns is None:
        return "question_answer"  # no row to look at: each row says what is wrong with it
    else:
        found = [f for f in FORMATS[1:] if _required(fields, f) in columns]
        if not found:
            text = (
                " (`text` is language-modeling data: it has no prompt to answer)"
                if "text" in columns
                else ""
            )
            raise InputFileError(
                path,
                f"no known format: columns [{', '.join(map(str, columns))}]; looked for: "
                f"{LOOKED_FOR}{text}; or name them with data.format and data.*_field",
            )
        fmt = found[0]
    need = _required(fields, fmt)
    if columns is not None and need not in columns:
        raise InputFileError(
            path,
            f"no column {need!r} (format {fmt}, from the settings); columns: "
            f"{', '.join(map(str, columns))}",
        )
    return fmt


def _first_object(rows: Iterator) -> tuple[list | None, list]:
    """The keys of the first row that is an object, and the rows read to find it."""
    seen = []
    for item in rows:
        seen.append(item)
        if isinstance(item[1], dict):
            return list(item[1]), seen
    return None, seen


def format_rows(path: Path | str, split: str, fields: Fields):
    """Yield (format, Where, row or BadField, raw text or None) for every row of the input:
    each file's format recognised from its columns before its first row."""
    for file in input_files(Path(path)):
        columns, rows = file_rows(file, split)
        seen = []
        if columns is None:
            columns, seen = _first_object(rows)
        fmt = detect(file, columns, fields)
        for item in seen:
            yield (fmt, *item)
        for item in rows:
            yield (fmt, *item)


# ---- a row's example ----------------------------------------------------------------------


def _optional_str(row: dict, name: str, *, numbers: bool = False) -> str | None:
    if not name or row.get(name) is None:
        return None
    value = row[name]
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise BadField(name, f"expected a string, got {type(value).__name__}")
    return value


def _text(row: dict, name: str) -> str:
    if name not in row or row[name] is None:
        raise BadField(name, "missing")
    value = row[name]
    if not isinstance(value, str):
        raise BadField(name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise BadField(name, "empty")
    return value


def _message_list(value, name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadField(name, f"expected a non-empty list of messages, got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise BadField(f"{name}[{j}]", "expected {role: str, content: str}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _messages(row: dict, name: str) -> list[dict]:
    if name not in row or row[name] is None:
        raise BadField(name, "missing")
    return _message_list(row[name], name)


@dataclass
class _Mapped:
    """What a format makes of a row: the prompt's chat and its field, the format's own
    answer (None: none) and the format's response field, for score mode."""

    messages: list[dict]
    prompt_field: str
    answer: str | None
    response_field: str
    conversation: list[dict] | None = None  # messages format: every message
    flags: list[bool | None] | None = None  # messages format: each message's `train` flag


def _question_answer(row: dict, f: Fields) -> _Mapped:
    q = _text(row, f.question)
    return _Mapped([{"role": "user", "content": q}], f.question, None, f.answer)


def _conversation(row: dict, f: Fields) -> _Mapped:
    name = f.messages or "messages"
    if name not in row or row[name] is None:
        raise BadField(name, "missing")
    whole, flags = conversation(row[name], name)
    msgs, answer = list(whole), None
    if msgs[-1]["role"] == "assistant":
        # A trailing assistant turn is the reference answer, not part of the prompt.
        last = msgs.pop()
        answer = last["content"] or json.dumps(last.get("tool_calls"), ensure_ascii=False)
    if not msgs:
        raise BadField(name, "no message before the assistant's")
    return _Mapped(msgs, name, answer, f.answer, whole, flags)


def _prompt_completion(row: dict, f: Fields) -> _Mapped:
    if row.get(f.prompt) is not None and isinstance(row[f.prompt], list):  # conversational
        msgs = _messages(row, f.prompt)
        if msgs[-1]["role"] == "assistant":
            raise BadField(
                f.prompt, "ends with an assistant turn: the response belongs in the completion"
            )
    else:  # standard: the prompt text is the user's turn
        msgs = [{"role": "user", "content": _text(row, f.prompt)}]
    completion = row.get(f.completion)
    if isinstance(completion, list):
        turns = _message_list(completion, f.completion)
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise BadField(f.completion, "expected one assistant message")
        completion = turns[0]["content"]
    elif completion is not None and not isinstance(completion, str):
        raise BadField(
            f.completion, f"expected a string or messages, got {type(completion).__name__}"
        )
    return _Mapped(msgs, f.prompt, completion, f.completion)


_FORMATS = {
    "question_answer": _question_answer,
    "messages": _conversation,
    "prompt_completion": _prompt_completion,
}


def parse_row(index: int, where: Where, row, fields: Fields, mode: str, fmt: str) -> Example:
    """The example of a row of format `fmt`; mode "score" needs a response to score."""
    if isinstance(row, BadField):
        raise row
    if not isinstance(row, dict):
        raise BadField("<row>", f"expected a JSON object, got {type(row).__name__}")
    m = _FORMATS[fmt](row, fields)
    given = _optional_str(row, fields.answer, numbers=True)
    answer = given if given is not None else m.answer
    experience = _optional_str(row, fields.experience) or ""
    response, whole, trained = None, (), ()
    if mode == "score" and m.conversation is not None and not fields.response:
        # The conversation path: every trained assistant turn is scored in place; a
        # reference `answer` stays the answer (meta), it is not scored.
        trained = tuple(trained_turns(m.conversation, m.flags, fields.train_turns))
        if not trained:
            n = len(m.conversation)
            why = (
                "every assistant turn is marked `train: false` (data.train_turns=marked)"
                if any(x["role"] == "assistant" for x in m.conversation)
                else f"none of its {n} turns is an assistant's"
            )
            raise BadField(m.prompt_field, f"score mode needs an assistant turn to score: {why}")
        whole = tuple(m.conversation)
        last = whole[trained[-1]]
        response = last["content"] or json.dumps(last.get("tool_calls"), ensure_ascii=False)
    elif mode == "score":
        rf = fields.response or m.response_field
        if rf == fields.answer:
            response = answer
        elif rf == m.response_field:
            response = m.answer  # prompt_completion: the completion
        else:
            response = _optional_str(row, rf, numbers=True)
        if response is None or not response.strip():
            raise BadField(rf, "score mode needs a non-empty response to score")
    ex_id = None
    if fields.id and row.get(fields.id) is not None:
        v = row[fields.id]
        if isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, str) and not v):
            raise BadField(fields.id, f"expected a non-empty string or an integer, got {v!r}")
        ex_id = str(v)
    if ex_id is None and fields.id_required:
        raise BadField(fields.id or "<id>", "missing: the two files are joined by id")
    if ex_id is None:
        # Stable across runs and machines, so that resume and the worker split agree.
        content = {"m": m.messages, "e": experience, "a": answer, "r": response}
        if m.flags is not None and any(x is not None for x in m.flags):
            content["f"] = m.flags  # rows that differ only in their marks are two examples
        blob = json.dumps(content, sort_keys=True, ensure_ascii=False)
        ex_id = "h" + hashlib.sha256(blob.encode()).hexdigest()[:16]
    meta, sample_index = _row_meta(row, fields)
    return Example(
        index,
        ex_id,
        tuple(m.messages),
        experience,
        answer,
        response,
        where,
        m.prompt_field,
        conversation=whole,
        trained=trained,
        meta=meta,
        sample_index=sample_index,
    )


def raw_text(row, raw: str | None) -> str:
    """A row's raw text for a message or a rejects entry."""
    if raw is not None:
        return raw
    return json.dumps(row, default=str, ensure_ascii=False)


def read_examples(
    path: Path | str, split: str, fields: Fields, mode: str, limit: int = 0
) -> tuple[list[Example], list[Reject], int]:
    """All valid examples and all rejects (invalid rows, duplicate ids), and the row count."""
    examples, rejects, seen = [], [], {}
    index = -1
    for index, (fmt, where, row, raw) in enumerate(format_rows(path, split, fields)):
        try:
            ex = parse_row(index, where, row, fields, mode, fmt)
            if ex.id in seen:
                raise BadField(
                    fields.id or "<id>", f"duplicate id {ex.id!r} (first at {seen[ex.id]})"
                )
        except BadField as b:
            rejects.append(Reject.of(index, where, b.field, b.reason, raw_text(row, raw)))
            continue
        seen[ex.id] = where
        examples.append(ex)
    if limit:
        examples = examples[:limit]
    return examples, rejects, index + 1

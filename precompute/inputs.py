"""Reading and validating input examples, before any teacher time is spent.

Formats: JSONL (and JSON lines in a .json file) are parsed here line by line, so that a bad
line is named by its number (`datasets`' JSON loader fails on the whole file without one, and
refuses a file whose rows disagree on a field's type). A JSON array, Parquet, CSV, Arrow and
folders saved with `datasets.save_to_disk` are read through `datasets`. Every row is then
checked field by field; a problem is reported as `file, line N (or row N), field 'x': reason`.
Locations: JSONL lines are 1-based (as an editor shows them), dataset rows 0-based (as
`datasets` indexes them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from precompute.config import DataConfig
from shards.fingerprint import files_fingerprint

TABLE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass(frozen=True)
class Example:
    """One validated input example (the chat before the experience is added)."""

    index: int  # position among the input's rows: seeds and the worker split derive from it
    id: str
    messages: tuple[dict, ...]  # the student view's chat: the question alone
    experience: str
    answer: str | None
    response: str | None  # score mode: the response to score
    where: str


@dataclass(frozen=True)
class Reject:
    index: int
    where: str
    field: str
    reason: str
    raw: str

    def message(self) -> str:
        return f"{self.where}, field {self.field!r}: {self.reason}"


class InputError(ValueError):
    """Invalid input rows; the message names file, line or row, and field of each."""

    def __init__(self, rejects: list[Reject], total: int):
        self.rejects = rejects
        shown = "\n  ".join(r.message() for r in rejects[:20])
        more = f"\n  ... and {len(rejects) - 20} more" if len(rejects) > 20 else ""
        super().__init__(
            f"{len(rejects)} invalid input row(s) of {total}:\n  {shown}{more}\n"
            "Fix them, or pass --skip-invalid to write them to a rejects file and go on."
        )


class _Bad(Exception):
    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason


def raw_rows(path: Path, split: str):
    """Yield (where, row-or-_Bad, raw text) for every row of the input."""
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path}: no split {split!r} (splits: {list(ds)})")
            ds = ds[split]
        for i, row in enumerate(ds):
            yield f"{path}, row {i}", row, None
        return
    if not path.is_file():
        raise FileNotFoundError(f"{path}: input not found")
    suffix = path.suffix.lower()
    if suffix in TABLE_FORMATS:
        import datasets

        ds = datasets.load_dataset(TABLE_FORMATS[suffix], data_files=str(path), split="train")
        for i, row in enumerate(ds):
            yield f"{path}, row {i}", row, None
        return
    if suffix not in (".jsonl", ".json"):
        raise ValueError(
            f"{path}: unknown input format {suffix!r} (jsonl, json, parquet, csv, "
            "arrow, or a folder saved by datasets)"
        )
    text = path.read_text(encoding="utf-8")
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {e.lineno}: not valid JSON: {e.msg}") from None
        for i, row in enumerate(rows):
            yield f"{path}, row {i}", row, None
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines separate nothing and hold no example
        try:
            yield f"{path}, line {n}", json.loads(line), line
        except json.JSONDecodeError as e:
            yield f"{path}, line {n}", _Bad("<json>", f"not valid JSON: {e.msg}"), line


def _optional_str(row: dict, name: str, *, numbers: bool = False) -> str | None:
    if not name or row.get(name) is None:
        return None
    value = row[name]
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise _Bad(name, f"expected a string, got {type(value).__name__}")
    return value


def _messages(row: dict, name: str) -> list[dict]:
    if name not in row or row[name] is None:
        raise _Bad(name, "missing")
    msgs = row[name]
    if not isinstance(msgs, list) or not msgs:
        raise _Bad(name, f"expected a non-empty list of messages, got {type(msgs).__name__}")
    out = []
    for j, m in enumerate(msgs):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise _Bad(f"{name}[{j}]", "expected {role: str, content: str}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def parse_row(index: int, where: str, row, cfg: DataConfig, mode: str) -> Example:
    if isinstance(row, _Bad):
        raise row
    if not isinstance(row, dict):
        raise _Bad("<row>", f"expected a JSON object, got {type(row).__name__}")
    answer = _optional_str(row, cfg.answer_field, numbers=True)
    if cfg.messages_field:
        msgs = _messages(row, cfg.messages_field)
        if msgs[-1]["role"] == "assistant":
            # A trailing assistant turn is the reference answer, not part of the prompt.
            last = msgs.pop()
            answer = answer if answer is not None else last["content"]
        if not msgs:
            raise _Bad(cfg.messages_field, "no message before the assistant's")
    else:
        if cfg.question_field not in row or row[cfg.question_field] is None:
            raise _Bad(cfg.question_field, "missing")
        q = row[cfg.question_field]
        if not isinstance(q, str):
            raise _Bad(cfg.question_field, f"expected a string, got {type(q).__name__}")
        if not q.strip():
            raise _Bad(cfg.question_field, "empty")
        msgs = [{"role": "user", "content": q}]
    experience = _optional_str(row, cfg.experience_field) or ""
    response = None
    if mode == "score":
        rf = cfg.response_field or cfg.answer_field
        response = answer if rf == cfg.answer_field else _optional_str(row, rf, numbers=True)
        if response is None or not response.strip():
            raise _Bad(rf, "score mode needs a non-empty response to score")
    ex_id = None
    if cfg.id_field and row.get(cfg.id_field) is not None:
        v = row[cfg.id_field]
        if isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, str) and not v):
            raise _Bad(cfg.id_field, f"expected a non-empty string or an integer, got {v!r}")
        ex_id = str(v)
    if ex_id is None:
        # Stable across runs and machines, so that resume and the worker split agree.
        blob = json.dumps(
            {"m": msgs, "e": experience, "a": answer, "r": response},
            sort_keys=True,
            ensure_ascii=False,
        )
        ex_id = "h" + hashlib.sha256(blob.encode()).hexdigest()[:16]
    return Example(index, ex_id, tuple(msgs), experience, answer, response, where)


def read_examples(cfg: DataConfig, mode: str) -> tuple[list[Example], list[Reject], int]:
    """All valid examples and all rejects (invalid rows, duplicate ids), and the row count."""
    examples, rejects, seen = [], [], {}
    index = -1
    for index, (where, row, raw) in enumerate(raw_rows(Path(cfg.path), cfg.split)):
        if raw is None:
            raw = json.dumps(row, default=str, ensure_ascii=False)
        try:
            ex = parse_row(index, where, row, cfg, mode)
            if ex.id in seen:
                raise _Bad(
                    cfg.id_field or "<id>", f"duplicate id {ex.id!r} (first at {seen[ex.id]})"
                )
        except _Bad as b:
            rejects.append(Reject(index, where, b.field, b.reason, raw))
            continue
        seen[ex.id] = where
        examples.append(ex)
    if cfg.limit:
        examples = examples[: cfg.limit]
    return examples, rejects, index + 1


def rejects_jsonl(rejects: list[Reject]) -> list[bytes]:
    """One JSON line per rejected row (the lines of a rejects file)."""
    return [
        json.dumps(
            {"where": r.where, "field": r.field, "reason": r.reason, "row": r.raw},
            ensure_ascii=False,
        ).encode()
        for r in rejects
    ]


def data_fingerprint(path: str | Path) -> str:
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return files_fingerprint(files)

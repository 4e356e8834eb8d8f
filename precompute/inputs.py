"""Reading and validating input examples, before any teacher time is spent.

Formats: JSONL (and JSON lines in a .json file) and CSV are parsed here, streamed line by
line, so that a bad line is named by its number and rejected alone (`datasets`' loaders fail
on the whole file without one, and refuse a file whose rows disagree on a field's type).
Parquet and Arrow files are streamed record batch by record batch with pyarrow; a JSON array
(loaded whole: use JSONL for large inputs) and folders saved with `datasets.save_to_disk`
(memory-mapped) are read through `datasets`. A folder of data files (not a saved data set) is
read file by file, in name order. Every row is then checked field by field; a problem is
reported as `file:line N` (JSONL, CSV: 1-based, as an editor shows them) or `file:row N`
(the other formats: 0-based, as `datasets` indexes them), the field and the reason.

Text is UTF-8; a byte-order mark at the start of a file is accepted (utf-8-sig). A line that
is not valid UTF-8 is rejected by itself, like any other bad row.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from precompute.config import DataConfig
from shards.fingerprint import files_fingerprint

FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
# Files that mark a folder saved by `datasets.save_to_disk` (Dataset, DatasetDict).
SAVED_MARKERS = ("state.json", "dataset_dict.json")
# A rejects entry keeps the raw row up to this many characters (the rest is cut, and the
# entry says how long the row was), so that one huge row cannot blow up the rejects file.
RAW_CAP_CHARS = 64 * 1024


@dataclass(frozen=True)
class Where:
    """A row's place in the input: file, and 1-based line (text formats) or 0-based row."""

    file: str
    unit: str  # "line" | "row"
    number: int

    def __str__(self) -> str:
        return f"{self.file}, {self.unit} {self.number}"

    def short(self) -> str:
        """`file:N` for lines (as compilers print them), `file:row N` for rows."""
        n = str(self.number) if self.unit == "line" else f"row {self.number}"
        return f"{self.file}:{n}"


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


class InputFileError(ValueError):
    """The input as a whole cannot be read (missing, unknown format, unreadable, a schema
    without the configured fields): one line naming the file."""

    def __init__(self, path: str | Path, message: str, *, line: int | None = None):
        self.path, self.message, self.line = str(path), message, line
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


class _Bad(Exception):
    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in SAVED_MARKERS)


def input_files(path: Path) -> list[Path]:
    """The files (or the one saved-dataset folder) a data path stands for.

    A folder that `datasets.save_to_disk` did not write is read as its data files, all of one
    format, in name order (files starting with '.' and other suffixes, e.g. a `.tmp` of a
    copy in progress, are not data); data files in its subfolders are refused."""
    if is_saved_dataset(path):
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in FILE_FORMATS
        )
        if not files:
            raise InputFileError(
                path,
                "folder holds no data file (" + ", ".join(FILE_FORMATS) + ") and was not "
                "saved by datasets.save_to_disk",
            )
        nested = sorted(
            str(q.relative_to(path))
            for q in path.rglob("*")
            if q.is_file()
            and q.parent != path
            and q.suffix.lower() in FILE_FORMATS
            and not any(part.startswith(".") for part in q.relative_to(path).parts)
        )
        if nested:  # reading only the top level would drop them without a word
            raise InputFileError(
                path,
                f"data files in subfolders ({', '.join(nested[:3])}"
                f"{', ...' if len(nested) > 3 else ''}): only the files directly in the "
                "folder are read; point data.path at one folder of files",
            )
        kinds = sorted({p.suffix.lower() for p in files})
        if len(kinds) > 1:
            raise InputFileError(
                path, f"folder mixes formats ({', '.join(kinds)}): keep one format per folder"
            )
        return files
    if not path.exists():
        raise InputFileError(path, "input not found")
    if path.suffix.lower() not in FILE_FORMATS:
        raise InputFileError(
            path,
            f"unknown input format {path.suffix!r} (jsonl, json, csv, parquet, arrow, a folder "
            "of such files, or a folder saved by datasets)",
        )
    return [path]


def _printable(raw: bytes | str) -> str:
    """Raw text for a message or a rejects entry: undecodable bytes as \\xNN."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "backslashreplace")


def _jsonl_rows(path: Path):
    # Binary lines, decoded one by one: a bad byte costs its own line only, and only "\n"
    # ends a line (str.splitlines would also split inside JSON strings at U+2028, \x1c, ...).
    with open(path, "rb") as f:
        for n, bline in enumerate(f, start=1):
            if n == 1 and bline.startswith(b"\xef\xbb\xbf"):
                bline = bline[3:]  # UTF-8 byte-order mark
            bline = bline.rstrip(b"\r\n")
            where = Where(str(path), "line", n)
            try:
                line = bline.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = _Bad("<utf-8>", f"not valid UTF-8 (byte {e.start + 1} of the line)")
                yield where, bad, _printable(bline)
                continue
            if not line.strip(" \t"):
                continue  # blank lines separate nothing and hold no example
            try:
                yield where, json.loads(line), line
            except json.JSONDecodeError as e:
                yield where, _Bad("<json>", f"not valid JSON: {e.msg}"), line


def _first_byte(path: Path) -> bytes:
    """The first byte that is not whitespace or a byte-order mark (b"" for none)."""
    with open(path, "rb") as f:
        head = f.read(3)
        if head != b"\xef\xbb\xbf":
            f.seek(0)
        while chunk := f.read(1 << 16):
            rest = chunk.lstrip()
            if rest:
                return rest[:1]
    return b""


def _json_array_rows(path: Path):
    data = path.read_bytes()  # a JSON array is one value: parsed whole (JSONL streams)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputFileError(path, "not valid UTF-8", line=line) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputFileError(path, f"not valid JSON: {e.msg}", line=e.lineno) from None
    for i, row in enumerate(rows):
        yield Where(str(path), "row", i), row, None


class _Lines:
    """Decoded lines for csv.reader that remember the raw text of the current record."""

    def __init__(self, f):
        self.f, self.n, self.raw = f, 0, []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        b = self.f.readline()
        if not b:
            raise StopIteration
        if self.n == 0 and b.startswith(b"\xef\xbb\xbf"):
            b = b[3:]
        self.n += 1
        # surrogateescape: a bad byte survives into the fields, where it is found and the
        # record rejected, instead of failing the whole file.
        s = b.decode("utf-8", "surrogateescape")
        self.raw.append(s)
        return s

    def take(self) -> str:
        raw, self.raw = "".join(self.raw).rstrip("\r\n"), []
        return raw


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _csv_rows(path: Path, required: str):
    csv.field_size_limit(1 << 30)  # the default (128 KiB) fails a long answer mid-file
    with open(path, "rb") as f:
        lines = _Lines(f)
        reader = csv.reader(lines)
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise InputFileError(path, f"header: {e}", line=1) from None
        if header is None:
            return
        if _has_surrogates("".join(header)):
            raise InputFileError(path, "header is not valid UTF-8", line=1)
        if len(set(header)) != len(header):
            raise InputFileError(path, f"header repeats a column name: {header}", line=1)
        _require_column(path, header, required)
        lines.take()
        start = lines.n + 1
        while True:
            try:
                rec = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield Where(str(path), "line", start), _Bad("<csv>", str(e)), lines.take()
                start = lines.n + 1
                continue
            raw, where = lines.take(), Where(str(path), "line", start)
            start = lines.n + 1
            if not rec:
                continue  # a blank line
            if _has_surrogates(raw):
                yield where, _Bad("<utf-8>", "not valid UTF-8"), _printable(raw)
            elif len(rec) != len(header):
                bad = _Bad("<csv>", f"{len(rec)} fields, the header has {len(header)}")
                yield where, bad, raw
            else:
                # An empty cell is a missing value, as pandas and `datasets` read it.
                row = {h: (v if v != "" else None) for h, v in zip(header, rec, strict=True)}
                yield where, row, raw


def _require_column(path: Path, columns, required: str) -> None:
    if required and required not in columns:
        raise InputFileError(
            path,
            f"no column {required!r} (the configured question or messages field); "
            f"columns: {', '.join(map(str, columns))}",
        )


def _arrow_batches(path: Path, suffix: str):
    if suffix == ".parquet":
        pf = pq.ParquetFile(path)
        return pf.schema_arrow, pf.iter_batches(batch_size=1024)
    try:
        reader = pa.ipc.open_file(path)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))  # the format `datasets` writes
        return reader.schema, iter(reader)


def _table_rows(path: Path, required: str):
    try:
        schema, batches = _arrow_batches(path, path.suffix.lower())
    except (pa.ArrowException, OSError) as e:
        kind = "Parquet" if path.suffix.lower() == ".parquet" else "Arrow"
        raise InputFileError(path, f"not a readable {kind} file: {e}") from None
    _require_column(path, schema.names, required)
    i = 0
    try:
        for batch in batches:
            for row in batch.to_pylist():
                yield Where(str(path), "row", i), row, None
                i += 1
    except (pa.ArrowException, OSError) as e:
        raise InputFileError(path, f"unreadable after row {i - 1}: {e}") from None


def _saved_rows(path: Path, split: str, required: str):
    import datasets  # seconds to import; only saved-dataset inputs need it

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds for a bad folder
        raise InputFileError(
            path, f"cannot be loaded as a folder saved by datasets: {type(e).__name__}: {e}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputFileError(path, f"no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    _require_column(path, ds.column_names, required)
    i = 0
    try:
        for i, row in enumerate(ds):
            yield Where(str(path), "row", i), row, None
    except Exception as e:  # noqa: BLE001 - e.g. data files that disagree with the saved schema
        raise InputFileError(
            path, f"unreadable at row {i}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None


def raw_rows(path: Path, split: str, required: str = ""):
    """Yield (Where, row-or-_Bad, raw text or None) for every row of the input, streamed.

    `required`: a field every row needs; a table format without such a column is refused
    as a whole (one line), instead of rejecting each of its rows."""
    path = Path(path)
    for file in input_files(path):
        suffix = file.suffix.lower()
        if file.is_dir():
            yield from _saved_rows(file, split, required)
        elif suffix == ".csv":
            yield from _csv_rows(file, required)
        elif suffix in (".parquet", ".arrow"):
            yield from _table_rows(file, required)
        elif suffix == ".json" and _first_byte(file) == b"[":
            yield from _json_array_rows(file)
        else:
            yield from _jsonl_rows(file)


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


def _required_field(cfg: DataConfig) -> str:
    return cfg.messages_field or cfg.question_field


def read_examples(cfg: DataConfig, mode: str) -> tuple[list[Example], list[Reject], int]:
    """All valid examples and all rejects (invalid rows, duplicate ids), and the row count."""
    examples, rejects, seen = [], [], {}
    index = -1
    rows = raw_rows(Path(cfg.path), cfg.split, _required_field(cfg))
    for index, (where, row, raw) in enumerate(rows):
        try:
            ex = parse_row(index, where, row, cfg, mode)
            if ex.id in seen:
                raise _Bad(
                    cfg.id_field or "<id>", f"duplicate id {ex.id!r} (first at {seen[ex.id]})"
                )
        except _Bad as b:
            rejects.append(Reject.of(index, where, b.field, b.reason, _raw_text(row, raw)))
            continue
        seen[ex.id] = where
        examples.append(ex)
    if cfg.limit:
        examples = examples[: cfg.limit]
    return examples, rejects, index + 1


def _raw_text(row, raw: str | None) -> str:
    if raw is not None:
        return raw
    return json.dumps(row, default=str, ensure_ascii=False)


def raw_text_of(cfg: DataConfig, indices) -> dict[int, str]:
    """The raw text of the rows at `indices` (a second pass over the input: examples do not
    keep their raw rows, which would double the memory a large input takes)."""
    want, out = set(indices), {}
    if not want:
        return out
    for index, (_, row, raw) in enumerate(raw_rows(Path(cfg.path), cfg.split)):
        if index in want:
            out[index] = _raw_text(row, raw)
            if len(out) == len(want):
                break
    return out


def rejects_jsonl(rejects: list[Reject]) -> list[bytes]:
    """One JSON line per rejected row (the lines of a rejects file)."""
    lines = []
    for r in rejects:
        rec = {"where": str(r.where), "field": r.field, "reason": r.reason, "row": r.raw}
        if r.raw_chars >= 0:
            rec["row_chars"] = r.raw_chars  # the row was cut to RAW_CAP_CHARS
        lines.append(json.dumps(rec, ensure_ascii=False).encode())
    return lines


def data_fingerprint(path: str | Path) -> str:
    p = Path(path)
    if is_saved_dataset(p):
        files = sorted(q for q in p.rglob("*") if q.is_file())
    else:
        files = input_files(p)
    return files_fingerprint(files)

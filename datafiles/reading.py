"""Data files to raw rows, each with its place (file and line or row), streamed.

File types: JSONL (and JSON lines in a .json file) and CSV are parsed here, streamed line by
line, so that a bad line is named by its number and rejected alone (`datasets`' loaders fail
on the whole file without one, and refuse a file whose rows disagree on a field's type).
Parquet and Arrow files are streamed record batch by record batch with pyarrow; a JSON array
(loaded whole: use JSONL for large inputs) and folders saved with `datasets.save_to_disk`
(memory-mapped) are read through `datasets`. A folder of data files (not a saved data set) is
read file by file, in name order. Every row is then checked field by field; a problem is
reported as `file:line N` (JSONL, CSV: 1-based, as an editor shows them) or `file:row N`
(the other formats: 0-based, as `datasets` indexes them), the field and the reason
(datafiles/formats.py checks the rows).

Text is UTF-8; a byte-order mark at the start of a file is accepted (utf-8-sig). A line that
is not valid UTF-8 is rejected by itself, like any other bad row.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
# Files that mark a folder saved by `datasets.save_to_disk` (Dataset, DatasetDict).
SAVED_MARKERS = ("state.json", "dataset_dict.json")


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


class InputFileError(ValueError):
    """The input as a whole cannot be read (missing, unknown file type, unreadable, a table
    of no known format): one line naming the file."""

    def __init__(self, path: str | Path, message: str, *, line: int | None = None):
        self.path, self.message, self.line = str(path), message, line
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


class BadField(Exception):
    """A row's problem: the field (or <json>, <csv>, <utf-8>, <row>) and the reason."""

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
                bad = BadField("<utf-8>", f"not valid UTF-8 (byte {e.start + 1} of the line)")
                yield where, bad, _printable(bline)
                continue
            if not line.strip(" \t"):
                continue  # blank lines separate nothing and hold no example
            try:
                yield where, json.loads(line), line
            except json.JSONDecodeError as e:
                yield where, BadField("<json>", f"not valid JSON: {e.msg}"), line


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


def _csv_file(path: Path) -> tuple[list[str], Iterator]:
    """The header and the records of a CSV file (the file stays open while they are read)."""
    csv.field_size_limit(1 << 30)  # the default (128 KiB) fails a long answer mid-file
    f = open(path, "rb")  # noqa: SIM115 - closed by _csv_records when it ends
    try:
        lines = _Lines(f)
        reader = csv.reader(lines)
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise InputFileError(path, f"header: {e}", line=1) from None
        if header is None:
            f.close()
            return [], iter(())
        if _has_surrogates("".join(header)):
            raise InputFileError(path, "header is not valid UTF-8", line=1)
        if len(set(header)) != len(header):
            raise InputFileError(path, f"header repeats a column name: {header}", line=1)
    except BaseException:
        f.close()
        raise
    lines.take()
    return header, _csv_records(path, f, lines, reader, header)


def _csv_records(path: Path, f, lines: _Lines, reader, header: list[str]):
    with f:
        start = lines.n + 1
        while True:
            try:
                rec = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield Where(str(path), "line", start), BadField("<csv>", str(e)), lines.take()
                start = lines.n + 1
                continue
            raw, where = lines.take(), Where(str(path), "line", start)
            start = lines.n + 1
            if not rec:
                continue  # a blank line
            if _has_surrogates(raw):
                yield where, BadField("<utf-8>", "not valid UTF-8"), _printable(raw)
            elif len(rec) != len(header):
                bad = BadField("<csv>", f"{len(rec)} fields, the header has {len(header)}")
                yield where, bad, raw
            else:
                # An empty cell is a missing value, as pandas and `datasets` read it.
                row = {h: (v if v != "" else None) for h, v in zip(header, rec, strict=True)}
                yield where, row, raw


def _arrow_batches(path: Path, suffix: str):
    import pyarrow as pa

    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        return pf.schema_arrow, pf.iter_batches(batch_size=1024)
    try:
        reader = pa.ipc.open_file(path)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))  # the format `datasets` writes
        return reader.schema, iter(reader)


def _table_file(path: Path) -> tuple[list[str], Iterator]:
    import pyarrow as pa

    try:
        schema, batches = _arrow_batches(path, path.suffix.lower())
    except (pa.ArrowException, OSError) as e:
        kind = "Parquet" if path.suffix.lower() == ".parquet" else "Arrow"
        raise InputFileError(path, f"not a readable {kind} file: {e}") from None
    return list(schema.names), _table_rows(path, batches)


def _table_rows(path: Path, batches):
    import pyarrow as pa

    i = 0
    try:
        for batch in batches:
            for row in batch.to_pylist():
                yield Where(str(path), "row", i), row, None
                i += 1
    except (pa.ArrowException, OSError) as e:
        raise InputFileError(path, f"unreadable after row {i - 1}: {e}") from None


def _saved_file(path: Path, split: str) -> tuple[list[str], Iterator]:
    import datasets

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
    return list(ds.column_names), _saved_rows(path, ds)


def _saved_rows(path: Path, ds):
    i = 0
    try:
        for i, row in enumerate(ds):
            yield Where(str(path), "row", i), row, None
    except Exception as e:  # noqa: BLE001 - e.g. data files that disagree with the saved schema
        raise InputFileError(
            path, f"unreadable at row {i}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None


def file_rows(file: Path, split: str) -> tuple[list[str] | None, Iterator]:
    """(columns, rows) of one file of `input_files`: rows as (Where, row or BadField, raw
    text or None), streamed. Columns: a table's schema or a CSV header; None for JSON, whose
    rows each have their own keys."""
    suffix = file.suffix.lower()
    if file.is_dir():
        return _saved_file(file, split)
    if suffix == ".csv":
        return _csv_file(file)
    if suffix in (".parquet", ".arrow"):
        return _table_file(file)
    if suffix == ".json" and _first_byte(file) == b"[":
        return None, _json_array_rows(file)
    return None, _jsonl_rows(file)


def raw_rows(path: Path, split: str):
    """Yield (Where, row or BadField, raw text or None) for every row of the input, streamed."""
    for file in input_files(Path(path)):
        yield from file_rows(file, split)[1]

"""Precompute's input examples: `data.*` settings to datafiles' reading, before any teacher
time is spent.

The files are read and their rows checked by datafiles/ (reading.py: file types, lines and
rows; formats.py: the formats and their fields), which train/ and tools/ share; this module
adds what only precompute needs: the config's fields, a second pass for rejected rows' raw
text, the rejects file's lines, and the input's fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path

from datafiles.formats import (
    RAW_CAP_CHARS,
    Example,
    Fields,
    InputError,
    Reject,
    raw_text,
)
from datafiles.formats import read_examples as read_file_examples
from datafiles.pairs import read_pairs
from datafiles.reading import InputFileError, Where, input_files, is_saved_dataset, raw_rows
from precompute.config import DataConfig
from shards.fingerprint import files_fingerprint

__all__ = [
    "RAW_CAP_CHARS",
    "Example",
    "InputError",
    "InputFileError",
    "Reject",
    "Where",
    "raw_rows",
]


def fields_of(cfg: DataConfig) -> Fields:
    return Fields(
        format=cfg.format,
        question=cfg.question_field,
        messages=cfg.messages_field,
        experience=cfg.experience_field,
        answer=cfg.answer_field,
        id=cfg.id_field,
        response=cfg.response_field,
        train_turns=cfg.train_turns,
        meta=cfg.meta_field,
        sample_index=cfg.sample_index_field,
    )


def read_examples(cfg: DataConfig, mode: str) -> tuple[list[Example], list[Reject], int]:
    """All valid examples and all rejects (invalid rows, duplicate ids, with two files the
    rows without a partner or whose assistant turns differ), and the row count."""
    if cfg.teacher_path:
        return read_pairs(cfg.path, cfg.teacher_path, cfg.split, fields_of(cfg), mode, cfg.limit)
    return read_file_examples(cfg.path, cfg.split, fields_of(cfg), mode, cfg.limit)


def raw_text_of(cfg: DataConfig, indices) -> dict[int, str]:
    """The raw text of the rows at `indices` (a second pass over the input: examples do not
    keep their raw rows, which would double the memory a large input takes)."""
    want, out = set(indices), {}
    if not want:
        return out
    for index, (_, row, raw) in enumerate(raw_rows(Path(cfg.path), cfg.split)):
        if index in want:
            out[index] = raw_text(row, raw)
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

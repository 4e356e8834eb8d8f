"""ShardWriter: rows in, complete Arrow IPC files and manifest entries out, crash-safe.

A file is written under a temporary name, fsynced, renamed and only then listed in the
manifest; the manifest is the commit point. A process killed at any moment leaves either a
listed, complete file or debris that the next writer with the same id deletes. All rows of
one `add` call (the n samples of one example) land in the same file, so an example id is
either complete or absent, and `completed_ids` is what a resumed precompute skips.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather

from shards import codec
from shards.errors import ShardError
from shards.manifest import (
    FileEntry,
    add_file,
    fsync_dir,
    init_or_check,
    load_manifest,
    sha256_file,
)
from shards.schema import (
    META_KEY,
    PER_ENTRY,
    PER_EXTRA,
    PER_TOKEN,
    RANK_ORDER_KEY,
    SOURCES,
    ShardMetadata,
    arrow_schema,
)

log = logging.getLogger(__name__)


@dataclass
class ShardRow:
    """One training example as the writer takes it. T response tokens, K = metadata.k.

    topk_ids, topk_logprobs: (T, K) the teacher's top-k per response token (raw logprobs).
    token_logprobs: (T,) the teacher's logprob of each response token; may be None when
    every response token is in its top-k (it is then read from there).
    """

    id: str
    prompt_ids: list[int] | np.ndarray
    teacher_prompt_ids: list[int] | np.ndarray
    response_ids: list[int] | np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    token_logprobs: np.ndarray | None = None
    sample_index: int = 0
    source: str = "teacher"
    thinking: bool | None = None
    meta: dict | None = None


def _check_row(row: ShardRow, k: int, vocab: int, where: Path) -> ShardRow:
    def bad(field: str, msg: str):
        return ShardError(where, f"example {row.id!r}: {msg}", field=field)

    if not isinstance(row.id, str) or not row.id:
        raise bad("id", f"id must be a non-empty string, got {row.id!r}")
    if row.source not in SOURCES:
        raise bad("source", f"source must be one of {SOURCES}, got {row.source!r}")
    resp = np.asarray(row.response_ids)
    if resp.ndim != 1 or (resp.size and not np.issubdtype(resp.dtype, np.integer)):
        raise bad("response_ids", f"must be a 1-D integer sequence, got shape {resp.shape}")
    t = len(resp)
    ids, lps = np.asarray(row.topk_ids), np.asarray(row.topk_logprobs)
    if ids.shape != (t, k):
        raise bad("topk_ids", f"shape {ids.shape}, expected ({t}, {k})")
    if lps.shape != (t, k):
        raise bad("topk_logprobs", f"shape {lps.shape}, expected ({t}, {k})")
    # What codec.encode_tokens would refuse, refused here, before the row joins a batch: a
    # bad row must not take other examples' pending rows down with it, and an id outside
    # the vocabulary must not reach the file's rank order (which would make it unreadable).
    if t:
        if not np.issubdtype(ids.dtype, np.integer):
            raise bad("topk_ids", f"must be integers, got {ids.dtype}")
        out = ((ids < 0) | (ids >= vocab)).any(axis=1)
        if out.any():
            pos = int(np.argmax(out))
            raise bad("topk_ids", f"token {pos}: top-k id outside the vocabulary [0, {vocab})")
        flp = np.asarray(lps, dtype=np.float32)
        nonneg = (np.isnan(flp) | (flp > 1e-3)).any(axis=1)
        if nonneg.any():
            pos = int(np.argmax(nonneg))
            raise bad("topk_logprobs", f"token {pos}: top-k logprob is NaN or positive")
        srt = np.sort(ids, axis=1)
        dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
        if dup.any():
            raise bad("topk_ids", f"token {int(np.argmax(dup))}: duplicate ids in the top-k")
    for name in ("prompt_ids", "teacher_prompt_ids", "response_ids"):
        a = np.asarray(getattr(row, name))
        if a.ndim != 1 or (a.size and (a.min() < 0 or a.max() >= vocab)):
            raise bad(name, f"token ids must be 1-D and in [0, {vocab})")
    tok = row.token_logprobs
    if tok is None:
        hit = ids == resp[:, None]
        if not hit.any(axis=1).all():
            pos = int(np.argmin(hit.any(axis=1)))
            raise bad("token_logprobs", f"token {pos} is not in its top-k and no logprob is given")
        tok = np.asarray(lps, dtype=np.float32)[hit]
    tok = np.asarray(tok, dtype=np.float32)
    if tok.shape != (t,):
        raise bad("token_logprobs", f"shape {tok.shape}, expected ({t},)")
    if np.isnan(tok).any() or (tok > 1e-3).any():
        raise bad("token_logprobs", "logprobs must be <= 0 and not NaN")
    return ShardRow(
        id=row.id,
        prompt_ids=np.asarray(row.prompt_ids, dtype=np.int32),
        teacher_prompt_ids=np.asarray(row.teacher_prompt_ids, dtype=np.int32),
        response_ids=resp.astype(np.int32),
        topk_ids=ids,
        topk_logprobs=lps,
        token_logprobs=tok,
        sample_index=int(row.sample_index),
        source=row.source,
        thinking=row.thinking,
        meta=row.meta,
    )


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


class _OpenFile:
    """The file being filled: its temporary path, Arrow writer and frequency ranking."""

    def __init__(self, tmp: Path, final: Path, schema: pa.Schema, order: np.ndarray, level: int):
        self.tmp, self.final = tmp, final
        self.order = order
        self.rank_of = codec.invert_order(order)
        self.sink = pa.OSFile(str(tmp), "wb")
        options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=level))
        self.writer = pa.ipc.new_file(self.sink, schema, options=options)
        self.batch_rows: list[int] = []
        self.tokens = 0


class ShardWriter:
    """Writes rows to `folder` as part-<writer_id>-<seq>.arrow files listed in manifest.json.

    Data-parallel precompute runs one writer per process, each with its own `writer_id`, into
    one folder; their files and manifest entries never collide.

    compression_level: zstd level of the Arrow IPC buffers. 12 writes about 70k tokens/s per
    core at k=64 for 3-4% more bytes than 19, which writes under 10k tokens/s and would
    throttle a fast teacher (measured in BENCHMARKS.md).
    """

    def __init__(
        self,
        folder: str | Path,
        metadata: ShardMetadata,
        *,
        writer_id: str = "w0",
        target_file_bytes: int = 128 << 20,
        batch_tokens: int = 16384,
        compression_level: int = 12,
    ):
        if not re.fullmatch(r"[A-Za-z0-9_.]+", writer_id):
            raise ValueError(f"writer_id {writer_id!r}: use letters, digits, '_' and '.'")
        self.folder = Path(folder)
        self.metadata = metadata
        self.writer_id = writer_id
        self.target_file_bytes = target_file_bytes
        self.batch_tokens = batch_tokens
        self.compression_level = compression_level
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.folder / f".writer-{writer_id}.lock", "a+")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ShardError(
                self.folder, f"another process is writing as writer {writer_id!r}"
            ) from None
        try:
            manifest = init_or_check(self.folder, metadata)
            self._seq = self._clean_debris({f.name for f in manifest.files})
        except BaseException:
            self._lock.close()  # else the writer id stays locked until garbage collection
            raise
        self._schema = arrow_schema()
        self._pending: list[ShardRow] = []
        self._pending_tokens = 0
        self._file: _OpenFile | None = None
        self.files_written: list[FileEntry] = []

    # ---- resume ---------------------------------------------------------------------------

    def _clean_debris(self, listed: set[str]) -> int:
        """Delete this writer's temporary and unlisted files; return the next sequence number."""
        pattern = re.compile(rf"part-{re.escape(self.writer_id)}-(\d+)\.arrow")
        seq = 0
        for p in self.folder.iterdir():
            if p.name.startswith(f".part-{self.writer_id}-") and p.name.endswith(".tmp"):
                p.unlink()
                continue
            m = pattern.fullmatch(p.name)
            if not m:
                continue
            if p.name in listed:
                seq = max(seq, int(m.group(1)) + 1)
            else:
                # Renamed but not yet listed when the process died: never committed.
                log.warning("removing %s: not in the manifest (interrupted write)", p)
                p.unlink()
        return seq

    def completed_ids(self) -> set[str]:
        """Example ids in files listed in the manifest, from every writer of this folder."""
        ids: set[str] = set()
        for entry in load_manifest(self.folder).files:
            table = feather.read_table(self.folder / entry.name, columns=["id"], memory_map=True)
            ids.update(table.column("id").to_pylist())
        return ids

    # ---- writing --------------------------------------------------------------------------

    def add(self, rows: ShardRow | list[ShardRow]) -> None:
        """Add the rows of one example; they are committed together, in one file."""
        rows = [rows] if isinstance(rows, ShardRow) else list(rows)
        checked = [
            _check_row(r, self.metadata.k, self.metadata.vocab_size, self.folder) for r in rows
        ]
        self._pending.extend(checked)
        self._pending_tokens += sum(len(r.response_ids) for r in checked)
        if self._pending_tokens >= self.batch_tokens:
            self._write_batch()

    def _open_file(self) -> _OpenFile:
        # The first batch's top-k ids rank the vocabulary for the whole file.
        ids = np.concatenate(
            [np.asarray(r.topk_ids, dtype=np.int64).ravel() for r in self._pending]
        )
        order = codec.build_rank_order(ids, self.metadata.vocab_size)
        schema = self._schema.with_metadata(
            {META_KEY: self.metadata.dumps(), RANK_ORDER_KEY: codec.pack_order(order, ids)}
        )
        name = f"part-{self.writer_id}-{self._seq:05d}.arrow"
        self._seq += 1
        tmp = self.folder / f".{name}.tmp"
        return _OpenFile(tmp, self.folder / name, schema, order, self.compression_level)

    def _write_batch(self) -> None:
        if not self._pending:
            return
        if self._file is None:
            self._file = self._open_file()
        f, rows = self._file, self._pending
        self._pending, self._pending_tokens = [], 0
        lens = np.array([len(r.response_ids) for r in rows], dtype=np.int64)
        tok_off = np.concatenate([[0], np.cumsum(lens)])
        try:
            cols = codec.encode_tokens(
                np.concatenate([r.topk_ids for r in rows]),
                np.concatenate([r.topk_logprobs for r in rows]),
                np.concatenate([r.response_ids for r in rows]),
                np.concatenate([r.token_logprobs for r in rows]),
                f.rank_of,
                self.metadata.codebook,
            )
        except ValueError as e:
            # Name the example, not the token's position in the batch.
            m = re.match(r"token (\d+): (.*)", str(e))
            if not m:
                raise
            row = int(np.searchsorted(tok_off, int(m.group(1)), side="right") - 1)
            pos = int(m.group(1)) - int(tok_off[row])
            raise ShardError(
                self.folder, f"example {rows[row].id!r} token {pos}: {m.group(2)}", field="topk"
            ) from e
        k = self.metadata.k
        missing = np.concatenate([[0], np.cumsum(~cols["token_in_topk"])])[tok_off]
        arrays = {
            "id": pa.array([r.id for r in rows], pa.string()),
            "sample_index": pa.array([r.sample_index for r in rows], pa.int32()),
            "source": pa.array([r.source for r in rows], pa.string()),
            "thinking": pa.array([r.thinking for r in rows], pa.bool_()),
            "meta": pa.array(
                [None if r.meta is None else json.dumps(r.meta) for r in rows], pa.string()
            ),
        }
        for name in ("prompt_ids", "teacher_prompt_ids", "response_ids"):
            seqs = [getattr(r, name) for r in rows]
            off = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
            arrays[name] = _list_array(off, np.concatenate(seqs).astype(np.int32))
        for name in PER_TOKEN:
            arrays[name] = _list_array(tok_off, cols[name])
        for name in PER_ENTRY:
            arrays[name] = _list_array(tok_off * (k - 1), cols[name])
        for name in PER_EXTRA:
            arrays[name] = _list_array(missing, cols[name])
        batch = pa.RecordBatch.from_arrays(
            [arrays[n] for n in self._schema.names], schema=self._schema
        )
        f.writer.write_batch(batch)
        f.batch_rows.append(len(rows))
        f.tokens += int(lens.sum())
        if f.sink.tell() >= self.target_file_bytes:
            self._finish_file()

    def _finish_file(self) -> None:
        f, self._file = self._file, None
        f.writer.close()
        f.sink.close()
        fd = os.open(f.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        entry = FileEntry(
            name=f.final.name,
            rows=sum(f.batch_rows),
            tokens=f.tokens,
            bytes=f.tmp.stat().st_size,
            sha256=sha256_file(f.tmp),
            batch_rows=f.batch_rows,
            writer=self.writer_id,
        )
        os.replace(f.tmp, f.final)
        fsync_dir(self.folder)
        add_file(self.folder, entry)
        self.files_written.append(entry)

    def flush(self) -> None:
        """Commit everything added so far (ends the current file)."""
        self._write_batch()
        if self._file is not None:
            self._finish_file()

    def close(self) -> None:
        if self._lock.closed:
            return
        try:
            self.flush()
        finally:
            self._lock.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

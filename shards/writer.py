"""ShardWriter: rows in, complete Arrow IPC files and manifest entries out, crash-safe.

A file is written under a temporary name, fsynced, renamed and only then listed in the
writer's own manifest (manifest-<writer>.json, written whole); that write is the commit
point. A process killed at any moment leaves either a listed, complete file or debris that
the next writer with the same id deletes. All rows of one `add` call (the n samples of one
example) land in the same file, so an example id is either complete or absent, and
`completed_ids` is what a resumed precompute skips. Other files a run keeps in the folder
(its rejects, its config) are committed the same way with `add_extra`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import xxhash

from shards import codec
from shards.compact import merged_order, rebuild
from shards.errors import ShardError
from shards.manifest import (
    DATA_KIND,
    WRITER_ID,
    ExtraEntry,
    FileEntry,
    WriterManifest,
    check_listing,
    load_manifest,
    load_writer_manifest,
    manifest_name,
    owned_name,
    parse_owned,
    write_manifest,
)
from shards.schema import (
    META_KEY,
    PER_ENTRY,
    PER_EXTRA,
    PER_TOKEN,
    RANK_ORDER_KEY,
    SCHEMA_VERSION,
    SOURCES,
    ShardMetadata,
    arrow_schema,
)
from shards.spans import batch_spans, check_spans, check_turns
from shards.storage import open_storage

log = logging.getLogger(__name__)


@dataclass
class ShardRow:
    """One training example as the writer takes it: the conversation prompt_ids ++
    response_ids (P + T tokens), N trained tokens, K = metadata.k.

    spans: (start, length) of each trained span in conversation coordinates (sorted, not
    overlapping, the first at P, the last ending at P + T); None: one span, the whole
    response (none if T = 0). N = sum of the lengths.
    turns: (start, role) of each message of the conversation, in conversation coordinates;
    None: not recorded.
    topk_ids, topk_logprobs: (N, K) the teacher's top-k per trained token (raw logprobs), in
    span order. token_logprobs: (N,) the teacher's logprob of each trained token; may be None
    when every trained token is in its top-k (it is then read from there).
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
    spans: list[tuple[int, int]] | None = None
    turns: list[tuple[int, str]] | None = None


def _trained_index(spans: np.ndarray, prompt_len: int) -> np.ndarray:
    """(N,) indices into response_ids of the span tokens; spans (S, 2) as _check_row keeps
    them."""
    idx = [np.arange(s - prompt_len, s - prompt_len + n) for s, n in spans]
    return np.concatenate(idx) if idx else np.zeros(0, np.int64)


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
    for name in ("prompt_ids", "teacher_prompt_ids", "response_ids"):
        a = np.asarray(getattr(row, name))
        if a.ndim != 1 or (a.size and (a.min() < 0 or a.max() >= vocab)):
            raise bad(name, f"token ids must be 1-D and in [0, {vocab})")
    p = len(row.prompt_ids)
    if row.spans is None:
        spans = np.array([[p, len(resp)]] if len(resp) else [], np.int64).reshape(-1, 2)
    else:
        try:
            spans = np.stack(check_spans(row.spans, p, p + len(resp)), axis=1)
        except ValueError as e:
            raise bad("spans", str(e)) from None
    try:
        turns = [] if row.turns is None else check_turns(row.turns, p + len(resp))
    except ShardError as e:
        raise bad("turns", e.message) from None
    trained = resp[_trained_index(spans, p)]
    t = len(trained)  # N: top-k rows, one per span token
    ids, lps = np.asarray(row.topk_ids), np.asarray(row.topk_logprobs)
    if ids.shape != (t, k):
        raise bad("topk_ids", f"shape {ids.shape}, expected ({t}, {k}) (trained tokens, k)")
    if lps.shape != (t, k):
        raise bad("topk_logprobs", f"shape {lps.shape}, expected ({t}, {k}) (trained tokens, k)")
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
    tok = row.token_logprobs
    if tok is None:
        hit = ids == trained[:, None]
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
        spans=spans,
        turns=turns,
    )


def _list_array(offsets: np.ndarray, values: np.ndarray | pa.Array) -> pa.Array:
    values = values if isinstance(values, pa.Array) else pa.array(values)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


class _OpenFile:
    """The file being filled: its staging path, final name, Arrow writer and frequency
    ranking."""

    def __init__(self, tmp: Path, final: str, schema: pa.Schema, order: np.ndarray, level: int):
        self.tmp, self.final = tmp, final
        self.order = order
        self.rank_of = codec.invert_order(order)
        self.sink = pa.OSFile(str(tmp), "wb")
        options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=level))
        self.writer = pa.ipc.new_file(self.sink, schema, options=options)
        self.batch_rows: list[int] = []
        self.batch_ends: list[int] = []  # file offset after each record batch
        self.tokens = 0


def file_checksums(path: Path, batch_ends: list[int]) -> dict:
    """sha256 of the file, and the xxh3-64 of its head, of each record batch and of its foot
    (FileEntry's checksum fields), in one pass over the file."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            # Arrow writes the schema with the first batch: the first batch starts after the
            # magic (8 bytes), the continuation marker and length (8) and the schema message.
            marker, schema_len = struct.unpack_from("<Ii", view, 8)
            if marker != 0xFFFFFFFF:  # the Arrow >= 0.15 IPC format that pyarrow writes
                raise ShardError(path, "unexpected Arrow IPC layout: no continuation marker")
            offsets = [16 + schema_len, *batch_ends]

            def xxh(a: int, b: int) -> str:
                return xxhash.xxh3_64_hexdigest(view[a:b])

            out = {
                "bytes": len(mm),
                "sha256": hashlib.sha256(view).hexdigest(),
                "batch_offsets": offsets,
                "batch_xxh3": [xxh(a, b) for a, b in zip(offsets, offsets[1:], strict=False)],
                "head_xxh3": xxh(0, offsets[0]),
                "foot_xxh3": xxh(offsets[-1], len(mm)),
            }
        finally:
            view.release()
    return out


class ShardWriter:
    """Writes rows to `folder` as part-<writer_id>-<seq>.arrow files, committed in
    manifest-<writer_id>.json.

    Data-parallel precompute runs one writer per process, each with its own `writer_id`, into
    one folder; their files and manifests never collide, and they share no lock.

    compression_level: zstd level of the Arrow IPC buffers. 12 writes several times faster
    than 19 for a few percent more bytes; 19 would throttle a fast teacher (figures in
    BENCHMARKS.md, "Shard format" and "Precompute host path").
    commit_level: zstd level of the files written as rows come in (default: compression_level);
    `compact` writes its merged files at compression_level. Precompute commits at a fast
    level, where the teacher waits on the host, and its merge at the end of the run gives the
    folder the bytes of compression_level (BENCHMARKS.md, "Precompute host path").
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
        commit_level: int | None = None,
    ):
        if metadata.schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"metadata.schema_version {metadata.schema_version}: writers write schema "
                f"v{SCHEMA_VERSION} only"
            )
        if not re.fullmatch(WRITER_ID, writer_id):
            raise ValueError(f"writer_id {writer_id!r}: use letters, digits, '_' and '.'")
        # A local folder (temporary file, fsync, rename) or an fsspec URL (whole uploads).
        self.store = open_storage(folder)
        self.folder = self.store.root
        self.metadata = metadata
        self.writer_id = writer_id
        self.target_file_bytes = target_file_bytes
        self.batch_tokens = batch_tokens
        self.compression_level = compression_level
        self.commit_level = compression_level if commit_level is None else commit_level
        self.store.makedirs()
        # Refuse a folder made with other settings before writing anything into it.
        self._check_metadata(load_manifest(self.store, missing_ok=True))
        # One live process per writer id on this host (flock); across hosts and on object
        # stores, write_manifest refuses a manifest that changed under it.
        self._lock = self.store.lock(f".writer-{writer_id}.lock")
        if self._lock is None:
            raise ShardError(
                self.folder, f"another process is writing as writer {writer_id!r}"
            ) from None
        try:
            self._open_manifest()
        except BaseException:
            self._lock.close()  # else the writer id stays locked until garbage collection
            self.store.close()
            raise
        self._schema = arrow_schema()
        self._pending: list[ShardRow] = []
        self._pending_tokens = 0
        self._file: _OpenFile | None = None
        self.files_written: list[FileEntry] = []

    # ---- resume ---------------------------------------------------------------------------

    def _check_metadata(self, manifest) -> None:
        if manifest is not None and manifest.metadata.schema_version != SCHEMA_VERSION:
            # A folder holds one schema version: its readers and compact rely on it.
            raise ShardError(
                self.store.where(manifest.sources[0]),
                f"folder holds schema v{manifest.metadata.schema_version} shards, this writer "
                f"writes v{SCHEMA_VERSION}: use another output folder (the old one still reads)",
                field="schema_version",
            )
        if manifest is not None and (diff := manifest.metadata.mismatches(self.metadata)):
            raise ShardError(
                self.store.where(manifest.sources[0]),
                "folder holds shards made with other settings; use another output folder. "
                + "; ".join(diff),
            )

    def _open_manifest(self) -> None:
        if self.store.exists(manifest_name(self.writer_id)):
            self._manifest, self._manifest_bytes = load_writer_manifest(self.store, self.writer_id)
            self._clean_debris()
            return
        self._clean_debris()
        self._manifest = WriterManifest(writer=self.writer_id, metadata=self.metadata)
        self._manifest_bytes = write_manifest(self.store, self._manifest, None)
        # Writers that started at the same time with other settings: whichever lists the
        # folder last sees the other's manifest (each lists after its own write), and leaves.
        try:
            self._check_metadata(load_manifest(self.store))
        except ShardError:
            self.store.delete(manifest_name(self.writer_id))
            raise

    def _clean_debris(self) -> None:
        """Delete this writer's debris (temporary files, files past its last commit, files
        merged into another); set the next sequence numbers. A file of this writer that was
        committed and then lost from its manifest (`check_listing`) is refused, not deleted."""
        listed = load_manifest(self.store, missing_ok=True)
        errors, debris = check_listing(self.store, listed)
        for e in errors:
            if parse_owned(Path(e.path).name)[1] == self.writer_id:
                raise ShardError(
                    e.path,
                    f"{e.message}. Restore the manifest entry, or move the file away and re-run",
                )
        for name in debris:
            if name.startswith(".") and name.endswith(".tmp"):
                # .part-w0-00002.arrow.tmp, .<name>.<random>.tmp (write_atomic)
                inner = name[1:-4]
                if not parse_owned(inner):
                    inner = inner.rsplit(".", 1)[0]
                mine = inner == manifest_name(self.writer_id)
            else:
                inner, mine = name, False
            owned = parse_owned(inner)
            if mine or (owned and owned[1] == self.writer_id):
                if inner == name:
                    log.warning(
                        "removing %s: never committed, or merged into another",
                        self.store.where(name),
                    )
                self.store.delete(name)
        last: dict[str, int] = {}
        for e in [] if listed is None else (*listed.files, *listed.extras):
            owned = parse_owned(e.name)
            if owned and owned[1] == self.writer_id:
                last[owned[0]] = max(last.get(owned[0], -1), owned[2])
        self._seq = last.get(DATA_KIND, -1) + 1
        self._extra_seq = {k: v + 1 for k, v in last.items() if k != DATA_KIND}

    def completed_ids(self) -> set[str]:
        """Example ids in committed files, from every writer of this folder."""
        ids: set[str] = set()
        for entry in load_manifest(self.store).files:
            table = feather.read_table(self.store.open_input(entry.name), columns=["id"])
            ids.update(table.column("id").to_pylist())
        return ids

    def _commit(self, manifest: WriterManifest) -> None:
        self._manifest_bytes = write_manifest(self.store, manifest, self._manifest_bytes)
        self._manifest = manifest

    # ---- other committed files -------------------------------------------------------------

    def extras(self, kind: str | None = None) -> list[ExtraEntry]:
        """This writer's committed extra files (of `kind`), in commit order."""
        return [e for e in self._manifest.extras if kind is None or e.kind == kind]

    def add_extra(self, kind: str, data: bytes, suffix: str) -> ExtraEntry:
        """Commit `data` as a new file <kind>-<writer>-<seq><suffix> (append-only: earlier
        files of the kind are never rewritten), listed in this writer's manifest."""
        if not re.fullmatch(r"[A-Za-z0-9_]+", kind) or kind in (DATA_KIND, "manifest"):
            raise ValueError(f"extra kind {kind!r}: letters, digits and '_', not 'part'")
        if not re.fullmatch(r"\.[A-Za-z0-9]+", suffix):
            raise ValueError(f"suffix {suffix!r}: '.' and letters or digits")
        seq = self._extra_seq.get(kind, 0)
        name = owned_name(kind, self.writer_id, seq, suffix)
        self._publish(lambda: self.store.write(name, data, create=True), name)
        entry = ExtraEntry(
            name=name,
            kind=kind,
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            writer=self.writer_id,
            commit=-1,  # set by with_extra
        )
        self._commit(self._manifest.with_extra(entry))
        self._extra_seq[kind] = seq + 1
        return self._manifest.extras[-1]

    # ---- writing --------------------------------------------------------------------------

    def add(self, rows: ShardRow | list[ShardRow]) -> None:
        """Add the rows of one example; they are committed together, in one file."""
        rows = [rows] if isinstance(rows, ShardRow) else list(rows)
        checked = [
            _check_row(r, self.metadata.k, self.metadata.vocab_size, self.folder) for r in rows
        ]
        self._pending.extend(checked)
        self._pending_tokens += sum(len(r.topk_ids) for r in checked)  # trained tokens
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
        return _OpenFile(self.store.staging(name), name, schema, order, self.commit_level)

    def _write_batch(self) -> None:
        if not self._pending:
            return
        if self._file is None:
            self._file = self._open_file()
        f, rows = self._file, self._pending
        self._pending, self._pending_tokens = [], 0
        lens = np.array([len(r.topk_ids) for r in rows], dtype=np.int64)  # trained tokens
        tok_off = np.concatenate([[0], np.cumsum(lens)])
        trained = [r.response_ids[_trained_index(r.spans, len(r.prompt_ids))] for r in rows]
        try:
            cols = codec.encode_tokens(
                np.concatenate([r.topk_ids for r in rows]),
                np.concatenate([r.topk_logprobs for r in rows]),
                np.concatenate(trained),
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
                self.folder,
                f"example {rows[row].id!r} trained token {pos}: {m.group(2)}",
                field="topk",
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
        span_off = np.concatenate([[0], np.cumsum([len(r.spans) for r in rows])])
        spans = np.concatenate([r.spans for r in rows]).astype(np.int32)
        arrays["span_starts"] = _list_array(span_off, spans[:, 0])
        arrays["span_lengths"] = _list_array(span_off, spans[:, 1])
        turn_off = np.concatenate([[0], np.cumsum([len(r.turns) for r in rows])])
        turns = [t for r in rows for t in r.turns]
        arrays["turn_starts"] = _list_array(turn_off, np.array([s for s, _ in turns], np.int32))
        arrays["turn_roles"] = _list_array(turn_off, pa.array([x for _, x in turns], pa.string()))
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
        f.batch_ends.append(f.sink.tell())
        f.tokens += int(lens.sum())
        if f.sink.tell() >= self.target_file_bytes:
            self._finish_file()

    def _finish_file(self) -> None:
        f, self._file = self._file, None
        entry = self._seal(f)
        self._commit(self._manifest.with_file(entry))
        self.files_written.append(self._manifest.files[-1])

    def _seal(self, f: _OpenFile) -> FileEntry:
        """Close, checksum and publish a finished file (fsync and rename, or upload it
        whole); the caller commits it."""
        f.writer.close()
        f.sink.close()
        entry = FileEntry(
            name=f.final,
            rows=sum(f.batch_rows),
            tokens=f.tokens,
            batch_rows=f.batch_rows,
            writer=self.writer_id,
            **file_checksums(f.tmp, f.batch_ends),
        )
        self._publish(lambda: self.store.publish(f.tmp, f.final), f.final)
        return entry

    def _publish(self, put, name: str) -> None:
        try:
            put()
        except FileExistsError:
            # Only on an object store (no lock): a committed file would be overwritten.
            raise ShardError(
                self.store.where(name),
                f"exists already: another process is writing as writer {self.writer_id!r}; "
                "give each writer its own id",
            ) from None

    def flush(self) -> None:
        """Commit everything added so far (ends the current file)."""
        self._write_batch()
        if self._file is not None:
            self._finish_file()

    # ---- merging small files ---------------------------------------------------------------

    def compact(
        self, max_bytes: int | None = None, only: set[str] | None = None
    ) -> list[FileEntry]:
        """Merge runs of this writer's small committed files (under half of `max_bytes`,
        default target_file_bytes; of the names in `only` if given, e.g. the files of this
        run) into files of up to `max_bytes`, each with one rank order (from its first
        batch_tokens tokens, as for a written file). Every merge is one commit that lists the
        new file in place of the old ones, which are deleted after it; a kill at any point
        leaves the old files or the new one committed, never both or neither (the next
        writer start deletes the leftovers). Rows and every decoded value stay the same.
        With a commit_level other than compression_level, each file of this writer's
        session (or of `only`) that no merge takes is rewritten alone at compression_level,
        so that the folder gets that level's bytes. Returns the new entries."""
        self.flush()
        limit = max_bytes or self.target_file_bytes
        groups, run, size = [], [], 0
        for f in [*self._manifest.files, None]:
            small = (
                f is not None
                and not f.replaces
                and f.bytes < limit // 2
                and (only is None or f.name in only)
            )
            if run and (not small or size + f.bytes > limit):
                if len(run) > 1:
                    groups.append(run)
                run, size = [], 0
            if small:
                run.append(f)
                size += f.bytes
        if self.commit_level != self.compression_level:
            merged = {f.name for g in groups for f in g}
            mine = only if only is not None else {f.name for f in self.files_written}
            groups += [
                [f]
                for f in self._manifest.files
                if f.name in mine and f.name not in merged and not f.replaces
            ]
        return [self._merge(group) for group in groups]

    def _merge(self, group: list[FileEntry]) -> FileEntry:
        sources = []
        for f in group:
            # Never launder a damaged file into a new one with fresh checksums.
            if self.store.size(f.name) != f.bytes or self.store.sha256(f.name) != f.sha256:
                raise ShardError(self.store.where(f.name), "differs from its entry: not merged")
            reader = pa.ipc.open_file(self.store.open_input(f.name))
            file_meta = reader.schema.metadata
            order = codec.unpack_order(file_meta[RANK_ORDER_KEY], self.metadata.vocab_size)
            meta = file_meta[META_KEY]
            sources += [(reader.get_batch(b), order) for b in range(reader.num_record_batches)]
        k = self.metadata.k
        order, packed = merged_order(sources, k, self.metadata.vocab_size, self.batch_tokens)
        rank_of = codec.invert_order(order)
        table = pa.Table.from_batches([rebuild(b, k, o, rank_of) for b, o in sources])
        # Record batches of about batch_tokens trained tokens again (the small files' were
        # cut by commits).
        span_off, _, span_lens = batch_spans(table.combine_chunks().to_batches()[0])
        lens = np.diff(np.concatenate([[0], np.cumsum(span_lens)])[span_off])
        cuts, acc = [0], 0
        for i, n in enumerate(lens):
            acc += int(n)
            if acc >= self.batch_tokens:
                cuts.append(i + 1)
                acc = 0
        if cuts[-1] != len(lens):
            cuts.append(len(lens))
        name = f"part-{self.writer_id}-{self._seq:05d}.arrow"
        self._seq += 1
        schema = self._schema.with_metadata({META_KEY: meta, RANK_ORDER_KEY: packed})
        out = _OpenFile(self.store.staging(name), name, schema, order, self.compression_level)
        for a, b in zip(cuts, cuts[1:], strict=False):
            batch = table.slice(a, b - a).combine_chunks().to_batches()[0]
            out.writer.write_batch(batch)
            out.batch_rows.append(batch.num_rows)
            out.batch_ends.append(out.sink.tell())
        out.tokens = sum(f.tokens for f in group)
        entry = self._seal(out)
        self._commit(self._manifest.with_merge(entry, group))
        for f in group:
            self.store.delete(f.name)
        self.store.sync()
        gone = {f.name for f in group}
        new = self._manifest.files[-1]
        self.files_written = [f for f in self.files_written if f.name not in gone] + [new]
        return new

    def close(self) -> None:
        if self._lock.closed:
            return
        try:
            self.flush()
        finally:
            self._lock.close()
            self.store.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

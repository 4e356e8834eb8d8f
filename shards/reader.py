"""Streaming, shuffled, partitioned and resumable reading of a shard folder.

The unit of planning is the Arrow record batch (a "block"), whose row counts the manifest
lists, so a reader plans an epoch without opening any file:

1. every epoch, the blocks are permuted with a seed derived from (seed, epoch);
2. block i of that order goes to shard i % S, where S = world_size * DataLoader workers and a
   process's shard is rank * workers + worker id, so every row is read exactly once;
3. each shard reads its blocks in windows of `window_blocks` blocks and yields the rows of a
   window in a permutation seeded by (seed, epoch, shard, window). At most one window of
   decoded blocks is held in memory, whatever the folder's size.

The position of a shard is (epoch, rows yielded in that epoch), and everything above is a
pure function of it, so resuming needs only those two numbers per shard. Rows carry a
`cursor` (shard, epoch, position after the row); the trainer hands the cursors of the rows
it actually consumed to `ShardReader.update`, so rows prefetched by DataLoader workers but
never trained on are read again after a restart.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import xxhash
from torch.utils.data import IterableDataset, get_worker_info

from shards import codec
from shards.errors import ShardError
from shards.manifest import FileEntry, check_listing, load_manifest
from shards.schema import (
    META_KEY,
    PER_ENTRY,
    PER_EXTRA,
    PER_TOKEN,
    RANK_ORDER_KEY,
    ShardMetadata,
    arrow_schema,
    check_schema_version,
)
from shards.spans import batch_spans, batch_trained_index
from shards.storage import open_storage

VERIFY_MODES = ("full", "size", "none")


@dataclass
class _FileHandle:
    reader: pa.ipc.RecordBatchFileReader
    source: pa.MemoryMappedFile
    order: np.ndarray
    metadata: ShardMetadata


class ShardFolder:
    """A validated shard folder: manifest, files, and decoding of single blocks.

    Always: the manifests are checked (commit sequence, totals, no file listed twice, no
    committed file missing from them), and every byte read is checked against the xxh3
    checksums of the manifest before use: a file's head and foot when it is opened, a record
    batch each time it is decoded. verify: "full" also checks each file's length and sha256
    the first time this process opens it; "size" checks the lengths of all files up front;
    "none" adds nothing. Files of legacy folders (a single manifest.json) have no checksums:
    there only "full" catches a damaged byte.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        expected_tokenizer_fingerprint: str | None = None,
        verify: str = "full",
        max_open_files: int = 8,
        check_unlisted: bool = True,
    ):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        # A local folder or an fsspec URL (s3://...): shards.storage.
        self.store = open_storage(folder)
        self.path = self.store.root
        self.manifest = load_manifest(self.store)
        self.metadata = self.manifest.metadata
        self.verify = verify
        got = self.metadata.tokenizer_fingerprint
        if expected_tokenizer_fingerprint is not None and got != expected_tokenizer_fingerprint:
            raise ShardError(
                self.store.where(self.manifest.sources[0]),
                f"tokenizer fingerprint {got} differs from the student's "
                f"{expected_tokenizer_fingerprint}: the token ids would mean other tokens",
                field="tokenizer_fingerprint",
            )
        errors, _ = check_listing(self.store, self.manifest) if check_unlisted else ([], [])
        if errors:
            raise errors[0]
        if verify != "none":
            for entry in self.manifest.files:
                self._check_size(entry)
        self.blocks = np.array(
            [
                (fi, bi, n)
                for fi, entry in enumerate(self.manifest.files)
                for bi, n in enumerate(entry.batch_rows)
            ],
            dtype=np.int64,
        ).reshape(-1, 3)
        self._open: OrderedDict[int, _FileHandle] = OrderedDict()
        self._max_open = max_open_files
        self._verified: set[str] = set()
        self._pid = os.getpid()

    @property
    def k(self) -> int:
        return self.metadata.k

    def __getstate__(self) -> dict:
        # DataLoader workers receive a pickled copy: memory maps do not pickle, and each
        # process opens (and verifies) the files it reads itself.
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state

    def _check_size(self, entry: FileEntry) -> None:
        p = self.store.where(entry.name)
        try:
            size = self.store.size(entry.name)
        except FileNotFoundError:
            raise ShardError(p, "file listed in the manifest is missing") from None
        if size != entry.bytes:
            raise ShardError(p, f"length {size} bytes, manifest says {entry.bytes}")

    def verify_file(self, fi: int) -> None:
        """Length, sha256, schema and row counts of file `fi` against the manifest."""
        entry = self.manifest.files[fi]
        p = self.store.where(entry.name)
        self._check_size(entry)
        digest = self.store.sha256(entry.name)
        if digest != entry.sha256:
            raise ShardError(p, f"sha256 {digest[:16]}... differs from the manifest's")
        handle = self._file(fi, check_sha=False)
        rows = [
            handle.reader.get_batch(b).num_rows for b in range(handle.reader.num_record_batches)
        ]
        if rows != list(entry.batch_rows):
            raise ShardError(p, f"record batch rows {rows} differ from the manifest's")
        for bi in range(len(rows)):
            self._check_block(fi, bi, handle)

    def _file(self, fi: int, check_sha: bool = True) -> _FileHandle:
        if self._pid != os.getpid():  # a forked DataLoader worker: remote handles don't fork
            self._open.clear()
            self._pid = os.getpid()
        if fi in self._open:
            self._open.move_to_end(fi)
            return self._open[fi]
        entry = self.manifest.files[fi]
        p = self.store.where(entry.name)
        if check_sha and self.verify == "full" and entry.name not in self._verified:
            self._check_size(entry)
            digest = self.store.sha256(entry.name)
            if digest != entry.sha256:
                raise ShardError(p, f"sha256 {digest[:16]}... differs from the manifest's")
            self._verified.add(entry.name)
        try:
            source = self.store.open_input(entry.name)
        except FileNotFoundError as e:
            raise ShardError(p, "file listed in the manifest is missing") from e
        except (OSError, pa.ArrowException) as e:
            raise ShardError(p, f"not a readable Arrow IPC file: {e}") from e
        if entry.checksummed:
            # Before Arrow parses anything: the schema (with the rank order) and the footer
            # (with every batch's offset) are what the checksums of the batches rely on.
            if source.size() != entry.bytes:
                raise ShardError(p, f"length {source.size()} bytes, manifest says {entry.bytes}")
            head = (0, entry.batch_offsets[0], entry.head_xxh3, "head (schema)")
            foot = (entry.batch_offsets[-1], entry.bytes, entry.foot_xxh3, "foot (batch index)")
            for a, b, want, what in (head, foot):
                if xxhash.xxh3_64_hexdigest(source.read_at(b - a, a)) != want:
                    raise ShardError(p, f"the file's {what} is damaged: checksum differs")
        try:
            reader = pa.ipc.open_file(source)
        except (OSError, pa.ArrowException) as e:
            raise ShardError(p, f"not a readable Arrow IPC file: {e}") from e
        meta = reader.schema.metadata or {}
        if META_KEY not in meta or RANK_ORDER_KEY not in meta:
            raise ShardError(p, "no kdshards metadata in the Arrow schema")
        try:
            file_meta = ShardMetadata.from_json(json.loads(meta[META_KEY]))
        except (ValueError, KeyError, TypeError) as e:
            raise ShardError(p, f"bad kdshards metadata: {e}", field="schema metadata") from e
        check_schema_version(file_meta.schema_version, p)
        diff = file_meta.mismatches(self.metadata)
        if diff:
            raise ShardError(p, "file metadata disagrees with the manifest: " + "; ".join(diff))
        expected = arrow_schema(file_meta.schema_version)
        if not reader.schema.remove_metadata().equals(expected):
            raise ShardError(
                p,
                f"Arrow schema differs from v{file_meta.schema_version}: "
                f"{reader.schema.remove_metadata()}",
            )
        try:
            order = codec.unpack_order(meta[RANK_ORDER_KEY], file_meta.vocab_size)
        except Exception as e:
            raise ShardError(p, f"bad rank order: {e}", field="schema metadata") from e
        handle = _FileHandle(reader=reader, source=source, order=order, metadata=file_meta)
        self._open[fi] = handle
        while len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return handle

    def _check_block(self, fi: int, bi: int, handle: _FileHandle) -> None:
        entry = self.manifest.files[fi]
        if not entry.checksummed:
            return
        a, b = entry.batch_offsets[bi], entry.batch_offsets[bi + 1]
        if xxhash.xxh3_64_hexdigest(handle.source.read_at(b - a, a)) != entry.batch_xxh3[bi]:
            raise ShardError(
                self.store.where(entry.name),
                f"record batch {bi} (bytes {a}-{b}) is damaged: its checksum differs from the "
                "manifest's",
            )

    def read_block(self, fi: int, bi: int) -> Block:
        handle = self._file(fi)
        p = self.store.where(self.manifest.files[fi].name)
        if bi >= len(self.manifest.files[fi].batch_rows):
            raise ShardError(p, f"record batch {bi}: the manifest lists fewer")
        self._check_block(fi, bi, handle)
        try:
            batch = handle.reader.get_batch(bi)
            # Arrow does not check offsets when reading IPC: a damaged file that passed the
            # checks of `verify` would make to_pylist read out of bounds and crash. Cheap per
            # batch (BENCHMARKS.md, "Checksums per record batch").
            batch.validate(full=True)
        except (OSError, pa.ArrowException, IndexError, ValueError) as e:
            raise ShardError(p, f"record batch {bi} unreadable: {e}") from e
        expected = self.manifest.files[fi].batch_rows[bi]
        if batch.num_rows != expected:
            raise ShardError(
                p, f"record batch {bi} has {batch.num_rows} rows, the manifest says {expected}"
            )
        return Block.decode(
            batch, handle, p, first_row=sum(self.manifest.files[fi].batch_rows[:bi])
        )


def _flat(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list column, zero-copy where Arrow allows."""
    col = batch.column(name)
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False)
    return offsets, values


class Block:
    """One decoded record batch: torch tensors for all its tokens, sliced per row.

    offsets: per-row offsets (rows+1,) into the flat tensors: "response" (T per row),
    "trained" (N per row, the top-k streams), "spans" (S), "turns" (M), and one per prompt.
    """

    def __init__(self, rows: dict, offsets: dict, tensors: dict):
        self.rows, self.offsets, self.tensors = rows, offsets, tensors

    @classmethod
    def decode(
        cls, batch: pa.RecordBatch, handle: _FileHandle, path: Path, first_row: int
    ) -> Block:
        meta = handle.metadata
        k = meta.k
        resp_off, resp = _flat(batch, "response_ids")
        resp = resp[resp_off[0] : resp_off[-1]]
        resp_off = resp_off - resp_off[0]
        v2 = meta.schema_version >= 2
        cols = {}

        def check(name: str, expected: np.ndarray, what: str = "span_lengths") -> None:
            off, vals = _flat(batch, name)
            if not np.array_equal(off - off[0], expected - expected[0]):
                row = int(np.argmax((off - off[0]) != (expected - expected[0]))) - 1
                raise ShardError(
                    path,
                    f"length disagrees with {what}",
                    row=first_row + max(row, 0),
                    field=name,
                )
            cols[name] = vals[off[0] : off[-1]]

        try:
            # v1: one span per row, the whole response.
            tok_off, idx = batch_trained_index(batch)
        except ShardError as e:
            raise ShardError(path, e.message, row=first_row + e.row, field=e.field) from None
        if v2:
            check("turn_roles", _flat(batch, "turn_starts")[0], "turn_starts")
        for name in PER_TOKEN:
            check(name, tok_off)
        for name in PER_ENTRY:
            check(name, tok_off * (k - 1))
        missing = np.concatenate([[0], np.cumsum(~np.asarray(cols["token_in_topk"], bool))])[
            tok_off
        ]
        for name in PER_EXTRA:
            check(name, missing)
        try:
            top = codec.decode_tokens(cols, resp[idx], k, handle.order, meta.codebook)
        except (IndexError, ValueError) as e:
            raise ShardError(
                path, f"corrupt top-k streams: {e}", row=first_row, field="topk"
            ) from e
        rows = {
            n: batch.column(n).to_pylist()
            for n in ("id", "sample_index", "source", "thinking", "meta")
        }
        offsets = {"response": resp_off, "trained": tok_off}
        tensors = {
            "response_ids": torch.from_numpy(np.array(resp, dtype=np.int32)),
            "topk_ids": torch.from_numpy(top.ids),
            "topk_logprobs": torch.from_numpy(top.logprobs),
            "tail_logprob": torch.from_numpy(top.tail_logprob),
            "token_logprob": torch.from_numpy(top.token_logprob),
        }
        for name in ("prompt_ids", "teacher_prompt_ids"):
            off, vals = _flat(batch, name)
            offsets[name] = off - off[0]
            tensors[name] = torch.from_numpy(np.array(vals[off[0] : off[-1]], dtype=np.int32))
        span_off, starts, lengths = batch_spans(batch)
        offsets["spans"] = span_off
        tensors["span_starts"] = torch.from_numpy(starts.astype(np.int64))
        tensors["span_lengths"] = torch.from_numpy(lengths.astype(np.int64))
        if v2:
            off, vals = _flat(batch, "turn_starts")
            tensors["turn_starts"] = torch.from_numpy(vals[off[0] : off[-1]].astype(np.int64))
            off = offsets["turns"] = off - off[0]
            roles = cols["turn_roles"].tolist()
            rows["turn_roles"] = [roles[a:b] for a, b in zip(off, off[1:], strict=False)]
        else:
            offsets["turns"] = np.zeros(len(resp_off), np.int64)
            tensors["turn_starts"] = torch.zeros(0, dtype=torch.int64)
            rows["turn_roles"] = [[] for _ in range(len(resp_off) - 1)]
        return cls(rows, offsets, tensors)

    def __len__(self) -> int:
        return len(self.rows["id"])

    def row(self, i: int) -> dict:
        """Row i: metadata plus tensor views. Shapes: response (T,), top-k (N, K) and
        tail/token logprob (N,) of the N trained tokens, prompts (P,), span_starts and
        span_lengths (S,) in conversation coordinates, turn_starts (M,) and turn_roles."""
        out = {n: v[i] for n, v in self.rows.items()}
        a, b = self.offsets["response"][i], self.offsets["response"][i + 1]
        out["response_ids"] = self.tensors["response_ids"][a:b]
        a, b = self.offsets["trained"][i], self.offsets["trained"][i + 1]
        for name in ("topk_ids", "topk_logprobs", "tail_logprob", "token_logprob"):
            out[name] = self.tensors[name][a:b]
        for name, key in (
            ("prompt_ids", "prompt_ids"),
            ("teacher_prompt_ids", "teacher_prompt_ids"),
            ("span_starts", "spans"),
            ("span_lengths", "spans"),
            ("turn_starts", "turns"),
        ):
            off = self.offsets[key]
            out[name] = self.tensors[name][off[i] : off[i + 1]]
        return out


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(x) for x in key]))


class ShardReader(IterableDataset):
    """Rows of a shard folder for one rank, split across DataLoader workers.

    epochs=None streams forever. `state_dict`/`load_state_dict` carry each shard's
    (epoch, position); a restart with the same seed, world size and worker count continues
    with exactly the rows that remained.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        seed: int = 0,
        shuffle: bool = True,
        window_blocks: int = 4,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        epochs: int | None = 1,
        expected_tokenizer_fingerprint: str | None = None,
        verify: str = "full",
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.folder = ShardFolder(
            folder, expected_tokenizer_fingerprint=expected_tokenizer_fingerprint, verify=verify
        )
        self.seed, self.shuffle, self.window_blocks = seed, shuffle, max(1, window_blocks)
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers  # must equal the DataLoader's, for the split
        self.epochs = epochs
        self.num_shards = world_size * max(1, num_workers)
        self._positions: dict[int, tuple[int, int]] = {}

    @property
    def metadata(self) -> ShardMetadata:
        return self.folder.metadata

    # ---- planning: pure functions of (seed, epoch, shard) ----------------------------------

    def shard_blocks(self, epoch: int, shard: int) -> np.ndarray:
        """Indices into folder.blocks that `shard` reads in `epoch`, in reading order."""
        n = len(self.folder.blocks)
        order = _rng(self.seed, epoch).permutation(n) if self.shuffle else np.arange(n)
        return order[shard :: self.num_shards]

    def _window_rows(self, epoch: int, shard: int, window: int, blocks: np.ndarray):
        """(block index, row) pairs of one window, in yield order."""
        refs = (
            np.concatenate(
                [
                    np.stack(
                        [np.full(self.folder.blocks[b, 2], b), np.arange(self.folder.blocks[b, 2])],
                        1,
                    )
                    for b in blocks
                ]
            )
            if len(blocks)
            else np.zeros((0, 2), np.int64)
        )
        if self.shuffle:
            refs = refs[_rng(self.seed, epoch, shard, window, 1).permutation(len(refs))]
        return refs

    def _shard_stream(self, shard: int, epoch: int, pos: int):
        while self.epochs is None or epoch < self.epochs:
            blocks = self.shard_blocks(epoch, shard)
            if not len(blocks) and (self.epochs is None):
                return  # more shards than blocks: this shard has nothing, in any epoch
            sizes = self.folder.blocks[blocks, 2]
            w = self.window_blocks
            start = 0
            for window, lo in enumerate(range(0, len(blocks), w)):
                n = int(sizes[lo : lo + w].sum())
                if pos >= start + n:
                    start += n
                    continue
                refs = self._window_rows(epoch, shard, window, blocks[lo : lo + w])
                cache = {}
                for j in range(pos - start, len(refs)):
                    b, r = int(refs[j, 0]), int(refs[j, 1])
                    if b not in cache:
                        fi, bi, _ = self.folder.blocks[b]
                        cache[b] = self.folder.read_block(int(fi), int(bi))
                    row = cache[b].row(r)
                    pos = start + j + 1
                    row["cursor"] = (shard, epoch, pos)
                    yield row
                start += n
            epoch, pos = epoch + 1, 0

    def __iter__(self):
        info = get_worker_info()
        workers = 1 if info is None else info.num_workers
        if max(1, self.num_workers) != workers:
            raise ValueError(
                f"ShardReader was built for num_workers={self.num_workers} but runs in a "
                f"DataLoader with {workers}: the rank/worker split would not partition the rows"
            )
        shard = self.rank * workers + (0 if info is None else info.id)
        epoch, pos = self._positions.get(shard, (0, 0))
        for row in self._shard_stream(shard, epoch, pos):
            if info is None:
                self.update([row["cursor"]])
            yield row

    # ---- resume ------------------------------------------------------------------------------

    def update(self, cursors) -> None:
        """Record rows the trainer consumed: an iterable of (shard, epoch, position)."""
        for shard, epoch, pos in cursors:
            shard, epoch, pos = int(shard), int(epoch), int(pos)
            if (epoch, pos) > self._positions.get(shard, (0, 0)):
                self._positions[shard] = (epoch, pos)

    def seek(self, shard: int, epoch: int, position: int) -> None:
        """Make `shard` start at row `position` of `epoch` (e.g. a batcher's window start)."""
        self._positions[int(shard)] = (int(epoch), int(position))

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "window_blocks": self.window_blocks,
            "num_shards": self.num_shards,
            "world_size": self.world_size,
            "workers": max(1, self.num_workers),
            "rank": self.rank,
            "files": [f.name for f in self.folder.manifest.files],
            "positions": {str(s): list(p) for s, p in sorted(self._positions.items())},
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        keys = ("seed", "shuffle", "window_blocks", "num_shards", "world_size", "workers", "rank")
        for key in keys + ("files",):
            if state[key] != mine[key]:
                raise ValueError(
                    f"reader state was saved with {key}={state[key]!r}, this reader has "
                    f"{mine[key]!r}: resuming would not continue with the remaining rows"
                )
        self._positions = {int(s): (int(e), int(p)) for s, (e, p) in state["positions"].items()}


def read_rows(folder: str | Path, **kwargs):
    """All rows of a folder in file order (no shuffling), e.g. for tools and tests."""
    return iter(ShardReader(folder, shuffle=False, **kwargs))

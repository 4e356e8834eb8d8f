"""Plain Parquet out of and into shard folders: `python -m tools.shards export | import`.

    python -m tools.shards export DIR --format parquet --out OUT.parquet
    python -m tools.shards import IN.parquet --tokenizer TOKENIZER_DIR --out DIR [--k K]
        [--skip-invalid] [--teacher NAME] [--vocab-size V]

`export` writes the decoded rows of `shards.hf` (one Parquet row group per stored block):
list<int32> ids and list<float> logprobs per token, list<list<...>> for the top-k, so
polars, duckdb, pandas and `datasets` read it without kdshards. The folder's metadata rides
along in the Parquet schema metadata (key "kdshards.metadata").

`import` reads plain top-k Parquet, from `export` or from another tool, into a shard folder:

    response_ids   list<int>           required: the T response tokens
    topk_ids       list<list<int>>     required: (N, >= K) the teacher's top ids per trained
                                       token (N = T without spans)
    topk_logprobs  list<list<float>>   required: (N, >= K) their raw log-probabilities
    prompt_ids     list<int>           required: the student's prompt (P tokens)
    span_starts, span_lengths          optional, together: the trained spans (start, length)
                                       in conversation coordinates (offsets into prompt_ids +
                                       response_ids); absent or null: one span, the response
    turn_starts, turn_roles            optional, together: each message's start and role;
                                       absent or null: not recorded
    teacher_prompt_ids, id, sample_index, source, thinking, meta, token_logprob,
    tail_logprob                       optional (defaults: prompt_ids, "row<N>", 0,
                                       "teacher", null, null, from the top-k, from the top-k)

An export of an older (v1) folder, or of a tool that knows no spans, imports as one span
per row.

Each row is validated like precompute's (ids inside the vocabulary, K distinct ids per token,
log-probabilities that are <= 0 and sum to at most 1, a given tail that agrees with the mass
outside the top-k); a wider top-k is cut to its K most probable entries. The first bad row
stops the import with one error naming file, row and field; with --skip-invalid bad rows go
to a rejects file committed in DIR (rejects-import-<n>.jsonl) and the rest is imported.
Rows already in DIR (by id) are skipped, so an interrupted import resumes.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from precompute.inputs import InputError, Reject, Where
from precompute.run import commit_rejects
from shards.codec import tail_logprob_of
from shards.errors import ShardError
from shards.fingerprint import files_fingerprint, tokenizer_fingerprint
from shards.hf import DECODED_SCHEMA, decoded_batches
from shards.manifest import load_manifest
from shards.schema import SOURCES, ShardMetadata
from shards.spans import check_spans, check_turns
from shards.storage import as_folder
from shards.writer import ShardRow, ShardWriter

PARQUET_META_KEY = b"kdshards.metadata"
REQUIRED = ("response_ids", "topk_ids", "topk_logprobs", "prompt_ids")
OPTIONAL = (
    "span_starts",
    "span_lengths",
    "turn_starts",
    "turn_roles",
    "id",
    "teacher_prompt_ids",
    "sample_index",
    "source",
    "thinking",
    "meta",
    "token_logprob",
    "tail_logprob",
)
# How far a given tail may sit from 1 - sum(top-k probabilities), in probability: an export
# carries quantized top-k logprobs, while its tail came from the float32 ones (measured on
# synthetic shards: up to 0.017 at k=4, 0.005 at k=64). Renormalized top-k miss by far more.
TAIL_TOLERANCE = 5e-2
# A logprob may round a little above 0 (the writer's own bound) ...
POSITIVE_TOLERANCE = 1e-3
# ... and top-k probabilities may sum a little over 1: an export's quantized logprobs do by
# up to 0.013 (k=4; 0.004 at k=64); logits or unnormalized scores sum far above.
MASS_TOLERANCE = 5e-2
IMPORT_WRITER_ID = "import"


# ---- export ------------------------------------------------------------------------------


def export_parquet(folder: str | Path, out: str | Path, *, compression: str = "zstd") -> dict:
    """Write the folder's decoded rows to one Parquet file (atomically); returns sizes."""
    out = Path(out)  # the folder may be a URL (shards.storage)
    manifest = load_manifest(folder)
    schema = DECODED_SCHEMA.with_metadata({PARQUET_META_KEY: manifest.metadata.dumps()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    rows = tokens = 0
    with pq.ParquetWriter(tmp, schema, compression=compression) as writer:
        for batch in decoded_batches(folder):
            writer.write_batch(batch)
            rows += batch.num_rows
            tokens += len(batch.column("token_logprob").values)  # trained tokens
    os.replace(tmp, out)
    shard_bytes = sum(f.bytes for f in manifest.files)
    out_bytes = out.stat().st_size
    return {
        "rows": rows,
        "tokens": tokens,
        "k": manifest.metadata.k,
        "shard_bytes": shard_bytes,
        "parquet_bytes": out_bytes,
        "ratio": out_bytes / max(shard_bytes, 1),
    }


# ---- import ------------------------------------------------------------------------------


class BadRow(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def _ints(value, name: str) -> np.ndarray:
    if value is None:
        raise BadRow(name, "missing")
    try:
        a = np.asarray(value)
    except ValueError as e:  # ragged nested lists
        raise BadRow(name, f"not a list of integers: {e}") from None
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise BadRow(name, f"must be a list of integers, got shape {a.shape} of {a.dtype}")
    return a.astype(np.int64)


def _matrix(value, name: str, t: int, dtype) -> np.ndarray:
    """(T, W) from a list of T lists of one width W."""
    if value is None:
        raise BadRow(name, "missing")
    if len(value) != t:
        raise BadRow(name, f"{len(value)} tokens, the trained tokens are {t}")
    widths = {len(v) if v is not None else -1 for v in value}
    if len(widths) > 1 or -1 in widths:
        raise BadRow(name, f"every token needs the same number of entries, got {sorted(widths)}")
    a = np.asarray(list(value), dtype=np.float64).reshape(t, widths.pop() if t else 0)
    if dtype is np.int64 and not np.array_equal(a, np.round(a)):
        raise BadRow(name, "ids must be integers")
    return a.astype(dtype)


def _per_token(value, name: str, t: int) -> np.ndarray | None:
    if value is None:
        return None
    if len(value) != t or any(v is None for v in value):
        raise BadRow(name, f"needs one value per trained token ({t}), got {len(value)}")
    return np.asarray(value, dtype=np.float64)


def _pairs(rec: dict, a: str, b: str) -> list[tuple] | None:
    """zip(rec[a], rec[b]), None when neither is given."""
    x, y = rec.get(a), rec.get(b)
    if x is None and y is None:
        return None
    if x is None or y is None:
        raise BadRow(b if y is None else a, f"given without {b if y is None else a}: give both")
    if len(x) != len(y):
        raise BadRow(b, f"{len(y)} entries, {a} has {len(x)}")
    return list(zip(x, y, strict=True))


def _spans(rec: dict, p: int, resp: np.ndarray) -> tuple[list | None, np.ndarray]:
    """(spans or None, the trained tokens (N,)) of a record."""
    spans = _pairs(rec, "span_starts", "span_lengths")
    if spans is None:
        return None, resp
    try:
        starts, lengths = check_spans(spans, p, p + len(resp))
    except ValueError as e:
        raise BadRow("span_starts", str(e)) from None
    idx = [np.arange(s - p, s - p + n) for s, n in zip(starts, lengths, strict=True)]
    return spans, resp[np.concatenate(idx)] if idx else resp[:0]


def row_from_record(rec: dict, index: int, k: int) -> ShardRow:
    """One Parquet row as a ShardRow with top-k width k; raises BadRow(field, reason)."""
    resp = _ints(rec.get("response_ids"), "response_ids")
    prompt = _ints(rec.get("prompt_ids"), "prompt_ids")
    spans, trained = _spans(rec, len(prompt), resp)
    turns = _pairs(rec, "turn_starts", "turn_roles")
    if turns is not None:
        try:
            turns = check_turns(turns, len(prompt) + len(resp))
        except ShardError as e:
            raise BadRow(e.field, e.message) from None
    t = len(trained)  # the top-k's rows
    ids = _matrix(rec.get("topk_ids"), "topk_ids", t, np.int64)
    lps = _matrix(rec.get("topk_logprobs"), "topk_logprobs", t, np.float64)
    if ids.shape != lps.shape:
        raise BadRow("topk_logprobs", f"shape {lps.shape}, topk_ids has {ids.shape}")
    if t and ids.shape[1] < k:
        raise BadRow("topk_ids", f"{ids.shape[1]} entries per token, fewer than k={k}")
    if t and (np.isnan(lps).any() or (lps > POSITIVE_TOLERANCE).any()):
        bad = int(np.argmax(np.isnan(lps).any(1) | (lps > POSITIVE_TOLERANCE).any(1)))
        raise BadRow("topk_logprobs", f"token {bad}: a logprob is NaN or positive")
    mass = np.exp(lps).sum(axis=1)
    if (mass > 1 + MASS_TOLERANCE).any():
        bad = int(np.argmax(mass > 1 + MASS_TOLERANCE))
        raise BadRow(
            "topk_logprobs",
            f"token {bad}: probabilities sum to {mass[bad]:.4f} > 1: not log-probabilities",
        )
    tail = _per_token(rec.get("tail_logprob"), "tail_logprob", t)
    if tail is not None:
        given, implied = np.exp(tail), np.exp(tail_logprob_of(lps))
        off = np.abs(given - implied) > TAIL_TOLERANCE
        if off.any():
            bad = int(np.argmax(off))
            raise BadRow(
                "tail_logprob",
                f"token {bad}: tail mass {given[bad]:.4f} disagrees with the "
                f"{implied[bad]:.4f} outside the top-k (renormalized or tempered logprobs?)",
            )
    token_lp = _per_token(rec.get("token_logprob"), "token_logprob", t)
    if t and ids.shape[1] > k:  # keep the k most probable, in their given order
        hit = ids == trained[:, None]
        if token_lp is None and hit.any(axis=1).all():
            # The trained token's logprob, before the cut may drop it from the top-k.
            token_lp = lps[hit]
        keep = np.sort(np.argsort(-lps, axis=1, kind="stable")[:, :k], axis=1)
        ids = np.take_along_axis(ids, keep, axis=1)
        lps = np.take_along_axis(lps, keep, axis=1)
    source = rec.get("source") or "teacher"
    if source not in SOURCES:
        raise BadRow("source", f"must be one of {SOURCES}, got {source!r}")
    meta = rec.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError as e:
            raise BadRow("meta", f"not JSON: {e}") from None
    if meta is not None and not isinstance(meta, dict):
        raise BadRow("meta", f"must be a JSON object, got {type(meta).__name__}")
    teacher_prompt = rec.get("teacher_prompt_ids")
    row_id = rec.get("id")
    if row_id is not None and (not isinstance(row_id, str) or not row_id):
        raise BadRow("id", f"must be a non-empty string, got {row_id!r}")
    return ShardRow(
        id=row_id if row_id is not None else f"row{index}",
        prompt_ids=prompt,
        teacher_prompt_ids=prompt
        if teacher_prompt is None
        else _ints(teacher_prompt, "teacher_prompt_ids"),
        response_ids=resp,
        topk_ids=ids.reshape(t, k),
        topk_logprobs=lps.reshape(t, k).astype(np.float32),
        token_logprobs=None if token_lp is None else token_lp.astype(np.float32),
        sample_index=int(rec.get("sample_index") or 0),
        source=source,
        thinking=rec.get("thinking"),
        meta=meta,
        spans=spans,
        turns=turns,
    )


@dataclass
class ImportSummary:
    rows: int = 0
    tokens: int = 0
    skipped_done: int = 0
    rejects: int = 0
    rejects_file: str = ""
    k: int = 0
    files: list[str] = field(default_factory=list)


def _vocab_size(tokenizer_dir: Path, tokenizer) -> int:
    """The logit dimension when the folder holds a model config (it may exceed the tokenizer's
    vocabulary), else the tokenizer's size."""
    config = tokenizer_dir / "config.json"
    if config.exists():
        v = json.loads(config.read_text()).get("vocab_size")
        if v:
            return max(int(v), len(tokenizer))
    return len(tokenizer)


def import_metadata(
    pf: pq.ParquetFile, path: Path, tokenizer_dir: Path, k: int | None, teacher: str | None,
    vocab_size: int | None,
) -> ShardMetadata:  # fmt: skip
    # transformers takes seconds to import: only import needs it (tools.shards imports this
    # module for every command and --help)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok_fp = tokenizer_fingerprint(tok)
    raw = (pf.schema_arrow.metadata or {}).get(PARQUET_META_KEY)
    source = ShardMetadata.from_json(json.loads(raw)) if raw else None
    if source is not None and source.tokenizer_fingerprint != tok_fp:
        raise ShardError(
            path,
            f"exported with tokenizer {source.tokenizer_fingerprint}, --tokenizer has {tok_fp}: "
            "the token ids would mean other tokens",
            field="tokenizer_fingerprint",
        )
    if k is None:
        k = source.k if source else _first_width(pf, path)
    if vocab_size is None:
        vocab_size = source.vocab_size if source else _vocab_size(tokenizer_dir, tok)
    if source is not None:
        return ShardMetadata(
            k=k, vocab_size=vocab_size, teacher=teacher or source.teacher,
            teacher_fingerprint=source.teacher_fingerprint, tokenizer_fingerprint=tok_fp,
            logprobs_mode=source.logprobs_mode, sampling=source.sampling,
            data_fingerprint=source.data_fingerprint,
            extra={**source.extra, "import": {"from": path.name}},
        )  # fmt: skip
    return ShardMetadata(
        k=k, vocab_size=vocab_size, teacher=teacher or "unknown", teacher_fingerprint="",
        tokenizer_fingerprint=tok_fp, sampling={"mode": "import"},
        data_fingerprint=files_fingerprint([path]), extra={"import": {"from": path.name}},
    )  # fmt: skip


def _first_width(pf: pq.ParquetFile, path: Path) -> int:
    for batch in pf.iter_batches(batch_size=64, columns=["topk_ids"]):
        for tokens in batch.column("topk_ids").to_pylist():
            if tokens:
                return len(tokens[0])
    raise ShardError(path, "no row has a top-k to take k from; pass --k", field="topk_ids")


def import_parquet(
    parquet: str | Path,
    tokenizer: str | Path,
    out: str | Path,
    *,
    k: int | None = None,
    skip_invalid: bool = False,
    teacher: str | None = None,
    vocab_size: int | None = None,
    batch_size: int = 256,
) -> ImportSummary:
    path, out = Path(parquet), Path(out)
    pf = pq.ParquetFile(path)
    missing = [c for c in REQUIRED if c not in pf.schema_arrow.names]
    if missing:
        raise ShardError(path, f"missing column(s) {missing}", field=missing[0])
    columns = [c for c in REQUIRED + OPTIONAL if c in pf.schema_arrow.names]
    metadata = import_metadata(pf, path, Path(tokenizer), k, teacher, vocab_size)
    summary = ImportSummary(k=metadata.k)
    rejects: list = []
    total = pf.metadata.num_rows

    def reject(index: int, fld: str, reason: str, rec: dict) -> None:
        where = Where(str(path), "row", index)
        rejects.append(Reject.of(index, where, fld, reason, json.dumps(rec, default=str)))
        if not skip_invalid:
            raise InputError(rejects, total)

    with ShardWriter(out, metadata, writer_id=IMPORT_WRITER_ID) as writer:
        done = writer.completed_ids()
        closed: set[str] = set()  # ids whose rows are behind us
        # The rows of one id, consecutive in the file, as (index, record, row): they are
        # added together, so an example is committed whole (what resume relies on).
        example: list[tuple[int, dict, ShardRow]] = []

        def flush() -> None:
            if not example:
                return
            try:
                writer.add([row for _, _, row in example])
            except ShardError as e:
                # The writer's checks (vocabulary, distinct ids, token logprob) refuse the
                # example before any of its rows is kept: each of its rows is rejected.
                for index, rec, _ in example:
                    reject(index, e.field or "topk", e.message, rec)
            else:
                summary.rows += len(example)
                summary.tokens += sum(len(row.topk_ids) for _, _, row in example)  # trained
            closed.add(example[0][2].id)
            example.clear()

        index = -1
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            for rec in batch.to_pylist():
                index += 1
                try:
                    row = row_from_record(rec, index, metadata.k)
                except BadRow as e:
                    reject(index, e.field, e.reason, rec)
                    continue
                if example and example[0][2].id != row.id:
                    flush()
                if row.id in closed:
                    reject(index, "id", f"id {row.id!r} again after other ids: keep an "
                           "example's rows together", rec)  # fmt: skip
                elif any(r.sample_index == row.sample_index for _, _, r in example):
                    reject(index, "sample_index", f"sample {row.sample_index} of {row.id!r} "
                           "twice", rec)  # fmt: skip
                elif row.id in done:
                    summary.skipped_done += 1
                else:
                    example.append((index, rec, row))
        flush()
        if rejects:  # committed by the writer, append-only, like precompute's rejects
            entry = commit_rejects(writer, rejects)
            summary.rejects_file = str(out / entry.name) if entry else ""
    summary.files = [f.name for f in writer.files_written]
    summary.rejects = len(rejects)
    return summary


# ---- command line (subcommands of python -m tools.shards) -------------------------------


def cmd_export(args) -> int:
    s = export_parquet(args.dir, args.out)
    print(
        f"exported {s['rows']} rows, {s['tokens']} tokens (k={s['k']}) to {args.out}: "
        f"{s['parquet_bytes']:,} bytes, {s['ratio']:.2f}x the shards' {s['shard_bytes']:,}"
    )
    return 0


def cmd_import(args) -> int:
    try:
        s = import_parquet(
            args.parquet, args.tokenizer, args.out, k=args.k, skip_invalid=args.skip_invalid,
            teacher=args.teacher, vocab_size=args.vocab_size,
        )  # fmt: skip
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"imported {s.rows} rows, {s.tokens} tokens (k={s.k}) into {args.out}"
        + (f"; {s.skipped_done} rows already there" if s.skipped_done else "")
        + (f"; {s.rejects} invalid rows listed in {s.rejects_file}" if s.rejects else "")
    )
    return 0


def add_commands(sub) -> None:
    """`export` and `import` on the subparsers of tools/shards.py."""
    p = sub.add_parser("export", help="decoded rows to plain Parquet (ids, logprobs per token)")
    p.add_argument("dir", type=as_folder)
    p.add_argument("--format", default="parquet", choices=("parquet",))
    p.add_argument("--out", required=True, type=Path, help="the .parquet file to write")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("import", help="plain top-k Parquet into a shard folder")
    p.add_argument("parquet", type=Path)
    p.add_argument("--tokenizer", required=True, help="tokenizer (or model) folder of the ids")
    p.add_argument("--out", required=True, type=Path, help="shard folder (resumed if present)")
    p.add_argument("--k", type=int, default=None, help="top-k width (default: the input's)")
    p.add_argument("--skip-invalid", action="store_true", help="list bad rows, import the rest")
    p.add_argument("--teacher", default=None, help="teacher name for the metadata")
    p.add_argument("--vocab-size", type=int, default=None, help="default: the model config's")
    p.set_defaults(fn=cmd_import)

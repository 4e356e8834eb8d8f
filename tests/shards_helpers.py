"""Synthetic teacher data and small utilities shared by the shard tests.

Everything is generated from numpy seeds, so a failing example is reproducible from the
seed that hypothesis or a parametrization prints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np

from shards.codec import Codebook
from shards.schema import ShardMetadata
from shards.writer import ShardRow, ShardWriter

VOCAB = 1000
FLOAT32_SLACK = 1e-5  # float32 rounding of a codebook level near -64 is ~4e-6
REPO = Path(__file__).resolve().parents[1]


def metadata(k: int = 16, vocab_size: int = VOCAB, **kw) -> ShardMetadata:
    return ShardMetadata(
        k=k,
        vocab_size=vocab_size,
        teacher="test",
        teacher_fingerprint="t",
        tokenizer_fingerprint="tok",
        **kw,
    )


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """Naive float64 log_softmax over the last axis."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def quantization_bound(codebook: Codebook, lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(target, bound): the decoded value must be within `bound` of `target`.

    target is lp clamped to the lowest level (the documented floor); bound is half the gap
    between the two codebook levels around it, computed naively from `Codebook.levels`.
    """
    levels = codebook.levels  # descending, float64
    target = np.maximum(np.asarray(lp, dtype=np.float64), levels[-1])
    # j: the level just above x (levels[j] >= x >= levels[j + 1]), by plain counting.
    j = (levels > target[..., None]).sum(axis=-1) - 1
    j = np.clip(j, 0, len(levels) - 2)
    return target, (levels[j] - levels[j + 1]) / 2 + FLOAT32_SLACK


def random_distributions(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    """(n, vocab) float64 logprobs: random logits at a per-token temperature.

    Scales from 0.2 (nearly uniform) to 12 (one token holds almost all the mass).
    """
    scale = np.exp(rng.uniform(np.log(0.2), np.log(12.0), size=(n, 1)))
    return log_softmax64(rng.standard_normal((n, vocab)) * scale)


def topk_of(
    rng: np.random.Generator,
    full: np.ndarray,
    k: int,
    p_in_topk: float = 0.7,
):
    """Top-k of full (n, V) float64 logprobs, with response tokens sampled in or out of it.

    Returns (ids (n, k) int64 in a random column order, logprobs (n, k) float32,
    response_ids (n,), token_logprobs (n,) float32, in_topk (n,) bool).
    """
    n, vocab = full.shape
    if n == 0:
        return (
            np.zeros((0, k), np.int64),
            np.zeros((0, k), np.float32),
            np.zeros(0, np.int64),
            np.zeros(0, np.float32),
            np.zeros(0, bool),
        )
    top = (
        np.argpartition(-full, k - 1, axis=1)[:, :k]
        if k < vocab
        else np.tile(np.arange(vocab), (n, 1))
    )
    # A random column order: the codec must not depend on the order it is given.
    top = np.take_along_axis(top, rng.permuted(np.tile(np.arange(k), (n, 1)), axis=1), axis=1)
    want_in = (rng.random(n) < p_in_topk) | (k == vocab)
    resp = np.empty(n, np.int64)
    for i in range(n):
        if want_in[i]:
            resp[i] = top[i, rng.integers(k)]
        else:
            outside = np.setdiff1d(np.arange(vocab), top[i], assume_unique=True)
            resp[i] = outside[rng.integers(len(outside))]
    lps = np.take_along_axis(full, top, axis=1).astype(np.float32)
    tok = full[np.arange(n), resp].astype(np.float32)
    return top, lps, resp, tok, want_in


def make_row(
    rng: np.random.Generator,
    example_id: str,
    *,
    k: int = 16,
    vocab: int = VOCAB,
    sample_index: int = 0,
    min_len: int = 1,
    max_len: int = 50,
    with_token_logprobs: bool = True,
) -> ShardRow:
    """One synthetic row: random prompts, a response of 1..50 tokens and its top-k."""
    t = int(rng.integers(min_len, max_len + 1))
    full = random_distributions(rng, t, vocab)
    ids, lps, resp, tok, _ = topk_of(
        rng, full, k, p_in_topk=1.0 if not with_token_logprobs else 0.7
    )
    p = int(rng.integers(1, 20))
    return ShardRow(
        id=example_id,
        prompt_ids=rng.integers(0, vocab, p).tolist(),
        teacher_prompt_ids=rng.integers(0, vocab, p + int(rng.integers(0, 10))).tolist(),
        response_ids=resp,
        topk_ids=ids,
        topk_logprobs=lps,
        token_logprobs=tok if with_token_logprobs else None,
        sample_index=sample_index,
        source=("teacher", "dataset", "student")[int(rng.integers(3))],
        thinking=(None, True, False)[int(rng.integers(3))],
        meta=None if rng.random() < 0.3 else {"answer": int(rng.integers(100)), "e": example_id},
    )


def make_example(rng: np.random.Generator, example_id: str, n_samples: int, **kw) -> list[ShardRow]:
    """The n samples of one example: rows with one id and sample_index 0..n-1."""
    return [make_row(rng, example_id, sample_index=s, **kw) for s in range(n_samples)]


def make_examples(
    seed: int, n_examples: int, *, max_samples: int = 3, **kw
) -> list[list[ShardRow]]:
    rng = np.random.default_rng(seed)
    return [
        make_example(rng, f"ex{i:05d}", int(rng.integers(1, max_samples + 1)), **kw)
        for i in range(n_examples)
    ]


def write_examples(
    folder, examples, *, k: int = 16, vocab: int = VOCAB, **writer_kw
) -> ShardWriter:
    writer_kw.setdefault("compression_level", 1)
    with ShardWriter(folder, metadata(k, vocab), **writer_kw) as w:
        for rows in examples:
            w.add(rows)
    return w


def several_files(path, seed: int) -> Path:
    """30 examples in files of about 12 kB with record batches of 200 tokens."""
    write_examples(path, make_examples(seed, 30), batch_tokens=200, target_file_bytes=12_000)
    return path


def private_copy(src, tmp_path) -> Path:
    """A copy of a module's pristine folder, for one test to damage."""
    path = Path(tmp_path) / "shards"
    shutil.copytree(src, path)
    return path


def row_key(row) -> tuple[str, int]:
    return (row["id"], int(row["sample_index"]))


def assert_row_matches(got: dict, row: ShardRow, codebook: Codebook) -> None:
    """A row read back equals the row written: exact ids and fields, top-k as a set with
    logprobs within the codebook's half-step, tail within 1e-3 in probability."""
    assert got["id"] == row.id
    assert got["sample_index"] == row.sample_index
    assert got["source"] == row.source
    assert got["thinking"] == row.thinking
    assert (None if got["meta"] is None else json.loads(got["meta"])) == row.meta
    for name in ("prompt_ids", "teacher_prompt_ids", "response_ids"):
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(getattr(row, name)))
    ids = np.asarray(row.topk_ids, dtype=np.int64)
    lps = np.asarray(row.topk_logprobs, dtype=np.float32)
    got_ids, got_lps = np.asarray(got["topk_ids"]), np.asarray(got["topk_logprobs"])
    assert got_ids.shape == ids.shape
    a, b = np.argsort(ids, axis=1), np.argsort(got_ids, axis=1)
    np.testing.assert_array_equal(np.take_along_axis(got_ids, b, 1), np.take_along_axis(ids, a, 1))
    target, bound = quantization_bound(codebook, np.take_along_axis(lps, a, 1))
    assert (np.abs(np.take_along_axis(got_lps, b, 1) - target) <= bound).all()
    if row.token_logprobs is None:
        tok = lps[ids == np.asarray(row.response_ids)[:, None]]
    else:
        tok = np.asarray(row.token_logprobs, dtype=np.float32)
    target, bound = quantization_bound(codebook, tok)
    assert (np.abs(np.asarray(got["token_logprob"]) - target) <= bound).all()
    ref_tail = np.maximum(1.0 - np.exp(lps.astype(np.float64)).sum(axis=1), 0.0)
    got_tail = np.exp(np.asarray(got["tail_logprob"], dtype=np.float64))
    np.testing.assert_allclose(got_tail, ref_tail, rtol=0, atol=1e-3)


def file_digests(folder) -> dict[str, str]:
    """sha256 of every committed .arrow file in a folder, by name."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).glob("part-*.arrow"))
    }


def manifest_json(folder, writer: str = "w0") -> dict:
    return json.loads((Path(folder) / f"manifest-{writer}.json").read_text())


def write_arrow(path, schema, batches, compression_level: int = 1) -> dict:
    """Write an Arrow IPC file the way ShardWriter does; return its length, sha256 and
    checksums (the FileEntry fields that describe the bytes), for a manifest that agrees."""
    import pyarrow as pa

    from shards.writer import file_checksums

    ends = []
    options = pa.ipc.IpcWriteOptions(
        compression=pa.Codec("zstd", compression_level=compression_level)
    )
    with pa.OSFile(str(path), "wb") as sink:
        with pa.ipc.new_file(sink, schema, options=options) as w:
            for b in batches:
                w.write_batch(b)
                ends.append(sink.tell())
    return file_checksums(Path(path), ends)


def write_manifest_json(folder, d: dict, writer: str = "w0") -> None:
    """Overwrite a writer's manifest with `d` (tests that edit or damage manifests)."""
    (Path(folder) / f"manifest-{writer}.json").write_text(json.dumps(d))


# ---- the child process of tests/test_writer_crash.py --------------------------------------------


def _sigkill_self() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


# Several record batches per file, about 10 files for the 70 examples of the crash tests.
CRASH_WRITER = dict(writer_id="w0", target_file_bytes=20_000, batch_tokens=100, compression_level=1)


def crash_child(folder: str, seed: int, n_examples: int, crash: str, after_files: int) -> None:
    """Write `n_examples` examples into `folder` and get killed with SIGKILL on the way.

    crash:
      "external": print "committed <n>" after each committed file; the parent kills us.
      "in_tmp": die while file number `after_files` is still a temporary file (after its
        first record batch).
      "renamed": die after a file was renamed to its final name, before the manifest lists it.
      "manifest": die while the manifest update is written (temporary manifest on disk).
      "none": finish normally.
    """
    import shards.storage
    import shards.writer

    examples = make_examples(seed, n_examples)
    writer = ShardWriter(folder, metadata(), **CRASH_WRITER)
    done = set(writer.completed_ids())
    committed = [0]

    real_commit = ShardWriter._commit
    real_replace = os.replace
    real_write_batch = ShardWriter._write_batch

    def commit(self, manifest):
        if crash == "renamed" and committed[0] == after_files:
            _sigkill_self()
        real_commit(self, manifest)
        committed[0] += 1
        print(f"committed {committed[0]}", flush=True)

    def replace(src, dst, *a, **kw):
        if (
            crash == "manifest"
            and committed[0] == after_files
            and Path(dst).name == "manifest-w0.json"
        ):
            _sigkill_self()
        return real_replace(src, dst, *a, **kw)

    def write_batch(self):
        real_write_batch(self)
        if crash == "in_tmp" and committed[0] == after_files and self._file is not None:
            assert self._file.tmp.exists()
            _sigkill_self()

    ShardWriter._commit = commit
    shards.storage.os.replace = replace
    ShardWriter._write_batch = write_batch
    for rows in examples:
        if rows[0].id in done:
            continue
        writer.add(rows)
    writer.close()
    print("finished", flush=True)

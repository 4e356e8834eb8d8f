"""ShardWriter -> manifest -> ShardReader round trips, and what the writer refuses."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pytest

from shards.errors import ShardError
from shards.manifest import load_manifest
from shards.reader import ShardFolder, ShardReader, read_rows
from shards.schema import META_KEY, RANK_ORDER_KEY, arrow_schema
from shards.writer import ShardWriter
from tests.shards_helpers import (
    REPO,
    assert_row_matches,
    make_examples,
    make_row,
    manifest_json,
    metadata,
    row_key,
    write_arrow,
    write_examples,
    write_manifest_json,
)


def by_key(examples):
    return {(r.id, r.sample_index): r for rows in examples for r in rows}


def by_key_ids(folder):
    return [row_key(r) for r in read_rows(folder)]


@pytest.fixture(scope="module")
def examples():
    ex = make_examples(11, 120, max_samples=3)
    # Rows without token_logprobs (every response token in its top-k) and empty responses.
    ex += make_examples(12, 10, with_token_logprobs=False)
    ex += [[make_row(np.random.default_rng(13), "empty", min_len=0, max_len=0)]]
    for i, rows in enumerate(ex[-11:]):  # make_examples numbers ids from 0: rename
        for r in rows:
            r.id = f"extra{i:03d}"
    return ex


@pytest.fixture(scope="module")
def folder(tmp_path_factory, examples):
    path = tmp_path_factory.mktemp("rt")
    write_examples(path, examples, target_file_bytes=30_000, batch_tokens=400)
    return path


def test_round_trip_exact(folder, examples):
    want = by_key(examples)
    got = list(read_rows(folder))
    assert Counter(row_key(r) for r in got) == Counter(want.keys())
    cb = metadata().codebook
    for row in got:
        assert_row_matches(row, want[row_key(row)], cb)


@pytest.mark.parametrize("k", [1, 2, 64])
def test_round_trip_other_k(tmp_path, k):
    ex = make_examples(k, 20, k=k, max_len=20)
    write_examples(tmp_path, ex, k=k, batch_tokens=100, target_file_bytes=10_000)
    want = by_key(ex)
    got = list(read_rows(tmp_path))
    assert sorted(map(row_key, got)) == sorted(want)
    for row in got:
        assert row["topk_ids"].shape[1] == k
        assert_row_matches(row, want[row_key(row)], metadata(k).codebook)


def test_files_roll_at_target_size(folder):
    manifest = load_manifest(folder)
    files = manifest.files
    assert len(files) >= 4
    for entry in files[:-1]:
        assert entry.bytes >= 30_000
    # Rolled after the batch that crossed the target: not much bigger than it.
    assert max(e.bytes for e in files) < 30_000 + 30_000
    assert [e.name for e in files] == [f"part-w0-{i:05d}.arrow" for i in range(len(files))]


def test_manifest_counts_and_digests(folder, examples):
    manifest = load_manifest(folder)
    total_rows = sum(len(rows) for rows in examples)
    total_tokens = sum(len(r.response_ids) for rows in examples for r in rows)
    assert manifest.rows == total_rows
    assert manifest.tokens == total_tokens
    want = by_key(examples)
    for entry in manifest.files:
        p = folder / entry.name
        data = p.read_bytes()
        assert entry.bytes == len(data)
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
        assert entry.writer == "w0"
        with pa.ipc.open_file(p) as f:
            batches = [f.get_batch(i) for i in range(f.num_record_batches)]
        assert entry.batch_rows == [b.num_rows for b in batches]
        assert entry.rows == sum(entry.batch_rows)
        keys = [
            (i, s)
            for b in batches
            for i, s in zip(b["id"].to_pylist(), b["sample_index"].to_pylist(), strict=True)
        ]
        assert entry.tokens == sum(len(want[key].response_ids) for key in keys)
    # The JSON on disk says the same.
    d = manifest_json(folder)
    assert d["format"] == "kdshards" and d["schema_version"] == 2
    assert d["metadata"]["k"] == 16 and d["metadata"]["tokenizer_fingerprint"] == "tok"


def test_rows_of_one_add_stay_in_one_file(folder, examples):
    n_samples = {rows[0].id: len(rows) for rows in examples}
    file_of = defaultdict(set)
    per_file = defaultdict(Counter)
    for entry in load_manifest(folder).files:
        ids = pa.ipc.open_file(folder / entry.name).read_all()["id"].to_pylist()
        for i in ids:
            file_of[i].add(entry.name)
            per_file[entry.name][i] += 1
    assert all(len(files) == 1 for files in file_of.values())
    for counts in per_file.values():
        for i, c in counts.items():
            assert c == n_samples[i]


def test_plain_pyarrow_reads_files(folder):
    entry = load_manifest(folder).files[0]
    with pa.ipc.open_file(folder / entry.name) as f:
        table = f.read_all()
        assert f.num_record_batches == len(entry.batch_rows)
    assert table.num_rows == entry.rows
    assert table.schema.remove_metadata().equals(arrow_schema())
    meta = table.schema.metadata
    assert json.loads(meta[META_KEY])["k"] == 16
    assert RANK_ORDER_KEY in meta


def test_datasets_load_dataset_reads_files(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    manifest = load_manifest(folder)
    ds = datasets.load_dataset(
        "arrow",
        data_files=[str(folder / e.name) for e in manifest.files],
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert ds.num_rows == manifest.rows
    assert set(ds.column_names) == set(arrow_schema().names)
    assert sorted(set(ds["id"])) == sorted({i for i, _ in by_key_ids(folder)})


def test_completed_ids_lists_committed_files_only(tmp_path):
    ex = make_examples(3, 40)
    w = ShardWriter(tmp_path, metadata(), target_file_bytes=20_000, batch_tokens=300)
    assert w.completed_ids() == set()
    committed = set()
    for i, rows in enumerate(ex):
        before = len(w.files_written)
        w.add(rows)
        if len(w.files_written) > before:
            # A file completes with the batch of all pending rows: everything added so far.
            committed = {r[0].id for r in ex[: i + 1]}
        assert w.completed_ids() == committed
    assert len(w.files_written) >= 2
    w.close()
    assert w.completed_ids() == {rows[0].id for rows in ex}


def test_two_writers_share_a_folder(tmp_path):
    ex = make_examples(4, 60)
    w0 = ShardWriter(
        tmp_path, metadata(), writer_id="w0", target_file_bytes=15_000, batch_tokens=200
    )
    w1 = ShardWriter(
        tmp_path, metadata(), writer_id="w1", target_file_bytes=15_000, batch_tokens=200
    )
    for i, rows in enumerate(ex):
        (w0 if i % 2 else w1).add(rows)
    w0.close()
    w1.close()
    manifest = load_manifest(tmp_path)
    writers = Counter(e.writer for e in manifest.files)
    assert writers["w0"] >= 2 and writers["w1"] >= 2
    assert sorted(e.name for e in manifest.files) == sorted(
        p.name for p in tmp_path.glob("part-*.arrow")
    )
    assert {e.name for e in manifest.files} == {e.name for e in w0.files_written + w1.files_written}
    assert manifest.rows == sum(len(r) for r in ex)
    assert sorted(by_key_ids(tmp_path)) == sorted(by_key(ex))
    folder = ShardFolder(tmp_path)
    for fi in range(len(manifest.files)):
        folder.verify_file(fi)


def test_same_writer_id_twice_is_refused(tmp_path):
    w = ShardWriter(tmp_path, metadata(), writer_id="w7")
    with pytest.raises(ShardError, match="another process is writing as writer 'w7'"):
        ShardWriter(tmp_path, metadata(), writer_id="w7")
    ShardWriter(tmp_path, metadata(), writer_id="w8").close()
    w.close()
    ShardWriter(tmp_path, metadata(), writer_id="w7").close()


def test_same_writer_id_in_another_process_is_refused(tmp_path):
    code = (
        "import sys; from shards.writer import ShardWriter;"
        "from tests.shards_helpers import metadata;"
        f"w = ShardWriter({str(tmp_path)!r}, metadata(), writer_id='w0');"
        "print('ready', flush=True); sys.stdin.readline(); w.close()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(ShardError, match="another process"):
            ShardWriter(tmp_path, metadata(), writer_id="w0")
    finally:
        child.communicate("\n", timeout=30)
    assert child.returncode == 0
    ShardWriter(tmp_path, metadata(), writer_id="w0").close()


def test_folder_with_other_metadata_is_refused(tmp_path):
    write_examples(tmp_path, make_examples(5, 3))
    for other in (
        metadata(k=8),
        metadata(vocab_size=2000),
        metadata(sampling={"temperature": 0.7}),
    ):
        with pytest.raises(ShardError, match="other settings") as err:
            ShardWriter(tmp_path, other)
        assert "manifest-w0.json" in str(err.value)
        assert sorted(p.name for p in tmp_path.glob("manifest*")) == ["manifest-w0.json"]
    # The refusal names the differing field, and releases the writer id at once (the
    # exception, still referenced here, must not keep it locked).
    with pytest.raises(ShardError, match="k: 16 != 8") as err:
        ShardWriter(tmp_path, metadata(k=8))
    ShardWriter(tmp_path, metadata()).close()
    assert err.value is not None


def test_same_metadata_created_later_is_accepted(tmp_path):
    write_examples(tmp_path, make_examples(5, 3))
    later = metadata(created_at="2099-01-01T00:00:00+00:00")  # not part of the identity
    rows = make_examples(6, 1)[0]
    for r in rows:
        r.id = "added-later"
    with ShardWriter(tmp_path, later, writer_id="w0") as w:
        w.add(rows)
    assert len(load_manifest(tmp_path).files) == 2
    assert "added-later" in w.completed_ids()


@pytest.mark.parametrize(
    "field, change, message",
    [
        ("topk_ids", lambda r: r.topk_ids.__setitem__((3, 0), 1000), "token 3: top-k id outside"),
        ("topk_ids", lambda r: r.topk_ids.__setitem__((2, 0), -1), "token 2: top-k id outside"),
        (
            "topk_ids",
            lambda r: r.topk_ids.__setitem__((4, 1), r.topk_ids[4, 0]),
            "token 4: duplicate",
        ),
        ("topk_logprobs", lambda r: r.topk_logprobs.__setitem__((1, 5), np.nan), "token 1: .*NaN"),
        (
            "topk_logprobs",
            lambda r: r.topk_logprobs.__setitem__((0, 5), 0.5),
            "token 0: .*positive",
        ),
        ("token_logprobs", lambda r: r.token_logprobs.__setitem__(2, np.nan), "NaN"),
        ("prompt_ids", lambda r: setattr(r, "prompt_ids", [5, 1000]), r"\[0, 1000\)"),
        ("source", lambda r: setattr(r, "source", "oracle"), "source must be one of"),
    ],
)
def test_bad_rows_are_refused_at_add(tmp_path, field, change, message):
    rng = np.random.default_rng(21)
    good = make_row(rng, "good", min_len=10, max_len=10)
    bad = make_row(rng, "bad", min_len=10, max_len=10)
    change(bad)
    with ShardWriter(tmp_path, metadata(), batch_tokens=10**6) as w:
        w.add(good)
        with pytest.raises(ShardError, match=message) as err:
            w.add(bad)
        assert err.value.field == field
        assert "'bad'" in str(err.value)
    # The bad row did not take the pending good row with it, and the file is readable.
    assert [r["id"] for r in read_rows(tmp_path)] == ["good"]


def test_unknown_schema_version_in_manifest(tmp_path):
    write_examples(tmp_path, make_examples(7, 5))
    d = manifest_json(tmp_path)
    d["schema_version"] = 3
    write_manifest_json(tmp_path, d)
    with pytest.raises(ShardError, match="schema version 3 is not supported") as err:
        ShardReader(tmp_path)
    assert "manifest-w0.json" in str(err.value)


def test_unknown_schema_version_in_file(tmp_path):
    """A file from a future writer (schema version 3 in its metadata) in a v2 manifest."""
    write_examples(tmp_path, make_examples(8, 10), target_file_bytes=5_000, batch_tokens=200)
    p = tmp_path / "part-w0-00001.arrow"
    with pa.ipc.open_file(p) as f:
        schema = f.schema
        batches = [f.get_batch(i) for i in range(f.num_record_batches)]
    meta = dict(schema.metadata)
    meta[META_KEY] = json.dumps({**json.loads(meta[META_KEY]), "schema_version": 3}).encode()
    fields = write_arrow(p, schema.with_metadata(meta), batches)
    d = manifest_json(tmp_path)
    d["files"][1].update(fields)
    write_manifest_json(tmp_path, d)
    with pytest.raises(ShardError, match="schema version 3 is not supported") as err:
        list(ShardReader(tmp_path, shuffle=False))
    assert "part-w0-00001.arrow" in str(err.value)
    with pytest.raises(ShardError, match="schema version 3") as err:
        ShardFolder(tmp_path).verify_file(1)
    assert "part-w0-00001.arrow" in str(err.value)
    ShardFolder(tmp_path).verify_file(0)


def test_tokenizer_fingerprint(tmp_path):
    write_examples(tmp_path, make_examples(9, 3))
    with pytest.raises(ShardError, match="tokenizer fingerprint tok differs") as err:
        ShardReader(tmp_path, expected_tokenizer_fingerprint="sha256:other")
    assert err.value.field == "tokenizer_fingerprint"
    assert "manifest-w0.json" in str(err.value)
    assert len(list(ShardReader(tmp_path, expected_tokenizer_fingerprint="tok"))) > 0


def test_reader_refuses_file_metadata_that_disagrees(tmp_path):
    """A file written for another folder, listed in this one's manifest."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_examples(a, make_examples(10, 3))
    write_examples(b, make_examples(10, 3, k=8), k=8)
    (a / "part-w0-00000.arrow").write_bytes((b / "part-w0-00000.arrow").read_bytes())
    d, e = manifest_json(a), manifest_json(b)
    d.update({key: e[key] for key in ("files", "commits", "rows", "tokens")})
    write_manifest_json(a, d)
    with pytest.raises(ShardError, match="disagrees with the manifest") as err:
        list(ShardReader(a))
    assert "part-w0-00000.arrow" in str(err.value)

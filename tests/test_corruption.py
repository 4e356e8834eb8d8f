"""Damaged shard folders: every problem is a ShardError naming the file, never a raw
pyarrow/numpy exception, a crash or silently wrong data (with verify="full")."""

from __future__ import annotations

import hashlib
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pytest

from shards.errors import ShardError
from shards.reader import ShardFolder, ShardReader
from tests.shards_helpers import (
    make_examples,
    manifest_json,
    private_copy,
    row_key,
    several_files,
    write_arrow,
    write_examples,
    write_manifest_json,
)

VICTIM = "part-w0-00001.arrow"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = several_files(tmp_path_factory.mktemp("pristine"), 41)
    assert len(manifest_json(path)["files"]) >= 3
    return path


@pytest.fixture
def folder(pristine, tmp_path):
    return private_copy(pristine, tmp_path)


def read_all(folder, verify="full"):
    """Every row of the folder, decoded; comparable across runs."""
    out = []
    for r in ShardReader(folder, shuffle=False, verify=verify):
        out.append(
            (
                row_key(r),
                r["source"],
                r["meta"],
                *(r[t].numpy().tobytes() for t in ("response_ids", "topk_ids", "topk_logprobs")),
                *(r[t].numpy().tobytes() for t in ("tail_logprob", "prompt_ids")),
            )
        )
    return out


def rewrite_manifest(folder, change, retotal=True):
    """Edit the manifest, then make its running totals agree again, as a writer would have
    written them: the data checks below the manifest's own are what these tests are about."""
    d = manifest_json(folder)
    change(d)
    if not retotal:
        return write_manifest_json(folder, d)
    rows = tokens = 0
    for f in d["files"]:
        rows, tokens = rows + f["rows"], tokens + f["tokens"]
        f.update(rows_total=rows, tokens_total=tokens)
    d.update(rows=rows, tokens=tokens)
    write_manifest_json(folder, d)


def entry(d, name=VICTIM):
    return next(f for f in d["files"] if f["name"] == name)


def match_manifest_to_file(folder, name=VICTIM):
    """Make the manifest agree with the file's current bytes (a file damaged before listing)."""
    data = (folder / name).read_bytes()

    def change(d):
        entry(d, name).update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    rewrite_manifest(folder, change)


def expect_error(fn, name=VICTIM, match=None) -> ShardError:
    with pytest.raises(ShardError, match=match) as err:
        fn()
    assert name in str(err.value), str(err.value)
    return err.value


def file_index(folder, name=VICTIM):
    return [f["name"] for f in manifest_json(folder)["files"]].index(name)


def test_pristine_folder_reads_and_verifies(pristine):
    assert len(read_all(pristine)) == sum(f["rows"] for f in manifest_json(pristine)["files"])
    folder = ShardFolder(pristine)
    for fi in range(len(folder.manifest.files)):
        folder.verify_file(fi)


# ---- truncated / missing files: caught by verify="full" and "size" at open -----------------


@pytest.mark.parametrize("verify", ["full", "size"])
@pytest.mark.parametrize("cut", ["empty", "header", "half", "footer"])
def test_truncated_file(folder, verify, cut):
    p = folder / VICTIM
    data = p.read_bytes()
    n = {"empty": 0, "header": 100, "half": len(data) // 2, "footer": len(data) - 10}[cut]
    p.write_bytes(data[:n])
    expect_error(lambda: ShardReader(folder, verify=verify), match="length .* manifest says")
    expect_error(lambda: ShardFolder(folder, verify="none").verify_file(file_index(folder)))


@pytest.mark.parametrize("verify", ["full", "size", "none"])
def test_truncated_file_the_manifest_agrees_with(folder, verify):
    """A file cut short before it was listed: the Arrow footer is gone."""
    p = folder / VICTIM
    p.write_bytes(p.read_bytes()[:-50])
    match_manifest_to_file(folder)
    expect_error(lambda: read_all(folder, verify), match="foot .* is damaged")
    expect_error(lambda: ShardFolder(folder).verify_file(file_index(folder)))


@pytest.mark.parametrize("verify", ["full", "size"])
def test_missing_file(folder, verify):
    (folder / VICTIM).unlink()
    expect_error(lambda: ShardReader(folder, verify=verify), match="missing")
    expect_error(
        lambda: ShardFolder(folder, verify="none").verify_file(file_index(folder)), match="missing"
    )


def test_missing_file_with_verify_none(folder):
    (folder / VICTIM).unlink()
    expect_error(lambda: read_all(folder, "none"))


# ---- flipped bytes: verify="full" catches every one; "size" never crashes --------------------


def flip_positions(size: int, n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    # Header, footer and the middle, plus random places.
    fixed = [0, 5, 8, size // 2, size - 1, size - 7, size - 12, size - 100]
    return sorted(set(fixed + rng.choice(size, n, replace=False).tolist()))


def test_flipped_byte_with_full_verify(folder):
    p = folder / VICTIM
    data = bytearray(p.read_bytes())
    fi = file_index(folder)
    for pos in flip_positions(len(data), 6):
        bad = data.copy()
        bad[pos] ^= 0x10
        p.write_bytes(bytes(bad))
        expect_error(lambda: read_all(folder), match="sha256")
        expect_error(lambda: ShardFolder(folder).verify_file(fi), match="sha256")


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("single")
    write_examples(path, make_examples(42, 12), batch_tokens=150)
    assert len(manifest_json(path)["files"]) == 1
    return path


def test_flipped_bytes_with_size_verify_never_crash(single_file, tmp_path):
    """verify="size" skips only the whole-file hash: the manifest's per-batch checksums catch
    a damaged byte when its batch is read, as a ShardError naming the file, never as other
    data, a raw pyarrow/numpy error or a crash (unchecked Arrow offsets used to segfault in
    to_pylist)."""
    folder = tmp_path / "s"
    shutil.copytree(single_file, folder)
    name = manifest_json(folder)["files"][0]["name"]
    p = folder / name
    data = bytearray(p.read_bytes())
    good = read_all(folder)
    outcomes = {"error": 0, "same": 0, "different": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy casts of garbage values
        for i, pos in enumerate(flip_positions(len(data), 150, seed=1)):
            bad = data.copy()
            bad[pos] ^= 1 << (i % 8)
            p.write_bytes(bytes(bad))
            try:
                rows = read_all(folder, verify="size")
            except ShardError as e:
                assert name in str(e)
                outcomes["error"] += 1
            else:
                outcomes["same" if rows == good else "different"] += 1
    assert outcomes["different"] == 0 and outcomes["error"] > 0, outcomes
    # verify="full" catches every one of these.
    p.write_bytes(bytes(data))
    assert read_all(folder) == good


# ---- the manifest disagrees with a file ------------------------------------------------------


def test_wrong_sha256(folder):
    good = read_all(folder)
    rewrite_manifest(folder, lambda d: entry(d).update(sha256="0" * 64))
    expect_error(lambda: read_all(folder), match="sha256")
    expect_error(lambda: ShardFolder(folder).verify_file(file_index(folder)), match="sha256")
    # verify="size" does not hash: the (intact) data reads as before.
    assert read_all(folder, "size") == good


@pytest.mark.parametrize("verify", ["full", "size"])
@pytest.mark.parametrize("delta", [1, -1, 1000])
def test_wrong_bytes(folder, verify, delta):
    rewrite_manifest(folder, lambda d: entry(d).update(bytes=entry(d)["bytes"] + delta))
    expect_error(lambda: ShardReader(folder, verify=verify), match="length")
    expect_error(lambda: ShardFolder(folder, verify="none").verify_file(file_index(folder)))


@pytest.mark.parametrize("delta", [1, -1])
def test_wrong_row_count(folder, delta):
    """`rows` that disagrees with `batch_rows`: the manifest contradicts itself."""
    rewrite_manifest(folder, lambda d: entry(d).update(rows=entry(d)["rows"] + delta))
    expect_error(lambda: ShardReader(folder), match="rows=")


@pytest.mark.parametrize("verify", ["full", "size"])
@pytest.mark.parametrize("delta", [1, -1])
def test_wrong_batch_rows(folder, verify, delta):
    """The manifest plans one row more or less than a record batch holds: reading must stop
    with an error, not raise IndexError or silently drop a row."""

    def change(d):
        e = entry(d)
        e["batch_rows"][0] += delta
        e["rows"] += delta

    rewrite_manifest(folder, change)
    expect_error(lambda: read_all(folder, verify), match="rows")
    expect_error(lambda: ShardFolder(folder).verify_file(file_index(folder)), match="rows")


@pytest.mark.parametrize("verify", ["full", "size"])
def test_extra_batch_in_manifest(folder, verify):
    def change(d):
        e = entry(d)
        e["batch_rows"].append(3)
        e["rows"] += 3

    rewrite_manifest(folder, change)
    # Caught by the manifest's own checks: a batch without a checksum.
    expect_error(lambda: read_all(folder, verify), match="inconsistent checksums")


# ---- not an Arrow file -------------------------------------------------------------------


@pytest.mark.parametrize("listed", [False, True])
@pytest.mark.parametrize("verify", ["full", "size"])
def test_not_an_arrow_file(folder, verify, listed):
    p = folder / VICTIM
    size = p.stat().st_size
    p.write_bytes(np.random.default_rng(0).bytes(size))
    if listed:  # the manifest agrees with the garbage: only opening it can tell
        match_manifest_to_file(folder)
    match = "sha256" if verify == "full" and not listed else "head .* is damaged"
    expect_error(lambda: read_all(folder, verify), match=match)
    expect_error(lambda: ShardFolder(folder).verify_file(file_index(folder)))


def test_arrow_file_without_kdshards_metadata(folder):
    p = folder / VICTIM
    with pa.ipc.open_file(p) as f:
        table = f.read_all()
    fields = write_arrow(p, table.schema.remove_metadata(), table.to_batches())
    rewrite_manifest(folder, lambda d: entry(d).update(fields))
    expect_error(lambda: read_all(folder), match="no kdshards metadata")


def test_parquet_file_in_place_of_arrow(folder):
    import pyarrow.parquet as pq

    p = folder / VICTIM
    with pa.ipc.open_file(p) as f:
        table = f.read_all()
    pq.write_table(table, p)
    match_manifest_to_file(folder)
    expect_error(lambda: read_all(folder), match="is damaged")


# ---- a garbled manifest --------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b'{"format": "kdshards", "schema_version": 1, "metadata": {',
        b"[]",
        b"null",
        b"42",
        b'"kdshards"',
        b'{"format": "other"}',
        b"\xff\xfe\x00garbage",
        b'{"format": "kdshards", "schema_version": 1}',
    ],
)
def test_garbled_manifest(folder, content):
    (folder / "manifest-w0.json").write_bytes(content)
    expect_error(lambda: ShardReader(folder), name="manifest-w0.json")


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.pop("files"),
        lambda d: d.update(files={"a": 1}),
        lambda d: d.update(files=[1, 2]),
        lambda d: d["files"][0].pop("sha256"),
        lambda d: d["files"][0].update(extra=1),
        lambda d: d["metadata"].pop("codebook"),
        lambda d: d["metadata"].update(k=0),
        lambda d: d["metadata"].update(unknown_key=1),
        lambda d: d.update(metadata=[]),
    ],
)
def test_malformed_manifest(folder, change):
    rewrite_manifest(folder, change, retotal=False)
    expect_error(lambda: ShardReader(folder), name="manifest-w0.json")


def test_no_manifest(folder):
    (folder / "manifest-w0.json").unlink()
    expect_error(lambda: ShardReader(folder), name="manifest-*.json", match="no manifest")

"""The manifests are the commit record, with integrity of their own: a file listed twice or an
entry dropped is an error (reader, writer and `verify`), never rows read twice or lost; every
byte of a data file is checked against a checksum when it is read, at every verify level;
writers in separate processes commit without a shared lock; legacy folders still read.

The edits below find the manifest with a glob and change its "files" list, so that they also
run against the single-manifest code this replaced (where they fail)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from shards.errors import ShardError
from shards.manifest import load_manifest
from shards.reader import ShardFolder, ShardReader, read_rows
from shards.writer import ShardWriter
from tests.shards_helpers import (
    REPO,
    assert_row_matches,
    make_examples,
    metadata,
    private_copy,
    row_key,
    several_files,
    write_examples,
)
from tools import shards as cli

LEGACY = Path(__file__).parent / "fixtures" / "legacy_v1"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return several_files(tmp_path_factory.mktemp("pristine"), 51)


@pytest.fixture
def folder(pristine, tmp_path):
    return private_copy(pristine, tmp_path)


def the_manifest(folder) -> Path:
    (path,) = [p for p in Path(folder).glob("manifest*.json")]
    return path


def edit(folder, change) -> list[str]:
    """Apply change(d) to the folder's manifest; returns the listed file names after."""
    path = the_manifest(folder)
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))
    return [f["name"] for f in d["files"]]


def verify(capsys, folder) -> tuple[int, list[str]]:
    code = cli.main(["verify", str(folder)])
    return code, capsys.readouterr().out.splitlines()


def keys(folder, **kw) -> list:
    return [row_key(r) for r in ShardReader(folder, shuffle=False, **kw)]


# ---- a file listed twice -----------------------------------------------------------------------


def test_duplicate_entry_is_an_error(folder, capsys):
    names = edit(folder, lambda d: d["files"].append(dict(d["files"][1])))
    assert names.count(names[1]) == 2
    with pytest.raises(ShardError, match="listed twice"):
        keys(folder)
    code, lines = verify(capsys, folder)
    assert code == 1 and any(line.startswith("BAD") for line in lines), lines


def test_duplicate_content_under_another_name_is_an_error(folder, capsys):
    """A copy of a committed file, listed under a new name: its rows would be read twice."""

    def change(d):
        copy = dict(d["files"][1], name="part-w0-00099.arrow")
        shutil.copy(folder / d["files"][1]["name"], folder / copy["name"])
        if "writer" in d:  # a consistent commit: only the content gives it away
            d.update(commits=d["commits"] + 1, rows=d["rows"] + copy["rows"])
            d["tokens"] += copy["tokens"]
            copy.update(commit=d["commits"] - 1, rows_total=d["rows"], tokens_total=d["tokens"])
        d["files"].append(copy)

    edit(folder, change)
    with pytest.raises(ShardError, match="same content"):
        keys(folder)
    assert verify(capsys, folder)[0] == 1


def test_entry_of_another_writer_is_an_error(folder):
    """w1's manifest listing w0's file (a copied manifest, a bug) would read it twice."""
    other = json.loads(the_manifest(folder).read_text())
    if "writer" not in other:
        pytest.skip("per-writer manifests only")
    other.update(writer="w1", files=other["files"][:1], extras=[])
    other["files"][0]["writer"] = "w1"
    (folder / "manifest-w1.json").write_text(json.dumps(other))
    with pytest.raises(ShardError, match="not a part file of this writer"):
        keys(folder)


# ---- an entry dropped --------------------------------------------------------------------------


def test_dropped_entry_is_an_error(folder, capsys):
    names = edit(folder, lambda d: d["files"].pop(1))
    assert len(names) >= 2
    with pytest.raises(ShardError):
        keys(folder)
    with pytest.raises(ShardError):
        keys(folder, verify="none")
    code, lines = verify(capsys, folder)
    assert code == 1 and any(line.startswith("BAD") for line in lines), lines


def test_dropped_entry_with_consistent_totals_is_still_an_error(folder, capsys):
    """Dropped, and the commit numbers and totals edited to agree: the data file is still
    there, below later commits of its writer, so it was committed and lost."""
    d = json.loads(the_manifest(folder).read_text())
    if "writer" not in d:
        pytest.skip("per-writer manifests only")
    lost = d["files"].pop(1)["name"]
    rows = tokens = 0
    for i, f in enumerate(d["files"]):
        rows, tokens = rows + f["rows"], tokens + f["tokens"]
        f.update(commit=i, rows_total=rows, tokens_total=tokens)
    d.update(commits=len(d["files"]), rows=rows, tokens=tokens)
    the_manifest(folder).write_text(json.dumps(d))
    with pytest.raises(ShardError, match="an entry was dropped") as err:
        keys(folder, verify="none")
    assert lost in str(err.value)
    code, lines = verify(capsys, folder)
    assert code == 1 and f"BAD  {lost}: " in "\n".join(lines)
    with pytest.raises(ShardError, match="an entry was dropped"):
        ShardWriter(folder, metadata(), compression_level=1)  # never deletes it as debris
    assert (folder / lost).exists()


def test_lost_manifest_of_a_writer_is_an_error(tmp_path, capsys):
    """A writer creates its manifest before any file: its files without it were committed."""
    write_examples(tmp_path, make_examples(53, 4), writer_id="w0")
    write_examples(tmp_path, make_examples(54, 4), writer_id="w1")
    lost = sorted(p.name for p in tmp_path.glob("part-w1-*.arrow"))
    (tmp_path / "manifest-w1.json").unlink()
    with pytest.raises(ShardError, match="its writer 'w1' has no manifest"):
        keys(tmp_path, verify="none")
    code, lines = verify(capsys, tmp_path)
    assert code == 1 and [line.split(":")[0] for line in lines[:-1]] == [f"BAD  {lost[0]}"]
    with pytest.raises(ShardError, match="has no manifest"):
        ShardWriter(tmp_path, metadata(), writer_id="w1", compression_level=1)
    assert sorted(p.name for p in tmp_path.glob("part-w1-*.arrow")) == lost


def test_changed_totals_are_an_error(folder):
    d = json.loads(the_manifest(folder).read_text())
    if "writer" not in d:
        pytest.skip("per-writer manifests only")
    d["files"][2]["rows_total"] += 1
    the_manifest(folder).write_text(json.dumps(d))
    with pytest.raises(ShardError, match="running totals"):
        keys(folder)


def test_last_commit_dropped_is_debris(folder, capsys):
    """The last file of a writer that no manifest lists looks like a write interrupted
    between rename and commit: a warning, and the writer's next run removes it."""
    d = json.loads(the_manifest(folder).read_text())
    if "writer" not in d:
        pytest.skip("per-writer manifests only")
    last = d["files"].pop()
    d.update(commits=d["commits"] - 1, rows=d["rows"] - last["rows"])
    d["tokens"] -= last["tokens"]
    the_manifest(folder).write_text(json.dumps(d))
    code, lines = verify(capsys, folder)
    assert code == 0 and lines[0].startswith(f"WARN {last['name']}: "), lines
    ShardWriter(folder, metadata(), compression_level=1).close()
    assert not (folder / last["name"]).exists()
    assert verify(capsys, folder) == (0, [lines[-1].replace("1 not in", "0 not in")])


# ---- checksums of record batches, at every verify level -----------------------------------------


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    """One file of several record batches."""
    path = tmp_path_factory.mktemp("blocks")
    write_examples(path, make_examples(52, 20), batch_tokens=120)
    folder = ShardFolder(path)
    assert len(folder.manifest.files) == 1 and len(folder.manifest.files[0].batch_rows) >= 4
    return path


def test_flipped_byte_in_a_batch_is_named_when_that_batch_is_read(blocks, tmp_path):
    folder = tmp_path / "s"
    shutil.copytree(blocks, folder)
    entry = ShardFolder(folder).manifest.files[0]
    p = folder / entry.name
    data = bytearray(p.read_bytes())
    lo, hi = entry.batch_offsets[2], entry.batch_offsets[3]  # inside record batch 2
    data[(lo + hi) // 2] ^= 0x04
    p.write_bytes(bytes(data))
    for verify_level in ("none", "size"):
        sf = ShardFolder(folder, verify=verify_level)
        sf.read_block(0, 0)  # the other batches still read
        sf.read_block(0, 3)
        with pytest.raises(ShardError, match="record batch 2 .*damaged") as err:
            sf.read_block(0, 2)
        assert entry.name in str(err.value)
        with pytest.raises(ShardError, match="record batch 2"):
            list(ShardReader(folder, shuffle=False, verify=verify_level))


@pytest.mark.parametrize("verify_level", ["size", "none"])
def test_every_flipped_byte_is_caught(blocks, tmp_path, verify_level):
    """Of 150 single-bit flips anywhere in the file, none reads back as other data: the
    checksums tile the whole file (head, every batch, foot)."""
    folder = tmp_path / "s"
    shutil.copytree(blocks, folder)
    name = ShardFolder(folder).manifest.files[0].name
    p = folder / name
    data = bytearray(p.read_bytes())
    rng = np.random.default_rng(3)
    positions = sorted({0, 9, len(data) - 1, *rng.choice(len(data), 150, replace=False).tolist()})
    for i, pos in enumerate(positions):
        bad = data.copy()
        bad[pos] ^= 1 << (i % 8)
        p.write_bytes(bytes(bad))
        with pytest.raises(ShardError) as err:
            list(read_rows(folder, verify=verify_level))
        assert name in str(err.value)


# ---- writers in separate processes, no shared lock ---------------------------------------------

WRITERS, PER_WRITER = 4, 24

CHILD = """
import contextlib, sys
import shards.manifest
from shards.writer import ShardWriter
from tests.shards_helpers import make_examples, metadata
# The shared manifest lock of the single-manifest design, if there is one, is disabled: the
# commit must not depend on a lock shared between machines.
if hasattr(shards.manifest, "locked"):
    shards.manifest.locked = lambda folder: contextlib.nullcontext()
i = int(sys.argv[2])
sys.stdin.readline()  # start together
with ShardWriter(sys.argv[1], metadata(), writer_id=f"w{i}", batch_tokens=1,
                 target_file_bytes=1, compression_level=1) as w:
    for rows in make_examples(100 + i, {n}):
        for r in rows:
            r.id = f"w{i}-" + r.id
        w.add(rows)
        w.flush()  # one commit per example
""".replace("{n}", str(PER_WRITER))


def test_concurrent_writers_without_a_shared_lock(tmp_path, capsys):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), str(i)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(WRITERS)
    ]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    want = {
        (f"w{i}-{r.id}", r.sample_index): r
        for i in range(WRITERS)
        for rows in make_examples(100 + i, PER_WRITER)
        for r in rows
    }
    rows = list(read_rows(tmp_path))
    counts = Counter(row_key(r) for r in rows)
    assert set(counts) == set(want) and max(counts.values()) == 1
    for r in rows:
        assert_row_matches(
            {**r, "id": r["id"].split("-", 1)[1]}, want[row_key(r)], metadata().codebook
        )
    assert len(load_manifest(tmp_path).files) == WRITERS * PER_WRITER
    assert verify(capsys, tmp_path)[0] == 0


def test_a_second_process_committing_as_the_same_writer_is_refused(tmp_path):
    """Same writer id on another machine (the flock does not reach it): its commit changed
    the manifest under this writer, whose next commit would drop it: refused."""
    w = ShardWriter(tmp_path, metadata(), batch_tokens=1, compression_level=1)
    w.add(make_examples(7, 1)[0])
    w.flush()
    path = tmp_path / "manifest-w0.json"
    d = json.loads(path.read_text())
    path.write_text(json.dumps(d))  # rewritten by someone else (same content, other bytes)
    w.add(make_examples(8, 1)[0])
    with pytest.raises(ShardError, match="another process is writing as writer 'w0'"):
        w.flush()
    w._lock.close()


# ---- folders written before per-writer manifests -----------------------------------------------


@pytest.fixture
def legacy(tmp_path):
    path = tmp_path / "legacy"
    shutil.copytree(LEGACY, path, ignore=shutil.ignore_patterns("*.py"))
    return path


def legacy_examples():
    from tests.fixtures.legacy_v1.make_legacy_v1 import EXAMPLES

    return make_examples(**EXAMPLES)


def test_legacy_folder_reads_and_verifies(legacy, capsys):
    want = {(r.id, r.sample_index): r for rows in legacy_examples() for r in rows}
    rows = list(read_rows(legacy))
    assert sorted(row_key(r) for r in rows) == sorted(want)
    for r in rows:
        assert_row_matches(r, want[row_key(r)], metadata().codebook)
    assert verify(capsys, legacy) == (0, ["ok: 3 file(s) checked, 0 bad, 0 not in the manifest"])


def test_legacy_folder_refuses_new_writers(legacy):
    """A legacy folder holds schema v1 files; writers write v2 only, and a folder holds one
    version: a writer refuses it in one line before touching it, and it still reads."""
    before = {p.name: p.read_bytes() for p in legacy.iterdir()}
    for wid in ("w0", "w2"):
        with pytest.raises(ShardError, match="folder holds schema v1 shards") as err:
            ShardWriter(legacy, metadata(), writer_id=wid, compression_level=1)
        assert err.value.field == "schema_version"
        assert "manifest.json" in str(err.value) and "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in legacy.iterdir()} == before
    assert len(list(read_rows(legacy))) == sum(f.rows for f in load_manifest(legacy).files)

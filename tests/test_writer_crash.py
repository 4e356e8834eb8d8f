"""A writer process killed with SIGKILL, then resumed: nothing lost, duplicated or rewritten.

The child is `tests.shards_helpers.crash_child`, a real process that gets SIGKILL either from
this test (after it reports committed files) or from itself at an exact point of the commit
protocol (temporary file open, file renamed but not listed, manifest half written).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter

import pytest

from shards.manifest import load_manifest
from shards.reader import ShardFolder, read_rows
from shards.writer import ShardWriter
from tests.shards_helpers import (
    CRASH_WRITER,
    REPO,
    assert_row_matches,
    file_digests,
    make_examples,
    metadata,
    row_key,
)

SEED, N_EXAMPLES = 77, 70
WRITER = CRASH_WRITER


def child(folder, crash: str, after_files: int = 0) -> subprocess.Popen:
    code = (
        "from tests.shards_helpers import crash_child; "
        f"crash_child({str(folder)!r}, {SEED}, {N_EXAMPLES}, {crash!r}, {after_files})"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_after(folder, files: int) -> list[str]:
    """Run a child, SIGKILL it as soon as it reports `files` committed files."""
    proc = child(folder, "external")
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() == f"committed {files}":
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (lines, proc.stderr.read())
    return lines


def crash_at(folder, crash: str, after_files: int) -> None:
    proc = child(folder, crash, after_files)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (out, err)
    assert out.split() == [w for i in range(1, after_files + 1) for w in ("committed", str(i))]


def debris(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def unlisted(folder) -> list[str]:
    listed = {f.name for f in load_manifest(folder).files}
    return sorted(p.name for p in folder.glob("part-*.arrow") if p.name not in listed)


def resume(folder) -> set[str]:
    """What a restarted precompute does: skip completed examples, write the others."""
    with ShardWriter(folder, metadata(), **WRITER) as w:
        done = w.completed_ids()
        for rows in make_examples(SEED, N_EXAMPLES):
            if rows[0].id not in done:
                w.add(rows)
    return done


def check_final(folder, committed_before: dict[str, str]) -> None:
    examples = make_examples(SEED, N_EXAMPLES)
    want = {(r.id, r.sample_index): r for rows in examples for r in rows}
    rows = list(read_rows(folder))
    counts = Counter(row_key(r) for r in rows)
    assert set(counts) == set(want)
    assert max(counts.values()) == 1  # every (id, sample) exactly once
    cb = metadata().codebook
    for r in rows:
        assert_row_matches(r, want[row_key(r)], cb)
    assert debris(folder) == []
    assert unlisted(folder) == []
    after = file_digests(folder)
    for name, digest in committed_before.items():
        assert after[name] == digest, f"{name} was rewritten"
    manifest = load_manifest(folder)
    assert manifest.rows == len(want)
    sf = ShardFolder(folder)
    for fi in range(len(manifest.files)):
        sf.verify_file(fi)
    with ShardWriter(folder, metadata(), **WRITER) as w:
        assert w.completed_ids() == {rows[0].id for rows in examples}


def committed_files(folder) -> dict[str, str]:
    listed = {f.name for f in load_manifest(folder).files}
    return {n: d for n, d in file_digests(folder).items() if n in listed}


def test_reference_run_writes_many_files(tmp_path):
    """Without a crash the child writes enough files for the kills below to land mid-run."""
    proc = child(tmp_path, "none")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.split()[-1] == "finished"
    assert len(load_manifest(tmp_path).files) >= 8
    check_final(tmp_path, committed_files(tmp_path))


def test_external_sigkill_then_resume(tmp_path):
    kill_after(tmp_path, 3)
    before = committed_files(tmp_path)
    assert len(before) >= 3
    done = resume(tmp_path)
    assert 0 < len(done) < N_EXAMPLES
    check_final(tmp_path, before)


def test_two_crashes_then_resume(tmp_path):
    kill_after(tmp_path, 2)
    first = committed_files(tmp_path)
    kill_after(tmp_path, 2)  # the restarted child also dies, after 2 files of its own
    second = committed_files(tmp_path)
    assert set(first) < set(second) and all(second[n] == d for n, d in first.items())
    resume(tmp_path)
    check_final(tmp_path, second)


@pytest.mark.parametrize(
    "crash, expect",
    [
        # killed with the next file still under its temporary name
        ("in_tmp", lambda f: debris(f) == [".part-w0-00002.arrow.tmp"] and not unlisted(f)),
        # killed after the rename, before the manifest listed the file
        ("renamed", lambda f: not debris(f) and unlisted(f) == ["part-w0-00002.arrow"]),
        # killed while writing the new manifest: its temporary copy is left behind
        (
            "manifest",
            lambda f: (
                len(debris(f)) == 1
                and debris(f)[0].startswith(".manifest-w0.json.")
                and unlisted(f) == ["part-w0-00002.arrow"]
            ),
        ),
    ],
)
def test_crash_at_each_step_of_a_commit(tmp_path, crash, expect):
    crash_at(tmp_path, crash, after_files=2)
    before = committed_files(tmp_path)
    assert sorted(before) == ["part-w0-00000.arrow", "part-w0-00001.arrow"]
    assert expect(tmp_path), (debris(tmp_path), unlisted(tmp_path))
    # Opening a writer with the same id cleans up at once, before it writes anything.
    ShardWriter(tmp_path, metadata(), **WRITER).close()
    assert debris(tmp_path) == [] and unlisted(tmp_path) == []
    assert committed_files(tmp_path) == before
    resume(tmp_path)
    check_final(tmp_path, before)


def test_crash_debris_of_another_writer_is_left_alone(tmp_path):
    """A resumed writer w1 must not delete w0's files, listed or not."""
    crash_at(tmp_path, "renamed", after_files=1)
    before_unlisted = unlisted(tmp_path)
    assert before_unlisted == ["part-w0-00001.arrow"]
    rows = make_examples(5, 1)[0]
    for r in rows:
        r.id = "written-by-w1"
    with ShardWriter(tmp_path, metadata(), **{**WRITER, "writer_id": "w1"}) as w:
        w.add(rows)
    assert unlisted(tmp_path) == before_unlisted
    ShardWriter(tmp_path, metadata(), **WRITER).close()  # w0 again: cleans its own debris
    assert unlisted(tmp_path) == []

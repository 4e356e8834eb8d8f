"""ShardWriter.compact: a writer's small committed files merged into one, with the same rows
and decoded values, in one atomic commit; a crash at any step leaves a folder that reads the
same and verifies clean after the writer's next start."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shards.errors import ShardError
from shards.manifest import load_manifest
from shards.reader import read_rows
from shards.writer import ShardWriter
from tests.shards_helpers import make_examples, metadata, private_copy, row_key
from tools import shards as cli

WRITER = dict(compression_level=1, batch_tokens=200)


def canonical(folder) -> dict:
    """Every row's decoded values, the top-k sorted by id (it is a set: stored in no
    particular order, and a merged file's rank order sorts it differently)."""
    out = {}
    for r in read_rows(folder):
        ids, lps = r["topk_ids"].numpy(), r["topk_logprobs"].numpy()
        o = np.argsort(ids, axis=1)
        out[row_key(r)] = (
            np.take_along_axis(ids, o, 1).tobytes(),
            np.take_along_axis(lps, o, 1).tobytes(),
            *(r[n].numpy().tobytes() for n in ("tail_logprob", "token_logprob", "response_ids")),
            *(r[n].numpy().tobytes() for n in ("prompt_ids", "teacher_prompt_ids")),
            r["meta"],
            r["source"],
            r["thinking"],
        )
    return out


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    """One commit per example: 30 small files, as precompute's commit_every makes."""
    path = tmp_path_factory.mktemp("small")
    with ShardWriter(path, metadata(), **WRITER) as w:
        for rows in make_examples(61, 30):
            w.add(rows)
            w.flush()
    assert len(load_manifest(path).files) == 30
    return path


@pytest.fixture
def folder(small_files, tmp_path):
    return private_copy(small_files, tmp_path)


def verify_lines(capsys, folder) -> list[str]:
    assert cli.main(["verify", str(folder)]) == 0
    return capsys.readouterr().out.splitlines()


def test_compact_keeps_every_value_in_fewer_bytes(folder, capsys):
    want = canonical(folder)
    done = ShardWriter(folder, metadata(), **WRITER).completed_ids()
    before = sum(p.stat().st_size for p in folder.glob("part-*.arrow"))
    with ShardWriter(folder, metadata(), **WRITER) as w:
        new = w.compact(max_bytes=10 << 20)
    assert len(new) == 1 and [f.name for f in load_manifest(folder).files] == [new[0].name]
    assert new[0].rows == sum(1 for _ in want) and len(new[0].replaces) == 30
    after = sum(p.stat().st_size for p in folder.glob("part-*.arrow"))
    assert after < before / 2
    assert canonical(folder) == want
    assert ShardWriter(folder, metadata(), **WRITER).completed_ids() == done
    assert len(verify_lines(capsys, folder)) == 1


class Boom(BaseException):
    """Stands for a kill: nothing after it runs, no cleanup."""


@pytest.mark.parametrize("step", ["writing", "renamed", "committed"])
def test_interrupted_compact_is_undone_or_finished(folder, capsys, monkeypatch, step):
    want = canonical(folder)
    names = sorted(p.name for p in folder.glob("part-*.arrow"))
    w = ShardWriter(folder, metadata(), **WRITER)
    if step == "writing":
        import pyarrow as pa

        real = pa.ipc.RecordBatchFileWriter.write_batch

        def write_batch(self, batch, *a, **kw):
            real(self, batch, *a, **kw)
            raise Boom

        monkeypatch.setattr(pa.ipc.RecordBatchFileWriter, "write_batch", write_batch)
    elif step == "renamed":
        monkeypatch.setattr(ShardWriter, "_commit", lambda self, m: (_ for _ in ()).throw(Boom))
    else:
        monkeypatch.setattr("pathlib.Path.unlink", lambda self, **kw: (_ for _ in ()).throw(Boom))
    with pytest.raises(Boom):
        w.compact(max_bytes=10 << 20)
    monkeypatch.undo()
    w._lock.close()
    assert canonical(folder) == want  # readable as it is, before any cleanup
    listed = [f.name for f in load_manifest(folder).files]
    assert listed == (names if step != "committed" else ["part-w0-00030.arrow"])
    ShardWriter(folder, metadata(), **WRITER).close()  # the next start cleans up
    assert len(verify_lines(capsys, folder)) == 1
    assert sorted(p.name for p in folder.glob("part-*.arrow")) == sorted(listed)
    assert canonical(folder) == want


def test_dropped_record_of_a_merge_is_an_error(folder):
    with ShardWriter(folder, metadata(), **WRITER) as w:
        w.compact(max_bytes=10 << 20)
    path = folder / "manifest-w0.json"
    d = json.loads(path.read_text())
    d["files"][0]["replaces"].pop(3)
    path.write_text(json.dumps(d))
    with pytest.raises(ShardError, match="an entry was dropped|replaced"):
        list(read_rows(folder))


def test_compact_refuses_a_damaged_source(folder):
    p = sorted(folder.glob("part-*.arrow"))[4]
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))
    with ShardWriter(folder, metadata(), **WRITER) as w:
        with pytest.raises(ShardError, match="not merged") as err:
            w.compact(max_bytes=10 << 20)
    assert p.name in str(err.value)


@pytest.mark.parametrize("commits", ["one per example", "one for all"])
def test_commit_level_files_end_at_the_writers_level(tmp_path, commits):
    """Files committed at a fast commit_level (as precompute does) are merged, or rewritten
    alone, at compression_level: the folder ends with the bytes of a writer that committed
    at compression_level throughout, and the same values."""
    folders = {}
    for commit_level in (1, 12):
        path = folders[commit_level] = tmp_path / f"level{commit_level}"
        with ShardWriter(
            path, metadata(), compression_level=12, commit_level=commit_level, batch_tokens=200
        ) as w:
            for rows in make_examples(61, 30):
                w.add(rows)
                if commits == "one per example":
                    w.flush()
            w.flush()
            sizes = sum(p.stat().st_size for p in path.glob("part-*.arrow"))
            if commit_level == 1:
                fast = sizes
            else:
                assert fast > sizes  # the commit level was used (random rows: by ~1%)
            new = w.compact(max_bytes=10 << 20)
            if commit_level == 1:
                assert len(new) == 1  # merged, or rewritten alone
            elif commits == "one for all":
                assert not new  # nothing to merge: put it through the same rewrite
                w._merge(list(w._manifest.files))
    fast, slow = (sorted(folders[lv].glob("part-*.arrow")) for lv in (1, 12))
    assert len(fast) == len(slow) == 1
    assert fast[0].stat().st_size == slow[0].stat().st_size
    assert canonical(folders[1]) == canonical(folders[12])

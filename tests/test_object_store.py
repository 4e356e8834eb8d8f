"""Shard folders at s3:// URLs (#14 §2), against a local S3 server (moto) on 127.0.0.1.

One server for the module, stopped at its end; the credentials are dummies and the endpoint
is set through AWS_ENDPOINT_URL (inherited by the subprocesses), so nothing reaches AWS.
The commit protocol there: data files uploaded whole under their final name, the writer's
manifest written whole (a conditional PUT) as the commit point, debris cleaned by the same
writer id on restart.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from precompute.hf_backend import HFBackend
from precompute.run import run
from shards import hf as hf_views
from shards.errors import ShardError
from shards.manifest import load_manifest, manifest_name
from shards.reader import read_rows
from shards.storage import FsspecStorage, ManifestChanged
from shards.writer import ShardWriter
from tests.fixtures.tiny_model import build_tiny_model, tiny_model_dir
from tests.precompute_helpers import K, all_rows, cfg, questions, write_jsonl
from tests.shards_helpers import make_examples, metadata, row_key, write_examples
from tests.train_helpers import write_teacher_shards
from tools import shards as cli
from vllm_engine.teacher_server import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bucket():
    import s3fs

    # moto's server in its own process, not ThreadedMotoServer: that imports Flask into this
    # process, and vLLM's in-process engine (tests/test_student_engine.py, later in the
    # session) scans every module's globals with hasattr, which Flask's context proxies
    # answer with RuntimeError.
    host, port = "127.0.0.1", free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection((host, port), timeout=2).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.2)
    env = pytest.MonkeyPatch()
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        env.delenv(key, raising=False)
    env.setenv("AWS_ACCESS_KEY_ID", "testing")
    env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    env.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        s3fs.S3FileSystem().mkdir("kdshards")
        yield "s3://kdshards"
    finally:
        server.kill()
        server.wait()
        env.undo()
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def url(bucket) -> str:
    return f"{bucket}/{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir()


def objects(url: str) -> list[str]:
    return FsspecStorage(url).names()


def test_written_and_read_back_like_a_local_folder(url, tmp_path, capsys):
    examples = make_examples(3, 20)
    kw = dict(batch_tokens=200, target_file_bytes=12_000)
    write_examples(url, examples, **kw)
    write_examples(tmp_path / "local", examples, **kw)
    remote, local = load_manifest(url), load_manifest(tmp_path / "local")
    assert len(remote.files) > 2
    assert [(f.name, f.rows, f.batch_rows) for f in remote.files] == [
        (f.name, f.rows, f.batch_rows) for f in local.files
    ]
    # Nothing but committed objects: no temporary names on the store.
    assert objects(url) == sorted([manifest_name("w0"), *(f.name for f in remote.files)])
    got = {row_key(r): r for r in read_rows(url)}
    want = {row_key(r): r for r in read_rows(tmp_path / "local")}
    assert got.keys() == want.keys()
    for key, r in want.items():
        for name in ("response_ids", "topk_ids", "topk_logprobs", "tail_logprob"):
            np.testing.assert_array_equal(got[key][name].numpy(), r[name].numpy())
    assert cli.main(["verify", url]) == 0
    assert capsys.readouterr().out.startswith("ok:")
    # The decoded `datasets` views read the URL too.
    assert len(hf_views.load(url)) == remote.rows
    assert sum(1 for _ in hf_views.load(url, streaming=True)) == remote.rows


def test_manifest_write_is_conditional(url):
    """The commit is a conditional PUT: a store that did not write the current manifest
    cannot overwrite it, whatever bytes it expects."""
    a, b = FsspecStorage(url), FsspecStorage(url)
    a.write_if("manifest-w9.json", b"one", None)
    with pytest.raises(ManifestChanged):
        b.write_if("manifest-w9.json", b"two", None)  # If-None-Match: it exists
    b.write_if("manifest-w9.json", b"two", b"one")  # b read what is there: allowed
    with pytest.raises(ManifestChanged):
        a.write_if("manifest-w9.json", b"three", b"one")  # If-Match: a's ETag is stale
    assert a.read("manifest-w9.json") == b"two"


def test_second_process_as_one_writer_is_refused(url):
    """No lock on an object store: the second writer's commit makes the first one's fail,
    instead of silently dropping it."""
    first = ShardWriter(url, metadata(), batch_tokens=50, compression_level=1)
    rows = make_examples(0, 3)
    first.add(rows[0])
    first.flush()
    second = ShardWriter(url, metadata(), batch_tokens=50, compression_level=1)
    second.add(rows[1])
    second.flush()
    first.add(rows[2])
    with pytest.raises(ShardError, match="another process is writing as writer 'w0'"):
        first.flush()
    second.close()
    assert sorted({r["id"] for r in read_rows(url)}) == [rows[0][0].id, rows[1][0].id]


def test_debris_is_cleaned_by_the_same_writer(url, capsys):
    write_examples(url, make_examples(1, 4), batch_tokens=200)
    store = FsspecStorage(url)
    store.write("part-w0-00007.arrow", b"an upload past the last commit")
    store.write("part-w1-00000.arrow", b"another writer's: not w0's to delete")
    # w0's upload past its last commit is debris; a file of a writer without any manifest
    # is committed data whose manifest was lost: an error (shards.manifest.check_listing).
    assert cli.main(["verify", url]) == 1
    out = capsys.readouterr().out
    assert "WARN part-w0-00007.arrow" in out
    assert "part-w1-00000.arrow" in out and "has no manifest" in out
    ShardWriter(url, metadata(), compression_level=1).close()
    names = objects(url)
    assert "part-w0-00007.arrow" not in names and "part-w1-00000.arrow" in names


def test_precompute_writes_there_and_tools_read_it(tiny, url, tmp_path, capsys):
    data = write_jsonl(tmp_path / "q.jsonl", questions(8) + ["{oops"])
    hf = HFBackend(str(tiny), K, batch_size=8)
    c = cfg(tiny, data, url, "skip_invalid=true", "sampling.temperature=0")
    run(c, backend=hf)
    run(cfg(tiny, data, tmp_path / "local", "skip_invalid=true", "sampling.temperature=0"), hf)
    rows, local = all_rows(url), all_rows(tmp_path / "local")
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in local)
    by_id = {r["id"]: r for r in local}
    for r in rows:
        assert r["response_ids"].tolist() == by_id[r["id"]]["response_ids"].tolist()
    assert sorted(e.kind for e in load_manifest(url).extras) == ["precompute_config", "rejects"]
    assert cli.main(["verify", url]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("ok:")
    assert cli.main(["stats", url, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rows"] == 8 and stats["folder"] == url and stats["bytes_on_disk"] > 0
    out = tmp_path / "topk.parquet"
    assert cli.main(["export", url, "--format", "parquet", "--out", str(out)]) == 0
    import pyarrow.parquet as pq

    assert pq.read_metadata(out).num_rows == 8


@pytest.mark.slow
def test_resume_after_kill_9(tiny, url, tmp_path, capsys):
    """A precompute writing to S3 killed mid-run, then re-run: nothing lost or duplicated,
    committed objects untouched, no debris left."""
    data = write_jsonl(tmp_path / "q.jsonl", questions(30))
    args = [
        *(sys.executable, "-m", "precompute", "--config", "", "--teacher", str(tiny)),
        *("--data", str(data), "--k", str(K), "--backend", "hf", "--no-progress", "--out", url),
        *("commit_every=2", "sampling.temperature=0", "sampling.max_tokens=12"),
        "hf.batch_size=2",
    ]
    proc = subprocess.Popen(
        args, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            m = load_manifest(url, missing_ok=True)
            if m is not None and len(m.files) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {f.name: f.sha256 for f in load_manifest(url).files}
    assert 0 < len(before) < 15
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    manifest = load_manifest(url)
    after = {f.name: f.sha256 for f in manifest.files}
    assert all(after[n] == h for n, h in before.items())
    rows = all_rows(url)
    assert len(rows) == 30 and len({r["id"] for r in rows}) == 30
    listed = {e.name for e in (*manifest.files, *manifest.extras)} | {manifest_name("w0")}
    assert set(objects(url)) == listed
    assert cli.main(["verify", url]) == 0
    assert capsys.readouterr().out.startswith("ok:")


@pytest.mark.slow
def test_training_streams_from_s3(tiny, url, tmp_path):
    """python -m train with data.shards=s3://...: the same steps and losses as from the
    same files on local disk (DataLoader workers each open the store themselves)."""
    import fsspec

    local = write_teacher_shards(tmp_path / "s", tiny, examples=24)
    fs, path = fsspec.core.url_to_fs(url)
    fs.put(f"{local}/", path, recursive=True)
    student = build_tiny_model(tmp_path / "student", seed=7)

    def train(shards: str, out: str) -> list[tuple]:
        args = [
            *(sys.executable, "-m", "train", "configs/train/skd.yaml"),
            *(f"model.path={student}", f"data.shards={shards}", f"out_dir={out}"),
            *("data.batch_tokens=256", "data.sort_window=8", "data.num_workers=1"),
            *("optim.warmup_steps=0", "max_steps=4", "save_every=4"),
        ]
        done = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        with open(f"{out}/metrics.jsonl") as f:
            log = [json.loads(line) for line in f]
        return [(r["step"], r["loss"], r["tokens"]) for r in log]

    remote = train(url, str(tmp_path / "remote"))
    assert [s for s, _, _ in remote] == [1, 2, 3, 4]
    assert remote == train(str(local), str(tmp_path / "local"))


def test_other_fsspec_stores_take_the_generic_path(tmp_path):
    """A store without conditional PUTs (fsspec's memory://, standing in for gs:// and
    others here): the same files, a read-compare-write commit, create-only uploads."""
    url = f"memory://kdshards/{uuid.uuid4().hex[:8]}"
    examples = make_examples(5, 8)
    write_examples(url, examples, batch_tokens=200, target_file_bytes=12_000)
    assert len({row_key(r) for r in read_rows(url)}) == sum(map(len, examples))
    first = ShardWriter(url, metadata(), compression_level=1)
    second = ShardWriter(url, metadata(), compression_level=1)
    second.add(make_examples(6, 1)[0])
    second.flush()
    first.add(make_examples(7, 1)[0])
    with pytest.raises(ShardError, match="another process is writing as writer 'w0'"):
        first.flush()

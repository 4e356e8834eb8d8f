"""Precompute as Ray tasks on a local Ray cluster (one per module, 2 CPUs): every example
exactly once, a worker killed mid-run is retried and resumes, a finished folder is left
alone. The transformers backend keeps the workers' start-up short; the last test runs the
real vLLM engine, one per worker."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from vllm_engine.env import default_kvcache_space  # noqa: E402

ray = pytest.importorskip("ray")
# Passed on to the workers (precompute.ray_runner.FORWARD_ENV).
default_kvcache_space()
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

from precompute.__main__ import main  # noqa: E402
from precompute.jobs import run_job  # noqa: E402
from shards.manifest import load_manifest  # noqa: E402
from tests.fixtures.tiny_model import tiny_model_dir  # noqa: E402
from tests.precompute_helpers import (  # noqa: E402
    all_rows,
    cfg,
    kill_after_first_commit,
    questions,
    write_jsonl,
)


@pytest.fixture(scope="module")
def cluster():
    # Ray's socket paths must stay under 108 bytes: a short folder, not pytest's tmp_path.
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir()


def data(tmp_path, n):
    rows = [{**q, "id": f"q{i}"} for i, q in enumerate(questions(n))]
    return write_jsonl(tmp_path / "q.jsonl", rows), {r["id"] for r in rows}


def ray_cfg(tiny, path, out, *extra):
    return cfg(
        tiny, path, out, "backend=hf", "ray=true", "num_workers=2", "sampling.temperature=0", *extra
    )


def attempts(events, worker):
    return list(dict.fromkeys(ev["attempt"] for ev in events if ev["worker"] == worker))


def test_ray_workers_write_every_example_once(cluster, tiny, tmp_path, capfd):
    path, ids = data(tmp_path, 12)
    out = tmp_path / "out"
    events = []
    s = run_job(ray_cfg(tiny, path, out, "commit_every=2"), on_event=events.append)
    got = [r["id"] for r in all_rows(out)]
    assert sorted(got) == sorted(ids)  # each input id exactly once
    assert {f.writer for f in load_manifest(out).files} == {"w0", "w1"}
    assert (s.examples, s.rows, s.skipped_done) == (12, 12, 0)
    assert s.tokens == sum(len(r["response_ids"]) for r in all_rows(out))
    # Two workers in two processes, each reporting its share before it started.
    assert {ev["pid"] for ev in events if ev["worker"] == 0}.isdisjoint(
        ev["pid"] for ev in events if ev["worker"] == 1
    )
    assert sum(ev["todo"] for ev in events if ev["summary"]["examples"] == 0) == 12

    # A second run over the finished folder (from the CLI) starts no engine, writes nothing.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    args = ["--config", "", "--teacher", str(tiny), "--data", str(path), "--out", str(out)]
    args += ["--backend", "hf", "--k", "8", "--ray", "--num-workers", "2", "--no-progress"]
    assert main([*args, "sampling.temperature=0", "sampling.max_tokens=12"]) == 0
    assert "precompute: 0 examples (12 already done)" in capfd.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.slow
def test_ray_retries_a_killed_worker_which_resumes(cluster, tiny, tmp_path):
    path, ids = data(tmp_path, 24)
    out = tmp_path / "out"
    events = []
    hook = kill_after_first_commit(0, events)
    s = run_job(ray_cfg(tiny, path, out, "commit_every=1", "sampling.max_tokens=48"), on_event=hook)
    first, *retried = attempts(events, 0)
    assert hook.killed and first == hook.killed[0]["attempt"] and len(retried) == 1
    # The retry resumed from the manifest: it found what the killed attempt had committed
    # (at least its first commit) done, and did the rest of w0's slice. Where in the slice
    # the kill lands is timing (the events reach the driver late); it may even land during
    # the end-of-run merge of files, and then the retry has nothing left to do.
    # By worker and attempt: Ray reuses worker processes, so w0's retry may run in the
    # process (the same host:pid attempt id) that has just run w1.
    w0 = [ev for ev in events if ev["worker"] == 0]
    first_ev = next(ev for ev in w0 if ev["attempt"] == first)
    resumed = next(ev for ev in w0 if ev["attempt"] == retried[0])
    assert resumed["summary"]["skipped_done"] > 0
    assert resumed["summary"]["skipped_done"] + resumed["todo"] == first_ev["todo"]
    got = [r["id"] for r in all_rows(out)]
    assert sorted(got) == sorted(ids)  # nothing lost, nothing duplicated
    assert s.examples == 24 and s.extra["attempts"] == 3


@pytest.mark.slow
def test_ray_workers_each_own_a_vllm_engine(cluster, tiny, tmp_path):
    pytest.importorskip("vllm")
    path, ids = data(tmp_path, 8)
    out = tmp_path / "out"
    c = cfg(tiny, path, out, "ray=true", "num_workers=2", "sampling.temperature=0")
    s = run_job(c)
    assert sorted(r["id"] for r in all_rows(out)) == sorted(ids)
    assert s.examples == 8 and {f.writer for f in load_manifest(out).files} == {"w0", "w1"}

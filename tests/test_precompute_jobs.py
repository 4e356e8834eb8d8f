"""A precompute job on one machine without Ray: one spawned process per worker (transformers
backend on the tiny model), a killed worker restarted, errors stopping the job."""

from __future__ import annotations

import os
import signal

import pytest

from precompute.jobs import WorkerFailed, run_job
from shards.manifest import load_manifest
from tests.fixtures.tiny_model import tiny_model_dir
from tests.precompute_helpers import (
    all_rows,
    cfg,
    kill_after_first_commit,
    questions,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir()


def local_cfg(tiny, path, out, *extra):
    return cfg(tiny, path, out, "backend=hf", "num_workers=2", "sampling.temperature=0", *extra)


@pytest.mark.slow
def test_local_workers_restart_a_killed_worker_and_finish(tiny, tmp_path):
    rows = [{**q, "id": f"q{i}"} for i, q in enumerate(questions(24))]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    out = tmp_path / "out"
    events = []
    hook = kill_after_first_commit(1, events)
    c = local_cfg(tiny, path, out, "commit_every=1", "sampling.max_tokens=32")
    s = run_job(c, on_event=hook)
    w1 = list(dict.fromkeys(ev["attempt"] for ev in events if ev["worker"] == 1))
    assert hook.killed and len(w1) == 2
    # The restart resumed from the manifest (where the kill lands in the slice is timing).
    first_ev = next(ev for ev in events if ev["attempt"] == w1[0])
    resumed = next(ev for ev in events if ev["attempt"] == w1[1])
    assert resumed["summary"]["skipped_done"] > 0
    assert resumed["summary"]["skipped_done"] + resumed["todo"] == first_ev["todo"]
    assert sorted(r["id"] for r in all_rows(out)) == sorted(r["id"] for r in rows)
    assert {f.writer for f in load_manifest(out).files} == {"w0", "w1"}
    assert s.examples == 24

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    s2 = run_job(c)
    assert (s2.examples, s2.skipped_done) == (0, 24)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_worker_error_stops_the_job_with_its_message(tiny, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [*questions(4), {"question": ""}])
    with pytest.raises(WorkerFailed, match=r"(?s)worker w0: .*q.jsonl:5: question: empty"):
        run_job(local_cfg(tiny, path, tmp_path / "out", "max_retries=0"))


def test_retries_exhausted_is_an_error(tiny, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", questions(24))

    def kill_every_attempt_of_w0(ev):
        if ev["worker"] == 0:
            os.kill(ev["pid"], signal.SIGKILL)

    c = local_cfg(tiny, path, tmp_path / "out", "commit_every=1", "max_retries=1")
    with pytest.raises(WorkerFailed, match="worker w0 exited with code -9 after 1 restarts"):
        run_job(c, on_event=kill_every_attempt_of_w0)


def test_slurm_array_task_runs_its_worker_only(tiny, tmp_path, monkeypatch):
    from precompute.__main__ import main
    from precompute.run import worker_of

    rows = [{**q, "id": f"q{i}"} for i, q in enumerate(questions(12))]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    out = tmp_path / "out"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")  # --array=1-2: the second task
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    args = ["--config", "", "--teacher", str(tiny), "--data", str(path), "--out", str(out)]
    args += ["--backend", "hf", "--k", "8", "--no-progress", "sampling.max_tokens=4"]
    assert main(args) == 0
    assert {f.writer for f in load_manifest(out).files} == {"w1"}
    assert sorted(r["id"] for r in all_rows(out)) == sorted(
        r["id"] for r in rows if worker_of(r["id"], 2) == 1
    )


def test_absolute_paths_keep_a_linked_teacher_folders_name(tmp_path, monkeypatch):
    """A Ray run makes paths absolute; the teacher's name in the metadata must stay the one
    a local run records (docs/precompute.md's `make precompute RAY=1` after `make precompute`
    with models/ linked to another folder was refused as "other settings")."""
    from precompute.config import load_config
    from precompute.launch import absolute_paths

    (tmp_path / "store" / "qwen3-abc").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "teacher").symlink_to(tmp_path / "store" / "qwen3-abc")
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(load_config(None, ["teacher=models/teacher", "student=models/teacher"]))
    assert cfg.teacher == str(tmp_path / "models" / "teacher")
    assert cfg.student == cfg.teacher
    assert absolute_paths(load_config(None, ["teacher=org/hub-name"])).teacher == "org/hub-name"

"""Where precompute's workers run: GPU groups, CPU cores, SLURM arrays, Ray cluster sizes
(pure functions, no GPU or cluster needed), and the job's progress totals."""

from __future__ import annotations

import pytest

from precompute.__main__ import resolve
from precompute.job_progress import JobProgress
from precompute.launch import (
    CPU_WORKERS,
    LaunchError,
    WorkerSlot,
    gpus_per_worker,
    local_plan,
    ray_workers,
    slurm_overrides,
    visible_gpus,
)
from precompute.run import Summary

GPUS8 = [str(i) for i in range(8)]


def test_eight_gpus_tensor_parallel_two_give_four_workers():
    plan = local_plan(0, -1, {"tensor_parallel_size": 2}, GPUS8, [0, 1])
    assert plan == [
        WorkerSlot(0, {"CUDA_VISIBLE_DEVICES": "0,1"}),
        WorkerSlot(1, {"CUDA_VISIBLE_DEVICES": "2,3"}),
        WorkerSlot(2, {"CUDA_VISIBLE_DEVICES": "4,5"}),
        WorkerSlot(3, {"CUDA_VISIBLE_DEVICES": "6,7"}),
    ]


def test_gpu_groups_follow_visible_devices_and_pipeline_parallel():
    assert gpus_per_worker({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}) == 4
    assert gpus_per_worker({}) == 1
    # CUDA_VISIBLE_DEVICES as given (ids or UUIDs), not renumbered.
    visible = visible_gpus({"CUDA_VISIBLE_DEVICES": "3,5, 6,GPU-ab"})
    assert visible == ["3", "5", "6", "GPU-ab"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    plan = local_plan(0, -1, {"tensor_parallel_size": 2}, visible, [0])
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in plan] == ["3,5", "6,GPU-ab"]
    # 7 GPUs, TP=2: three workers, the seventh GPU idle.
    plan = local_plan(0, -1, {"tensor_parallel_size": 2}, GPUS8[:7], [0])
    assert [s.index for s in plan] == [0, 1, 2]
    plan = local_plan(0, -1, {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, GPUS8, [])
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in plan] == ["0,1,2,3", "4,5,6,7"]


def test_gpu_plan_with_an_explicit_count_or_index():
    tp2 = {"tensor_parallel_size": 2}
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in local_plan(2, -1, tp2, GPUS8, [])] == [
        "0,1",
        "2,3",
    ]
    # One worker: runs in this process on the visible GPUs; so does an explicit index.
    assert local_plan(1, -1, tp2, GPUS8, []) == [WorkerSlot(0)]
    assert local_plan(0, -1, {"tensor_parallel_size": 8}, GPUS8, []) == [WorkerSlot(0)]
    assert local_plan(4, 3, tp2, GPUS8, []) == [WorkerSlot(3)]
    with pytest.raises(LaunchError, match="5 worker.* need 10 GPUs, 8 visible"):
        local_plan(5, -1, tp2, GPUS8, [])
    with pytest.raises(LaunchError, match="need 4 GPUs, 2 visible"):
        local_plan(0, -1, {"tensor_parallel_size": 4}, GPUS8[:2], [])


def test_cpu_plan_gives_each_worker_its_own_cores():
    assert len(local_plan(0, -1, {}, [], [0, 1, 2, 3])) == CPU_WORKERS == 2  # auto
    assert local_plan(0, -1, {}, [], [0]) == [WorkerSlot(0)]  # auto: at most one per core
    assert local_plan(0, -1, {}, [], [0, 1], cpu_workers=1) == [WorkerSlot(0)]
    assert local_plan(1, -1, {}, [], [0, 1]) == [WorkerSlot(0)]
    plan = local_plan(2, -1, {}, [], [0, 1, 2, 3, 4])
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in plan] == ["0,1", "2,3"]
    assert [s.env["OMP_NUM_THREADS"] for s in plan] == ["2", "2"]
    with pytest.raises(LaunchError, match="3 CPU workers need a core each, 2 allowed"):
        local_plan(3, -1, {}, [], [0, 1])


def test_ray_worker_count_and_resources():
    tp2 = {"tensor_parallel_size": 2}
    assert ray_workers(0, tp2, 16.0, 2) == (8, {"num_gpus": 2})
    assert ray_workers(3, tp2, 16.0, 2) == (3, {"num_gpus": 2})  # more queue for GPUs
    assert ray_workers(0, {}, 0, 3) == (3, {"num_cpus": 1})  # one engine per CPU node
    assert ray_workers(2, {}, 0, 1) == (2, {"num_cpus": 1})
    with pytest.raises(LaunchError, match="needs 4 GPUs .* cluster has 2"):
        ray_workers(0, {"tensor_parallel_size": 4}, 2.0, 1)


def test_slurm_array_task_is_one_worker():
    assert slurm_overrides({}) == []
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}
    assert slurm_overrides(env) == ["num_workers=8", "worker_index=3"]
    # --array=1-8 and --array=0-14:2: the position in the array.
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1"}
    assert slurm_overrides(env) == ["num_workers=8", "worker_index=0"]
    env = {
        "SLURM_ARRAY_TASK_ID": "14",
        "SLURM_ARRAY_TASK_COUNT": "8",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_STEP": "2",
    }
    assert slurm_overrides(env) == ["num_workers=8", "worker_index=7"]
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_COUNT is not"):
        slurm_overrides({"SLURM_ARRAY_TASK_ID": "0"})
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID=9 is not one of the 8 tasks"):
        slurm_overrides({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "8"})


def test_slurm_environment_sets_the_split_and_flags_win(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "6")
    monkeypatch.delenv("SLURM_ARRAY_TASK_MIN", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_STEP", raising=False)
    _, c = resolve(["--config", ""])
    assert (c.num_workers, c.worker_index) == (6, 5)
    _, c = resolve(["--config", "", "--worker-index", "1"])
    assert (c.num_workers, c.worker_index) == (6, 1)
    _, c = resolve(["--config", "", "--num-workers", "2", "worker_index=0"])
    assert (c.num_workers, c.worker_index) == (2, 0)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    _, c = resolve(["--config", ""])
    assert (c.num_workers, c.worker_index, c.ray) == (0, -1, False)


def test_config_refuses_bad_worker_settings():
    with pytest.raises(ValueError, match="worker_index must be -1 .* num_workers=2"):
        resolve(["--config", "", "--num-workers", "2", "--worker-index", "2"])
    with pytest.raises(ValueError, match="worker_index must be -1"):
        resolve(["--config", "", "--worker-index", "0"])  # a split needs its size
    with pytest.raises(ValueError, match="ray runs every worker"):
        resolve(["--config", "", "--ray", "--num-workers", "2", "--worker-index", "0"])
    _, c = resolve(["--config", "", "--ray", "max_retries=1"])
    assert c.ray and c.max_retries == 1


def _ev(worker, attempt, todo, examples, rows, tokens, done=0, rejects=0, cut=0):
    s = Summary(examples=examples, rows=rows, tokens=tokens, skipped_done=done, rejects=rejects)
    s.cut, s.max_tokens = cut, 64
    from dataclasses import asdict

    return {"worker": worker, "attempt": attempt, "todo": todo, "summary": asdict(s)}


def test_job_progress_sums_attempts_of_restarted_workers():
    job = JobProgress(2, enabled=False)
    job.update(_ev(0, "h:1", 10, 0, 0, 0, done=2, rejects=1))
    job.update(_ev(0, "h:1", 10, 4, 8, 80, done=2, rejects=1, cut=3))
    assert (job.total, job.done) == (10, 4)
    job.update(_ev(1, "h:2", 6, 6, 12, 60, cut=1))
    assert (job.total, job.done) == (16, 10)
    # w0 was killed after 4 committed examples; its new attempt finds 2 + 4 done, 6 to do.
    job.update(_ev(0, "h:3", 6, 0, 0, 0, done=6, rejects=1))
    assert (job.total, job.done) == (16, 10)
    job.update(_ev(0, "h:3", 6, 6, 12, 120, done=6, rejects=1, cut=2))
    s = job.summary()
    assert (s.examples, s.rows, s.tokens, s.skipped_done, s.rejects) == (16, 32, 260, 2, 1)
    assert (s.cut, s.max_tokens) == (6, 64)  # cut rows of every attempt's committed rows
    assert ", 32 rows (6 cut at max_tokens=64), 260 tokens," in s.text()
    assert s.extra == {"workers": 2, "attempts": 3}
    job.close()

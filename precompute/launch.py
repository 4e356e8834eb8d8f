"""Where precompute's workers run: how many, and which GPUs or CPU cores each one gets.

Pure functions (no GPU, no Ray needed) so that the arithmetic is tested on any machine:

- `slurm_overrides`: in a SLURM job array, task I of N is worker I of N.
- `local_plan`: one machine; one worker per group of tensor x pipeline parallel GPUs
  (8 GPUs, TP=2: 4 workers, CUDA_VISIBLE_DEVICES=0,1 / 2,3 / 4,5 / 6,7), or on a CPU
  `CPU_WORKERS` vLLM workers, each engine bound to its own cores.
- `ray_workers`: how many workers a Ray cluster holds, and each one's resources.
- `worker_engine`, `local_gpus`, `absolute_paths`: a config's worker settings, for the local
  launcher (precompute/jobs.py) and the Ray one (precompute/ray_runner.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from precompute.config import PrecomputeConfig

# vLLM workers on a CPU-only machine when num_workers=0 (auto). One vLLM CPU engine runs its
# model on one core and keeps one for its scheduler; on 2 cores two workers, each engine
# bound to its own core, finish the default data sooner than one (figures in BENCHMARKS.md,
# "Precompute workers on one machine"). Never more than the allowed cores.
CPU_WORKERS = 2


class LaunchError(ValueError):
    """The workers asked for do not fit the machine or the cluster."""


@dataclass(frozen=True)
class WorkerSlot:
    index: int
    # Set in the worker's process before it imports torch or vLLM.
    env: dict[str, str] = field(default_factory=dict)


def slurm_overrides(env: Mapping[str, str]) -> list[str]:
    """`num_workers=N`, `worker_index=I` from a SLURM array task's environment, or [].

    The index is the task's position in the array (`--array=1-8` and `--array=0-14:2` give
    0..7), so any array of N tasks splits the data N ways."""
    task = env.get("SLURM_ARRAY_TASK_ID")
    if task is None:
        return []
    where = f"SLURM_ARRAY_TASK_ID={task}"
    try:
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", "1"))
        offset = int(task) - first
    except KeyError:
        raise ValueError(f"{where} is set but SLURM_ARRAY_TASK_COUNT is not") from None
    except ValueError as e:
        raise ValueError(f"{where}: SLURM array variables must be integers ({e})") from None
    if step < 1 or offset % step or not 0 <= offset // step < count:
        raise ValueError(
            f"{where} is not one of the {count} tasks from SLURM_ARRAY_TASK_MIN={first} in "
            f"steps of {step}; use --array=A-B[:S], or pass --num-workers and --worker-index"
        )
    return [f"num_workers={count}", f"worker_index={offset // step}"]


def gpus_per_worker(engine: Mapping) -> int:
    """GPUs one vLLM engine uses: tensor x pipeline parallel size."""
    return int(engine.get("tensor_parallel_size", 1)) * int(engine.get("pipeline_parallel_size", 1))


def visible_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES entries ([] without CUDA)."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    try:
        import torch
    except ImportError:
        return []
    # device_count asks NVML and leaves CUDA uninitialized for the engine in this process.
    return [str(i) for i in range(torch.cuda.device_count())]


def allowed_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _groups(items: list, size: int) -> list[list]:
    return [items[i * size : (i + 1) * size] for i in range(len(items) // size)]


def local_plan(
    num_workers: int,
    worker_index: int,
    engine: Mapping,
    gpus: list[str],
    cpus: list[int],
    cpu_workers: int = CPU_WORKERS,
) -> list[WorkerSlot]:
    """The workers one launch on this machine runs, each with its environment.

    worker_index >= 0 (a flag or a SLURM array task): just that worker, on every visible
    device. Otherwise every worker of the split: num_workers of them, or with 0 (auto) one
    per GPU group, or on a machine without GPUs `cpu_workers` (at most one per core)."""
    if worker_index >= 0:
        return [WorkerSlot(worker_index)]
    if gpus:
        per = gpus_per_worker(engine)
        groups = _groups(gpus, per)
        n = num_workers or len(groups)
        if not groups or n > len(groups):
            raise LaunchError(
                f"{max(n, 1)} worker(s) x {per} GPUs (tensor x pipeline parallel) need "
                f"{max(n, 1) * per} GPUs, {len(gpus)} visible ({','.join(gpus)}); lower "
                "num_workers or engine.tensor_parallel_size"
            )
        if n == 1:
            return [WorkerSlot(0)]
        return [WorkerSlot(i, {"CUDA_VISIBLE_DEVICES": ",".join(groups[i])}) for i in range(n)]
    n = num_workers or max(1, min(cpu_workers, len(cpus)))
    if n == 1:
        return [WorkerSlot(0)]
    if n > len(cpus):
        raise LaunchError(f"{n} CPU workers need a core each, {len(cpus)} allowed")
    # Without distinct cores every engine would bind its threads to the same ones.
    groups = _groups(cpus, len(cpus) // n)
    return [
        WorkerSlot(
            i,
            {
                "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, groups[i])),
                "OMP_NUM_THREADS": str(len(groups[i])),
            },
        )
        for i in range(n)
    ]


def ray_workers(
    num_workers: int,
    engine: Mapping,
    cluster_gpus: float,
    cluster_nodes: int,
) -> tuple[int, dict]:
    """(workers, Ray resources of one worker) on a cluster with these GPUs and alive nodes.

    With GPUs each worker holds its engine's tensor x pipeline parallel GPUs, and auto makes
    as many workers as fit; without, each holds one CPU and auto gives one per node (a vLLM
    CPU engine binds its threads to the node's cores by itself, so two on a node would share
    them: ask for more with num_workers and pin them with VLLM_CPU_OMP_THREADS_BIND)."""
    if cluster_gpus > 0:
        per = gpus_per_worker(engine)
        fit = int(cluster_gpus) // per
        if fit == 0:
            raise LaunchError(
                f"one worker needs {per} GPUs (tensor x pipeline parallel), the Ray cluster "
                f"has {cluster_gpus:g}"
            )
        return num_workers or fit, {"num_gpus": per}
    return num_workers or cluster_nodes, {"num_cpus": 1}


# ---- a config's worker settings ----------------------------------------------------------


def worker_engine(cfg: PrecomputeConfig) -> dict:
    """The engine arguments that size one worker (its GPUs: tensor x pipeline parallel)."""
    return cfg.engine if cfg.backend == "vllm" else {}


def local_gpus(cfg: PrecomputeConfig) -> list[str]:
    """The GPUs this machine gives the workers ([] for transformers on the CPU)."""
    if cfg.backend == "hf" and not cfg.hf.device.startswith("cuda"):
        return []
    return visible_gpus()


def absolute_paths(cfg: PrecomputeConfig) -> PrecomputeConfig:
    """Paths that do not depend on the worker's working directory (Ray workers have their
    own); the model folders only when they exist here, as they may name a hub model.
    Symlinks are kept (abspath, not resolve): the metadata records the teacher folder's name,
    and a linked models/ folder must give the same name as a local run's."""

    def local(p: str) -> str:
        return os.path.abspath(p) if p and Path(p).exists() else p

    return replace(
        cfg,
        out=str(Path(cfg.out).resolve()),
        teacher=local(cfg.teacher),
        student=local(cfg.student),
        data=replace(cfg.data, path=local(cfg.data.path)),
    )

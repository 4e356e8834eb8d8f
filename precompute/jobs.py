"""Run a whole precompute job: every worker of the split, on this machine or on Ray.

`run_job(cfg)` is what `python -m precompute` calls:
- worker_index >= 0 (--worker-index, or a SLURM array task): that one worker, here;
- ray=true: every worker as a Ray task (precompute/ray_runner.py);
- otherwise the workers of `launch.local_plan`: one in this process, or one spawned child
  process each, with its GPU group or CPU cores in its environment. A child killed by a
  signal is started again (up to max_retries times) and resumes its slice from the manifest.

Every worker writes as `w{I}` into the one shard folder with the writer's commit protocol, so
workers never write the same file, and a restarted worker skips what any worker committed.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import time
import traceback
from dataclasses import replace

from precompute.config import PrecomputeConfig
from precompute.errors import WorkerFailed, error_lines, expected_errors
from precompute.job_progress import JobProgress, event, reporter
from precompute.launch import (
    CPU_WORKERS,
    WorkerSlot,
    allowed_cpus,
    local_gpus,
    local_plan,
    worker_engine,
)
from precompute.ray_runner import run_ray
from precompute.rollout import run_rollout
from precompute.run import Summary, check_required, run


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_job(cfg: PrecomputeConfig, log=None, on_event=None) -> Summary:
    """Run every worker of `cfg` (or the one `cfg.worker_index` names) to the end.

    `on_event(ev)` sees each progress event (tests use it to kill a worker mid-run)."""
    log = log or _stderr
    check_required(cfg)  # before any worker starts
    if cfg.mode == "rollout":  # one worker, in this process (config.validate_rollout)
        return run_rollout(replace(cfg, num_workers=1, worker_index=0), log=log)
    if cfg.ray:
        return run_ray(cfg, log, on_event)
    # The CPU default was measured with vLLM's engine; transformers uses every core itself.
    cpu_workers = CPU_WORKERS if cfg.backend == "vllm" else 1
    slots = local_plan(
        cfg.num_workers,
        cfg.worker_index,
        worker_engine(cfg),
        local_gpus(cfg),
        allowed_cpus(),
        cpu_workers,
    )
    if len(slots) == 1 and not slots[0].env:
        return run(cfg, log=log)
    return _run_local(cfg, slots, log, on_event)


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the launcher dies, so that a killed job
    leaves no workers behind."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _local_worker(cfg: PrecomputeConfig, env: dict, queue) -> None:
    """A spawned child: one worker, with its devices set before torch or vLLM load."""
    os.environ.update(env)
    _die_with_parent()
    i = cfg.worker_index
    try:
        summary = run(cfg, log=lambda m: _stderr(f"[w{i}] {m}"), progress=reporter(queue.put, i))
    except expected_errors() as e:  # the same lines as a one-worker run, no traceback
        queue.put({"worker": i, "error": error_lines(e, cfg.out)})
        raise SystemExit(1) from None
    except Exception as e:
        traceback.print_exc()
        queue.put({"worker": i, "error": [f"{type(e).__name__}: {e}"]})
        raise SystemExit(1) from None
    queue.put(event(i, summary, 0))


def _run_local(cfg: PrecomputeConfig, slots: list[WorkerSlot], log, on_event) -> Summary:
    ctx = multiprocessing.get_context("spawn")  # vLLM and CUDA do not survive fork
    # A SimpleQueue writes each event to the pipe in put(): no feeder thread, which a
    # multiprocessing.Queue joins at the child's exit and which was seen to hang there (the
    # child waiting for its feeder, the feeder for data) under load.
    queue = ctx.SimpleQueue()
    n = len(slots)
    log(
        f"precompute: {n} local workers: "
        + "; ".join(f"w{s.index} " + " ".join(f"{k}={v}" for k, v in s.env.items()) for s in slots)
    )
    job = JobProgress(n, cfg.progress)
    procs: dict[int, multiprocessing.Process] = {}
    restarts = dict.fromkeys((s.index for s in slots), 0)

    def start(slot: WorkerSlot) -> None:
        wcfg = replace(cfg, num_workers=n, worker_index=slot.index, progress=False)
        p = ctx.Process(
            target=_local_worker, args=(wcfg, slot.env, queue), name=f"precompute-w{slot.index}"
        )
        p.start()
        procs[slot.index] = p

    def drain(wait: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            if queue.empty():
                if time.monotonic() >= deadline:
                    return
                time.sleep(0.02)
                continue
            ev = queue.get()
            deadline = 0.0  # after the first event, take what is there without waiting
            if "error" in ev:
                raise WorkerFailed.of(ev["worker"], ev["error"])
            job.update(ev)
            if on_event is not None:
                on_event(ev)

    by_index = {s.index: s for s in slots}
    try:
        for s in slots:
            start(s)
        while procs:
            drain(0.2)
            for i, p in list(procs.items()):
                if p.is_alive():
                    continue
                p.join()
                del procs[i]
                drain(0)  # its last events, or its error
                if p.exitcode == 0:
                    continue
                if p.exitcode < 0 and restarts[i] < cfg.max_retries:
                    restarts[i] += 1
                    log(
                        f"precompute: worker w{i} died (signal {-p.exitcode}); restart "
                        f"{restarts[i]}/{cfg.max_retries}, resuming from the manifest"
                    )
                    start(by_index[i])
                    continue
                raise WorkerFailed(
                    f"worker w{i} exited with code {p.exitcode}"
                    + (f" after {restarts[i]} restarts" if restarts[i] else "")
                )
        drain(0)
    finally:
        for p in procs.values():
            p.kill()
            p.join()
        job.close()
    summary = job.summary()
    log(f"{summary.text()} ({n} workers)")
    return summary

"""Precompute on a Ray cluster: each worker of the split is one Ray task owning one engine.

`python -m precompute --ray` connects to the cluster at RAY_ADDRESS (`ray start --head` /
`ray start --address=...` on each node), or starts a local one for the job. A task asks
for its engine's tensor x pipeline parallel GPUs (`num_gpus`; one CPU on a cluster without
GPUs), so Ray places the workers and sets each one's CUDA_VISIBLE_DEVICES; vLLM then runs
the engine's tensor-parallel ranks as processes on those GPUs (a worker stays on one node).
Every node needs kdshards installed and the shard folder (and the data, the teacher) on a
shared filesystem at the same path.

A task whose process dies (killed, out of memory, node lost) is retried by Ray up to
`max_retries` times; the retried worker resumes its slice from the manifest. An error raised
by a worker (bad input, a refused folder) is not retried: the job stops with it. Workers
report progress through a Ray queue to this driver, which shows the job's bar.
"""

from __future__ import annotations

import os
from dataclasses import replace

from precompute.config import PrecomputeConfig
from precompute.errors import WorkerFailed, error_lines
from precompute.job_progress import JobProgress, event, reporter
from precompute.launch import absolute_paths, ray_workers, worker_engine
from precompute.run import Summary, run

# Environment the driver passes on to the workers (vLLM's KV cache size, logging, caches).
FORWARD_ENV = ("VLLM_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")


def _worker(cfg: PrecomputeConfig, queue) -> None:
    i = cfg.worker_index
    summary = run(
        cfg, log=lambda m: print(f"[w{i}] {m}", flush=True), progress=reporter(queue.put, i)
    )
    queue.put(event(i, summary, 0))


def run_ray(cfg: PrecomputeConfig, log, on_event=None) -> Summary:
    import ray
    from ray.util.queue import Queue

    own_cluster = not ray.is_initialized()
    if own_cluster:
        ray.init()  # RAY_ADDRESS if set, else a cluster on this machine for this job
    queue = job = None
    refs: dict = {}
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        n, resources = ray_workers(
            cfg.num_workers, worker_engine(cfg), ray.cluster_resources().get("GPU", 0), len(alive)
        )
        log(
            f"precompute: {n} Ray workers on {len(alive)} node(s), each with "
            + ", ".join(f"{k}={v}" for k, v in resources.items())
        )
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV)}
        task = ray.remote(_worker).options(
            max_retries=cfg.max_retries,
            retry_exceptions=False,
            runtime_env={"env_vars": env},
            **resources,
        )
        queue = Queue(actor_options={"num_cpus": 0})
        base = absolute_paths(cfg)
        refs = {
            task.remote(replace(base, num_workers=n, worker_index=i, progress=False), queue): i
            for i in range(n)
        }
        job = JobProgress(n, cfg.progress)

        def drain() -> None:
            if queue.qsize():
                for ev in queue.get_nowait_batch(queue.qsize()):
                    job.update(ev)
                    if on_event is not None:
                        on_event(ev)

        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            drain()
            for ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    # Worded as a one-worker run words it.
                    raise WorkerFailed.of(refs[ref], error_lines(e.cause, cfg.out)) from None
                except ray.exceptions.RayError as e:
                    raise WorkerFailed(
                        f"worker w{refs[ref]} died {cfg.max_retries + 1} times: {e}"
                    ) from None
        drain()
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    finally:
        if job is not None:
            job.close()
        if queue is not None:
            queue.shutdown()
        if own_cluster:
            ray.shutdown()
    summary = job.summary()
    log(f"{summary.text()} ({n} Ray workers)")
    return summary

"""Progress of a whole job, from the reports of its workers (local processes or Ray tasks).

A worker reports `event(worker, summary, todo)` after it has found what is left to do and
after every commit (`precompute.run.run(progress=...)`); an event is a plain dict, so it
crosses a multiprocessing or Ray queue. Each run of a worker is one attempt (host:pid): a
restarted worker starts a new attempt and resumes from the manifest, so what an attempt
reports is committed and the job's totals are the sums over all attempts.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import asdict

from precompute.run import Summary
from runtime.progress import progress


def event(worker: int, summary: Summary, todo: int) -> dict:
    return {
        "worker": worker,
        "attempt": f"{socket.gethostname()}:{os.getpid()}",
        "pid": os.getpid(),
        "todo": todo,
        "summary": asdict(summary),
    }


def reporter(put, worker: int):
    """A `run(progress=...)` callback that sends this worker's events with `put`."""
    return lambda summary, todo: put(event(worker, summary, todo))


class JobProgress:
    """The job's progress bar (runtime/progress.py): examples done of the job's total, rows,
    tokens/s and ETA.

    The total is known per worker once it reports its first event (a worker that starts
    later adds its share)."""

    def __init__(self, workers: int, enabled: bool = True):
        self.workers = workers
        self.t0 = time.time()
        self.todo: dict[int, int] = {}  # worker -> examples it had left at its first report
        self.done_before: dict[int, int] = {}  # worker -> examples committed before this job
        self.attempts: dict[tuple[int, str], dict] = {}  # latest summary of each attempt
        self.total = self.done = 0  # examples of this job: all, committed
        # A bar on a terminal; in a log (a cluster job's stdout) a plain line now and then.
        self.bar = progress(0, "precompute", "ex", file=sys.stderr, disable=not enabled)

    def update(self, ev: dict) -> None:
        w = ev["worker"]
        if w not in self.todo:
            self.todo[w] = ev["todo"]
            self.done_before[w] = ev["summary"]["skipped_done"]
            self.total = sum(self.todo.values())
            self.bar.total = self.total
        self.attempts[(w, ev["attempt"])] = ev["summary"]
        totals = self.totals()
        self.bar.update(totals["examples"] - self.done)
        self.done = totals["examples"]
        self.bar.set_postfix(
            rows=totals["rows"],
            tok_s=f"{totals['tokens'] / self.engine_s():.0f}" if self.engine_s() else 0,
            workers=f"{len(self.todo)}/{self.workers}",
        )

    def engine_s(self) -> float:
        """Teacher seconds of the job: the workers run at once, so the longest worker's."""
        per_worker: dict[int, float] = {}
        for (w, _), s in self.attempts.items():
            per_worker[w] = per_worker.get(w, 0.0) + s["engine_s"]
        return max(per_worker.values(), default=0.0)

    def totals(self) -> dict:
        t = {"examples": 0, "rows": 0, "tokens": 0}
        for s in self.attempts.values():
            for key in t:
                t[key] += s[key]
        return t

    def summary(self) -> Summary:
        """The job's summary: sums over all attempts; rejects once per worker (every attempt
        finds the same); teacher time of the longest worker."""
        out = Summary()
        per_attempt = ("examples", "rows", "tokens", "files", "bytes", "cut")
        per_attempt += ("retokenize_mismatches",)
        rejects: dict[int, int] = {}
        for (w, _), s in self.attempts.items():
            for key in per_attempt:
                setattr(out, key, getattr(out, key) + s[key])
            rejects[w] = max(rejects.get(w, 0), s["rejects"])
        out.rejects = sum(rejects.values())
        # Every worker resolves the same limit from the same config and model.
        out.max_tokens = max((s["max_tokens"] for s in self.attempts.values()), default=0)
        out.skipped_done = sum(self.done_before.values())
        out.wall_s = time.time() - self.t0
        out.engine_s = self.engine_s()
        out.extra = {"workers": self.workers, "attempts": len(self.attempts)}
        return out

    def close(self) -> None:
        self.bar.close()

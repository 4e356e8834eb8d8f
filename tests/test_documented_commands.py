"""Every shell command that README.md and docs/*.md tell a user to type is tried (#19 §6).

tests/doc_commands.py says which fences count and how a block splits into commands. Each
command is one test (id: file:line), run in document order with `bash -c` in one workspace
that lives for the module, so `make train` finds the shards `make precompute` wrote. The
workspace links the checkout's code, configs and Makefile and holds its own models/, data/,
out/, runs/ and reports/:

- FIXTURE_PATHS: every model or data path the docs name is there, built by
  tests/fixtures/tiny_model.py (a random Qwen3 teacher; the student the same architecture
  with other weights and the same tokenizer) and `precompute.default_data` (a few
  questions), never the demo's SmolLM2 models;
- SIZE_ENV: small sizes through the documented make variables (STEPS, PRECOMPUTE_ARGS,
  EVAL_ARGS), read by make from the environment;
- SUBSTITUTIONS: a table of (pattern, replacement) applied to every command, for sizes a
  command sets itself (`STEPS=100`, `max_steps=500`) and for outputs that two documented
  alternatives would otherwise share (each is a new folder named by the command's line);
- `make` runs with VENV= the interpreter's venv and its setup stamp and `models` target
  marked done (-o), so it neither re-creates .venv nor converts SmolLM2.

Commands that need a GPU or a cluster, take more than a minute here, or are run end to end
by another test (doc_commands.CHECK_ONLY lists each with its reason), and commands that would
run as an earlier one did (`repeats`), are checked without running: `bash -n`, `make -n`, the
module's `--help`, and for precompute its resolved config (`--print-config`). Any other
command runs, so a new fenced command is picked up without editing this file; one that fails
fails its test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from precompute.config import load_config
from tests.doc_commands import (
    DocCommand,
    block_commands,
    documented_commands,
    program,
    python_modules,
    unlabeled_command_blocks,
)
from vllm_engine.env import default_kvcache_space

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
COMMAND_TIMEOUT_S = 900

# Workspace path -> what is put there ("teacher", "student", or a file of the tiny data).
FIXTURE_PATHS = {
    "models/smollm2-135m-instruct": "teacher",
    "models/smollm2-student": "student",
    "models/qwen3-8b": "teacher",
    "models/x": "teacher",
    "path/to/qwen3-8b": "teacher",
    "path/to/qwen3-0.6b": "student",
    "my.jsonl": "data/default/train.jsonl",
    "my_test.jsonl": "data/default/test.jsonl",
    "my.parquet": "parquet:data/default/train.jsonl",
}

# Read by make as variables (a command that sets one itself wins; SUBSTITUTIONS shrinks it).
SIZE_ENV = {
    "STEPS": "2",
    "PRECOMPUTE_ARGS": "num_workers=1 sampling.max_tokens=16 commit_every=4",
    "EVAL_ARGS": "--backend hf --max-tokens 8 --limit 4",
}

# (regex, replacement) on every command; `{line}` is the command's line in its file.
SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    (r"\bSTEPS=\d+", "STEPS=2"),
    (r"\bmax_steps=\d+", "max_steps=2"),
    (r"\bROUNDS=\d+", "ROUNDS=1"),
    (r"--limit \d+", "--limit 4"),
    (r"\bEVAL_ARGS='", "EVAL_ARGS='--backend hf --max-tokens 8 "),
    (r"(python -m tools\.eval\b)", r"\1 --backend hf --max-tokens 8 --limit 4"),
    # A direct precompute run gets the same sizes as `make precompute`, and its own folder:
    # the docs list it as an alternative, and a folder refuses a second config.
    (
        r"^python -m precompute\b(?!.*(--out\b|\bout=|--help|--print-config))",
        "python -m precompute --out out/doc-{line}",
    ),
    (
        r"^python -m precompute\b(?!.*--(help|print-config))",
        "python -m precompute $PRECOMPUTE_ARGS",
    ),
    # Rounds refuse other settings in a used WORK folder; each documented variant gets one.
    (r"^make onpolicy-rounds\b(?!.*\bWORK=)", "make onpolicy-rounds WORK=runs/rounds-{line}"),
    # The transformers backend instead of vLLM engines (20-30 s to start each here) where
    # another test runs the same path with vLLM (ENGINE_ELSEWHERE, in this order); `make
    # precompute` with a teacher, data and STUDENT= keeps vLLM here.
    (r"^(python -m precompute \$PRECOMPUTE_ARGS)(?=.*--mode score\b)", r"\1 backend=hf"),
    (
        r"^make precompute CONFIG=configs/demo/precompute\.yaml\b",
        'make precompute CONFIG=configs/demo/precompute.yaml PRECOMPUTE_ARGS="$PRECOMPUTE_ARGS'
        ' backend=hf"',
    ),
    (
        r"^make precompute RAY=1\b",
        'make precompute RAY=1 PRECOMPUTE_ARGS="$PRECOMPUTE_ARGS backend=hf"',
    ),
    (r"^(make onpolicy-rounds\b.*\bROUNDS_ARGS=')", r"\1--backend hf "),
)

# The tests that run, with vLLM, what the backend=hf substitutions run here with transformers:
# score mode, generation with the demo's config (whose engine section
# tests/test_precompute.py::test_config_refuses_unknown_keys checks against vLLM's arguments),
# precompute's Ray workers, rounds end to end.
ENGINE_ELSEWHERE = (
    "tests/test_precompute_vllm.py::test_score_mode_teacher_forces_the_reference",
    "tests/test_precompute_vllm.py::test_generate_writes_valid_shards",
    "tests/test_precompute_ray.py::test_ray_workers_each_own_a_vllm_engine",
    "tests/test_rounds.py::test_two_rounds_killed_and_resumed",
)

COMMANDS = documented_commands(ROOT)


def substitute(text: str, line: int) -> str:
    parts = []
    for part in re.split(r"(\s&&\s)", text):
        for pattern, repl in SUBSTITUTIONS:
            part = re.sub(pattern, repl.replace("{line}", str(line)), part, flags=re.M)
        parts.append(part)
    return "".join(parts)


def run_words(script: str) -> tuple[str, ...]:
    """What a substituted command runs here: its words less the `VAR=value` ones that only
    repeat SIZE_ENV (`make onpolicy-live STEPS=2` runs as `make onpolicy-live` does)."""
    return tuple(
        w
        for w in shlex.split(script)
        if not ((m := re.match(r"^(\w+)=(.*)$", w, re.S)) and SIZE_ENV.get(m[1]) == m[2])
    )


def repeats(cmds) -> dict[str, str]:
    """file:line of a command to run -> file:line of the earlier run command it repeats word
    for word once sized (README.md and docs/precompute.md both list `make precompute ...`).
    Run again in the same workspace it would find its work done (precompute skips committed
    examples, training resumes at its last step), so it is checked instead."""
    first: dict[tuple[str, ...], str] = {}
    out: dict[str, str] = {}
    for c in cmds:
        if c.check_only_reason() is not None:
            continue
        key = run_words(substitute(c.text, c.line))
        if key in first:
            out[c.where] = first[key]
        else:
            first[key] = c.where
    return out


REPEATS = repeats(COMMANDS)


def _make_wrapper() -> str:
    stamp = VENV / ".setup-stamp"
    return (
        f"make() {{ command make VENV={shlex.quote(str(VENV))} -o {shlex.quote(str(stamp))} "
        '-o models "$@"; }\n'
    )


def _build_data(ws: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "precompute.default_data", "--out", "data/default"]
        + ["--train", "8", "--val", "4", "--test", "4"],
        cwd=ws,
        env=_env(ws),
        check=True,
        capture_output=True,
        timeout=300,
    )


def _place(ws: Path, rel: str, what: str, models: dict[str, Path]) -> None:
    dest = ws / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if what in models:
        dest.symlink_to(models[what], target_is_directory=True)
    elif what.startswith("parquet:"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [json.loads(x) for x in (ws / what[8:]).read_text().splitlines() if x.strip()]
        # Score mode with data.answer_field=solution (docs/precompute.md): the answer field
        # holds the response to teacher-force.
        for r in rows:
            r["solution"] = r.pop("answer")
        pq.write_table(pa.Table.from_pylist(rows), dest)
    else:
        shutil.copyfile(ws / what, dest)


def _env(ws: Path) -> dict[str, str]:
    env = default_kvcache_space(dict(os.environ))
    env.update(SIZE_ENV)
    env.update(
        PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="offline",
    )
    return env


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    from tests.fixtures.tiny_model import tiny_model_dir

    ws = tmp_path_factory.mktemp("docs-workspace")
    for entry in ROOT.iterdir():
        if entry.name not in {".git", ".venv", "models", "data", "out", "runs", "reports"}:
            (ws / entry.name).symlink_to(entry)
    (ws / ".venv").symlink_to(VENV)  # `source .venv/bin/activate` finds the tests' venv
    models = {"teacher": tiny_model_dir(), "student": tiny_model_dir(seed=1)}
    _build_data(ws)
    for rel, what in FIXTURE_PATHS.items():
        _place(ws, rel, what, models)
    return ws


def _bash(ws: Path, script: str, timeout: float = COMMAND_TIMEOUT_S):
    return subprocess.run(
        ["bash", "-c", _make_wrapper() + script],
        cwd=ws,
        env=_env(ws),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ok(proc, what: str) -> None:
    if proc.returncode:
        tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]).strip()
        pytest.fail(f"{what} exited {proc.returncode}:\n{tail}", pytrace=False)


# A recipe's `\`-continued lines as one line each (make -n prints them as written).
JOIN_CONTINUATIONS = r"""awk '/\\$/ {sub(/\\$/, ""); printf "%s", $0; next} {print}'"""
PRECOMPUTE_LINE = re.compile(r"-m precompute( |$)")


def check_only_steps(cmd_text: str) -> list[str]:
    """Shell lines that check a command without running it (each must exit 0). The
    precompute commands it would run are resolved apart (`precompute_lines`)."""
    steps = [f"bash -n <<'DOC_EOF'\n{cmd_text}\nDOC_EOF"]
    if cmd_text.startswith("#!"):
        # A batch script: its commands need the cluster's paths; check the modules it runs.
        return steps + [f"python -m {m} --help >/dev/null" for m in python_modules(cmd_text)]
    for part in re.split(r"\s&&\s", cmd_text):
        prog = program(part)
        if prog == "make":
            env_words, rest = part.split("make", 1)
            steps.append(f"{env_words}make -n{rest}")
        elif prog in ("python", "python3"):
            mods = [m for m in python_modules(part) if m != "precompute"]
            steps += [f"python -m {m} --help >/dev/null" for m in mods]
        elif prog == "sbatch":
            # The cluster is not here; the script the docs name is, and must parse.
            scripts = [w for w in shlex.split(part) if w.endswith((".sbatch", ".sh"))]
            assert scripts, f"sbatch without a script: {part}"
            steps += [f"test -f {shlex.quote(s)} && bash -n {shlex.quote(s)}" for s in scripts]
        else:
            steps.append(f"command -v {shlex.quote(prog)}")
    return steps


def precompute_lines(ws: Path, cmd: DocCommand) -> list[str]:
    """The precompute command lines a check-only command would run: those of its make
    targets' dry run (`make -n`, continuations joined) and its own `python -m precompute`."""
    if cmd.text.startswith("#!"):
        return []
    lines = []
    for part in cmd.parts():
        prog = program(part)
        if prog == "make":
            env_words, rest = part.split("make", 1)
            dry = _bash(ws, f"{env_words}make -n{rest} | {JOIN_CONTINUATIONS}", timeout=60)
            _ok(dry, f"`make -n{rest}`")
            lines += [x for x in dry.stdout.splitlines() if PRECOMPUTE_LINE.search(x)]
        elif prog in ("python", "python3") and "precompute" in python_modules(part):
            lines.append(part)
    return lines


def print_config_here(ws: Path, line: str) -> str:
    """`line --print-config`, resolved in this process: a process per command would import
    vLLM again (6 s) to check the engine arguments. The shell expands the line's words (its
    quotes and $VARIABLES, in the commands' environment); its `VAR=value` words are the
    environment of the resolution, as they would be of the command. Returns what it prints."""
    from precompute.__main__ import main

    words = _bash(ws, f"printf '%s\\0' {line}", timeout=60)
    _ok(words, f"expand `{line}`")
    argv = words.stdout.split("\0")[:-1]
    env = {}
    while argv and (m := re.match(r"^(\w+)=(.*)$", argv[0], re.S)):
        env[m[1]] = m[2]
        argv.pop(0)
    at = next(i for i in range(len(argv) - 1) if argv[i : i + 2] == ["-m", "precompute"])
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update({**_env(ws), **env})
        os.chdir(ws)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([*argv[at + 2 :], "--print-config"])
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    if rc != 0:
        pytest.fail(f"`{line} --print-config` exited {rc}:\n{err.getvalue()}", pytrace=False)
    return out.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command(cmd, workspace):
    reason = cmd.check_only_reason()
    if reason is None and cmd.where in REPEATS:
        reason = f"runs as {REPEATS[cmd.where]} did, earlier in this workspace"
    if reason is not None:
        for step in check_only_steps(cmd.text):
            _ok(_bash(workspace, step, timeout=300), f"{cmd.where} ({reason}), check `{step}`")
        for line in precompute_lines(workspace, cmd):
            print_config_here(workspace, line)
        return
    script = substitute(cmd.text, cmd.line)
    _ok(_bash(workspace, "set -e\n" + script), f"{cmd.where} `{script}`")


# --- the harness itself (fast) ---


def test_docs_have_commands_and_no_unlabeled_command_fences():
    assert len(COMMANDS) > 20, [c.where for c in COMMANDS]
    assert unlabeled_command_blocks(ROOT) == [], "label these fences `sh`"


def test_block_splitting():
    lines = [
        "make a                      # a comment",
        "# = python -m x \\",
        "#     --y",
        'python -m tools.eval --model "a (Q+E)=m@qe" \\',
        "    --data d.jsonl   # trailing",
        "make train STEPS=1 && \\",
        "make eval EVAL_ARGS='--x #not-a-comment'",
        "$ make help",
    ]
    cmds = block_commands("f.md", 10, "sh", lines)
    assert [(c.line, c.text) for c in cmds] == [
        (10, "make a"),
        (13, 'python -m tools.eval --model "a (Q+E)=m@qe" --data d.jsonl'),
        (15, "make train STEPS=1 && make eval EVAL_ARGS='--x #not-a-comment'"),
        (17, "make help"),
    ]
    assert cmds[2].parts() == ["make train STEPS=1", "make eval EVAL_ARGS='--x #not-a-comment'"]
    console = block_commands("f.md", 1, "console", ["$ make x", "some output", "$ ls"])
    assert [c.text for c in console] == ["make x", "ls"]
    script = block_commands("f.md", 1, "bash", ["#!/bin/bash", "#SBATCH --x", "python -m a"])
    assert len(script) == 1 and script[0].check_only_reason() is not None


def test_classification_and_substitution():
    run = block_commands("f.md", 7, "sh", ["make train METHOD=skd", "python -m precompute --k 8"])
    assert [c.check_only_reason() for c in run] == [None, None]
    gpu = block_commands("f.md", 1, "sh", ["make train METHOD=jsd GPUS=8 ZERO=3", "make demo"])
    assert all(c.check_only_reason() for c in gpu)
    assert substitute("make onpolicy-live STEPS=100", 3) == "make onpolicy-live STEPS=2"
    assert substitute("python -m precompute --k 8", 9) == (
        "python -m precompute $PRECOMPUTE_ARGS --out out/doc-9 --k 8"
    )
    assert substitute("python -m precompute --help", 9) == "python -m precompute --help"
    assert substitute("make onpolicy-rounds ROUNDS=3", 4) == (
        "make onpolicy-rounds WORK=runs/rounds-4 ROUNDS=1"
    )
    assert check_only_steps("make demo")[1] == "make -n demo"
    k64 = [
        "make precompute TEACHER=t DATA=d K=64 OUT=a",
        "make precompute TEACHER=t DATA=d K=64 STUDENT=s",
    ]
    assert [c.check_only_reason() is None for c in block_commands("f.md", 1, "sh", k64)] == [
        False,
        True,
    ]
    assert load_config(None, []).k == 64  # the K=64 rule's reason: it is the default
    assert substitute("python -m precompute --mode score --data x", 3) == (
        "python -m precompute $PRECOMPUTE_ARGS backend=hf --out out/doc-3 --mode score --data x"
    )
    assert substitute("python -m precompute --data x", 3) == (
        "python -m precompute $PRECOMPUTE_ARGS --out out/doc-3 --data x"
    )
    assert substitute("make precompute RAY=1 OUT=o", 3) == (
        'make precompute RAY=1 PRECOMPUTE_ARGS="$PRECOMPUTE_ARGS backend=hf" OUT=o'
    )
    assert substitute("make precompute CONFIG=configs/demo/precompute.yaml", 3) == (
        'make precompute CONFIG=configs/demo/precompute.yaml PRECOMPUTE_ARGS="$PRECOMPUTE_ARGS'
        ' backend=hf"'
    )
    assert substitute("make onpolicy-rounds WORK=w ROUNDS_ARGS='--n 2'", 3) == (
        "make onpolicy-rounds WORK=w ROUNDS_ARGS='--backend hf --n 2'"
    )
    setup = block_commands("f.md", 1, "sh", ["KDSHARDS_DEVICE=cpu make setup"])[0]
    assert setup.check_only_reason() is not None
    assert check_only_steps(setup.text)[1] == "KDSHARDS_DEVICE=cpu make -n setup"


def test_repeats_are_the_same_words_once_sized():
    cmds = block_commands(
        "f.md",
        1,
        "sh",
        [
            "make onpolicy-live",
            "make onpolicy-live STEPS=100",  # sized to STEPS=2, as SIZE_ENV gives the first
            "make onpolicy-live STEPS=100 RUN=runs/other",
            "make train METHOD=jsd BETA=0.5",
            "make train METHOD=jsd BETA=0.5 && make eval",
            "make demo",
            "make demo",  # check-only already: repeats only name commands that would run
        ],
    )
    assert repeats(cmds) == {"f.md:2": "f.md:1"}
    assert run_words("STEPS=2 make x EVAL_ARGS='--a b'") == ("make", "x", "EVAL_ARGS=--a b")


def test_each_onpolicy_target_is_still_run_by_one_documented_command():
    """The rules that leave a target to other tests or to an earlier command keep one
    documented run of each target here, with its Makefile defaults."""
    make_target = re.compile(r"^(?:\w+=\S*\s+)*make (\S+)")
    run = [c for c in COMMANDS if c.check_only_reason() is None and c.where not in REPEATS]
    targets = {m[1] for c in run for part in c.parts() if (m := make_target.match(part))}
    assert {"onpolicy-live", "onpolicy-rounds", "precompute", "train", "eval"} <= targets


def test_the_tests_that_check_only_reasons_name_exist():
    """A command left to another test names it (file::function); a rename must update it."""
    from tests.doc_commands import CHECK_ONLY

    named = [m for _, reason in CHECK_ONLY for m in re.findall(r"(tests/\w+\.py)::(\w+)", reason)]
    named += [tuple(t.split("::")) for t in ENGINE_ELSEWHERE]
    assert named
    for file, func in named:
        assert re.search(rf"^def {func}\(", (ROOT / file).read_text(), re.M), (file, func)


def test_a_precompute_command_is_resolved_here_and_a_bad_setting_fails(tmp_path):
    before, task = dict(os.environ), "SLURM_ARRAY_TASK_ID=1 SLURM_ARRAY_TASK_COUNT=2"
    printed = print_config_here(tmp_path, f"{task} python -m precompute --teacher 'a b' --k 8")
    assert "teacher: a b\n" in printed and "k: 8\n" in printed
    assert "num_workers: 2\n" in printed and "worker_index: 1\n" in printed  # from the VARs
    assert dict(os.environ) == before and Path.cwd() != tmp_path
    with pytest.raises(pytest.fail.Exception, match=r"engine\.bogus"):
        print_config_here(tmp_path, "python -m precompute --teacher t engine.bogus=1")

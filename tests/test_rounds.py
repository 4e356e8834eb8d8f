"""On-policy rounds (tools/onpolicy/rounds.py) and what they need from precompute.

The end-to-end test runs two rounds with the real vLLM CPU engine on the tiny model (round
2's student samples from round 1's checkpoint), its runner killed with SIGKILL during round
2's training (the stage's whole process tree must die with it), then re-run: no row is lost
or duplicated, finished rounds are left as they were, and the training goes on where it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from precompute.config import load_config
from precompute.hf_backend import HFBackend
from precompute.run import run
from shards.fingerprint import weights_fingerprint
from shards.reader import ShardFolder, read_rows
from tests.fixtures.tiny_model import build_tiny_model, tiny_model_dir
from tests.precompute_helpers import K, questions, write_jsonl
from vllm_engine.env import default_kvcache_space

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir()


def pc(tiny, data, out, *overrides):
    return load_config(
        None,
        [f"teacher={tiny}", f"data.path={data}", f"out={out}", f"k={K}", "progress=false",
         "sampling.max_tokens=6", "commit_every=4", *overrides],
    )  # fmt: skip


def test_precompute_student_view_exact_response_ids_source_and_tags(tiny, tmp_path):
    hf = HFBackend(str(tiny), K, batch_size=8)
    data = write_jsonl(tmp_path / "q.jsonl", questions(6))
    gen = tmp_path / "gen"
    run(pc(tiny, data, gen, "generator_view=student", "source=student", "tags.round=3"), hf)
    rows = list(read_rows(gen))
    odd = [r for r in rows if r["prompt_ids"].tolist() != r["teacher_prompt_ids"].tolist()]
    assert odd  # questions with an experience: the two views differ ...
    meta = ShardFolder(gen).metadata
    assert meta.extra["tags"] == {"round": 3} and {r["source"] for r in rows} == {"student"}
    # ... and the responses continue the student view: the student's greedy answer to Q.
    greedy = run(pc(tiny, data, tmp_path / "greedy", "sampling.temperature=0"), hf)
    assert greedy.rows == 6
    g2 = tmp_path / "g2"
    run(pc(tiny, data, g2, "generator_view=student", "sampling.temperature=0"), hf)
    for r in read_rows(g2):
        want = hf.generate(
            [r["prompt_ids"].tolist()],
            [0],
            load_config(None, ["sampling.temperature=0", "sampling.max_tokens=6"]).sampling,
        )[0][0].token_ids
        assert r["response_ids"].tolist() == list(want)
    # Score mode takes token ids as given: ids that no text tokenizes to are kept exactly.
    given = [[5, 5, 5, 7], [300, 2, 300], [9], [11, 12], [13], [14, 15, 16]]
    rows_in = [
        {**q, "id": f"x{i}", "response": "text", "response_ids": ids}
        for i, (q, ids) in enumerate(zip(questions(6), given, strict=True))
    ]
    scored = tmp_path / "scored"
    sdata = write_jsonl(tmp_path / "s.jsonl", rows_in)
    run(pc(tiny, sdata, scored, "mode=score", "score.response_ids_field=response_ids",
           "score.append_eos=false", "data.response_field=response"), hf)  # fmt: skip
    got = {r["id"]: r["response_ids"].tolist() for r in read_rows(scored)}
    assert got == {f"x{i}": ids for i, ids in enumerate(given)}
    bad = write_jsonl(tmp_path / "b.jsonl", [{**rows_in[0], "response_ids": [1, "two"]}])
    ids_field = ("mode=score", "score.response_ids_field=response_ids")
    with pytest.raises(ValueError, match=r"b.jsonl, line 1, field 'response_ids'"):
        run(pc(tiny, bad, tmp_path / "bad", *ids_field, "data.response_field=response"), hf)


# ---- the rounds, end to end with vLLM ----------------------------------------------------------

N_PROMPTS, N_SAMPLES, STEPS = 12, 2, 24


def rounds_cmd(tiny, student, data, work):
    return [
        sys.executable, "-m", "tools.onpolicy.rounds", "--rounds", "2", "--teacher", str(tiny),
        "--student", str(student), "--data", str(data), "--work", str(work),
        "--precompute-config", "", "--steps", str(STEPS), "--n", str(N_SAMPLES),
        "--max-tokens", "8", "--k", "8", "--previous-weight", "0.5",
        # One vLLM engine per precompute stage, in its process: two workers (the CPU default)
        # would start two engines on this machine's 2 cores for 24 short samples. Workers
        # killed with precompute: tests/test_lifetime.py; a killed worker's resume:
        # tests/test_precompute_jobs.py.
        "--precompute-args", "commit_every=1 num_workers=1 engine.max_model_len=256",
        "--train-args", "data.batch_tokens=256 data.sort_window=8 save_every=3 "
        "optim.warmup_steps=0 optim.lr=1e-3",
    ]  # fmt: skip


def start(cmd):
    env = default_kvcache_space({**os.environ, "PYTHONPATH": str(REPO)})
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def kill_when(proc, ready, timeout=600):
    """SIGKILL the runner alone once ready() holds (as a user's kill -9 would), then check
    that its stage's whole tree (precompute or train, their workers, vLLM's EngineCore, the
    watchdogs) is gone within seconds: nothing is left to write beside the re-run."""
    import psutil

    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "timed out waiting to kill"
        time.sleep(0.01)
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert tree  # the stage's command and what it started
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    def running(p) -> bool:  # an unreaped zombie has ended
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.time() + 15
    while any(running(p) for p in tree) and time.time() < deadline:
        time.sleep(0.1)
    alive = [p for p in tree if running(p)]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # nothing should be left; never leak on failure
    assert not alive, f"alive 15 s after kill -9 of the runner: {alive}"


def latest_step(train_dir: Path) -> int:
    marker = train_dir / "checkpoints" / "latest"
    return int(marker.read_text().split("-")[1]) if marker.exists() else 0


def snapshot(folder: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_rounds_killed_and_resumed(tiny, tmp_path):
    student = build_tiny_model(tmp_path / "student", seed=7)
    data = write_jsonl(tmp_path / "q.jsonl", questions(N_PROMPTS))
    work = tmp_path / "work"
    r1, r2 = work / "round-001", work / "round-002"
    cmd = rounds_cmd(tiny, student, data, work)

    # 1. Round 1 finishes; killed during round 2's training, after a checkpoint. (A stage
    # killed in its vLLM engine's work: tests/test_lifetime.py kills precompute's engine,
    # tests/test_precompute.py resumes a killed precompute; here it would cost the suite
    # another engine start.)
    proc = start(cmd)
    kill_when(proc, lambda: latest_step(r2 / "train") >= 3)
    assert latest_step(r2 / "train") < STEPS
    state = json.loads((work / "rounds.json").read_text())
    assert [k for k in state["done"] if k.startswith("round-001/")] == [
        f"round-001/{step}" for step in ("samples", "responses", "shards", "train")
    ]
    before = snapshot(r1)
    # 2. Re-run to the end: round 1 is not touched, round 2 continues its training.
    proc = start(cmd)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    assert "round 1: finished earlier" in out
    assert snapshot(r1) == before

    ids = Counter(ex_id for ex_id in (r["id"] for r in read_rows(r1 / "samples")))
    assert len(ids) == N_PROMPTS and set(ids.values()) == {N_SAMPLES}
    for r, d in ((1, r1), (2, r2)):
        samples = {(x["id"], x["sample_index"]): x for x in read_rows(d / "samples")}
        scored = list(read_rows(d / "shards"))
        assert len(samples) == N_PROMPTS * N_SAMPLES  # every sample once ...
        assert sorted(x["id"] for x in scored) == sorted(f"{i}#s{j}" for i, j in samples)
        for x in scored:  # ... scored by the teacher as sampled, on the student's prompt
            i, j = x["id"].rsplit("#s", 1)
            s = samples[(i, int(j))]
            assert x["response_ids"].tolist() == s["response_ids"].tolist()
            assert x["prompt_ids"].tolist() == s["prompt_ids"].tolist()
            assert x["source"] == "student"
        tags = ShardFolder(d / "shards").metadata.extra["tags"]
        sampler = student if r == 1 else r1 / "train/checkpoints/step-0000024/model"
        assert tags["round"] == r and tags["student_fingerprint"] == weights_fingerprint(sampler)
        assert latest_step(d / "train") == STEPS
    steps = [json.loads(line)["step"] for line in open(r2 / "train/metrics.jsonl")]
    assert steps[-1] == STEPS and sorted(set(steps)) == list(range(1, STEPS + 1))


def test_a_rounds_plan_samples_from_the_previous_rounds_final_checkpoint(tmp_path):
    """Built once: round 2's sampler is found when its stages start (round 1's final
    checkpoint), and a re-run with other settings is refused."""
    from tests.test_eval import fake_run
    from tools.onpolicy import rounds

    work, data = tmp_path / "w", tmp_path / "q.jsonl"
    argv = ["--teacher", "T", "--student", "S", "--data", str(data), "--work", str(work)]
    args = rounds.parser().parse_args(["--rounds", "2", *argv])
    one, two = rounds.round_stages(args, work, 1), rounds.round_stages(args, work, 2)
    assert [s.name for s in two] == [
        f"round-002/{step}" for step in ("samples", "responses", "shards", "train")
    ]
    samples = one[0].argv()
    assert samples[samples.index("--teacher") + 1] == "S" and one[0].inputs == [str(data), "S"]
    with pytest.raises(SystemExit, match="round 1 is marked finished but has no checkpoint"):
        two[0].argv()
    _, ck = fake_run(work / "round-001", "train")
    samples, train = two[0].argv(), two[3].argv()
    assert samples[samples.index("--teacher") + 1] == str(ck / "model")
    assert samples[samples.index("--student") + 1] == str(ck / "model")
    assert f"model.path={ck / 'model'}" in train and "sampling.seed=2" in samples
    assert two[0].inputs == [str(data), work / "round-001" / "train"]
    rounds.main(["--rounds", "0", *argv])  # writes the settings, runs nothing
    with pytest.raises(SystemExit, match=r"rounds.json: .* other settings \(steps\)"):
        rounds.main(["--rounds", "0", "--steps", "5", *argv])

"""Precompute without vLLM: inputs and validation, views, config and CLI, tokenizer checks,
worker split and resume (transformers backend on the tiny model, which loads in a second).
The vLLM engine's tests are in test_precompute_vllm.py."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

from precompute.config import ConfigError, load_config
from precompute.hf_backend import HFBackend
from precompute.inputs import InputError, read_examples
from precompute.run import run, worker_of
from precompute.views import make_views
from shards.errors import ShardError
from shards.manifest import load_manifest
from tests.fixtures.tiny_model import tiny_model_dir
from tests.precompute_helpers import K, all_rows, cfg, questions, write_jsonl
from tools import shards as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NoEngine:
    """A backend that fails the test if the teacher is ever asked for anything."""

    name, k, vocab_size = "none", K, 512

    def generate(self, *a, **kw):
        raise AssertionError("the teacher ran before validation finished")

    score = generate

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def hf(tiny):
    return HFBackend(str(tiny), K, batch_size=16)


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "q.jsonl", questions())


# ---- inputs and validation ------------------------------------------------------------------


def test_bad_rows_named_before_any_teacher_time(tiny, tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"question": "ok?"},
            "{not json",
            {"prompt": "no question field"},
            {"question": 42},
            "",
            {"question": "ok too", "experience": ["not", "a", "string"]},
            [1, 2],
        ],
    )
    with pytest.raises(InputError) as e:
        run(cfg(tiny, path, tmp_path / "out"), backend=NoEngine())
    msg = str(e.value)
    assert "5 invalid input row(s) of 6" in msg
    assert f"{path}:2: <json>: not valid JSON" in msg
    assert f"{path}:3: question: missing" in msg
    assert f"{path}:4: question: expected a string, got int" in msg
    assert f"{path}:6: experience: expected a string, got list" in msg
    assert f"{path}:7: <row>: expected a JSON object" in msg
    assert not list((tmp_path / "out").glob("*"))


def test_skip_invalid_writes_rejects_and_goes_on(tiny, hf, tmp_path):
    rows = questions(4) + ["{oops", {"question": None}, questions(1)[0]]  # last: duplicate
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    out = tmp_path / "out"
    s = run(cfg(tiny, path, out, "skip_invalid=true", "sampling.temperature=0"), backend=hf)
    assert (s.examples, s.rejects) == (4, 3)
    rejects = [json.loads(x) for x in (out / "rejects-w0-00000.jsonl").read_text().splitlines()]
    assert [r["where"] for r in rejects] == [f"{path}, line {n}" for n in (5, 6, 7)]
    assert rejects[0]["row"] == "{oops"
    assert rejects[1]["field"] == "question" and rejects[1]["reason"] == "missing"
    assert "duplicate id" in rejects[2]["reason"]
    assert len({r["id"] for r in all_rows(out)}) == 4


# ---- what precompute keeps besides shards: committed like shards -------------------------------
# Its config and rejected rows are listed with a checksum in the writer's manifest,
# append-only, never lost by a refused or resumed run; a fresh folder verifies clean.


def verify(capsys, folder) -> tuple[int, list[str]]:
    code = cli.main(["verify", str(folder)])
    return code, capsys.readouterr().out.splitlines()


def rejects_of(folder) -> list[dict]:
    out = []
    for name in sorted(p.name for p in folder.glob("rejects-*.jsonl")):
        out += [json.loads(line) for line in (folder / name).read_text().splitlines()]
    return out


def test_fresh_folder_verifies_without_a_warning(tiny, hf, tmp_path, capsys):
    data = write_jsonl(tmp_path / "q.jsonl", questions(6) + ["{oops"])
    out = tmp_path / "out"
    run(cfg(tiny, data, out, "skip_invalid=true", "sampling.temperature=0"), backend=hf)
    code, lines = verify(capsys, out)
    assert code == 0 and len(lines) == 1 and lines[0].startswith("ok:"), lines
    kinds = sorted(e.kind for e in load_manifest(out).extras)
    assert kinds == ["precompute_config", "rejects"]


def test_config_file_is_covered_by_the_manifest(tiny, hf, tmp_path, capsys):
    data = write_jsonl(tmp_path / "q.jsonl", questions(4))
    out = tmp_path / "out"
    run(cfg(tiny, data, out, "sampling.temperature=0"), backend=hf)
    (config,) = out.glob("precompute_config-*.yaml")
    config.write_bytes(config.read_bytes()[:-20])  # truncated
    code, lines = verify(capsys, out)
    assert code == 1
    assert any(line.startswith(f"BAD  {config.name}: ") for line in lines), lines


def test_refused_run_keeps_the_earlier_rejects(tiny, hf, tmp_path):
    """A run refused for other settings writes nothing, in particular no rejects file over
    the earlier run's."""
    out = tmp_path / "out"
    first = write_jsonl(tmp_path / "a.jsonl", questions(4) + ["{first bad row"])
    run(cfg(tiny, first, out, "skip_invalid=true", "sampling.temperature=0"), backend=hf)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert [r["row"] for r in rejects_of(out)] == ["{first bad row"]
    other = write_jsonl(tmp_path / "b.jsonl", questions(4) + ["{other bad row"])
    with pytest.raises(ShardError, match="other settings"):
        run(cfg(tiny, other, out, "skip_invalid=true", "k=4"), backend=hf)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resumed_run_keeps_rejects_once(tiny, hf, tmp_path, capsys):
    data = write_jsonl(tmp_path / "q.jsonl", questions(6) + ["{bad", {"question": None}])
    out = tmp_path / "out"
    c = cfg(tiny, data, out, "skip_invalid=true", "sampling.temperature=0", "data.limit=3")
    assert run(c, backend=hf).rejects == 2
    c = cfg(tiny, data, out, "skip_invalid=true", "sampling.temperature=0")
    # data.limit is not part of the folder's identity: the second run completes the folder.
    s = run(c, backend=hf)
    assert (s.examples, s.skipped_done) == (3, 3)
    assert sorted(r["row"] for r in rejects_of(out)) == sorted(['{"question": null}', "{bad"])
    # The second run's config differs (data.limit): both are kept, in order.
    configs = sorted(p.name for p in out.glob("precompute_config-*.yaml"))
    assert configs == ["precompute_config-w0-00000.yaml", "precompute_config-w0-00001.yaml"]
    assert verify(capsys, out)[0] == 0


@pytest.mark.parametrize("fmt", ["json", "parquet", "csv", "saved"])
def test_formats_through_datasets(tmp_path, fmt):
    import datasets

    rows = [{"q": f"question {i}", "a": str(i), "key": f"id{i}"} for i in range(3)]
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"d.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "csv":
        ds.to_csv(str(path), index=False)
    else:
        datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    c = load_config(
        None,
        [f"data.path={path}", "data.question_field=q", "data.answer_field=a", "data.id_field=key"],
    )
    examples, rejects, total = read_examples(c.data, "generate")
    assert (len(examples), rejects, total) == (3, [], 3)
    assert [e.id for e in examples] == ["id0", "id1", "id2"]
    assert examples[2].messages == ({"role": "user", "content": "question 2"},)
    assert examples[1].answer == "1"


def test_row_numbers_of_datasets_formats(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"question": "a"}, {"question": ""}]))
    c = load_config(None, [f"data.path={path}"])
    _, rejects, _ = read_examples(c.data, "generate")
    assert [r.message() for r in rejects] == [f"{path}:row 1: question: empty"]


def test_messages_field_ids_and_score_responses(tmp_path):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [{"messages": conv}, {"messages": conv[:2]}, {"messages": [{"role": "user"}]}],
    )
    c = load_config(None, [f"data.path={path}", "data.messages_field=messages"])
    examples, rejects, _ = read_examples(c.data, "score")
    # Row 2 has no assistant turn to score; row 3's message lacks content.
    assert [r.message() for r in rejects] == [
        f"{path}:2: messages: score mode needs an assistant turn to score: none of its 2 turns "
        "is an assistant's",
        f"{path}:3: messages[0].content: turn 0 (user): missing",
    ]
    (ex,) = examples
    assert ex.messages == tuple(conv[:2]) and ex.response == "4"
    again, _, _ = read_examples(c.data, "score")
    assert again[0].id == ex.id and ex.id.startswith("h")  # content hash: stable


# ---- views ----------------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["system", "prefix", "suffix"])
def test_views_put_the_experience_where_configured(tiny, tmp_path, position):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "Q?", "experience": "E!"}])
    c = load_config(
        None,
        [
            f"data.path={path}",
            f"view.experience_position={position}",
            "view.experience_template=Hint: {experience}",
        ],
    )
    (ex,), _, _ = read_examples(c.data, "generate")
    v = make_views(tok, ex, c.view, 0)
    student, teacher = tok.decode(v.prompt_ids), tok.decode(v.teacher_prompt_ids)
    assert student == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    expected = {
        "system": "<|im_start|>system\nHint: E!<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n",
        "prefix": "<|im_start|>user\nHint: E!\n\nQ?<|im_end|>\n",
        "suffix": "<|im_start|>user\nQ?\n\nHint: E!<|im_end|>\n",
    }[position]
    assert teacher == expected + "<|im_start|>assistant\n"


def test_mixed_thinking_is_drawn_per_example_and_passed_to_the_template(tiny, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    tok.chat_template = (
        "{{ 'T' if enable_thinking else 'N' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    path = write_jsonl(tmp_path / "q.jsonl", questions(40))
    c = load_config(None, [f"data.path={path}", "view.thinking=mixed", "view.thinking_prob=0.5"])
    examples, _, _ = read_examples(c.data, "generate")
    views = [make_views(tok, ex, c.view, 0) for ex in examples]
    flags = [v.thinking for v in views]
    assert 5 < sum(flags) < 35
    assert all(tok.decode(v.prompt_ids)[0] == ("T" if v.thinking else "N") for v in views)
    assert flags == [make_views(tok, ex, c.view, 0).thinking for ex in examples]


# ---- config and CLI -------------------------------------------------------------------------


def test_config_refuses_unknown_keys():
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, ["sampling.temprature=0.5"])
    with pytest.raises(ValueError, match="unknown vLLM engine argument.*engine.not_an_arg"):
        load_config(None, ["engine.not_an_arg=1"])
    with pytest.raises(ValueError, match="set by precompute"):
        load_config(None, ["engine.logprobs_mode=processed_logprobs"])
    c = load_config(f"{REPO}/configs/demo/precompute.yaml", ["engine.tensor_parallel_size=2"])
    assert c.engine["tensor_parallel_size"] == 2 and c.engine["dtype"] == "float32"


def test_neutral_defaults_name_nothing_of_the_demo():
    """Without a config: no model, data or student, no engine settings (the device and the
    model decide them), the model's response length; the demo's settings are in its YAML."""
    from precompute.__main__ import resolve

    c = load_config(None)
    assert (c.teacher, c.student, c.data.path, c.engine) == ("", "", "", {})
    assert (c.sampling.max_tokens, c.engine_window) == (0, 0)
    _, c = resolve(["--teacher", "t", "--data", "d.jsonl"])  # no --config: no YAML at all
    assert (c.student, c.engine, c.sampling.max_tokens) == ("", {}, 0)
    demo = load_config(f"{REPO}/configs/demo/precompute.yaml")
    assert demo.engine == {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048}
    assert (demo.teacher, demo.student) == (
        "models/smollm2-135m-instruct",
        "models/smollm2-student",
    )
    assert demo.sampling.max_tokens == 96


def test_run_without_teacher_or_data_says_which(tiny, tmp_path, capsys):
    from precompute.__main__ import main

    with pytest.raises(ConfigError, match=r"^teacher is not set: --teacher DIR or teacher="):
        run(load_config(None, [f"out={tmp_path / 'o'}"]), backend=NoEngine())
    assert main(["--teacher", str(tiny), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["precompute: error: data.path is not set: --data FILE or data.path=..."]


def test_cli_without_config_runs_any_teacher(tiny, tmp_path, capsys, monkeypatch):
    """The README's `make precompute TEACHER=... DATA=...` from the repository root: no demo
    config is read, so no demo student is checked (issue #19: it was, and refused the
    teacher)."""
    from precompute.__main__ import main

    monkeypatch.chdir(REPO)
    data = write_jsonl(tmp_path / "q.jsonl", questions(3))
    argv = ["--teacher", str(tiny), "--data", str(data), "--out", str(tmp_path / "o")]
    argv += ["--backend", "hf", "--k", str(K), "--no-progress", "sampling.max_tokens=4"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "precompute: 3 examples (0 already done), 3 rows (" in err
    assert load_manifest(tmp_path / "o").metadata.sampling["max_tokens"] == 4


def test_config_choices_are_typed_and_errors_list_them():
    """Choices are Literal fields of the typed loader: a bad value names the key and the
    allowed values, before anything is loaded; YAML's true/false read as the choice's words."""
    for override, allowed in [
        ("mode=scoring", "generate | score"),
        ("backend=tgi", "vllm | hf"),
        ("generator_view=both", "teacher | student"),
        ("source=oracle", "auto | teacher | dataset | student"),
        ("view.experience_position=middle", "system | prefix | suffix"),
        ("view.thinking=maybe", "none | true | false | mixed"),
        ("sampling.per_request_seed=sometimes", "auto | true | false"),
        ("hf.dtype=float8", "float32 | bfloat16 | float16"),
    ]:
        key = override.split("=")[0]
        with pytest.raises(ConfigError, match=f"{key}: expected one of {allowed}, got"):
            load_config(None, [override])
    c = load_config(None, ["view.thinking=true", "sampling.per_request_seed=false"])
    assert c.view.thinking == "true" and c.sampling.per_request_seed == "false"
    assert load_config(None, ["mode=score", "backend=hf"]).mode == "score"


def test_cli_overlay_and_help():
    from precompute.__main__ import resolve

    _, c = resolve(
        [
            "--config",
            "",
            "--k",
            "5",
            "--engine.max_num_seqs=3",
            "--n",
            "2",
            "view.thinking=on",
            "--sampling.top_p",
            "0.9",
            "--num-workers",
            "2",
        ]
    )
    assert (c.k, c.engine["max_num_seqs"], c.sampling.n, c.view.thinking) == (5, 3, 2, "true")
    assert (c.sampling.top_p, c.num_workers) == (0.9, 2)
    out = subprocess.run(
        [sys.executable, "-m", "precompute", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for key in (
        "--skip-invalid",
        "sampling.temperature",
        "view.experience_position",
        "engine.<any vllm.EngineArgs field>",
        "commit_every",
    ):
        assert key in out


# ---- the model's limits, cut responses, engine windows ---------------------------------------


def model_copy(tiny, tmp_path, generation: dict | None):
    """The tiny model with another generation_config.json (None: without one)."""
    d = tmp_path / "model"
    shutil.copytree(tiny, d)
    (d / "generation_config.json").unlink()
    if generation is not None:
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, **generation}))
    return d


@pytest.mark.parametrize(
    "generation, max_model_len, max_tokens, want",
    [
        ({"max_new_tokens": 300}, None, 0, (300, "generation_config.json max_new_tokens")),
        ({"max_length": 500}, None, 0, (500, "generation_config.json max_length")),
        ({"max_new_tokens": 30, "max_length": 50}, None, 0, (30, "generation_config.json max_new_tokens")),  # noqa: E501
        ({}, None, 0, (2048, "the context window")),  # transformers' max_length=20 is no limit
        (None, None, 0, (2048, "the context window")),
        (None, 1024, 0, (1024, "the context window")),
        ({"max_new_tokens": 300}, 1024, 7, (7, "sampling.max_tokens")),
    ],
)  # fmt: skip
def test_limits_come_from_the_model_unless_set(
    tiny, tmp_path, generation, max_model_len, max_tokens, want
):
    from precompute.model_limits import resolve_limits

    limits = resolve_limits(str(model_copy(tiny, tmp_path, generation)), max_model_len, max_tokens)
    assert (limits.max_tokens, limits.max_tokens_from) == want
    ctx_from = "engine.max_model_len" if max_model_len else "config.json max_position_embeddings"
    assert (limits.context, limits.context_from) == (max_model_len or 2048, ctx_from)


def test_cut_responses_are_counted_and_the_models_limit_recorded(tiny, tmp_path, capsys):
    """sampling.max_tokens=0: generation_config.json's max_new_tokens (3) limits the
    responses, is recorded in the shards' metadata, and the rows cut there are counted in
    the summary line and by `tools.shards stats`; no student named: the shards carry the
    teacher's tokenizer fingerprint."""
    from transformers import AutoTokenizer

    from shards.fingerprint import tokenizer_fingerprint

    teacher = model_copy(tiny, tmp_path, {"max_new_tokens": 3})
    data = write_jsonl(tmp_path / "q.jsonl", questions(6))
    out = tmp_path / "out"
    c = cfg(teacher, data, out, "sampling.max_tokens=0", "sampling.n=2")
    s = run(c, backend=HFBackend(str(teacher), K))
    rows = all_rows(out)
    reasons = [json.loads(r["meta"])["finish_reason"] for r in rows]
    assert all(len(r["response_ids"]) <= 3 for r in rows)
    want_cut = reasons.count("length")
    assert want_cut == sum(len(r["response_ids"]) == 3 for r in rows) > 0
    assert (s.cut, s.max_tokens, s.rows) == (want_cut, 3, 12)
    err = capsys.readouterr().err
    assert "precompute: max_tokens 3 (generation_config.json max_new_tokens), context 256 " in err
    assert f", 12 rows ({want_cut} cut at max_tokens=3), " in s.text()
    meta = load_manifest(out).metadata
    assert meta.sampling["max_tokens"] == 3
    assert meta.tokenizer_fingerprint == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny))
    stats = cli.compute_stats(out)
    assert (stats["cut_rows"], stats["generated_rows"], stats["max_tokens"]) == (want_cut, 12, 3)


class Recording:
    """A backend that records its calls' sizes and can die on one of them."""

    def __init__(self, inner, die_on_call: int | None = None):
        self.inner, self.die_on_call, self.calls = inner, die_on_call, []
        self.name, self.k, self.vocab_size = inner.name, inner.k, inner.vocab_size

    def generate(self, prompts, seeds, sampling, fixed_length=False):
        self.calls.append(len(prompts))
        if len(self.calls) == self.die_on_call:
            raise RuntimeError("the engine died")
        return self.inner.generate(prompts, seeds, sampling, fixed_length)

    def score(self, prompts, responses):
        self.calls.append(len(prompts))
        return self.inner.score(prompts, responses)

    def close(self) -> None:
        pass


def test_engine_gets_windows_and_rows_are_committed_every_commit_every(tiny, hf, tmp_path):
    """12 examples, windows of 5, commits of 2: engine calls 5, 5, 2; commits after each
    chunk of each window (2, 2, 1 | 2, 2, 1 | 2). An engine dying in the second window loses
    that window's teacher work only: the first window's rows stay committed, and the next
    run does the rest, each example exactly once."""
    from precompute.run import VLLM_WINDOW, engine_window

    data = write_jsonl(
        tmp_path / "q.jsonl", [{**q, "id": f"q{i}"} for i, q in enumerate(questions())]
    )
    c = cfg(tiny, data, tmp_path / "out", "commit_every=2", "engine_window=5")
    commits = []
    engine = Recording(hf)
    s = run(c, backend=engine, progress=lambda summary, todo: commits.append(summary.examples))
    assert engine.calls == [5, 5, 2]
    assert commits == [0, 2, 4, 5, 7, 9, 10, 12]  # the first call: before any work
    assert s.examples == 12

    c = cfg(tiny, data, tmp_path / "crash", "commit_every=2", "engine_window=5")
    with pytest.raises(RuntimeError, match="the engine died"):
        run(c, backend=Recording(hf, die_on_call=2))
    ids = [r["id"] for r in all_rows(tmp_path / "crash")]
    assert len(ids) == len(set(ids)) == 5  # the first window, in 3 commits
    engine = Recording(hf)
    s = run(c, backend=engine)
    assert (s.skipped_done, s.examples, engine.calls) == (5, 7, [5, 2])
    ids = [r["id"] for r in all_rows(tmp_path / "crash")]
    assert sorted(ids) == sorted(f"q{i}" for i in range(12))

    # The defaults: one large window with vLLM, commit_every with transformers (which runs
    # hf.batch_size prompts at a time anyway); never below commit_every.
    assert engine_window(load_config(None, ["commit_every=32"])) == VLLM_WINDOW == 4096
    assert engine_window(load_config(None, ["backend=hf", "commit_every=32"])) == 32
    assert engine_window(load_config(None, ["engine_window=8", "commit_every=32"])) == 32


# ---- tokenizers -----------------------------------------------------------------------------


def test_student_with_the_teachers_tokenizer_writes_ordinary_shards(tiny, data, tmp_path):
    # A student of another tokenizer gets teacher-vocabulary shards: tests/test_crosstok_shards.py.
    shutil.copytree(tiny, tmp_path / "same")
    c = cfg(tiny, data, tmp_path / "out2", f"student={tmp_path / 'same'}", "data.limit=1")
    assert run(c, backend=HFBackend(str(tiny), K)).examples == 1


# ---- workers and resume ---------------------------------------------------------------------


def test_workers_write_disjoint_shards_into_one_folder(tiny, hf, data, tmp_path, capsys):
    out = tmp_path / "out"
    got = []
    for i in range(3):
        c = cfg(tiny, data, out, "num_workers=3", f"worker_index={i}", "sampling.temperature=0")
        got.append(run(c, backend=hf).examples)
    rows = all_rows(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 12 and sum(got) == 12 and min(got) > 0
    writers = {f.writer for f in load_manifest(out).files}
    assert writers == {"w0", "w1", "w2"}
    # Each example is in a file of the worker its id hashes to.
    for f in load_manifest(out).files:
        assert {worker_of(r["id"], 3) for r in all_rows(out) if r["file"] == f.name} <= {
            int(f.writer[1:])
        }
    code, lines = verify(capsys, out)  # three writers' folder: clean, not a warning
    assert code == 0 and len(lines) == 1 and lines[0].startswith("ok:"), lines


def topk_pairs(row) -> list:
    return [
        sorted(zip(i, v, strict=True))
        for i, v in zip(row["topk_ids"].tolist(), row["topk_logprobs"].tolist(), strict=True)
    ]


def test_resume_after_kill_9(tiny, tmp_path, capsys):
    """A subprocess killed mid-run, then re-run: nothing lost, nothing duplicated, committed
    files untouched, and the same rows as an uninterrupted run (greedy decoding). Two samples
    per example, as rounds' student samples are."""
    data = write_jsonl(tmp_path / "q.jsonl", questions(30))
    args = [
        sys.executable,
        "-m",
        "precompute",
        "--config",
        "",
        "--teacher",
        str(tiny),
        "--data",
        str(data),
        "--k",
        str(K),
        "--backend",
        "hf",
        "--no-progress",
        "commit_every=2",
        "sampling.temperature=0",
        "sampling.max_tokens=12",
        "sampling.n=2",
        "hf.batch_size=2",
    ]
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*args, "--out", str(out)],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        m = out / "manifest-w0.json"
        if m.exists() and len(load_manifest(out).files) >= 2:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {f.name: f.sha256 for f in load_manifest(out).files}
    assert 0 < len(before) < 15
    done = subprocess.run([*args, "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    after = {f.name: f.sha256 for f in load_manifest(out).files}
    assert all(after[n] == h for n, h in before.items())
    rows = all_rows(out)
    keys = Counter((r["id"], r["sample_index"]) for r in rows)
    assert len(keys) == 60 and set(keys.values()) == {1}
    assert {k[1] for k in keys} == {0, 1}
    code, lines = verify(capsys, out)  # the killed run's debris is gone: no warning
    assert code == 0 and len(lines) == 1 and lines[0].startswith("ok:"), lines
    # Same content as one uninterrupted run.
    ref = tmp_path / "ref"
    # Same batches as the subprocess, so that padding does not change the last float bits.
    c = cfg(tiny, data, ref, "sampling.temperature=0", "commit_every=30", "hf.batch_size=2",
            "sampling.n=2")  # fmt: skip
    run(c, backend=HFBackend(str(tiny), K, batch_size=2))
    by_key = {(r["id"], r["sample_index"]): r for r in all_rows(ref)}
    for r in rows:
        want = by_key[(r["id"], r["sample_index"])]
        assert r["response_ids"].tolist() == want["response_ids"].tolist()
        assert topk_pairs(r) == topk_pairs(want)  # stored as sets: any order


def test_rerun_of_a_finished_folder_loads_no_teacher(tiny, hf, data, tmp_path):
    c = cfg(tiny, data, tmp_path / "out", "sampling.temperature=0")
    run(c, backend=hf)
    s = run(c, backend=NoEngine())
    assert (s.examples, s.skipped_done) == (0, 12)
    # Other sampling settings are a different data set: refused, not mixed in.
    with pytest.raises(Exception, match="sampling"):
        run(cfg(tiny, data, tmp_path / "out", "sampling.temperature=0.5"), backend=NoEngine())


def test_greedy_with_several_samples_is_the_greedy_answer_each_time(hf):
    """transformers refuses num_return_sequences > 1 without sampling: n greedy samples are
    the one greedy answer n times, as vLLM gives them, with the same top-k."""
    from precompute.config import SamplingConfig

    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    one = hf.generate(prompts, [0, 1, 2], SamplingConfig(n=1, temperature=0, max_tokens=5))
    two = hf.generate(prompts, [0, 1, 2], SamplingConfig(n=2, temperature=0, max_tokens=5))
    assert [len(s) for s in two] == [2, 2, 2]
    for (want,), got in zip(one, two, strict=True):
        for s in got:
            assert s.token_ids.tolist() == want.token_ids.tolist()
            assert np.array_equal(s.topk_ids, want.topk_ids)
            np.testing.assert_allclose(s.topk_logprobs, want.topk_logprobs, atol=1e-5)


def test_both_backends_declare_the_backend_protocol(hf):
    import dataclasses

    from precompute.backend import Backend
    from precompute.config import SamplingConfig
    from vllm_engine.teacher import Sampling, VLLMBackend

    def loose(sig):
        """vllm_engine cannot import precompute.config: the vLLM backend annotates sampling
        with its own Protocol (checked below), not SamplingConfig."""
        ps = [
            p.replace(annotation=inspect.Parameter.empty) if p.name == "sampling" else p
            for p in sig.parameters.values()
        ]
        return sig.replace(parameters=ps)

    for cls in (HFBackend, VLLMBackend):
        for method in ("generate", "score", "close"):
            want = inspect.signature(getattr(Backend, method))
            got = inspect.signature(getattr(cls, method))
            if cls is VLLMBackend:
                want, got = loose(want), loose(got)
            assert got == want, (cls.__name__, method)
    assert set(Sampling.__annotations__) <= {f.name for f in dataclasses.fields(SamplingConfig)}
    assert (hf.name, hf.k, hf.vocab_size) == ("hf", K, 512)

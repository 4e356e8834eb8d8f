"""What users and machines do to precompute's input and output (issue 15, items 6-10 and
"look for more of the same").

The rule for every case: nothing silently dropped, nothing lost that was committed, and one
clear line (`precompute: error: FILE:LINE: FIELD: MESSAGE`, exit status 2) instead of a
traceback. The CLI runs in-process with the transformers backend on the tiny model, so no
vLLM engine is started here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from precompute.__main__ import main, resolve
from precompute.inputs import RAW_CAP_CHARS, read_examples
from precompute.run import load_tokenizer, prepare
from shards.reader import ShardFolder
from tests.fixtures.tiny_model import tiny_model_dir
from tests.precompute_helpers import K, all_rows, cfg, questions, write_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir()


def cli(capsys, tiny, data, out, *extra) -> tuple[int, list[str]]:
    """Run `python -m precompute` in-process; (exit status, stderr lines)."""
    capsys.readouterr()
    argv = [
        "--config",
        "",
        "--teacher",
        str(tiny),
        "--backend",
        "hf",
        "--data",
        str(data),
        "--out",
        str(out),
        "--k",
        str(K),
        "--no-progress",
        "sampling.max_tokens=4",
        "commit_every=2",
        *extra,
    ]
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, [line for line in err.splitlines() if line.strip()]


def error_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("precompute: error: ")]


def read(c):
    return read_examples(c.data, c.mode)


def rejects_of(out: Path) -> list[dict]:
    """Every committed rejects entry of the folder, in commit order."""
    from shards.manifest import load_manifest, read_extra

    extras = [e for e in load_manifest(out).extras if e.kind == "rejects"]
    return [json.loads(x) for e in extras for x in read_extra(out, e).splitlines()]


# ---- item 6: invalid UTF-8, streaming ---------------------------------------------------------


def bad_utf8_file(tmp_path) -> Path:
    path = tmp_path / "q.jsonl"
    lines = [json.dumps(q).encode() for q in questions(3)]
    lines.insert(1, b'{"question": "caf\xe9?"}')  # latin-1, not UTF-8
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_invalid_utf8_line_is_one_error_line(tiny, tmp_path, capsys):
    path = bad_utf8_file(tmp_path)
    rc, lines = cli(capsys, tiny, path, tmp_path / "out")
    assert rc == 2
    assert error_lines(lines)[0] == (
        f"precompute: error: {path}:2: <utf-8>: not valid UTF-8 (byte 18 of the line)"
    )


def test_invalid_utf8_line_is_rejected_alone_with_skip_invalid(tiny, tmp_path, capsys):
    path = bad_utf8_file(tmp_path)
    out = tmp_path / "out"
    rc, _ = cli(capsys, tiny, path, out, "--skip-invalid")
    assert rc == 0
    (rej,) = rejects_of(out)
    assert rej["where"] == f"{path}, line 2" and rej["field"] == "<utf-8>"
    assert rej["row"] == '{"question": "caf\\xe9?"}'  # the bad byte shown, not dropped
    assert len({r["id"] for r in all_rows(out)}) == 3


def test_jsonl_is_streamed_not_read_whole(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "q.jsonl", questions(5))

    for name in ("read_text", "read_bytes"):
        original = getattr(Path, name)

        def whole(self, *a, _original=original, **kw):
            if self == path:
                raise AssertionError("the input file was read whole")
            return _original(self, *a, **kw)

        monkeypatch.setattr(Path, name, whole)
    examples, rejects, total = read(cfg(tiny_model_dir(), path, tmp_path / "o"))
    assert (len(examples), rejects, total) == (5, [], 5)


# ---- item 7: CSV with a wrong field count -----------------------------------------------------


def bad_csv(tmp_path) -> Path:
    path = tmp_path / "q.csv"
    path.write_text('question,answer\n"1 + 1?",2\n"2 + 2?",4,extra\n"3 + 3?",6\n')
    return path


def test_csv_row_with_wrong_field_count_is_one_line(tiny, tmp_path, capsys):
    path = bad_csv(tmp_path)
    rc, lines = cli(capsys, tiny, path, tmp_path / "out")
    assert rc == 2
    expected = f"precompute: error: {path}:3: <csv>: 3 fields, the header has 2"
    assert error_lines(lines)[0] == expected


def test_csv_row_with_wrong_field_count_is_rejected_alone(tmp_path):
    path = bad_csv(tmp_path)
    examples, rejects, total = read(cfg(tiny_model_dir(), path, tmp_path / "o"))
    assert [e.answer for e in examples] == ["2", "6"] and total == 3
    (r,) = rejects
    assert (str(r.where), r.field, r.raw) == (f"{path}, line 3", "<csv>", '"2 + 2?",4,extra')


# ---- items 8, 9: teacher folder, k ------------------------------------------------------------


@pytest.mark.parametrize("offline", [False, True])
def test_missing_teacher_folder_says_so(tmp_path, capsys, monkeypatch, offline):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_jsonl(tmp_path / "q.jsonl", questions(2))
    missing = tmp_path / "no-such-model"
    rc, lines = cli(capsys, missing, data, tmp_path / "out")
    assert rc == 2
    (line,) = error_lines(lines)
    assert line.startswith(f"precompute: error: teacher={missing}: no such folder;")
    assert "downloads nothing" in line
    assert not (tmp_path / "out").exists()


def test_k_above_the_vocabulary_is_one_line(tiny, tmp_path, capsys):
    data = write_jsonl(tmp_path / "q.jsonl", questions(2))
    rc, lines = cli(capsys, tiny, data, tmp_path / "out", "--k", "100000")
    assert rc == 2
    assert error_lines(lines) == [
        "precompute: error: k=100000 is above the teacher's vocabulary size (512)"
    ]


# ---- item 10: BOM, overrides anywhere, rejects of over-long rows -------------------------------


def test_utf8_bom_keeps_line_1(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(q) for q in questions(3)).encode())
    examples, rejects, _ = read(cfg(tiny_model_dir(), path, tmp_path / "o"))
    assert (len(examples), rejects) == (3, [])
    assert examples[0].where.number == 1
    csv_path = tmp_path / "q.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfquestion,answer\n1 + 1?,2\n")
    (ex,), rejects, _ = read(cfg(tiny_model_dir(), csv_path, tmp_path / "o"))
    assert rejects == [] and ex.messages[0]["content"] == "1 + 1?"


def test_key_value_overrides_anywhere_among_the_arguments():
    _, c = resolve(
        ["--config", "", "--out", "X", "k=3", "--data", "F", "sampling.n=2", "--n", "2", "k=4"]
    )
    assert (c.out, c.data.path, c.k, c.sampling.n) == ("X", "F", 4, 2)
    for argv in (["--out", "X", "stray"], ["--out", "X", "k=1", "--n", "1", "stray"]):
        with pytest.raises(ValueError, match="'stray'.* key=value"):
            resolve(["--config", "", *argv])


def test_rejects_of_over_long_rows_hold_the_raw_row_up_to_the_cap(tmp_path):
    tiny = tiny_model_dir()
    long_q = "word " * 100  # about 100 tokens: over max_model_len=64
    huge_q = "x" * (RAW_CAP_CHARS + 500)
    rows = [{"question": "short?"}, {"question": long_q, "id": "a"}, {"question": huge_q}]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    c = cfg(tiny, path, tmp_path / "o", "skip_invalid=true")
    work, rejects = prepare(c, load_tokenizer(str(tiny)), max_len=64)
    assert len(work) == 1
    by_line = {r.where.number: r for r in rejects}
    assert by_line[2].raw == json.dumps(rows[1]) and by_line[2].raw_chars == -1
    assert "max_model_len is 64" in by_line[2].reason
    assert by_line[3].raw == json.dumps(rows[2])[:RAW_CAP_CHARS]
    assert by_line[3].raw_chars == len(json.dumps(rows[2]))


# ---- more of the same -------------------------------------------------------------------------


def test_nul_byte_in_a_line_rejects_that_line(tmp_path):
    path = tmp_path / "q.jsonl"
    good = [json.dumps(q).encode() for q in questions(2)]
    path.write_bytes(good[0] + b'\n{"question": "a\x00b"}\n' + good[1] + b"\n")
    examples, rejects, total = read(cfg(tiny_model_dir(), path, tmp_path / "o"))
    assert (len(examples), total) == (2, 3)
    (r,) = rejects
    assert (r.where.number, r.field) == (2, "<json>") and "\x00" in r.raw


def test_line_separator_inside_a_json_string_is_not_a_line_break(tmp_path):
    # JSON allows U+2028 and U+0085 unescaped in strings; str.splitlines() breaks lines there.
    path = tmp_path / "q.jsonl"
    rows = [{"question": "one\u2028two?"}, {"question": "three\x85four?"}, {"question": "ok?"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    examples, rejects, _ = read(cfg(tiny_model_dir(), path, tmp_path / "o"))
    assert rejects == []
    assert [e.messages[0]["content"] for e in examples] == [r["question"] for r in rows]


def test_parquet_with_nested_types(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    conv = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]
    table = pa.table(
        {
            "messages": [conv, conv[:1]],
            "meta": pa.array([[("k", "v")], []], type=pa.map_(pa.string(), pa.string())),
            "question": [{"text": "nested"}, {"text": "struct"}],
        }
    )
    path = tmp_path / "n.parquet"
    pq.write_table(table, path)
    c = cfg(tiny_model_dir(), path, tmp_path / "o", "data.messages_field=messages")
    examples, rejects, _ = read(c)
    assert [e.answer for e in examples] == ["4", None] and rejects == []
    # The struct column as the question: each row rejected by row and field, none dropped.
    examples, rejects, total = read(cfg(tiny_model_dir(), path, tmp_path / "o"))
    assert (examples, total) == ([], 2)
    assert [r.message() for r in rejects] == [
        f"{path}:row {i}: question: expected a string, got dict" for i in (0, 1)
    ]


def test_saved_dataset_with_another_schema_is_one_line(tiny, tmp_path, capsys):
    import datasets

    # prompt/completion is TRL's format and is read (tests/test_data_formats.py); a table of
    # no known format is refused in one line that lists its columns.
    path = tmp_path / "saved"
    datasets.Dataset.from_list([{"input": "a?", "output": "b"}] * 3).save_to_disk(str(path))
    rc, lines = cli(capsys, tiny, path, tmp_path / "out")
    assert rc == 2
    assert error_lines(lines) == [
        f"precompute: error: {path}: no known format: columns [input, output]; looked for: "
        "question(+answer) | messages | prompt(+completion); or name them with data.format "
        "and data.*_field"
    ]


def test_saved_dataset_whose_data_file_has_another_schema_is_one_line(tiny, tmp_path, capsys):
    import datasets

    path = tmp_path / "saved"
    datasets.Dataset.from_list(questions(3)).save_to_disk(str(path))
    other = tmp_path / "other"
    datasets.Dataset.from_list([{"x": 1}] * 5).save_to_disk(str(other))
    (arrow,) = path.glob("data-*.arrow")
    (arrow_other,) = other.glob("data-*.arrow")
    arrow.write_bytes(arrow_other.read_bytes())
    rc, lines = cli(capsys, tiny, path, tmp_path / "out")
    assert rc == 2
    (line,) = error_lines(lines)
    assert line.startswith(f"precompute: error: {path}: ")


def test_folder_of_jsonl_files_is_read_in_name_order(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [{"question": "b1?"}, "{bad"])
    write_jsonl(folder / "a.jsonl", [{"question": "a1?"}, {"question": "a2?"}])
    (folder / ".a.jsonl.swp").write_text("junk")
    (folder / "README.md").write_text("not data")
    examples, rejects, total = read(cfg(tiny_model_dir(), folder, tmp_path / "o"))
    assert [e.messages[0]["content"] for e in examples] == ["a1?", "a2?", "b1?"]
    assert [e.index for e in examples] == [0, 1, 2] and total == 4
    (r,) = rejects
    assert (str(r.where), r.index) == (f"{folder / 'b.jsonl'}, line 2", 3)
    (folder / "c.csv").write_text("question\nc?\n")
    with pytest.raises(ValueError, match="mixes formats"):
        read(cfg(tiny_model_dir(), folder, tmp_path / "o"))
    (folder / "c.csv").unlink()
    (folder / "more").mkdir()
    write_jsonl(folder / "more" / "d.jsonl", [{"question": "d?"}])
    with pytest.raises(ValueError, match=r"data files in subfolders \(more/d.jsonl\)"):
        read(cfg(tiny_model_dir(), folder, tmp_path / "o"))


def test_json_array_that_is_not_utf8_or_not_json_is_one_line(tiny, tmp_path, capsys):
    path = tmp_path / "q.json"
    for body, expected in (
        (b'[\n {"question": "a"},\n {"question": "\xff"}\n]', "3: not valid UTF-8"),
        (b'[\n {"question": "a"},\n {"question": }\n]', "3: not valid JSON: Expecting value"),
    ):
        path.write_bytes(body)
        rc, lines = cli(capsys, tiny, path, tmp_path / "out")
        assert rc == 2
        assert error_lines(lines) == [f"precompute: error: {path}:{expected}"]


def test_missing_config_file_and_bad_yaml_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("k: [1,\n")
    for config in (tmp_path / "none.yaml", bad):
        capsys.readouterr()
        assert main(["--config", str(config), "--print-config"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"precompute: error: {config}: ") and err.count("\n") == 1


def test_folder_made_with_another_k_is_one_line(tiny, tmp_path, capsys):
    data = write_jsonl(tmp_path / "q.jsonl", questions(2))
    out = tmp_path / "out"
    assert cli(capsys, tiny, data, out)[0] == 0
    rc, lines = cli(capsys, tiny, data, out, "--k", "4")
    assert rc == 2
    (line,) = error_lines(lines)
    assert line.startswith(f"precompute: error: {out}") and "k" in line


def test_output_path_that_is_a_file_and_an_empty_teacher_folder(tiny, tmp_path, capsys):
    data = write_jsonl(tmp_path / "q.jsonl", questions(2))
    out = tmp_path / "out"
    out.write_text("a file, not a folder")
    rc, lines = cli(capsys, tiny, data, out)
    assert rc == 2
    assert error_lines(lines) == [f"precompute: error: {out}: File exists"]
    empty = tmp_path / "empty-model"
    empty.mkdir()
    rc, lines = cli(capsys, empty, data, tmp_path / "out2")
    assert rc == 2
    (line,) = error_lines(lines)
    assert line.startswith("precompute: error: ") and str(empty) in line


# ---- the output folder: read-only, a full disk ------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, ro) -> a folder on a small tmpfs (needs root and a mount namespace that
    allows it; skipped otherwise); unmounted at the end."""
    mounted = []

    def mount(size: str, ro: bool = False) -> Path:
        d = tmp_path / f"mnt{len(mounted)}"
        d.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], check=False)
        if r.returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_read_only_output_folder_is_one_line(tiny, tmp_path, capsys, tmpfs):
    data = write_jsonl(tmp_path / "q.jsonl", questions(2))
    if os.geteuid() == 0:  # root writes through file modes: a read-only mount instead
        out = tmpfs("1m", ro=True)
    else:
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o555)
    rc, lines = cli(capsys, tiny, data, out)
    assert rc == 2
    (line,) = error_lines(lines)
    assert line.startswith(f"precompute: error: {out}/")
    assert "Read-only file system" in line or "Permission denied" in line


def test_file_size_limit_is_one_line(tiny, tmp_path):
    """A full disk where no tmpfs can be mounted: RLIMIT_FSIZE makes writes fail (EFBIG)."""
    import resource

    data = write_jsonl(tmp_path / "q.jsonl", questions(4))
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "precompute", "--config", "", "--teacher", str(tiny),
        "--backend", "hf", "--data", str(data), "--out", str(out), "--k", str(K),
        "--no-progress", "sampling.max_tokens=4",
    ]  # fmt: skip

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        cmd, cwd=REPO, env=env, preexec_fn=limit, capture_output=True, text=True, check=False
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("precompute: error: ")]
    assert line.startswith(f"precompute: error: {out}") and "File too large" in line


def test_full_disk_in_a_spawned_worker_is_one_line(tiny, tmp_path):
    """With two local workers the error happens in a child process: it reaches the user as
    the same one line, naming the worker, and no traceback."""
    import resource

    data = write_jsonl(tmp_path / "q.jsonl", questions(4))
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "precompute", "--config", "", "--teacher", str(tiny),
        "--backend", "hf", "--data", str(data), "--out", str(out), "--k", str(K),
        "--num-workers", "2", "--no-progress", "sampling.max_tokens=4",
    ]  # fmt: skip

    def limit():  # inherited by the spawned workers
        resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        cmd, cwd=REPO, env=env, preexec_fn=limit, capture_output=True, text=True, check=False
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("precompute: error: ")]
    assert line.startswith("precompute: error: worker w"), line
    assert f": {out}" in line and "File too large" in line, line


def test_full_disk_keeps_what_was_committed_and_resumes(tiny, tmp_path, capsys, tmpfs):
    data = write_jsonl(tmp_path / "q.jsonl", questions(12))
    out = tmpfs("48k")
    rc, lines = cli(capsys, tiny, data, out, "sampling.temperature=0")
    assert rc == 2
    (line,) = error_lines(lines)
    assert line.startswith(f"precompute: error: {out}") and "No space left on device" in line
    committed = {r["id"] for r in all_rows(out)}
    assert 0 < len(committed) < 12  # some chunks were committed before the disk filled
    subprocess.run(["mount", "-o", "remount,size=16m", str(out)], check=True)
    rc, _ = cli(capsys, tiny, data, out, "sampling.temperature=0")
    assert rc == 0
    rows = all_rows(out)
    assert sorted(r["id"] for r in rows) == sorted({r["id"] for r in rows})  # no duplicates
    assert len(rows) == 12 and committed <= {r["id"] for r in rows}
    ShardFolder(out)  # the manifest loads


# ---- issue 21: conversations, each bad one named by its turn ------------------------------

U = {"role": "user", "content": "Find the mug."}
A = {"role": "assistant", "content": "I look around."}


def call(arguments) -> dict:
    fn = {"name": "look", "arguments": arguments}
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": fn}],
    }


BAD_CONVERSATIONS = [
    ([U, {"role": "robot", "content": "beep"}, A], "messages[1].role",
     "turn 1 (robot): unknown role 'robot' (expected one of system, user, assistant, tool)"),
    ([U, {"role": "assistant", "content": "  "}], "messages[1].content",
     "turn 1 (assistant): an assistant turn needs content or tool_calls"),
    ([U, call("{oops")], "messages[1].tool_calls",
     "turn 1 (assistant): tool_calls[0].function.arguments is not valid JSON: Expecting "
     "property name enclosed in double quotes"),
    ([U, call("[1, 2]")], "messages[1].tool_calls",
     "turn 1 (assistant): tool_calls[0].function.arguments is not a JSON object"),
    ([U, call(7)], "messages[1].tool_calls",
     "turn 1 (assistant): tool_calls[0].function.arguments: expected a JSON object or a "
     "string of one, got int"),
    ([U, {"role": "tool", "content": "a mug"}, A], "messages[1]",
     "turn 1 (tool): a tool message with no preceding tool call"),
    ([U, call({}), {"role": "tool", "content": "a"}, {"role": "tool", "content": "b"}, A],
     "messages[3]", "turn 3 (tool): more tool messages than the 1 tool call(s) before them"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x.png"}]}, A],
     "messages[0].content[0]", "turn 0 (user): expected a text part {type: text, text: str}"),
    ([U, {**A, "train": "yes"}], "messages[1].train", "turn 1 (assistant): expected true or "
     "false, got 'yes'"),
    ([U], "messages", "score mode needs an assistant turn to score: none of its 1 turns is an "
     "assistant's"),
]  # fmt: skip


def test_bad_conversations_are_refused_one_line_each_with_the_turn(tiny, tmp_path, capsys):
    rows = [{"messages": [U, A]}] + [{"messages": m} for m, _, _ in BAD_CONVERSATIONS]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    rc, lines = cli(capsys, tiny, data, tmp_path / "out", "--mode", "score")
    assert rc == 2
    assert error_lines(lines)[:-1] == [
        f"precompute: error: {data}:{n}: {field}: {reason}"
        for n, (_, field, reason) in enumerate(BAD_CONVERSATIONS, start=2)
    ]
    assert error_lines(lines)[-1].startswith(
        f"precompute: error: {len(BAD_CONVERSATIONS)} invalid input row(s) of 11: "
    )
    # Marks that leave nothing to train.
    marked = write_jsonl(tmp_path / "m.jsonl", [{"messages": [U, {**A, "train": False}]}])
    c = cfg(tiny, marked, tmp_path / "o", "mode=score", "data.train_turns=marked")
    assert [r.message() for r in read(c)[1]] == [
        f"{marked}:1: messages: score mode needs an assistant turn to score: every assistant "
        "turn is marked `train: false` (data.train_turns=marked)"
    ]


def test_conversations_whose_spans_do_not_hold_are_rejected_with_turn_and_token(tiny, tmp_path):
    """Found while rendering, before the teacher loads: a generation prompt that is not a
    prefix of the conversation (Qwen3's template with thinking off), spans that differ
    between the views (a template that writes the system message into assistant turns), a
    conversation longer than the context."""
    from tests.precompute_helpers import QWEN3_LIKE_TEMPLATE, conversation, with_template

    data = write_jsonl(
        tmp_path / "c.jsonl",
        [{"id": "a", "messages": conversation(1, 1)}, {"id": "b", "messages": conversation(2, 2)}],
    )

    def rejects(teacher, *extra, max_len=None):
        c = cfg(teacher, data, tmp_path / "o", "mode=score", "skip_invalid=true", *extra)
        work, rej = prepare(c, load_tokenizer(str(teacher)), max_len)
        return [ex.id for ex, _ in work], [r.message() for r in rej]

    qwen3 = with_template(tiny, tmp_path / "qwen3", QWEN3_LIKE_TEMPLATE)
    assert rejects(qwen3) == (["a", "b"], [])
    assert rejects(qwen3, "view.thinking=false") == (
        ["a"],
        [f"{data}:2: messages[2]: turn 2: the turns before it with the generation prompt are "
         "not a prefix of the whole conversation (whole vs prefix) at token 43: '2' (id 20) "
         "vs '<' (id 30)"],
    )  # fmt: skip
    system_in_turns = with_template(
        tiny,
        tmp_path / "sys",
        "{%- for m in messages -%}{{- '<|im_start|>' + m.role + '\\n' + m.content -}}"
        "{%- if m.role == 'assistant' -%}{{- ' (' + messages[0].content + ')' -}}{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
    )
    ids, msgs = rejects(system_in_turns, "view.default_experience=Hint.")
    assert ids == [] and [m.split(": turn")[0] for m in msgs] == [
        f"{data}:1: messages[2]",
        f"{data}:2: messages[2]",
    ]
    assert all("differ between the views (student vs teacher)" in m for m in msgs), msgs
    ids, msgs = rejects(tiny, max_len=60)
    assert ids == ["a"] and len(msgs) == 1
    assert msgs[0].startswith(f"{data}:2: messages: teacher view needs ")
    assert msgs[0].endswith(" tokens, max_model_len is 60")

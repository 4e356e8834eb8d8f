"""Teacher-vocabulary shards (issue #23 §1): the folder's teacher tokenizer
(crosstok/folder.py) and precompute writing shards for a student of another tokenizer."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from transformers import AutoTokenizer

from crosstok.folder import (
    TOKENIZER_EXTRA,
    pack_tokenizer,
    teacher_vocabulary,
    tokenizer_files,
)
from crosstok.tokens import CrossTokError
from precompute.inputs import InputError
from precompute.run import run
from shards.fingerprint import tokenizer_fingerprint
from shards.manifest import load_manifest, read_extra
from shards.writer import ShardRow, ShardWriter
from tests.fixtures.tiny_model import tiny_model_dir
from tests.precompute_helpers import (
    K,
    all_rows,
    cfg,
    other_tokenizer_student,
    questions,
    write_jsonl,
)
from tests.shards_helpers import metadata


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def tiny_tok(tiny):
    return AutoTokenizer.from_pretrained(str(tiny))


def _row() -> ShardRow:
    k = 16
    return ShardRow(
        id="a",
        prompt_ids=[1, 2],
        teacher_prompt_ids=[1, 2],
        response_ids=[3],
        topk_ids=np.arange(k)[None],
        topk_logprobs=np.full((1, k), -3.0, dtype=np.float32),
    )


def _folder(tmp_path, vocabulary: dict | None, tar: bytes | None = None):
    extra = {} if vocabulary is None else {"vocabulary": vocabulary}
    out = tmp_path / "shards"
    with ShardWriter(out, metadata(extra=extra)) as w:
        if tar is not None:
            w.add_extra(TOKENIZER_EXTRA, tar, ".tar")
        w.add([_row()])
    return out


def _vocabulary(fp: str, source: dict) -> dict:
    return {
        "kind": "teacher",
        "teacher_tokenizer_fingerprint": fp,
        "teacher_tokenizer": source,
        "student_tokenizer_fingerprint": "sha256:student",
    }


# ---- crosstok/folder.py ---------------------------------------------------------------------


def test_ordinary_shards_have_no_teacher_vocabulary(tmp_path):
    assert teacher_vocabulary(_folder(tmp_path, None)) is None


def test_teacher_tokenizer_from_the_folders_extra(tiny, tiny_tok, tmp_path):
    fp = tokenizer_fingerprint(tiny_tok)
    tar = pack_tokenizer(tokenizer_files(tiny_tok, tiny))
    assert tar == pack_tokenizer(tokenizer_files(tiny_tok, tiny))  # same bytes every time
    folder = _folder(tmp_path, _vocabulary(fp, {"extra": TOKENIZER_EXTRA}), tar)
    tv = teacher_vocabulary(folder)
    assert (tv.fingerprint, tv.student_fingerprint) == (fp, "sha256:student")
    assert tokenizer_fingerprint(tv.tokenizer()) == fp


def test_teacher_tokenizer_from_a_path(tiny, tiny_tok, tmp_path):
    fp = tokenizer_fingerprint(tiny_tok)
    folder = _folder(tmp_path, _vocabulary(fp, {"path": str(tiny)}))
    assert tokenizer_fingerprint(teacher_vocabulary(folder).tokenizer()) == fp


def test_save_pretrained_files_when_the_folder_has_none(tiny_tok, tmp_path):
    """A GGUF teacher has no tokenizer files: what save_pretrained writes is stored."""
    files = tokenizer_files(tiny_tok, tmp_path)  # tmp_path: no tokenizer.json there
    assert "tokenizer.json" in files
    fp = tokenizer_fingerprint(tiny_tok)
    folder = _folder(tmp_path, _vocabulary(fp, {"extra": TOKENIZER_EXTRA}), pack_tokenizer(files))
    assert tokenizer_fingerprint(teacher_vocabulary(folder).tokenizer()) == fp


@pytest.mark.parametrize(
    "source, tar, message",
    [
        ({"extra": TOKENIZER_EXTRA}, None, "no manifest lists one"),
        ({"path": "/nonexistent/tok"}, None, "/nonexistent/tok, which does not exist"),
        ({}, None, "neither {'extra': KIND} nor {'path': DIR}"),
        ({"extra": TOKENIZER_EXTRA}, b"not a tar", "not a tokenizer tar"),
        ({"extra": TOKENIZER_EXTRA}, pack_tokenizer({"x.txt": b"x"}), "cannot load it from"),
    ],
)
def test_teacher_tokenizer_not_found_is_one_line_naming_the_folder(tmp_path, source, tar, message):
    folder = _folder(tmp_path, _vocabulary("sha256:t", source), tar)
    tv = teacher_vocabulary(folder)  # opening the metadata is fine; loading is not
    with pytest.raises(CrossTokError) as e:
        tv.tokenizer()
    text = str(e.value)
    assert "\n" not in text and str(folder) in text and message in text


@pytest.mark.parametrize("damage", ["delete", "change"])
def test_a_damaged_tokenizer_extra_is_one_line_naming_the_folder(tmp_path, damage):
    tar = pack_tokenizer({"tokenizer.json": b"{}"})
    folder = _folder(tmp_path, _vocabulary("sha256:t", {"extra": TOKENIZER_EXTRA}), tar)
    (path,) = folder.glob(f"{TOKENIZER_EXTRA}-*.tar")
    path.unlink() if damage == "delete" else path.write_bytes(tar[:-1] + b"x")
    with pytest.raises(CrossTokError) as e:
        teacher_vocabulary(folder).tokenizer()
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{folder}: teacher tokenizer not")


def test_a_different_tokenizer_at_the_path_is_refused(tiny, tmp_path):
    folder = _folder(tmp_path, _vocabulary("sha256:other", {"path": str(tiny)}))
    with pytest.raises(CrossTokError, match="is not the one the shards were made with"):
        teacher_vocabulary(folder).tokenizer()


# ---- precompute writing teacher-vocabulary shards -------------------------------------------


@pytest.fixture(scope="module")
def student(tiny, tmp_path_factory):
    return other_tokenizer_student(tiny, tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def hf(tiny):
    from precompute.hf_backend import HFBackend

    return HFBackend(str(tiny), K, batch_size=16)


def rejects_of(folder) -> list[dict]:
    lines = []
    for e in load_manifest(folder).extras:
        if e.kind == "rejects":
            lines += read_extra(folder, e).decode().splitlines()
    return [json.loads(line) for line in lines]


def _crosstok_rows(folder):
    rows = all_rows(folder)
    assert rows
    return [(r, json.loads(r["meta"])["crosstok"]) for r in rows]


def _check_token_bytes(table, row, ct) -> None:
    """The stored token spans tile the response text, each token's bytes are its span, and
    only trailing special tokens (the EOS) have empty spans at the end."""
    data = ct["response_text"].encode("utf-8")
    ids = list(row["response_ids"])
    assert len(ct["token_bytes"]) == len(ids)
    end = 0
    for t, (a, b) in zip(ids, ct["token_bytes"], strict=True):
        assert a == end
        if table.special[t]:
            assert a == b == len(data)
        else:
            assert data[a:b] == table.pieces[t] and b > a
        end = b
    assert end == len(data)


def test_score_mode_keeps_texts_spans_and_the_teacher_tokenizer(
    tiny, tiny_tok, student, hf, tmp_path
):
    from crosstok.tokens import token_table

    rows = [
        {"question": "What is 2 + 3?", "answer": "2 + 3 = 5. café ünïcode ✓"},
        {"question": "Name a capital.", "answer": "Paris is the capital of France."},
        # A special token inside the text: encoding it gives <|im_end|>, which is no text.
        {"question": "Bad?", "answer": "Paris.<|im_end|> more"},
    ]
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    out = tmp_path / "out"
    lines = []
    c = cfg(tiny, data, out, "mode=score", f"student={student}", "skip_invalid=true")
    summary = run(c, backend=hf, log=lines.append)
    assert summary.rejects == 1 and summary.rows == 2
    assert "training will align them" in lines[-1]

    meta = load_manifest(out).metadata
    fp = tokenizer_fingerprint(tiny_tok)
    assert meta.tokenizer_fingerprint == fp
    s_fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(student)))
    assert meta.extra["vocabulary"] == {
        "kind": "teacher",
        "teacher_tokenizer_fingerprint": fp,
        "teacher_tokenizer": {"extra": TOKENIZER_EXTRA},
        "student_tokenizer_fingerprint": s_fp,
    }
    tv = teacher_vocabulary(out)
    assert tv.fingerprint == fp and tokenizer_fingerprint(tv.tokenizer()) == fp

    table = token_table(tiny_tok)
    got = {}
    for row, ct in _crosstok_rows(out):
        _check_token_bytes(table, row, ct)
        assert ct["thinking"] is None
        got[ct["prompt_messages"][0]["content"]] = ct
    assert got["What is 2 + 3?"]["prompt_messages"] == [
        {"role": "user", "content": "What is 2 + 3?"}
    ]
    assert got["What is 2 + 3?"]["response_text"] == "2 + 3 = 5. café ünïcode ✓"

    (bad,) = rejects_of(out)
    assert bad["where"].endswith("q.jsonl, line 3") and bad["field"] == "response"
    assert "does not round-trip through the teacher tokenizer" in bad["reason"]
    assert "\n" not in bad["reason"]


def test_conversations_keep_each_trained_turn_one_turn_keeps_its_prompt_messages(
    tiny, tiny_tok, student, hf, tmp_path
):
    """Several trained turns: meta["crosstok"] holds the messages and per turn its text and
    token bytes; one trained turn keeps the single-turn form; a turn whose tokens spell no
    text (a chat marker inside it) is rejected before any teacher time, one line."""
    from crosstok.tokens import token_table

    one = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "It is 5."},
    ]
    two = [*one, {"role": "user", "content": "And 3 + 4?"}, {"role": "assistant", "content": "7."}]
    bad = [*one, two[2], {"role": "assistant", "content": "7.<|im_start|> or 8."}]
    rows = [{"messages": two}, {"messages": one}, {"messages": bad}]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "out"
    c = cfg(tiny, data, out, "mode=score", "data.messages_field=messages", f"student={student}")
    with pytest.raises(InputError) as e:
        run(c, backend=hf)
    (reject,) = e.value.rejects
    line = reject.message()
    assert "c.jsonl:3" in line and "assistant message 3" in line and "\n" not in line
    assert "does not round-trip" in line

    summary = run(replace(c, skip_invalid=True), backend=hf)
    assert summary.rows == 2
    table = token_table(tiny_tok)
    got = {len(json.loads(r["meta"])["crosstok"].get("spans", [0])): r for r in all_rows(out)}
    row, ct = got[1], json.loads(got[1]["meta"])["crosstok"]
    assert ct["prompt_messages"] == one[:1]
    assert ct["response_text"] == "It is 5."  # the turn's end-of-turn token is markup
    _check_token_bytes(table, row, ct)
    row, ct = got[2], json.loads(got[2]["meta"])["crosstok"]
    assert ct["messages"] == two and ct["thinking"] is None
    assert [(s["message"], s["response_text"]) for s in ct["spans"]] == [(1, "It is 5."), (3, "7.")]
    conv = np.concatenate([row["prompt_ids"], row["response_ids"]])
    for s, a, n in zip(ct["spans"], row["span_starts"], row["span_lengths"], strict=True):
        _check_token_bytes(table, {"response_ids": conv[a : a + n]}, s)


def test_generate_mode_rows_spell_their_text_or_are_rejected(tiny, tiny_tok, student, hf, tmp_path):
    """The random tiny teacher may emit tokens that are no text (a special token, half a
    character at the cut): such samples are rejects; every other row tiles its text."""
    from crosstok.tokens import token_table

    data = write_jsonl(tmp_path / "q.jsonl", questions(6))
    out = tmp_path / "out"
    c = cfg(tiny, data, out, f"student={student}", "sampling.n=2", "backend=hf")
    summary = run(c, backend=hf, log=lambda _: None)
    table = token_table(tiny_tok)
    rows = _crosstok_rows(out)
    for row, ct in rows:
        _check_token_bytes(table, row, ct)
        assert ct["prompt_messages"][0]["role"] == "user"
    assert summary.rows == len(rows) and summary.rows + summary.rejects == 12
    assert summary.rejects and len(rejects_of(out)) == summary.rejects
    assert all("response (sample " in r["field"] for r in rejects_of(out))
    # A rerun redoes nothing: examples all of whose samples were rejected are done too.
    extras = load_manifest(out).extras
    again = run(c, backend=hf, log=lambda _: None)
    assert (again.examples, again.skipped_done) == (0, 6)
    assert load_manifest(out).extras == extras


def test_same_tokenizer_shards_are_unchanged(tiny, hf, tmp_path):
    """A student with the teacher's tokenizer (or none) gives the same ordinary shards:
    no vocabulary entry, no tokenizer extra, no crosstok meta, the same rows."""
    data = write_jsonl(tmp_path / "q.jsonl", questions(4))
    shutil.copytree(tiny, tmp_path / "same")
    runs = []
    for name, extra in (("none", ()), ("same", (f"student={tmp_path / 'same'}",))):
        out = tmp_path / name
        run(cfg(tiny, data, out, "mode=score", *extra), backend=hf, log=lambda _: None)
        runs.append(out)
        assert teacher_vocabulary(out) is None
        assert "vocabulary" not in load_manifest(out).metadata.extra
        assert not [e for e in load_manifest(out).extras if e.kind == TOKENIZER_EXTRA]
    a, b = (load_manifest(o) for o in runs)
    assert a.metadata.identity() == b.metadata.identity()
    ra, rb = (all_rows(o) for o in runs)
    assert len(ra) == len(rb) == 4
    for x, y in zip(ra, rb, strict=True):
        assert x.keys() == y.keys()
        for key in x.keys() - {"file"}:
            assert np.array_equal(np.asarray(x[key]), np.asarray(y[key])), key
    assert all("crosstok" not in json.loads(r["meta"]) for r in ra)


def test_every_worker_commits_the_same_tokenizer_tar(tiny, tiny_tok, student, hf, tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", questions(4))
    out = tmp_path / "out"
    for i in (0, 1):
        c = cfg(tiny, data, out, "mode=score", f"student={student}", "num_workers=2")
        run(replace(c, worker_index=i), backend=hf, log=lambda _: None)
    tars = [e for e in load_manifest(out).extras if e.kind == TOKENIZER_EXTRA]
    assert [e.writer for e in tars] == ["w0", "w1"] and tars[0].sha256 == tars[1].sha256
    fp = tokenizer_fingerprint(tiny_tok)
    assert tokenizer_fingerprint(teacher_vocabulary(out).tokenizer()) == fp
    assert len(all_rows(out)) == 4

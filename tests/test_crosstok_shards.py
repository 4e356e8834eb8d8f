"""Teacher-vocabulary shards (issue #23 §1): the folder's teacher tokenizer
(crosstok/folder.py) and precompute writing shards for a student of another tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from crosstok.folder import (
    TOKENIZER_EXTRA,
    pack_tokenizer,
    teacher_vocabulary,
    tokenizer_files,
)
from crosstok.tokens import CrossTokError
from shards.fingerprint import tokenizer_fingerprint
from shards.writer import ShardRow, ShardWriter
from tests.fixtures.tiny_model import tiny_model_dir
from tests.shards_helpers import metadata


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def tiny_tok(tiny):
    from transformers import AutoTokenizer

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


def test_a_different_tokenizer_at_the_path_is_refused(tiny, tmp_path):
    folder = _folder(tmp_path, _vocabulary("sha256:other", {"path": str(tiny)}))
    with pytest.raises(CrossTokError, match="is not the one the shards were made with"):
        teacher_vocabulary(folder).tokenizer()

"""Teacher-vocabulary shards: precompute for a named student whose tokenizer differs.

The rows keep the teacher's token ids and top-k (the teacher's vocabulary), and what aligning
them with any student tokenizer later needs (issue #23 §1, docs/cross-tokenizer.md "What the
shards keep"): per row `meta["crosstok"]` = the student view as chat messages, the thinking
mode, the response text and each response token's byte span in it; per folder
`metadata.extra["vocabulary"]` and the teacher tokenizer's files as the manifest extra
`teacher_tokenizer` (crosstok/folder.py opens them again).

The response text is exactly what the teacher's response tokens spell: their bytes
(crosstok/tokens.py) concatenate to its UTF-8 bytes. Trailing special tokens (the EOS that
ends a response, score.append_eos's EOS) are markup, not text: each gets the empty span
[len, len] at the end. A special token inside the text, or tokens that do not spell the text
(score mode: a response that does not round-trip through the teacher's tokenizer; generate
mode: a response cut inside a UTF-8 character) reject the row with the reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from crosstok.folder import (
    TEACHER_KIND,
    TOKENIZER_EXTRA,
    pack_tokenizer,
    tokenizer_files,
)

# token_bytes lives in crosstok/ (on-policy training builds the same spans); imported here
# for this module's callers.
from crosstok.tokens import TokenTable, token_bytes, token_table

META_KEY = "crosstok"  # row meta key


@dataclass(frozen=True)
class TeacherVocab:
    """What a run writing teacher-vocabulary shards needs: the teacher's token table, the
    folder's metadata entry and the packed tokenizer files."""

    table: TokenTable
    metadata: dict  # metadata.extra["vocabulary"]
    tar: bytes  # the teacher tokenizer's files (crosstok.folder.pack_tokenizer)


def teacher_vocab(teacher: str, tokenizer, tok_fp: str, student_fp: str) -> TeacherVocab:
    """The teacher-vocabulary setup of `teacher` (its tokenizer and fingerprint `tok_fp`) for a
    student tokenizer of fingerprint `student_fp`. Raises CrossTokError (one line) when the
    teacher's tokens' bytes cannot be read or its tokenizer cannot be stored."""
    table = token_table(tokenizer)
    tar = pack_tokenizer(tokenizer_files(tokenizer, teacher))
    return TeacherVocab(
        table=table,
        metadata={
            "kind": TEACHER_KIND,
            "teacher_tokenizer_fingerprint": tok_fp,
            "teacher_tokenizer": {"extra": TOKENIZER_EXTRA},
            "student_tokenizer_fingerprint": student_fp,
        },
        tar=tar,
    )


def commit_tokenizer(writer, vocab: TeacherVocab) -> None:
    """Commit the teacher tokenizer's files as this writer's `teacher_tokenizer` extra, once:
    a resumed run finds it and writes nothing."""
    sha = hashlib.sha256(vocab.tar).hexdigest()
    if not any(e.sha256 == sha for e in writer.extras(TOKENIZER_EXTRA)):
        writer.add_extra(TOKENIZER_EXTRA, vocab.tar, ".tar")


def row_meta(table: TokenTable, messages, thinking, ids, text: str | None = None) -> dict:
    """meta["crosstok"] of a row: the student view `messages`, `thinking`, and the response
    text and token bytes of its response tokens `ids` (see `token_bytes`)."""
    text, spans = token_bytes(table, ids, text)
    return {
        "prompt_messages": [dict(m) for m in messages],
        "thinking": thinking,
        "response_text": text,
        "token_bytes": spans,
    }

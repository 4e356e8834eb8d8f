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

A conversation row with several trained spans (score mode's `messages`, a rollout's
episode) keeps the same per span: meta["crosstok"] = {"messages", "thinking", "spans"}, the
whole conversation as the teacher's template rendered it (`drop_reasoning` applied) and per
trained span {"message": its assistant message's index, "response_text", "token_bytes"} of
that span's teacher tokens (`conversation_meta`). Rows with one trained span keep the
single-turn form above (no "spans" key), so they are unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from crosstok.folder import (
    TEACHER_KIND,
    TOKENIZER_EXTRA,
    pack_tokenizer,
    tokenizer_files,
)

# token_bytes lives in crosstok/ (on-policy training builds the same spans); imported here
# for this module's callers.
from crosstok.tokens import CrossTokError, TokenTable, token_bytes, token_table
from datafiles.conversation import drop_reasoning

META_KEY = "crosstok"  # row meta key
SPANS_KEY = "spans"  # meta["crosstok"] key of a conversation row (several trained spans)


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


def conversation_meta(
    table: TokenTable, messages, thinking, trained, conversation_ids, spans
) -> dict:
    """meta["crosstok"] of a conversation row with several trained spans: `messages` (the
    whole conversation, as the teacher's template rendered it), `thinking`, and per span
    {"message": trained[j], "response_text", "token_bytes"} of its teacher tokens
    conversation_ids[start:start + length] (`token_bytes`: the text they spell, a trailing
    end-of-turn token markup). `trained` (S,) message indices and `spans` (S,) (start,
    length) in conversation_ids' coordinates, in order. Raises CrossTokError (one line,
    naming the assistant message) when a span's tokens do not spell text."""
    if len(trained) != len(spans):
        raise CrossTokError(f"{len(trained)} trained turns but {len(spans)} spans")
    ids = np.asarray(conversation_ids, dtype=np.int64)
    out = []
    for j, (start, length) in zip(trained, spans, strict=True):
        try:
            text, tb = token_bytes(table, ids[start : start + length])
        except CrossTokError as e:
            raise CrossTokError(f"assistant message {j}: {e}") from None
        out.append({"message": int(j), "response_text": text, "token_bytes": tb})
    return {"messages": [dict(m) for m in messages], "thinking": thinking, SPANS_KEY: out}


def conversation_crosstok(
    table: TokenTable, tokenizer, messages, trained, kwargs, thinking, conversation_ids, spans
) -> dict:
    """meta["crosstok"] of a conversation row: its teacher-view `tokenizer`'s rendering of
    `messages` with the template arguments `kwargs` gave `conversation_ids` (the student
    view's conversation, prompt ++ response) and the trained `spans` (start, length) of the
    assistant messages `trained`. One span: the single-turn form (`row_meta`: the messages
    before the turn, its text); several: `conversation_meta` of the messages as the template
    renders them (reasoning it drops anyway removed, datafiles.conversation.drop_reasoning),
    so the student's template renders the same turns. Raises CrossTokError (one line)."""
    ids = np.asarray(conversation_ids, dtype=np.int64)
    if len(spans) == 1:
        (start, length), j = spans[0], trained[0]
        return row_meta(table, list(messages)[:j], thinking, ids[start : start + length])
    rendered = drop_reasoning(tokenizer, list(messages), kwargs)
    return conversation_meta(table, rendered, thinking, trained, ids, spans)

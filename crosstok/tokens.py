"""The exact bytes of every token of a tokenizer, and encoding a text that must come back intact.

Why bytes and not the tokenizers' offset mappings: offsets are character offsets, so a
byte-level BPE token that holds half of a multi-byte UTF-8 character gets the whole character's
span, shared with its neighbour (SmolLM2 splits 'é' into two tokens with the same (1, 2)
offsets), and an alignment built on them cannot tell where one ends. Each token's bytes, read
from the vocabulary through the tokenizer's decoder convention, are exact: a text's tokens'
bytes concatenate to the text's UTF-8 bytes, which `encode_exact` checks, and the token spans
follow from cumulative byte lengths (no decoding of prefixes, no offsets).

Supported decoder conventions (read from the tokenizer's backend JSON, never guessed):
* byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): each character of a token's string stands for
  one byte through the GPT-2 byte-to-unicode table ('Ġ' is the byte 0x20, a space).
* SentencePiece-style (Metaspace, or Replace('▁', ' ') with ByteFallback: Llama 2, Gemma):
  '▁' is a space, '<0xNN>' is the byte NN, anything else is its UTF-8 text.
Added tokens (specials like <|im_end|>) are their content as UTF-8; they are flagged special so
that alignment refuses them inside a text (they are markup, not text) and the vocabulary map
pairs them only with a student special token of the same content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

BYTE_LEVEL = "byte_level"
SENTENCEPIECE = "sentencepiece"
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class CrossTokError(ValueError):
    """A text, tokenizer or alignment that the cross-tokenizer path cannot use (one line)."""


@dataclass(frozen=True)
class TokenTable:
    """The bytes of every token id of one tokenizer.

    pieces: list indexed by id, the token's bytes (b"" for ids the vocabulary does not use).
    lengths: (V,) int64, len(pieces[i]).
    special: (V,) bool, added special tokens (markup, not text).
    kind: "byte_level" | "sentencepiece".
    strip_prefix_space: the tokenizer prepends a space to a text ('▁' on the first word) that
        decoding removes; `encode_exact` drops it from the first token's span.
    name: for messages (the tokenizer's name_or_path).
    byte_fallback: (V,) bool, SentencePiece byte-fallback pieces ('<0xNN>'): the tokenizer
        uses them only for bytes no regular piece covers (None: none).
    """

    pieces: list[bytes]
    lengths: np.ndarray
    special: np.ndarray
    kind: str
    strip_prefix_space: bool
    name: str
    byte_fallback: np.ndarray | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)


def _decoder_kind(backend: dict, name: str) -> str:
    dec = backend.get("decoder") or {}
    parts = dec.get("decoders", [dec]) if dec.get("type") == "Sequence" else [dec]
    types = {p.get("type") for p in parts}
    if "ByteLevel" in types:
        return BYTE_LEVEL
    replaces_meta = any(
        p.get("type") == "Replace" and p.get("pattern", {}).get("String") == "\u2581" for p in parts
    )
    if "Metaspace" in types or replaces_meta:
        return SENTENCEPIECE
    raise CrossTokError(
        f"tokenizer {name}: decoder {sorted(t for t in types if t)} is neither byte-level BPE "
        "nor SentencePiece-style (Metaspace / Replace '▁'); cannot read its tokens' bytes"
    )


def _prefix_space(backend: dict) -> bool:
    """SentencePiece tokenizers that add '▁' before the first word (Metaspace prepend_scheme
    'first'/'always', or a Prepend('▁') normalizer) and strip it when decoding."""
    for part in (backend.get("pre_tokenizer") or {}, backend.get("normalizer") or {}):
        items = part.get("pretokenizers") or part.get("normalizers") or [part]
        for p in items:
            if p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never":
                return True
            if p.get("type") == "Prepend" and p.get("prepend") == "\u2581":
                return True
    return False


def token_table(tokenizer) -> TokenTable:
    """The `TokenTable` of a transformers fast tokenizer (or anything with `backend_tokenizer`,
    `get_vocab()` and `added_tokens_decoder`)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # the GPT-2 byte table

    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = _decoder_kind(backend, name)
    vocab = tokenizer.get_vocab()
    added = {int(i): t for i, t in tokenizer.added_tokens_decoder.items()}
    size = max([*vocab.values(), *added.keys()]) + 1
    pieces = [b""] * size
    special = np.zeros(size, dtype=bool)
    fallback = np.zeros(size, dtype=bool)
    if kind == BYTE_LEVEL:
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
    for piece, i in vocab.items():
        if i in added:
            continue
        if kind == BYTE_LEVEL:
            try:
                pieces[i] = bytes(byte_of[c] for c in piece)
            except KeyError:  # a byte-level vocabulary entry outside the byte alphabet
                pieces[i] = piece.encode()
        else:
            m = _BYTE_FALLBACK.match(piece)
            pieces[i] = bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()
            fallback[i] = m is not None
    for i, tok in added.items():
        pieces[i] = tok.content.encode()
        special[i] = bool(tok.special)
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=size)
    strip = kind == SENTENCEPIECE and _prefix_space(backend)
    return TokenTable(pieces, lengths, special, kind, strip, name, fallback)


def _first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _excerpt(data: bytes, at: int) -> str:
    return repr(data[max(0, at - 12) : at + 12].decode("utf-8", errors="replace"))


def check_tokens(table: TokenTable, ids, text: str, *, role: str) -> np.ndarray:
    """The (T,) byte length of each token of `ids` as it covers `text`, checked.

    role: "teacher" (the message says the text does not round-trip) or "student" (says the
    tokenizer cannot represent the text). Raises CrossTokError, one line naming the tokenizer
    and the reason, when a token is special or empty, or when the tokens' bytes do not
    concatenate to the text's UTF-8 bytes (a normaliser or a lossy tokenizer changed it). With
    `strip_prefix_space`, a leading space that the tokenizer added is taken off the first token.
    """
    if role == "teacher":
        what = f"the text does not round-trip through the teacher tokenizer {table.name}"
    else:
        what = f"the {role} tokenizer {table.name} cannot represent the text"
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= table.vocab_size):
        raise CrossTokError(f"{what}: a token id is outside its vocabulary")
    lengths = table.lengths[ids].copy()
    bad = np.flatnonzero(table.special[ids] | (lengths == 0))
    if bad.size:
        i = int(bad[0])
        raise CrossTokError(
            f"{what}: token {i} (id {int(ids[i])}, {table.pieces[ids[i]]!r}) is a special or "
            "empty token, not text (an unknown character, or markup inside the text)"
        )
    got = b"".join(table.pieces[i] for i in ids)
    want = text.encode("utf-8")
    if table.strip_prefix_space and got == b" " + want and lengths.size:
        got = got[1:]
        lengths[0] -= 1
        if lengths[0] == 0:  # a lone '▁' token: the added space was all of it
            raise CrossTokError(f"{what}: a token holds only the added prefix space")
    if got != want:
        at = _first_difference(got, want)
        raise CrossTokError(
            f"{what}: its tokens spell {_excerpt(got, at)} where the text has "
            f"{_excerpt(want, at)} (byte {at}; a normaliser or lossy pre-tokenizer changes it)"
        )
    return lengths


def encode_exact(
    tokenizer, table: TokenTable, text: str, *, role: str
) -> tuple[list[int], np.ndarray]:
    """(ids, per-token byte lengths) of `text` with no special tokens added, checked to give the
    text back byte for byte (see `check_tokens`): for the teacher this is the round-trip
    check decode(encode(text)) == text, for the student the check that it can represent it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids, check_tokens(table, ids, text, role=role)


def token_bytes(
    table: TokenTable, ids, text: str | None = None, *, role: str = "teacher"
) -> tuple[str, list[list[int]]]:
    """(response_text, token_bytes) of the response tokens `ids` (T,): the text (`text`, or
    when None the text the tokens spell) and per token its [start, end) byte offsets into
    text.encode("utf-8"); trailing special tokens get [len, len]. Raises CrossTokError (one
    line) when the tokens do not spell the text. role: whose tokens, for messages (see
    `check_tokens`). Teacher-vocabulary rows (precompute/teacher_vocab.py) and on-policy
    samples across tokenizers (train/onpolicy_crosstok.py) both build their spans here."""
    ids = np.asarray(ids, dtype=np.int64)
    body = len(ids)
    while body and 0 <= ids[body - 1] < table.vocab_size and table.special[ids[body - 1]]:
        body -= 1
    if text is None:
        spelled = b"".join(table.pieces[i] for i in ids[:body] if 0 <= i < table.vocab_size)
        try:
            text = spelled.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CrossTokError(
                f"the {role}'s response tokens do not spell UTF-8 text ({e.reason} at byte "
                f"{e.start}; a response cut inside a character?)"
            ) from None
    lengths = check_tokens(table, ids[:body], text, role=role)
    ends = np.cumsum(lengths)
    spans = [[int(e - n), int(e)] for e, n in zip(ends, lengths, strict=True)]
    end = len(text.encode("utf-8"))
    return text, spans + [[end, end]] * (len(ids) - body)

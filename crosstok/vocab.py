"""The teacher-to-student vocabulary map, and the teacher's top-k moved onto student ids.

Mapping by decoded string: a teacher token maps to the student token whose text is equal,
text meaning the token's bytes (tokens.py: 'Ġ' and '▁' read as spaces, '<0xNN>' as a byte), so
'Ġthe' (byte-level BPE) and '▁the' (SentencePiece) are both b' the' and map to each other.
Comparing bytes rather than decoded str also maps byte-level tokens that hold part of a UTF-8
character (their str form is not valid text). Special tokens map only to a student special
token of the same content (<|im_end|> to <|im_end|>), never to text. Where the student has
several tokens with the same bytes, a regular piece wins over a SentencePiece byte-fallback
piece (Gemma has both '1' and '<0x31>'; its tokenizer writes '1', so a teacher's '1' mapped to
'<0x31>' would ask the student for a token it never produces), then the lowest id. A
teacher token with no equal student token maps to -1, and at each position its probability
goes to the tail.

The table is built once per tokenizer pair, (V_teacher,) int64, and cached in a file keyed by
both tokenizers' fingerprints (shards.fingerprint.tokenizer_fingerprint).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from crosstok.tokens import TokenTable
from shards.fingerprint import tokenizer_fingerprint


def build_vocab_map(teacher: TokenTable, student: TokenTable) -> np.ndarray:
    """(V_teacher,) int64: the student id with the same bytes as each teacher id, or -1."""
    text_ids: dict[bytes, int] = {}
    special_ids: dict[bytes, int] = {}
    fallback = student.byte_fallback
    if fallback is None:
        fallback = np.zeros(student.vocab_size, dtype=bool)
    for i in range(student.vocab_size - 1, -1, -1):  # descending: the lowest id wins
        piece = student.pieces[i]
        if piece:
            ids = special_ids if student.special[i] else text_ids
            if fallback[i] and piece in ids and not fallback[ids[piece]]:
                continue  # a regular piece of these bytes wins over a byte-fallback one
            ids[piece] = i
    out = np.full(teacher.vocab_size, -1, dtype=np.int64)
    for i, piece in enumerate(teacher.pieces):
        if piece:
            out[i] = (special_ids if teacher.special[i] else text_ids).get(piece, -1)
    return out


def vocab_map(teacher_tokenizer, student_tokenizer, cache_dir: str | Path | None = None):
    """(map (V_teacher,) int64, teacher table, student table), from `cache_dir` when there.

    The cache file is named by both fingerprints, so a changed tokenizer never reads a stale
    map; it is written atomically (a temporary file, then a rename).
    """
    from crosstok.tokens import token_table

    t_table, s_table = token_table(teacher_tokenizer), token_table(student_tokenizer)
    if cache_dir is None:
        return build_vocab_map(t_table, s_table), t_table, s_table
    t_fp = tokenizer_fingerprint(teacher_tokenizer).split(":")[-1][:16]
    s_fp = tokenizer_fingerprint(student_tokenizer).split(":")[-1][:16]
    # v2: regular pieces win over byte-fallback ones (maps cached before were wrong for Gemma)
    path = Path(cache_dir) / f"vocabmap-v2-{t_fp}-{s_fp}.npy"
    if path.exists():
        table = np.load(path, allow_pickle=False)
        if table.shape == (t_table.vocab_size,):
            return table, t_table, s_table
    table = build_vocab_map(t_table, s_table)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, table)
    os.replace(tmp, path)
    return table, t_table, s_table


@dataclass(frozen=True)
class MappedTopK:
    """The teacher's top-k on student ids, N positions.

    ids: (N, K) int64 student ids, -1 where the teacher token does not map (or is a duplicate
        of an earlier entry of its row, whose probability it was added to).
    logprobs: (N, K) float32 teacher logprobs of the mapped entries, -inf where ids is -1.
    tail_logprob: (N,) float32 log of the teacher mass outside the mapped entries: the stored
        tail plus every unmapped entry.
    mapped_mass: (N,) float32 teacher probability of the mapped entries.
    """

    ids: Tensor
    logprobs: Tensor
    tail_logprob: Tensor
    mapped_mass: Tensor


def map_topk(
    teacher_ids: Tensor, logprobs: Tensor, tail_logprob: Tensor, table: Tensor
) -> MappedTopK:
    """Move a teacher top-k (ids (N, K), logprobs (N, K), tail (N,)) onto student ids through
    `table` ((V_teacher,) int64, -1 = no student token); float32 inside."""
    ids = table[teacher_ids.long()]
    lp = logprobs.float()
    # Two teacher tokens with the same bytes (an added token spelling a regular one) land on
    # one student id: keep the first entry and give it both probabilities.
    srt = torch.sort(ids, dim=1).values
    dup_rows = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(dim=1).nonzero()[:, 0]
    if dup_rows.numel():  # rare: a plain loop over those rows only
        ids, lp = ids.clone(), lp.clone()
        for r in dup_rows.tolist():
            seen: dict[int, int] = {}
            for c, sid in enumerate(ids[r].tolist()):
                if sid < 0:
                    continue
                if sid in seen:
                    lp[r, seen[sid]] = torch.logaddexp(lp[r, seen[sid]], lp[r, c])
                    ids[r, c], lp[r, c] = -1, -torch.inf
                else:
                    seen[sid] = c
    unmapped = ids < 0
    moved = torch.logsumexp(lp.masked_fill(~unmapped, -torch.inf), dim=1)
    tail = torch.logaddexp(tail_logprob.float(), moved)
    mapped_lp = lp.masked_fill(unmapped, -torch.inf)
    return MappedTopK(ids, mapped_lp, tail, mapped_lp.exp().sum(dim=1))

"""Aligning two tokenizations of one text: blocks of teacher tokens and student tokens that
cover the same bytes.

Rule: a byte offset is a common boundary when both tokenizations have a token boundary there
(the text's start and end always are). Between two consecutive common boundaries lies one
block: the teacher tokens and the student tokens that cover exactly those bytes. Where both
sides have one token the position maps one to one; otherwise the block is the smallest group
of consecutive tokens on each side whose texts are equal (any smaller group would end at a
boundary the other side does not have). Boundaries are byte offsets, so a byte-level BPE token
that ends inside a multi-byte UTF-8 character is aligned like any other (see tokens.py for why
offsets in characters cannot do this).

Cost: two cumulative sums and one sorted intersection per text, O(T_teacher + T_student).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crosstok.tokens import CrossTokError, TokenTable, check_tokens, encode_exact


@dataclass(frozen=True)
class Alignment:
    """Blocks of one text's alignment, B blocks in text order.

    teacher: (B, 2) int64 [start, end) teacher token ranges, covering 0..T_teacher in order.
    student: (B, 2) int64 [start, end) student token ranges, covering 0..T_student in order.
    """

    teacher: np.ndarray
    student: np.ndarray

    @property
    def num_blocks(self) -> int:
        return self.teacher.shape[0]

    @property
    def one_to_one(self) -> np.ndarray:
        """(B,) bool: blocks of exactly one token on each side."""
        t, s = np.diff(self.teacher, axis=1)[:, 0], np.diff(self.student, axis=1)[:, 0]
        return (t == 1) & (s == 1)

    def blocks(self) -> list[tuple[range, range]]:
        """[(teacher token range, student token range)] per block."""
        return [
            (range(int(a), int(b)), range(int(c), int(d)))
            for (a, b), (c, d) in zip(self.teacher, self.student, strict=True)
        ]

    def block_of_teacher(self) -> np.ndarray:
        """(T_teacher,) int64, the block index of each teacher token."""
        return np.repeat(np.arange(self.num_blocks), np.diff(self.teacher, axis=1)[:, 0])

    def block_of_student(self) -> np.ndarray:
        """(T_student,) int64, the block index of each student token."""
        return np.repeat(np.arange(self.num_blocks), np.diff(self.student, axis=1)[:, 0])


def align_lengths(teacher_lengths, student_lengths) -> Alignment:
    """The alignment of two tokenizations given each token's length in bytes, (T_t,), (T_s,).

    Lengths must be positive and sum to the same total (the same text).
    """
    t = np.asarray(teacher_lengths, dtype=np.int64)
    s = np.asarray(student_lengths, dtype=np.int64)
    if (t.size and t.min() <= 0) or (s.size and s.min() <= 0):
        raise CrossTokError("token lengths must be positive (empty tokens cannot be aligned)")
    t_ends = np.concatenate([[0], np.cumsum(t)])
    s_ends = np.concatenate([[0], np.cumsum(s)])
    if t_ends[-1] != s_ends[-1]:
        raise CrossTokError(
            f"the tokenizations cover {t_ends[-1]} and {s_ends[-1]} bytes: not the same text"
        )
    # Cumulative ends are strictly increasing, so searchsorted gives each common boundary's
    # token index on both sides.
    common = np.intersect1d(t_ends, s_ends, assume_unique=True)
    ti = np.searchsorted(t_ends, common)
    si = np.searchsorted(s_ends, common)
    teacher = np.stack([ti[:-1], ti[1:]], axis=1)
    student = np.stack([si[:-1], si[1:]], axis=1)
    return Alignment(teacher, student)


def align_text(
    text: str,
    teacher_ids,
    teacher_table: TokenTable,
    student_tokenizer,
    student_table: TokenTable,
) -> tuple[Alignment, list[int]]:
    """(alignment, student ids) of `text`: the teacher's tokens of it (as stored in a shard,
    checked to spell the text) against the student tokenizer's encoding of it (checked too).

    Raises CrossTokError with one line when either side does not give back the text.
    """
    t_len = check_tokens(teacher_table, teacher_ids, text, role="teacher")
    s_ids, s_len = encode_exact(student_tokenizer, student_table, text, role="student")
    return align_lengths(t_len, s_len), s_ids

"""Which teacher tokenizer decodes a shard folder (issue #23; the contract's signature).

MINIMAL LOCAL VERSION written by the trainer side (H-ct-train) so that the load path can be
built and tested before H-ct-shards' version lands; theirs replaces this file. It reads
`metadata.extra["vocabulary"]` = {"kind": "teacher", "teacher_tokenizer_fingerprint",
"teacher_tokenizer": {"path": DIR} | {"extra": KIND}, "student_tokenizer_fingerprint"}
and loads tokenizers from a path only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crosstok.tokens import CrossTokError
from shards.fingerprint import tokenizer_fingerprint
from shards.manifest import load_manifest

VOCABULARY_KEY = "vocabulary"
TEACHER_KIND = "teacher"


@dataclass(frozen=True)
class TeacherVocabulary:
    folder: str
    fingerprint: str
    student_fingerprint: str
    source: dict

    def tokenizer(self):
        """The teacher's tokenizer, checked against `fingerprint`; CrossTokError (one line
        naming the folder) when it cannot be found or differs."""
        from transformers import AutoTokenizer

        path = Path(str(self.source.get("path", "")))
        if "path" not in self.source or not path.is_dir():
            raise CrossTokError(
                f"{self.folder}: teacher tokenizer not found: metadata extra "
                f"{VOCABULARY_KEY!r}.teacher_tokenizer is {self.source!r}"
            )
        tok = AutoTokenizer.from_pretrained(str(path))
        fp = tokenizer_fingerprint(tok)
        if fp != self.fingerprint:
            raise CrossTokError(
                f"{self.folder}: the teacher tokenizer found ({fp[:19]}...) is not the one the "
                f"shards were made with ({self.fingerprint[:19]}...)"
            )
        return tok


def teacher_vocabulary(folder) -> TeacherVocabulary | None:
    """The folder's `TeacherVocabulary`, or None for ordinary (student-vocabulary) shards."""
    metadata = load_manifest(folder).metadata
    voc = metadata.extra.get(VOCABULARY_KEY)
    if voc is None:
        return None
    if not isinstance(voc, dict) or voc.get("kind") != TEACHER_KIND:
        raise CrossTokError(f"{folder}: metadata extra {VOCABULARY_KEY!r} is {voc!r}")
    return TeacherVocabulary(
        folder=str(folder),
        fingerprint=str(voc.get("teacher_tokenizer_fingerprint", metadata.tokenizer_fingerprint)),
        student_fingerprint=str(voc.get("student_tokenizer_fingerprint", "")),
        source=dict(voc.get("teacher_tokenizer") or {}),
    )

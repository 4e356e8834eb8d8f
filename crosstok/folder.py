"""Which teacher tokenizer decodes a shard folder: the one function precompute and the trainer
share to open it (issue #23, docs/cross-tokenizer.md "What the shards keep").

A folder of teacher-vocabulary shards (a teacher whose tokenizer differs from the student's)
says so in its metadata, `extra["vocabulary"]`:

    {"kind": "teacher", "teacher_tokenizer_fingerprint": "sha256:...",
     "teacher_tokenizer": {"extra": "teacher_tokenizer"} | {"path": "/abs/dir"},
     "student_tokenizer_fingerprint": "sha256:..."}

`{"extra": KIND}`: the tokenizer files are a tar committed in the folder as a manifest extra
of that kind (checked against its manifest entry like any extra), so the folder carries its
own decoder wherever it is copied; `{"path": DIR}`: a tokenizer folder on this machine.
Either way the loaded tokenizer must have the recorded fingerprint.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from crosstok.tokens import CrossTokError
from shards.errors import ShardError
from shards.fingerprint import tokenizer_fingerprint
from shards.manifest import load_manifest, read_extra

VOCABULARY_KEY = "vocabulary"  # metadata.extra key
TEACHER_KIND = "teacher"  # extra["vocabulary"]["kind"]
TOKENIZER_EXTRA = "teacher_tokenizer"  # manifest extra kind of the packed tokenizer files
# What AutoTokenizer.from_pretrained reads from a tokenizer folder (those present are packed).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


@dataclass(frozen=True)
class TeacherVocabulary:
    """The teacher tokenizer of a folder of teacher-vocabulary shards.

    fingerprint: shards.fingerprint.tokenizer_fingerprint of the teacher's tokenizer (also
        the folder's metadata.tokenizer_fingerprint).
    student_fingerprint: the student tokenizer named at precompute (informative: any student
        tokenizer can be aligned at load).
    source: {"extra": kind} or {"path": dir}, where the tokenizer files are.
    """

    folder: str
    fingerprint: str
    student_fingerprint: str
    source: dict

    def tokenizer(self):
        """The teacher's transformers tokenizer, checked to have `fingerprint`. Raises
        CrossTokError, one line naming the folder, when it cannot be found or differs."""
        if "extra" in self.source:
            tok = _from_extra(self.folder, self.source["extra"])
        elif "path" in self.source:
            path = Path(self.source["path"])
            if not path.is_dir():
                raise CrossTokError(
                    f"{self.folder}: teacher tokenizer not found: its metadata names the folder "
                    f"{path}, which does not exist on this machine"
                )
            tok = _load(self.folder, path)
        else:
            raise CrossTokError(
                f"{self.folder}: teacher tokenizer not found: metadata extra "
                f"{VOCABULARY_KEY!r}.teacher_tokenizer is {self.source!r}, neither "
                "{'extra': KIND} nor {'path': DIR}"
            )
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
        raise CrossTokError(
            f"{folder}: metadata extra {VOCABULARY_KEY!r} is {voc!r}; this reader knows only "
            f"kind {TEACHER_KIND!r}"
        )
    return TeacherVocabulary(
        folder=str(folder),
        fingerprint=str(voc.get("teacher_tokenizer_fingerprint", metadata.tokenizer_fingerprint)),
        student_fingerprint=str(voc.get("student_tokenizer_fingerprint", "")),
        source=dict(voc.get("teacher_tokenizer") or {}),
    )


def tokenizer_files(tokenizer, model_dir=None) -> dict[str, bytes]:
    """The files that load `tokenizer` again, {name: bytes}: the model folder's own tokenizer
    files when they load a tokenizer with the same fingerprint, else what
    `tokenizer.save_pretrained` writes (a GGUF teacher has no tokenizer files). Raises
    CrossTokError when neither gives the tokenizer back."""
    fp = tokenizer_fingerprint(tokenizer)
    candidates = []
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        names = [n for n in TOKENIZER_FILES if (Path(model_dir) / n).is_file()]
        candidates.append({n: (Path(model_dir) / n).read_bytes() for n in names})
    with tempfile.TemporaryDirectory(prefix="kd-teacher-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        saved = sorted(p for p in Path(tmp).iterdir() if p.is_file())
        candidates.append({p.name: p.read_bytes() for p in saved})
    name = getattr(tokenizer, "name_or_path", "") or model_dir
    for files in candidates:
        with tempfile.TemporaryDirectory(prefix="kd-teacher-tok-") as tmp:
            for n, data in files.items():
                (Path(tmp) / n).write_bytes(data)
            try:
                if tokenizer_fingerprint(_load(name, Path(tmp))) == fp:
                    return files
            except CrossTokError:
                continue
    raise CrossTokError(
        f"teacher tokenizer {name}: neither its folder's tokenizer files nor save_pretrained "
        "load it back with the same fingerprint; cannot store it with the shards"
    )


def pack_tokenizer(files: dict[str, bytes]) -> bytes:
    """A tar of {name: bytes}, the same bytes for the same files (sorted, no times, no
    owners): every writer of a folder, and every resumed run, commits identical tars."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(files[name]), 0, 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()


def unpack_tokenizer(data: bytes, where: str, dest: Path) -> None:
    """Extract a `pack_tokenizer` tar into `dest`: plain files at its top level only."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar.getmembers():
                if not m.isfile() or "/" in m.name or m.name in ("", ".", ".."):
                    raise CrossTokError(f"{where}: member {m.name!r} is not a plain file name")
                (dest / m.name).write_bytes(tar.extractfile(m).read())
    except tarfile.TarError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CrossTokError(f"{where}: not a tokenizer tar: {first}") from None


def _from_extra(folder, kind: str):
    entries = [e for e in load_manifest(folder).extras if e.kind == kind]
    if not entries:
        raise CrossTokError(
            f"{folder}: teacher tokenizer not found: its metadata says the files are the "
            f"manifest extra {kind!r}, and no manifest lists one"
        )
    # Every writer commits the same tar; the first is as good as any (read_extra checks it).
    try:
        data = read_extra(folder, entries[0])
    except ShardError as e:  # missing, unreadable, or not what the manifest says
        raise CrossTokError(f"{folder}: teacher tokenizer not found: {e}") from None
    with tempfile.TemporaryDirectory(prefix="kd-teacher-tok-") as tmp:
        unpack_tokenizer(data, f"{folder}: {entries[0].name}", Path(tmp))
        return _load(folder, Path(tmp))


def _load(folder, path: Path):
    from transformers import AutoTokenizer  # loads torch: only when a tokenizer is wanted

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:  # transformers' several-line explanations
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CrossTokError(
            f"{folder}: teacher tokenizer not found: cannot load it from {path}: {first.strip()}"
        ) from None

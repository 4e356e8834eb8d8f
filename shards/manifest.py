"""manifest.json: the commit record of a shard folder.

A file belongs to a folder only once it is listed here; the writer lists it after the file is
complete, fsynced and renamed. Several writer processes (data-parallel precompute) update the
one manifest under an exclusive lock, each change written to a temporary file and renamed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shards.errors import ShardError
from shards.schema import FORMAT, ShardMetadata, check_schema_version

MANIFEST = "manifest.json"
LOCK = ".manifest.lock"


@dataclass(frozen=True)
class FileEntry:
    name: str
    rows: int
    tokens: int  # response tokens
    bytes: int
    sha256: str
    batch_rows: list[int]  # rows per Arrow record batch, so readers plan without opening files
    writer: str = ""


@dataclass
class Manifest:
    metadata: ShardMetadata
    files: list[FileEntry] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def tokens(self) -> int:
        return sum(f.tokens for f in self.files)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "schema_version": self.metadata.schema_version,
            "metadata": self.metadata.to_json(),
            "files": [asdict(f) for f in self.files],
        }


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename, fsync the folder: a reader sees the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise ShardError(path, "no manifest: not a shard folder, or no file was completed yet")
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise ShardError(path, f"unreadable manifest: {e}") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise ShardError(path, f"not a {FORMAT} manifest (format={got!r})")
    check_schema_version(d.get("schema_version"), path)
    try:
        meta = ShardMetadata.from_json(d["metadata"])
        files = [FileEntry(**f) for f in d["files"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(path, f"malformed manifest: {e}", field="metadata/files") from e
    for f in files:
        if f.rows != sum(f.batch_rows):
            raise ShardError(
                path.parent / f.name,
                f"manifest says rows={f.rows} but batch_rows sum to {sum(f.batch_rows)}",
            )
    return Manifest(metadata=meta, files=files)


@contextlib.contextmanager
def locked(folder: str | Path):
    """Exclusive lock on the folder's manifest, across processes on this host or NFSv4."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def init_or_check(folder: str | Path, metadata: ShardMetadata) -> Manifest:
    """Create the manifest, or check that an existing one describes the same data."""
    folder = Path(folder)
    with locked(folder):
        # Manifest updates happen under this lock, so a temporary manifest now is debris of
        # a process killed while it wrote one.
        for p in folder.glob(f".{MANIFEST}.*.tmp"):
            p.unlink()
        if (folder / MANIFEST).exists():
            manifest = load_manifest(folder)
            diff = manifest.metadata.mismatches(metadata)
            if diff:
                raise ShardError(
                    folder / MANIFEST,
                    "folder holds shards made with other settings; use another output folder. "
                    + "; ".join(diff),
                )
            return manifest
        manifest = Manifest(metadata=metadata)
        write_atomic(folder / MANIFEST, json.dumps(manifest.to_json(), indent=1).encode())
        return manifest


def add_file(folder: str | Path, entry: FileEntry) -> None:
    folder = Path(folder)
    with locked(folder):
        manifest = load_manifest(folder)
        if any(f.name == entry.name for f in manifest.files):
            raise ShardError(folder / entry.name, "file is already in the manifest")
        manifest.files.append(entry)
        write_atomic(folder / MANIFEST, json.dumps(manifest.to_json(), indent=1).encode())

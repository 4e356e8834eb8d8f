"""Where a shard folder lives: a local folder, or an fsspec URL (s3://, gs://, memory://...).

The commit protocol needs only what both give: a file (object) that appears whole. Locally
that is a temporary name, fsync and rename; on an object store a PUT, which is atomic by
itself, so data files are uploaded under their final name once complete. The writer's
manifest, the commit point, is written with a conditional PUT where the store offers one
(S3: If-None-Match for the first, If-Match with the ETag of this process's last write),
which makes the same-writer check atomic; elsewhere a read-compare-write as on NFS.
Object stores have no lock: two processes as one writer id are caught by that check.

Everything else in shards/ goes through `open_storage(folder)`, never `if url` branches.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow as pa

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(folder) -> bool:
    return isinstance(folder, str) and bool(_URL.match(folder))


def as_folder(text: str) -> str | Path:
    """A folder argument (command lines): a URL stays text, anything else is a Path (a
    Path would fold s3://b into s3:/b)."""
    return text if is_url(text) else Path(text)


class ManifestChanged(Exception):
    """The manifest is not what this process last wrote (another process commits as it)."""


class LocalStorage:
    """A folder on a local or network file system: fsync and rename, as before."""

    local = True

    def __init__(self, folder: str | Path):
        self.root = Path(folder)

    def where(self, name: str) -> Path:
        return self.root / name

    def makedirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def size(self, name: str) -> int:
        return (self.root / name).stat().st_size

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def sha256(self, name: str) -> str:
        return sha256_file(self.root / name)

    def open_input(self, name: str) -> pa.NativeFile:
        return pa.memory_map(str(self.root / name))

    def delete(self, name: str) -> None:
        (self.root / name).unlink()

    def staging(self, name: str) -> Path:
        """Where file `name` is written before `publish`: a hidden name in the folder, so
        that the rename is atomic and the writer's next start finds the debris."""
        return self.root / f".{name}.tmp"

    def publish(self, staged: Path, name: str) -> None:
        """Make a complete staged file appear whole under `name` (the per-writer flock
        keeps a second process from writing this writer's names on this host)."""
        fd = os.open(staged, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(staged, self.root / name)
        self.sync()

    def sync(self) -> None:
        fsync_dir(self.root)

    def write(self, name: str, data: bytes, *, create: bool = False) -> None:
        write_atomic(self.root / name, data)

    def write_if(self, name: str, data: bytes, expect: bytes | None) -> None:
        """Write `name` whole if its content is `expect` (None: absent). A check and a
        rename: catches all but a tight race (the per-writer flock excludes a second process
        on the same host)."""
        _compare_and_write(self, name, data, expect)

    def lock(self, name: str):
        """An exclusive flock on `name` in the folder, or None if another process holds it."""
        f = open(self.root / name, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        return f

    def close(self) -> None:
        pass

    def __str__(self) -> str:
        return str(self.root)


class FsspecStorage:
    """A folder at an fsspec URL. Listings bypass fsspec's cache (a stale listing would hide
    a commit or show deleted debris). Files being written are staged in a local temporary
    folder and uploaded whole once complete."""

    local = False

    def __init__(self, url: str, **storage_options):
        import fsspec  # the `cloud` extra: local folders work without it

        self.root = url.rstrip("/")
        self._options = storage_options
        self._fs, self._path = fsspec.core.url_to_fs(self.root, **storage_options)
        self._pid = os.getpid()
        self._staging_dir: str | None = None
        self._etags: dict[str, str] = {}  # the ETag of what this process last wrote

    @property
    def fs(self):
        # Async filesystems (s3fs, gcsfs) are not fork-safe: a DataLoader worker makes its own.
        if self._pid != os.getpid():
            import fsspec

            self._fs, _ = fsspec.core.url_to_fs(self.root, **self._options)
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pid"] = -1  # rebuilt on first use in the receiving process
        return state

    def _p(self, name: str) -> str:
        return f"{self._path}/{name}"

    def where(self, name: str) -> str:
        return f"{self.root}/{name}"

    def makedirs(self) -> None:
        self.fs.makedirs(self._path, exist_ok=True)

    def names(self) -> list[str]:
        self.fs.invalidate_cache(self._path)
        try:
            entries = self.fs.ls(self._path, detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "file"
        )

    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache(self._p(name))
        return self.fs.exists(self._p(name))

    def size(self, name: str) -> int:
        self.fs.invalidate_cache(self._p(name))
        return int(self.fs.size(self._p(name)))

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self._p(name))

    def sha256(self, name: str) -> str:
        with self.fs.open(self._p(name), "rb", block_size=1 << 22, cache_type="none") as f:
            return _sha256_of(f)

    def open_input(self, name: str) -> pa.NativeFile:
        # Random access with read-ahead: a record batch's checksum read and Arrow's read of
        # the same batch then cost one request.
        return pa.PythonFile(self.fs.open(self._p(name), "rb", cache_type="readahead"), mode="r")

    def delete(self, name: str) -> None:
        self.fs.rm_file(self._p(name))

    def staging(self, name: str) -> Path:
        if self._staging_dir is None:
            self._staging_dir = tempfile.mkdtemp(prefix="kdshards-")
        return Path(self._staging_dir) / name

    def publish(self, staged: Path, name: str) -> None:
        """Upload a complete file under its final name: a PUT (or a multipart upload, which
        is invisible until completed) makes it appear whole or not at all. Never over an
        existing object (FileExistsError): with no lock, that is how a second process
        writing as the same writer would overwrite a committed file."""
        if _is_s3(self.fs):
            self.fs.put_file(str(staged), self._p(name), mode="create")  # If-None-Match: *
        else:
            if self.exists(name):
                raise FileExistsError(self.where(name))
            self.fs.put_file(str(staged), self._p(name))
        staged.unlink()

    def sync(self) -> None:
        pass  # an object is durable once its PUT returns

    def write(self, name: str, data: bytes, *, create: bool = False) -> None:
        """Write `name` whole; `create`: only if absent (FileExistsError), as `publish`."""
        if create and _is_s3(self.fs):
            self.fs.pipe_file(self._p(name), data, mode="create")
            return
        if create and self.exists(name):
            raise FileExistsError(self.where(name))
        self.fs.pipe_file(self._p(name), data)

    def write_if(self, name: str, data: bytes, expect: bytes | None) -> None:
        path = self._p(name)
        if _is_s3(self.fs):
            # Atomic on S3: the PUT fails if the object changed since this process's write.
            etag = self._etags.get(name)
            if expect is not None and etag is None:
                etag = self._etag_of(name, expect)
            cond = {"IfNoneMatch": "*"} if expect is None else {"IfMatch": etag}
            try:
                out = self.fs.pipe_file(path, data, **cond)
            except FileExistsError as e:  # s3fs's word for a failed If-None-Match
                raise ManifestChanged(name) from e
            except OSError as e:  # 412 Precondition Failed (If-Match)
                if "precondition" in str(e).lower().replace("-", ""):
                    raise ManifestChanged(name) from e
                raise
            self._etags[name] = (out or {}).get("ETag") or self._etag_of(name, data)
            return
        _compare_and_write(self, name, data, expect)

    def _etag_of(self, name: str, expect: bytes) -> str:
        """The ETag of `name` if its content is `expect`: one GET returns both, so they
        belong to the same version."""
        bucket, key, _ = self.fs.split_path(self._p(name))
        try:
            resp = self.fs.call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError as e:
            raise ManifestChanged(name) from e
        body = _read_body(self.fs, resp["Body"])
        if body != expect:
            raise ManifestChanged(name)
        return resp["ETag"]

    def lock(self, name: str):
        return _NoLock()  # none on an object store: write_if catches a second writer

    def close(self) -> None:
        if self._staging_dir is not None:
            shutil.rmtree(self._staging_dir, ignore_errors=True)
            self._staging_dir = None

    def __str__(self) -> str:
        return self.root


def _compare_and_write(store, name: str, data: bytes, expect: bytes | None) -> None:
    try:
        current = store.read(name)
    except FileNotFoundError:
        current = None
    if current != expect:
        raise ManifestChanged(name)
    store.write(name, data)


class _NoLock:
    closed = False

    def close(self) -> None:
        self.closed = True


def _is_s3(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "s3" in protocol and hasattr(fs, "call_s3")


def _read_body(fs, body) -> bytes:
    from fsspec.asyn import sync

    async def read():
        async with body as stream:
            return await stream.read()

    return sync(fs.loop, read)


Storage = LocalStorage | FsspecStorage


def open_storage(folder) -> Storage:
    """The storage of `folder`: a path (local), or a URL with a scheme (fsspec)."""
    if isinstance(folder, LocalStorage | FsspecStorage):
        return folder
    if is_url(folder):
        return FsspecStorage(folder)
    return LocalStorage(folder)


def _sha256_of(f, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return _sha256_of(f)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename, fsync the folder: a reader sees the old or the new file, whole.
    The temporary name is unique across machines (a pid is not)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)

"""The commit record of a shard folder: one manifest per writer, merged by readers.

Writer `w3` commits by writing `manifest-w3.json` whole (a temporary file and a rename here;
one PUT on an object store): no lock is shared between writers or machines, so the protocol
holds on NFS and Lustre, where cross-machine flock is unreliable. Each manifest lists its
writer's committed files in commit order; every commit has a sequence number and the
writer's running row and token totals, so an entry dropped or duplicated by an edit or a bug
is an error, not silently lost or doubled data. Folders written before per-writer manifests
have a single `manifest.json`; it is still read (and never written again).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from shards.errors import ShardError
from shards.schema import FORMAT, ShardMetadata, check_schema_version
from shards.storage import ManifestChanged, Storage, open_storage

# Their home was here before shards.storage; kept for existing imports.
from shards.storage import fsync_dir as fsync_dir
from shards.storage import sha256_file as sha256_file
from shards.storage import write_atomic as write_atomic

LEGACY_MANIFEST = "manifest.json"
WRITER_ID = r"[A-Za-z0-9_.]+"
_MANIFEST_NAME = re.compile(rf"manifest-({WRITER_ID})\.json")
# Files a writer owns: <kind>-<writer>-<seq>.<ext> (part-w0-00003.arrow, rejects-w0-00000.jsonl).
_OWNED = re.compile(rf"([A-Za-z0-9_]+)-({WRITER_ID})-(\d+)\.([A-Za-z0-9]+)")
DATA_KIND = "part"


def manifest_name(writer_id: str) -> str:
    return f"manifest-{writer_id}.json"


def owned_name(kind: str, writer_id: str, seq: int, suffix: str) -> str:
    return f"{kind}-{writer_id}-{seq:05d}{suffix}"


def parse_owned(name: str) -> tuple[str, str, int] | None:
    """(kind, writer, seq) of a writer-owned file name, else None."""
    m = _OWNED.fullmatch(name)
    return (m.group(1), m.group(2), int(m.group(3))) if m else None


@dataclass(frozen=True)
class FileEntry:
    """One committed data file. The integrity fields are None in legacy `manifest.json`s."""

    name: str
    rows: int
    tokens: int  # response tokens
    bytes: int
    sha256: str
    batch_rows: list[int]  # rows per Arrow record batch, so readers plan without opening files
    writer: str = ""
    commit: int | None = None  # this writer's commit sequence number
    rows_total: int | None = None  # this writer's rows after this commit
    tokens_total: int | None = None
    # Byte ranges and xxh3-64 checksums that tile the file: head [0, batch_offsets[0]) (magic,
    # schema, rank order), record batch i [batch_offsets[i], batch_offsets[i + 1]), foot
    # [batch_offsets[-1], bytes) (the Arrow footer with the batches' offsets).
    batch_offsets: list[int] | None = None
    batch_xxh3: list[str] | None = None
    head_xxh3: str | None = None
    foot_xxh3: str | None = None
    # A merge of earlier files of this writer (ShardWriter.compact): their entries, each
    # {"name", "commit", "rows", "tokens"}, which keep their commit numbers accounted for.
    replaces: list[dict] | None = None

    @property
    def checksummed(self) -> bool:
        return self.batch_xxh3 is not None


@dataclass(frozen=True)
class ExtraEntry:
    """A committed non-data file of a writer (its rejects, the precompute config, ...)."""

    name: str
    kind: str
    bytes: int
    sha256: str
    writer: str
    commit: int


def _entry_json(e) -> dict:
    return {k: v for k, v in asdict(e).items() if v is not None}


def _dump(head: dict, lists: dict[str, list[dict]]) -> bytes:
    """JSON with one entry per line: readable, and small enough to rewrite at every commit."""
    out = [json.dumps(head)[:-1]]
    for key, items in lists.items():
        body = ",\n  ".join(json.dumps(x) for x in items)
        out.append(f',\n "{key}": [\n  {body}\n ]' if items else f',\n "{key}": []')
    return ("".join(out) + "\n}\n").encode()


class _Totals:
    files: tuple[FileEntry, ...] | list[FileEntry]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def tokens(self) -> int:
        return sum(f.tokens for f in self.files)


@dataclass(frozen=True)
class WriterManifest(_Totals):
    """manifest-<writer>.json: everything one writer committed, in commit order."""

    writer: str
    metadata: ShardMetadata
    commits: int = 0
    files: tuple[FileEntry, ...] = ()
    extras: tuple[ExtraEntry, ...] = ()

    def with_file(self, entry: FileEntry) -> WriterManifest:
        """This manifest plus one commit listing `entry`."""
        entry = replace(
            entry,
            writer=self.writer,
            commit=self.commits,
            rows_total=self.rows + entry.rows,
            tokens_total=self.tokens + entry.tokens,
        )
        return replace(self, commits=self.commits + 1, files=(*self.files, entry))

    def with_merge(self, entry: FileEntry, replaced: list[FileEntry]) -> WriterManifest:
        """This manifest plus one commit that lists `entry` instead of `replaced` (entry
        holds exactly their rows, so the running totals do not move)."""
        gone = {f.name for f in replaced}
        entry = replace(
            entry,
            writer=self.writer,
            commit=self.commits,
            rows_total=self.rows,
            tokens_total=self.tokens,
            replaces=[
                {"name": f.name, "commit": f.commit, "rows": f.rows, "tokens": f.tokens}
                for f in replaced
            ],
        )
        files = tuple(f for f in self.files if f.name not in gone)
        return replace(self, commits=self.commits + 1, files=(*files, entry))

    def with_extra(self, entry: ExtraEntry) -> WriterManifest:
        entry = replace(entry, writer=self.writer, commit=self.commits)
        return replace(self, commits=self.commits + 1, extras=(*self.extras, entry))

    def to_bytes(self) -> bytes:
        head = {
            "format": FORMAT,
            "schema_version": self.metadata.schema_version,
            "writer": self.writer,
            "commits": self.commits,
            "rows": self.rows,
            "tokens": self.tokens,
            "metadata": self.metadata.to_json(),
        }
        return _dump(
            head,
            {
                "files": [_entry_json(f) for f in self.files],
                "extras": [_entry_json(e) for e in self.extras],
            },
        )

    @classmethod
    def parse(cls, path: Path | str, data: bytes) -> WriterManifest:
        """Parse and check one writer's manifest; every problem is a ShardError naming it."""
        d = _parse_json(path, data)
        m = _MANIFEST_NAME.fullmatch(_name(path))
        writer = d.get("writer")
        if m is None or writer != m.group(1):
            raise ShardError(path, f"manifest of writer {writer!r} under this name", field="writer")
        try:
            meta = ShardMetadata.from_json(d["metadata"])
            files = tuple(_strict(FileEntry, f) for f in d["files"])
            extras = tuple(_strict(ExtraEntry, e) for e in d["extras"])
            commits, rows, tokens = (int(d[k]) for k in ("commits", "rows", "tokens"))
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(path, f"malformed manifest: {e}", field="metadata/files") from e
        wm = cls(writer=writer, metadata=meta, commits=commits, files=files, extras=extras)
        wm._check(path, rows, tokens)
        return wm

    def _check(self, path: Path, rows: int, tokens: int) -> None:
        """Sequence numbers without gaps or repeats, running totals that add up, and entries
        that belong to this writer: a dropped or duplicated entry cannot pass."""
        seen: dict[int, str] = {}

        def claim(commit, name: str) -> None:
            if not isinstance(commit, int):
                raise ShardError(path, f"entry {name!r} has no commit number", field="commit")
            if commit in seen:
                raise ShardError(path, f"commit {commit} is listed twice ({seen[commit]}, {name})")
            seen[commit] = name

        events = []  # (commit, rows, tokens, entry whose running totals to check)
        for e in (*self.files, *self.extras):
            owned = parse_owned(e.name)
            kind = e.kind if isinstance(e, ExtraEntry) else DATA_KIND
            if e.writer != self.writer or owned is None or owned[:2] != (kind, self.writer):
                raise ShardError(path, f"entry {e.name!r} is not a {kind} file of this writer")
            claim(e.commit, e.name)
            if isinstance(e, ExtraEntry):
                continue
            if not e.replaces:
                events.append((e.commit, e.rows, e.tokens, e))
                continue
            events.append((e.commit, 0, 0, e))
            for r in e.replaces:
                if not isinstance(r, dict) or set(r) != {"name", "commit", "rows", "tokens"}:
                    raise ShardError(path, f"{e.name}: malformed replaced entry {r!r}")
                owned = parse_owned(str(r["name"]))
                if owned is None or owned[:2] != (DATA_KIND, self.writer):
                    raise ShardError(path, f"{e.name} replaces {r['name']!r}, not this writer's")
                claim(r["commit"], r["name"])
                events.append((r["commit"], int(r["rows"]), int(r["tokens"]), None))
            got = (sum(r["rows"] for r in e.replaces), sum(r["tokens"] for r in e.replaces))
            if got != (e.rows, e.tokens):
                raise ShardError(
                    path, f"{e.name}: rows/tokens {e.rows}/{e.tokens}, it replaced {got}"
                )
        missing = sorted(set(range(self.commits)) - set(seen))
        extra = sorted(set(seen) - set(range(self.commits)))
        if missing or extra:
            raise ShardError(
                path,
                f"the writer made {self.commits} commits but "
                + (f"commit(s) {missing} are not listed: an entry was dropped" if missing else "")
                + ("; " if missing and extra else "")
                + (f"commit(s) {extra} are listed" if extra else ""),
                field="commits",
            )
        r = t = 0
        for _, dr, dt, f in sorted(events, key=lambda ev: ev[0]):
            r, t = r + dr, t + dt
            if f is None:
                continue
            if (f.rows_total, f.tokens_total) != (r, t):
                raise ShardError(
                    path,
                    f"{f.name}: running totals rows={f.rows_total} tokens={f.tokens_total}, "
                    f"the entries before it add up to rows={r} tokens={t}: an entry was "
                    "dropped or changed",
                    field="rows_total",
                )
            _check_file_entry(path, f, checksums=True)
        if (rows, tokens) != (r, t):
            raise ShardError(
                path, f"totals rows={rows} tokens={tokens}, the files add up to {r} and {t}"
            )


def _strict(cls, d: dict):
    if not isinstance(d, dict):
        raise TypeError(f"entry {d!r} is not an object")
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise TypeError(f"unknown entry keys {sorted(unknown)}")
    return cls(**d)


def _name(path: Path | str) -> str:
    return str(path).rsplit("/", 1)[-1]


def _sibling(path: Path | str, name: str) -> Path | str:
    return path.parent / name if isinstance(path, Path) else f"{str(path).rsplit('/', 1)[0]}/{name}"


def _check_file_entry(path: Path | str, f: FileEntry, checksums: bool) -> None:
    if f.rows != sum(f.batch_rows):
        raise ShardError(
            _sibling(path, f.name),
            f"manifest says rows={f.rows} but batch_rows sum to {sum(f.batch_rows)}",
        )
    if not checksums:
        return
    n = len(f.batch_rows)
    offs = f.batch_offsets
    if (
        offs is None
        or f.batch_xxh3 is None
        or f.head_xxh3 is None
        or f.foot_xxh3 is None
        or len(offs) != n + 1
        or len(f.batch_xxh3) != n
        or any(b <= a for a, b in zip(offs, offs[1:], strict=False))
        or not 0 < offs[0]
        or offs[-1] > f.bytes
    ):
        raise ShardError(path, f"{f.name}: missing or inconsistent checksums", field="xxh3")


def _parse_json(path: Path, data: bytes) -> dict:
    try:
        d = json.loads(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ShardError(path, f"unreadable manifest: {e}") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise ShardError(path, f"not a {FORMAT} manifest (format={got!r})")
    check_schema_version(d.get("schema_version"), path)
    return d


def _load_legacy(store: Storage, name: str) -> tuple[ShardMetadata, list[FileEntry]]:
    path = store.where(name)
    d = _parse_json(path, _read(store, name))
    try:
        meta = ShardMetadata.from_json(d["metadata"])
        files = [_strict(FileEntry, f) for f in d["files"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(path, f"malformed manifest: {e}", field="metadata/files") from e
    for f in files:
        _check_file_entry(path, f, checksums=False)
    return meta, files


def _read(store: Storage, name: str) -> bytes:
    try:
        return store.read(name)
    except OSError as e:
        raise ShardError(store.where(name), f"unreadable manifest: {e}") from e


@dataclass
class Manifest(_Totals):
    """The merged view of a folder: every writer's committed files, in (writer, commit)
    order after the legacy manifest's (a pure function of the manifests' contents)."""

    metadata: ShardMetadata
    files: list[FileEntry] = field(default_factory=list)
    extras: list[ExtraEntry] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # manifest file names, sorted
    replaced: set[str] = field(default_factory=set)  # files merged into others: debris


def manifest_names(store: Storage) -> list[str]:
    """The folder's manifests, sorted by name (never by listing order)."""
    return [n for n in store.names() if n == LEGACY_MANIFEST or _MANIFEST_NAME.fullmatch(n)]


def manifest_paths(folder: str | Path) -> list[Path | str]:
    """The folder's manifests, sorted by name (never by listing order)."""
    store = open_storage(folder)
    return [store.where(n) for n in manifest_names(store)]


def load_writer_manifest(folder, writer_id: str) -> tuple[WriterManifest, bytes]:
    store = open_storage(folder)
    name = manifest_name(writer_id)
    data = _read(store, name)
    return WriterManifest.parse(store.where(name), data), data


def load_manifest(folder, *, missing_ok: bool = False) -> Manifest | None:
    """Every manifest of the folder (a path, URL or Storage), checked and merged. A file
    listed twice (by name or by content) is an error, and so are writers whose metadata
    disagree."""
    store = open_storage(folder)
    names = manifest_names(store)
    if not names:
        if missing_ok:
            return None
        raise ShardError(
            store.where(manifest_name("*")),
            "no manifest: not a shard folder, or no writer has started in it yet",
        )
    metadata, first = None, None
    files: list[FileEntry] = []
    extras: list[ExtraEntry] = []
    for name in names:
        path = store.where(name)
        if name == LEGACY_MANIFEST:
            meta, fs = _load_legacy(store, name)
            files = fs + files  # first: the files written before per-writer manifests
        else:
            wm = WriterManifest.parse(path, _read(store, name))
            meta = wm.metadata
            files += sorted(wm.files, key=lambda f: f.commit)
            extras += sorted(wm.extras, key=lambda e: e.commit)
        if metadata is None:
            metadata, first = meta, path
        elif diff := metadata.mismatches(meta):
            raise ShardError(
                path,
                f"metadata disagrees with {_name(first)}'s (writers with other settings in one "
                "folder): " + "; ".join(diff),
            )
    replaced = {r["name"] for f in files for r in f.replaces or ()}
    by_name: dict[str, int] = dict.fromkeys(replaced, 1)
    by_hash: dict[str, str] = {}
    for e in (*files, *extras):
        if e.name in by_name:
            raise ShardError(store.where(e.name), "the file is listed twice in the manifests")
        by_name[e.name] = 1
    for f in files:
        if f.sha256 in by_hash:
            raise ShardError(
                store.where(f.name),
                f"same content (sha256) as {by_hash[f.sha256]}: its rows would be read twice",
            )
        by_hash[f.sha256] = f.name
    return Manifest(
        metadata=metadata,
        files=files,
        extras=extras,
        sources=names,
        replaced=replaced,
    )


def check_listing(folder, manifest: Manifest | None) -> tuple[list[ShardError], list[str]]:
    """Files in the folder that no manifest lists: (errors, debris names).

    A writer creates its manifest before it writes any file, and a commit only ever adds
    files after the writer's last. So a writer-owned file (part-w0-00003.arrow) that no
    manifest lists is an error (committed, then its entry or its writer's whole manifest was
    lost) when a later file of the same writer and kind is listed, or when the writer has no
    manifest at all (in a folder without a legacy manifest.json). Otherwise it is debris of an
    interrupted write (written or renamed, then the process died before its commit), as are
    temporary files and files merged into another (ShardWriter.compact) but not deleted yet.
    Call after loading the manifest: a commit racing this listing then only looks like debris.
    """
    store = open_storage(folder)
    files = [] if manifest is None else [*manifest.files, *manifest.extras]
    listed = {e.name for e in files}
    replaced = set() if manifest is None else manifest.replaced
    last: dict[tuple[str, str], int] = {}
    for name in listed:
        owned = parse_owned(name)
        if owned:
            key = owned[:2]
            last[key] = max(last.get(key, -1), owned[2])
    present = sorted(store.names())
    errors, debris = [], []
    for name in present:
        if name in listed or is_bookkeeping(name):
            continue
        owned = parse_owned(name)
        if owned and name not in replaced:
            kind, writer, seq = owned
            if seq < last.get((kind, writer), -1):
                why = f"writer {writer!r} committed later {kind} files: an entry was dropped"
            elif manifest_name(writer) not in present and LEGACY_MANIFEST not in present:
                why = f"its writer {writer!r} has no manifest: it was lost"
            else:
                why = None
            if why:
                errors.append(ShardError(store.where(name), f"no manifest lists it, but {why}"))
                continue
        debris.append(name)
    return errors, debris


_BOOKKEEPING = re.compile(
    rf"({re.escape(LEGACY_MANIFEST)}|manifest-{WRITER_ID}\.json|\.manifest\.lock"
    rf"|\.writer-{WRITER_ID}\.lock)"
)


def is_bookkeeping(name: str) -> bool:
    """Manifests and lock files: the folder's own records, not data."""
    return bool(_BOOKKEEPING.fullmatch(name))


def write_manifest(folder, manifest: WriterManifest, expect: bytes | None) -> bytes:
    """Commit: write the writer's manifest whole. `expect` is what this process last wrote
    (None: it must not exist yet); a manifest changed since then means another process is
    committing as the same writer, which would lose commits: refuse.

    On S3 this is one conditional PUT (If-Match / If-None-Match), which makes the check
    atomic; on a file system a check and a rename (shards.storage)."""
    store = open_storage(folder)
    name = manifest_name(manifest.writer)
    data = manifest.to_bytes()
    try:
        store.write_if(name, data, expect)
    except ManifestChanged:
        raise ShardError(
            store.where(name),
            f"changed since this process last committed: another process is writing as "
            f"writer {manifest.writer!r}; give each writer its own id",
        ) from None
    return data


def read_extra(folder, entry: ExtraEntry) -> bytes:
    """A committed extra file's bytes, checked against its entry."""
    store = open_storage(folder)
    p = store.where(entry.name)
    try:
        data = store.read(entry.name)
    except OSError as e:
        raise ShardError(p, f"listed in {manifest_name(entry.writer)} but unreadable: {e}") from e
    if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ShardError(p, f"differs from its entry in {manifest_name(entry.writer)}")
    return data

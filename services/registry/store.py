"""The registry's domain: model metadata in SQLite and file contents in a content-addressed blob store.

Layout under ``--data-dir``::

    registry.db                  models, versions, files, aliases and tags (SQLite, WAL, synchronous=FULL)
    blobs/sha256/ab/abcdef...    one read-only file per distinct content, named by its sha256
    uploads/<sha256>.partial     a pending upload; its size is the committed, resumable prefix
    corrupt/<sha256>.<time>      blobs that failed verification on read, kept for inspection
    LOCK                         held (flock) by the one registry process using this folder

Every metadata change is one transaction. A blob becomes visible only by an atomic rename after
its bytes were fsynced and matched their sha256, and a version is recorded only once every blob
it lists is stored, so a crash at any point leaves either the old state or the new one.

Everything here blocks (disk, SQLite); the servicer calls it from worker threads.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.runtime.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)

log = logging.getLogger(__name__)

#: Most bytes in one WriteBlob chunk or ReadBlob chunk.
MAX_CHUNK_BYTES = 4 * 1024 * 1024
#: ReadBlob chunk size when the request sends 0.
DEFAULT_CHUNK_BYTES = 1024 * 1024
#: Page size when a List request sends 0, and the largest one served.
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
#: Most files in one version.
MAX_FILES = 100_000

#: Version kinds (the names of latentwire.registry.v1.ModelKind) and the file each needs at the top level.
KINDS = {
    "MODEL_KIND_STABLE_DIFFUSION": "model_index.json",
    "MODEL_KIND_CONTROLNET": "config.json",
    "MODEL_KIND_IMAGE_CLASSIFIER": "config.json",
}
STATUS_READY = "MODEL_VERSION_STATUS_READY"

_MODEL_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_ALIAS = re.compile(r"[A-Za-z0-9_-]{1,128}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"[1-9][0-9]{0,17}")
_PATH_SEGMENT = re.compile(r"[^\x00-\x1f\x7f\\]{1,255}")


# ----------------------------------------------------------------------------------------------
# Names and arguments


def check_model_id(model_id: str, field_name: str = "name") -> str:
    """A model's short name: letters, digits, '-', '_' and '.', 1 to 128 characters, not starting with '.'.

    '..' anywhere is refused as well: the name becomes a folder name in client caches.
    """
    if not _MODEL_ID.fullmatch(model_id) or ".." in model_id:
        shown = model_id if model_id.isprintable() else repr(model_id)
        raise InvalidArgument(
            f"{field_name} {shown!r} is not a valid model name: use 1 to 128 letters, digits, '-', '_' and '.', "
            "not starting with '.' and without '..'",
            reason="INVALID_MODEL_NAME",
            metadata={"field": field_name},
        )
    return model_id


def parse_model_name(name: str, field_name: str = "name") -> str:
    """'models/{model}' or the bare short name -> the short name."""
    return check_model_id(name.removeprefix("models/"), field_name)


def parse_version_name(name: str, field_name: str = "name") -> tuple[str, int]:
    """'models/{model}/versions/{version}' -> (short name, version number)."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "models" or parts[2] != "versions" or not _VERSION.fullmatch(parts[3]):
        raise InvalidArgument(
            f"{field_name} {name!r} is not a version name; expected 'models/{{model}}/versions/{{version}}' "
            "with a version number >= 1",
            reason="INVALID_VERSION_NAME",
            metadata={"field": field_name},
        )
    return check_model_id(parts[1], field_name), int(parts[3])


def check_alias(alias: str) -> str:
    """Letters, digits, '-' and '_', 1 to 128 characters, not all digits (those are version numbers)."""
    if not _ALIAS.fullmatch(alias) or alias.isdigit():
        raise InvalidArgument(
            f"alias {alias!r} is not valid: use 1 to 128 letters, digits, '-' and '_', not all digits",
            reason="INVALID_ALIAS",
            metadata={"field": "alias"},
        )
    return alias


def check_tag(key: str, value: str) -> None:
    """Tag key: 1 to 250 printable characters; value: at most 5000 characters."""
    if not 1 <= len(key) <= 250 or not key.isprintable():
        raise InvalidArgument(f"tag key {key!r} must be 1 to 250 printable characters", reason="INVALID_TAG",
                              metadata={"field": "key"})
    if len(value) > 5000:
        raise InvalidArgument(f"tag {key!r}: the value has {len(value)} characters; at most 5000",
                              reason="INVALID_TAG", metadata={"field": "value"})


def check_tags(tags: dict[str, str]) -> dict[str, str]:
    for key, value in tags.items():
        check_tag(key, value)
    return dict(tags)


def check_text(value: str, field_name: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidArgument(f"{field_name} has {len(value)} characters; at most {limit}",
                              reason="INVALID_ARGUMENT", metadata={"field": field_name})
    return value


def check_sha256(sha256: str, field_name: str = "sha256") -> str:
    """Lowercase hex, 64 characters."""
    if not _SHA256.fullmatch(sha256):
        raise InvalidArgument(f"{field_name} {sha256[:80]!r} is not a lowercase hex sha256 (64 characters)",
                              reason="INVALID_SHA256", metadata={"field": field_name})
    return sha256


def check_file_path(path: str) -> str:
    """A relative '/'-separated path without '.', '..' or empty segments, backslashes or control characters."""
    segments = path.split("/")
    if (
        not path
        or len(path) > 1024
        or any(s in (".", "..") or not _PATH_SEGMENT.fullmatch(s) for s in segments)
    ):
        raise InvalidArgument(
            f"file path {path[:200]!r} is not a relative '/'-separated path inside the model folder",
            reason="INVALID_FILE_PATH",
            metadata={"field": "files.path"},
        )
    return path


def page_size_of(page_size: int) -> int:
    """0 -> the default; above the maximum -> the maximum (AIP-158); negative -> INVALID_ARGUMENT."""
    if page_size < 0:
        raise InvalidArgument(f"page_size {page_size} is negative", reason="INVALID_PAGE_SIZE",
                              metadata={"field": "page_size"})
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(scope: str, after) -> str:
    """An opaque token naming the listing it belongs to and where the next page starts."""
    raw = json.dumps({"scope": scope, "after": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, scope: str, kind: type):
    """The position inside ``token``; INVALID_ARGUMENT for a token that is garbled or from another listing."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        if data["scope"] != scope or type(data["after"]) is not kind:
            raise ValueError(scope)
        return data["after"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InvalidArgument("page_token is not a token this listing returned; start again without one",
                              reason="INVALID_PAGE_TOKEN", metadata={"field": "page_token"}) from None


# ----------------------------------------------------------------------------------------------
# Domain records


@dataclass
class ModelInfo:
    """A registered model with its tags and aliases."""

    model_id: str
    description: str
    tags: dict[str, str]
    aliases: dict[str, int]
    latest_version: int
    create_time: float


@dataclass(frozen=True)
class FileEntry:
    """One file of a version: where it goes in the folder, its size and its content's sha256."""

    path: str
    size_bytes: int
    sha256: str
    component: str


@dataclass
class VersionInfo:
    """One immutable version with its file manifest."""

    model_id: str
    version: int
    kind: str
    source: str
    status: str
    files: list[FileEntry]
    tags: dict[str, str]
    create_time: float
    description: str
    components: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Metadata (SQLite)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    model_id TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    latest_version INTEGER NOT NULL DEFAULT 0,
    create_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS model_tags (
    model_id TEXT NOT NULL REFERENCES models(model_id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (model_id, key)
);
CREATE TABLE IF NOT EXISTS versions (
    model_id TEXT NOT NULL REFERENCES models(model_id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    description TEXT NOT NULL,
    create_time REAL NOT NULL,
    PRIMARY KEY (model_id, version)
);
CREATE TABLE IF NOT EXISTS version_tags (
    model_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (model_id, version, key),
    FOREIGN KEY (model_id, version) REFERENCES versions(model_id, version) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS files (
    model_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    component TEXT NOT NULL,
    PRIMARY KEY (model_id, version, path),
    FOREIGN KEY (model_id, version) REFERENCES versions(model_id, version) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS files_by_sha256 ON files(sha256);
CREATE TABLE IF NOT EXISTS aliases (
    model_id TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (model_id, alias),
    FOREIGN KEY (model_id, version) REFERENCES versions(model_id, version) ON DELETE CASCADE
);
"""
_SCHEMA_VERSION = 1


class Database:
    """One SQLite connection in WAL mode, shared by the worker threads under a lock.

    Metadata calls are short; serialising them keeps every transaction simple (BEGIN IMMEDIATE ...
    COMMIT) while the slow work (blob IO) runs outside the lock.
    """

    def __init__(self, path: Path):
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")  # a committed change survives a power cut
        self._conn.execute("PRAGMA foreign_keys=ON")
        found = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if found > _SCHEMA_VERSION:
            self._conn.close()
            raise RuntimeError(f"{path} was written by a newer registry (schema {found}); upgrade latentwire")
        # One script, one transaction: the schema is created whole or not at all (every statement is idempotent).
        self._conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={_SCHEMA_VERSION}; COMMIT;")

    @contextlib.contextmanager
    def transaction(self):
        """A write transaction: all of it commits, or none of it."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def snapshot(self):
        """A read transaction: every query inside sees one consistent state."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _model_exists(db: sqlite3.Connection, model_id: str) -> None:
    if db.execute("SELECT 1 FROM models WHERE model_id = ?", (model_id,)).fetchone() is None:
        raise NotFound(f"model {model_id!r} does not exist", reason="MODEL_NOT_FOUND", metadata={"model": model_id})


def _version_exists(db: sqlite3.Connection, model_id: str, version: int) -> None:
    _model_exists(db, model_id)
    if db.execute("SELECT 1 FROM versions WHERE model_id = ? AND version = ?", (model_id, version)).fetchone() is None:
        raise NotFound(f"model {model_id!r} has no version {version}", reason="VERSION_NOT_FOUND",
                       metadata={"model": model_id, "version": str(version)})


def _read_model(db: sqlite3.Connection, model_id: str) -> ModelInfo:
    row = db.execute("SELECT description, latest_version, create_time FROM models WHERE model_id = ?",
                     (model_id,)).fetchone()
    if row is None:
        raise NotFound(f"model {model_id!r} does not exist", reason="MODEL_NOT_FOUND", metadata={"model": model_id})
    tags = dict(db.execute("SELECT key, value FROM model_tags WHERE model_id = ? ORDER BY key", (model_id,)))
    aliases = dict(db.execute("SELECT alias, version FROM aliases WHERE model_id = ? ORDER BY alias", (model_id,)))
    return ModelInfo(model_id, row[0], tags, aliases, row[1], row[2])


def _read_version(db: sqlite3.Connection, model_id: str, version: int) -> VersionInfo:
    row = db.execute(
        "SELECT kind, source, status, description, create_time FROM versions WHERE model_id = ? AND version = ?",
        (model_id, version),
    ).fetchone()
    if row is None:
        _model_exists(db, model_id)
        raise NotFound(f"model {model_id!r} has no version {version}", reason="VERSION_NOT_FOUND",
                       metadata={"model": model_id, "version": str(version)})
    files = [FileEntry(*r) for r in db.execute(
        "SELECT path, size_bytes, sha256, component FROM files WHERE model_id = ? AND version = ? ORDER BY path",
        (model_id, version))]
    tags = dict(db.execute("SELECT key, value FROM version_tags WHERE model_id = ? AND version = ? ORDER BY key",
                           (model_id, version)))
    return VersionInfo(
        model_id=model_id, version=version, kind=row[0], source=row[1], status=row[2], files=files, tags=tags,
        create_time=row[4], description=row[3],
        components=sorted({f.component for f in files if f.component}),
    )


# ----------------------------------------------------------------------------------------------
# Blobs (content-addressed files)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Files named by their sha256 under ``root``; pending uploads under ``uploads``."""

    def __init__(self, root: Path, max_blob_bytes: int):
        self.blobs = root / "blobs" / "sha256"
        self.uploads = root / "uploads"
        self.corrupt = root / "corrupt"
        self.max_blob_bytes = max_blob_bytes
        for folder in (self.blobs, self.uploads, self.corrupt):
            folder.mkdir(parents=True, exist_ok=True)
        # Hash state of pending uploads, so a resumed upload does not re-read its prefix: sha -> (position, hasher).
        self._hash_states: dict[str, tuple[int, "hashlib._Hash"]] = {}
        self._states_lock = threading.Lock()

    def path(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def partial_path(self, sha256: str) -> Path:
        return self.uploads / f"{sha256}.partial"

    def stored_size(self, sha256: str) -> int | None:
        """The size of a stored blob, or None when it is not stored."""
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def query(self, sha256: str) -> tuple[int, bool]:
        """(committed bytes, complete) for QueryBlob."""
        size = self.stored_size(sha256)
        if size is not None:
            return size, True
        try:
            return self.partial_path(sha256).stat().st_size, False
        except FileNotFoundError:
            return 0, False

    def quarantine(self, sha256: str) -> Path | None:
        """Move a blob that failed verification out of the store, so it is never served and can be re-uploaded."""
        target = self.corrupt / f"{sha256}.{int(time.time())}"
        try:
            os.replace(self.path(sha256), target)
        except FileNotFoundError:
            return None
        log.error("blob %s failed verification; moved to %s", sha256, target)
        return target

    def remember_hash(self, sha256: str, position: int, hasher) -> None:
        with self._states_lock:
            self._hash_states[sha256] = (position, hasher.copy())

    def recall_hash(self, sha256: str, position: int):
        with self._states_lock:
            state = self._hash_states.pop(sha256, None)
        if state is not None and state[0] == position:
            return state[1]
        return None


class Upload:
    """One WriteBlob stream: appends chunks to the blob's .partial file, hashing as it goes.

    The caller serialises uploads of one sha256 (at most one Upload per blob at a time).
    """

    def __init__(self, blobs: BlobStore, sha256: str, size_bytes: int, offset: int):
        self.blobs = blobs
        self.sha256 = check_sha256(sha256)
        if size_bytes < 0 or size_bytes > blobs.max_blob_bytes:
            raise InvalidArgument(f"size_bytes {size_bytes} is outside 0..{blobs.max_blob_bytes}",
                                  reason="INVALID_BLOB_SIZE", metadata={"field": "size_bytes"})
        self.size = size_bytes
        self.complete = False
        self._file = None
        stored = blobs.stored_size(sha256)
        if stored is not None:
            self.complete, self.position = True, stored
            return
        partial = blobs.partial_path(sha256)
        self._file = open(partial, "a+b")  # noqa: SIM115 - closed in close()
        committed = os.fstat(self._file.fileno()).st_size
        if offset < 0 or offset > committed or offset > size_bytes:
            self._discard(remove_partial=committed == 0)
            raise InvalidArgument(
                f"write offset {offset} does not continue the upload: {committed} bytes are committed; "
                "resume from QueryBlob's committed_size",
                reason="INVALID_WRITE_OFFSET",
                metadata={"field": "offset", "committed_size": str(committed)},
            )
        if offset < committed:
            self._file.truncate(offset)  # the client restarts earlier than it could: drop the rest
        self.position = offset
        self._hasher = blobs.recall_hash(sha256, offset)
        if self._hasher is None:
            self._hasher = hashlib.sha256()
            self._file.seek(0)
            remaining = offset
            while remaining:
                block = self._file.read(min(remaining, MAX_CHUNK_BYTES))
                if not block:
                    break
                self._hasher.update(block)
                remaining -= len(block)
        self._file.seek(0, os.SEEK_END)

    def write(self, sha256: str, size_bytes: int, offset: int, data: bytes, finish: bool) -> None:
        """Append one chunk; on the last one verify the sha256 and store the blob."""
        if sha256 != self.sha256 or size_bytes != self.size:
            raise InvalidArgument("sha256 and size_bytes must be the same in every chunk of one upload",
                                  reason="INCONSISTENT_UPLOAD")
        if offset != self.position:
            raise InvalidArgument(f"chunk offset {offset} is not the next byte ({self.position})",
                                  reason="INVALID_WRITE_OFFSET",
                                  metadata={"field": "offset", "committed_size": str(self.position)})
        if len(data) > MAX_CHUNK_BYTES:
            raise InvalidArgument(f"chunk of {len(data)} bytes; at most {MAX_CHUNK_BYTES}", reason="CHUNK_TOO_LARGE")
        if self.position + len(data) > self.size:
            raise InvalidArgument(f"the chunks run past size_bytes ({self.size})", reason="BLOB_TOO_LONG")
        if data:
            self._file.write(data)
            self._hasher.update(data)
            self.position += len(data)
        if finish:
            self._commit()

    def _commit(self) -> None:
        if self.position != self.size:
            raise InvalidArgument(f"finish_write after {self.position} of {self.size} bytes", reason="BLOB_INCOMPLETE")
        partial = self.blobs.partial_path(self.sha256)
        digest = self._hasher.hexdigest()
        if digest != self.sha256:
            self._discard(remove_partial=True)
            raise DataLoss(
                f"the uploaded bytes hash to {digest}, not {self.sha256}; the upload was discarded, send it again",
                reason="BLOB_DIGEST_MISMATCH", metadata={"sha256": self.sha256},
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.chmod(partial, 0o444)  # blobs are immutable
        target = self.blobs.path(self.sha256)
        target.parent.mkdir(exist_ok=True)
        os.replace(partial, target)
        _fsync_dir(target.parent)
        self.complete = True
        log.info("stored blob %s (%d bytes)", self.sha256, self.size)

    def _discard(self, *, remove_partial: bool) -> None:
        self._file.close()
        self._file = None
        self.blobs.recall_hash(self.sha256, -1)  # forget any saved state
        if remove_partial:
            self.blobs.partial_path(self.sha256).unlink(missing_ok=True)

    def close(self) -> None:
        """End the stream; an unfinished upload keeps its prefix (and hash state) for a resume."""
        if self._file is not None:
            if not self.complete:
                with contextlib.suppress(OSError):
                    self._file.flush()
                self.blobs.remember_hash(self.sha256, self.position, self._hasher)
            self._file.close()
            self._file = None


@dataclass
class Chunk:
    """One piece of a ReadBlob stream."""

    offset: int
    data: bytes


class BlobReader:
    """Reads a byte range of a blob while hashing the whole blob, so corruption is caught before the last chunk.

    ``next()`` reads one chunk ahead: the final chunk is handed out only after the digest of the
    whole stored file matched its name; otherwise the blob is quarantined and DATA_LOSS raised.
    """

    def __init__(self, blobs: BlobStore, sha256: str, fd: int, size: int, offset: int, limit: int, chunk_size: int):
        self.blobs = blobs
        self.sha256 = sha256
        self.size = size
        self._fd = fd
        self._lock = threading.Lock()
        self._hasher = hashlib.sha256()
        self._start = offset
        self._end = size if limit == 0 else min(size, offset + limit)
        self._chunk_size = chunk_size
        self._position = offset
        self._ahead: Chunk | None = None
        self._started = False
        self._done = False

    def _read(self, position: int, length: int) -> bytes:
        parts, remaining = [], length
        while remaining:
            block = os.pread(self._fd, remaining, position)
            if not block:
                break
            parts.append(block)
            position += len(block)
            remaining -= len(block)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._hasher.update(data)
        return data

    def _hash_range(self, start: int, end: int) -> None:
        position = start
        while position < end:
            block = self._read(position, min(MAX_CHUNK_BYTES, end - position))
            if not block:
                return
            position += len(block)

    def _read_chunk(self) -> Chunk | None:
        if self._position >= self._end:
            return None
        data = self._read(self._position, min(self._chunk_size, self._end - self._position))
        if not data:
            return None
        chunk = Chunk(self._position, data)
        self._position += len(data)
        return chunk

    def next(self) -> Chunk | None:
        """The next chunk to send, or None after the last one. Raises DataLoss when the blob is corrupt."""
        with self._lock:
            if self._done or self._fd < 0:
                return None
            if not self._started:
                self._started = True
                self._hash_range(0, self._start)
                self._ahead = self._read_chunk()
            current, self._ahead = self._ahead, self._read_chunk()
            if self._ahead is None:
                # ``current`` is the last chunk: verify everything before handing it out.
                self._done = True
                if self._position < self._end:  # the file is shorter than it was at open
                    self._fail()
                self._hash_range(self._end, self.size)
                if self._hasher.hexdigest() != self.sha256:
                    self._fail()
                if current is None:  # an empty range still answers once, with the blob's size
                    current = Chunk(self._start, b"")
            return current

    def _fail(self):
        self.blobs.quarantine(self.sha256)
        raise DataLoss(
            f"blob {self.sha256} is corrupt on the registry's disk (its bytes no longer match their sha256); "
            "it was taken out of service: import the model files again to repair it",
            reason="BLOB_CORRUPT", metadata={"sha256": self.sha256},
        )

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


# ----------------------------------------------------------------------------------------------
# The registry


class RegistryStore:
    """Models, versions, aliases and tags (SQLite) over a content-addressed blob store."""

    def __init__(self, data_dir: Path, max_blob_bytes: int):
        data_dir = Path(data_dir).expanduser()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self._lock_file = open(data_dir / "LOCK", "a+b")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            self._lock_file.close()
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise RuntimeError(f"another registry is using --data-dir {data_dir}; stop it or pick another folder")
            raise
        self.blobs = BlobStore(data_dir, max_blob_bytes)
        self.db = Database(data_dir / "registry.db")
        log.info("registry data in %s", data_dir)

    def close(self) -> None:
        self.db.close()
        self._lock_file.close()

    # -- models ------------------------------------------------------------------------------

    def create_model(self, name: str, description: str, tags: dict[str, str]) -> ModelInfo:
        model_id = check_model_id(name, "model_id")
        description = check_text(description, "description", 10_000)
        tags = check_tags(tags)
        with self.db.transaction() as db:
            if db.execute("SELECT 1 FROM models WHERE model_id = ?", (model_id,)).fetchone() is not None:
                raise AlreadyExists(f"model {model_id!r} exists already", reason="MODEL_EXISTS",
                                    metadata={"model": model_id})
            db.execute("INSERT INTO models (model_id, description, create_time) VALUES (?, ?, ?)",
                       (model_id, description, time.time()))
            db.executemany("INSERT INTO model_tags VALUES (?, ?, ?)", [(model_id, k, v) for k, v in tags.items()])
            return _read_model(db, model_id)

    def get_model(self, name: str) -> ModelInfo:
        model_id = parse_model_name(name)
        with self.db.snapshot() as db:
            return _read_model(db, model_id)

    def list_models(self, page_size: int, page_token: str) -> tuple[list[ModelInfo], str]:
        size = page_size_of(page_size)
        after = decode_page_token(page_token, "models", str) if page_token else ""
        with self.db.snapshot() as db:
            ids = [r[0] for r in db.execute(
                "SELECT model_id FROM models WHERE model_id > ? ORDER BY model_id LIMIT ?", (after, size + 1))]
            models = [_read_model(db, model_id) for model_id in ids[:size]]
        token = encode_page_token("models", ids[size - 1]) if len(ids) > size else ""
        return models, token

    def delete_model(self, name: str) -> None:
        model_id = parse_model_name(name)
        with self.db.transaction() as db:
            _model_exists(db, model_id)
            db.execute("DELETE FROM models WHERE model_id = ?", (model_id,))
        log.info("deleted model %s", model_id)

    def set_model_tag(self, name: str, key: str, value: str) -> ModelInfo:
        model_id = parse_model_name(name)
        check_tag(key, value)
        with self.db.transaction() as db:
            _model_exists(db, model_id)
            db.execute("INSERT OR REPLACE INTO model_tags VALUES (?, ?, ?)", (model_id, key, value))
            return _read_model(db, model_id)

    def delete_model_tag(self, name: str, key: str) -> ModelInfo:
        model_id = parse_model_name(name)
        with self.db.transaction() as db:
            _model_exists(db, model_id)
            if db.execute("DELETE FROM model_tags WHERE model_id = ? AND key = ?", (model_id, key)).rowcount == 0:
                raise NotFound(f"model {model_id!r} has no tag {key!r}", reason="TAG_NOT_FOUND",
                               metadata={"model": model_id, "key": key})
            return _read_model(db, model_id)

    def set_alias(self, name: str, alias: str, version: int) -> ModelInfo:
        """Point ``alias`` at ``version``; the old target is replaced in the same transaction."""
        model_id = parse_model_name(name)
        check_alias(alias)
        with self.db.transaction() as db:
            _version_exists(db, model_id, version)
            db.execute("INSERT OR REPLACE INTO aliases VALUES (?, ?, ?)", (model_id, alias, version))
            return _read_model(db, model_id)

    def delete_alias(self, name: str, alias: str) -> ModelInfo:
        model_id = parse_model_name(name)
        with self.db.transaction() as db:
            _model_exists(db, model_id)
            if db.execute("DELETE FROM aliases WHERE model_id = ? AND alias = ?", (model_id, alias)).rowcount == 0:
                raise NotFound(f"model {model_id!r} has no alias {alias!r}", reason="ALIAS_NOT_FOUND",
                               metadata={"model": model_id, "alias": alias})
            return _read_model(db, model_id)

    # -- versions ----------------------------------------------------------------------------

    def create_version(
        self, name: str, kind: str, source: str, files: list[FileEntry], tags: dict[str, str], description: str,
        aliases: list[str],
    ) -> VersionInfo:
        """Record a version whose blobs are all stored, in one transaction (the model is created if needed)."""
        model_id = parse_model_name(name)
        if kind not in KINDS:
            raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}", reason="INVALID_KIND",
                                  metadata={"field": "kind"})
        source = check_text(source, "source", 4096)
        description = check_text(description, "description", 10_000)
        tags = check_tags(tags)
        aliases = sorted({check_alias(a) for a in aliases})
        files = self._check_files(files, kind)
        with self.db.transaction() as db:
            # Checked inside the transaction: a version never lists a blob that is not stored.
            self._check_blobs_stored(files)
            now = time.time()
            db.execute("INSERT OR IGNORE INTO models (model_id, description, create_time) VALUES (?, '', ?)",
                       (model_id, now))
            version = db.execute("UPDATE models SET latest_version = latest_version + 1 WHERE model_id = ? "
                                 "RETURNING latest_version", (model_id,)).fetchone()[0]
            db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (model_id, version, kind, source, STATUS_READY, description, now))
            db.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
                           [(model_id, version, f.path, f.size_bytes, f.sha256, f.component) for f in files])
            db.executemany("INSERT INTO version_tags VALUES (?, ?, ?, ?)",
                           [(model_id, version, k, v) for k, v in tags.items()])
            db.executemany("INSERT OR REPLACE INTO aliases VALUES (?, ?, ?)",
                           [(model_id, alias, version) for alias in aliases])
            created = _read_version(db, model_id, version)
        log.info("created %s version %d (%s, %d files)", model_id, version, kind, len(files))
        return created

    def _check_files(self, files: list[FileEntry], kind: str) -> list[FileEntry]:
        if not files:
            raise InvalidArgument("a version needs at least one file", reason="NO_FILES", metadata={"field": "files"})
        if len(files) > MAX_FILES:
            raise InvalidArgument(f"{len(files)} files; at most {MAX_FILES}", reason="TOO_MANY_FILES")
        sizes: dict[str, int] = {}
        paths: set[str] = set()
        for f in files:
            check_file_path(f.path)
            check_sha256(f.sha256, "files.sha256")
            if f.path in paths:
                raise InvalidArgument(f"file {f.path!r} is listed twice", reason="DUPLICATE_FILE")
            paths.add(f.path)
            if not 0 <= f.size_bytes <= self.blobs.max_blob_bytes:
                raise InvalidArgument(f"file {f.path!r}: size_bytes {f.size_bytes} is outside "
                                      f"0..{self.blobs.max_blob_bytes}", reason="INVALID_BLOB_SIZE")
            if sizes.setdefault(f.sha256, f.size_bytes) != f.size_bytes:
                raise InvalidArgument(f"sha256 {f.sha256} is listed with two sizes", reason="INCONSISTENT_FILES")
            expected = f.path.split("/", 1)[0] if "/" in f.path else ""
            if f.component != expected:
                raise InvalidArgument(
                    f"file {f.path!r} belongs to component {expected!r} (its first folder), not {f.component!r}",
                    reason="INVALID_COMPONENT", metadata={"field": "files.component"})
        needed = KINDS[kind]
        if needed not in paths:
            raise InvalidArgument(f"a {kind} version needs a top-level {needed}", reason="MISSING_FILE",
                                  metadata={"path": needed})
        return sorted(files, key=lambda f: f.path)

    def _check_blobs_stored(self, files: list[FileEntry]) -> None:
        missing = [f for f in files if self.blobs.stored_size(f.sha256) != f.size_bytes]
        if missing:
            first = missing[0]
            raise FailedPrecondition(
                f"{len(missing)} file(s) have no stored blob of their size, for example {first.path!r} "
                f"(sha256 {first.sha256}); upload them with WriteBlob first",
                reason="BLOB_MISSING",
                metadata={"path": first.path, "sha256": first.sha256, "missing": str(len(missing))},
            )

    def get_version(self, name: str) -> VersionInfo:
        model_id, version = parse_version_name(name)
        with self.db.snapshot() as db:
            return _read_version(db, model_id, version)

    def list_versions(self, parent: str, page_size: int, page_token: str) -> tuple[list[VersionInfo], str]:
        model_id = parse_model_name(parent, "parent")
        size = page_size_of(page_size)
        before = decode_page_token(page_token, f"versions:{model_id}", int) if page_token else 2**63 - 1
        with self.db.snapshot() as db:
            _model_exists(db, model_id)
            numbers = [r[0] for r in db.execute(
                "SELECT version FROM versions WHERE model_id = ? AND version < ? ORDER BY version DESC LIMIT ?",
                (model_id, before, size + 1))]
            versions = [_read_version(db, model_id, n) for n in numbers[:size]]
        token = encode_page_token(f"versions:{model_id}", numbers[size - 1]) if len(numbers) > size else ""
        return versions, token

    def delete_version(self, name: str) -> None:
        model_id, version = parse_version_name(name)
        with self.db.transaction() as db:
            _version_exists(db, model_id, version)
            # Aliases and files go with it (ON DELETE CASCADE); blobs stay, other versions may share them.
            db.execute("DELETE FROM versions WHERE model_id = ? AND version = ?", (model_id, version))
        log.info("deleted %s version %d", model_id, version)

    def set_version_tag(self, name: str, key: str, value: str) -> VersionInfo:
        model_id, version = parse_version_name(name)
        check_tag(key, value)
        with self.db.transaction() as db:
            _version_exists(db, model_id, version)
            db.execute("INSERT OR REPLACE INTO version_tags VALUES (?, ?, ?, ?)", (model_id, version, key, value))
            return _read_version(db, model_id, version)

    def resolve(self, reference: str) -> VersionInfo:
        """'name' (the "default" alias, else the latest version), 'name@VERSION' or 'name@ALIAS'."""
        name, sep, ref = reference.partition("@")
        model_id = parse_model_name(name, "reference")
        if sep and not ref:
            raise InvalidArgument(f"reference {reference!r} ends in '@'; use NAME, NAME@VERSION or NAME@ALIAS",
                                  reason="INVALID_REFERENCE", metadata={"field": "reference"})
        with self.db.snapshot() as db:
            _model_exists(db, model_id)
            if ref and ref.isdigit():
                if not _VERSION.fullmatch(ref):
                    raise InvalidArgument(f"version {ref!r} is not a version number", reason="INVALID_REFERENCE")
                return _read_version(db, model_id, int(ref))
            alias = check_alias(ref) if ref else "default"
            row = db.execute("SELECT version FROM aliases WHERE model_id = ? AND alias = ?", (model_id, alias)).fetchone()
            if row is None and not ref:
                row = db.execute("SELECT MAX(version) FROM versions WHERE model_id = ?", (model_id,)).fetchone()
                if row[0] is None:
                    raise NotFound(f"model {model_id!r} has no versions", reason="VERSION_NOT_FOUND",
                                   metadata={"model": model_id})
            if row is None:
                raise NotFound(f"model {model_id!r} has no alias {alias!r}", reason="ALIAS_NOT_FOUND",
                               metadata={"model": model_id, "alias": alias})
            return _read_version(db, model_id, row[0])

    # -- blobs -------------------------------------------------------------------------------

    def query_blob(self, sha256: str) -> tuple[int, bool]:
        return self.blobs.query(check_sha256(sha256))

    def begin_upload(self, sha256: str, size_bytes: int, offset: int) -> Upload:
        return Upload(self.blobs, sha256, size_bytes, offset)

    def open_blob(self, sha256: str, offset: int, limit: int, chunk_size: int) -> BlobReader:
        """Open a blob for ReadBlob; a blob that versions list but the disk lacks is DATA_LOSS, not NOT_FOUND."""
        check_sha256(sha256)
        chunk_size = chunk_size or DEFAULT_CHUNK_BYTES
        if not 0 < chunk_size <= MAX_CHUNK_BYTES:
            raise InvalidArgument(f"chunk_size {chunk_size} is outside 1..{MAX_CHUNK_BYTES}",
                                  reason="INVALID_CHUNK_SIZE", metadata={"field": "chunk_size"})
        if offset < 0 or limit < 0:
            raise InvalidArgument("offset and limit must be >= 0", reason="INVALID_RANGE",
                                  metadata={"field": "offset" if offset < 0 else "limit"})
        try:
            fd = os.open(self.blobs.path(sha256), os.O_RDONLY)
        except FileNotFoundError:
            with self.db.snapshot() as db:
                used = db.execute("SELECT model_id, version, path FROM files WHERE sha256 = ? LIMIT 1",
                                  (sha256,)).fetchone()
            if used is not None:
                raise DataLoss(
                    f"blob {sha256} ({used[0]} version {used[1]}, {used[2]}) is missing from the registry's store; "
                    "import the model files again to repair it",
                    reason="BLOB_MISSING", metadata={"sha256": sha256, "model": used[0], "version": str(used[1])},
                ) from None
            raise NotFound(f"blob {sha256} is not stored", reason="BLOB_NOT_FOUND", metadata={"sha256": sha256}) from None
        size = os.fstat(fd).st_size
        if offset > size:
            os.close(fd)
            raise InvalidArgument(f"offset {offset} is past the blob's end ({size} bytes)", reason="OFFSET_OUT_OF_RANGE",
                                  metadata={"field": "offset", "size_bytes": str(size)})
        return BlobReader(self.blobs, sha256, fd, size, offset, limit, chunk_size)

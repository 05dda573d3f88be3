"""The registry's metadata in SQLite: models, versions, their files, aliases and tags.

Every method is one transaction (a write: BEGIN IMMEDIATE ... COMMIT; a read: one snapshot), so
a crash leaves the old state or the new one. Arguments arrive checked (``validation``); what
depends on the stored state (a model that does not exist, a taken name) is decided here.
"""
from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from services.runtime.errors import AlreadyExists, NotFound

STATUS_READY = "MODEL_VERSION_STATUS_READY"


# ----------------------------------------------------------------------------------------------
# Records


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


@dataclass(frozen=True)
class BlobUse:
    """A version listing a blob: enough to tell the caller which model a lost blob belongs to."""

    model_id: str
    version: int
    path: str


# ----------------------------------------------------------------------------------------------
# Schema

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
#: Larger than any version number (they are at most 18 digits): where a newest-first listing starts.
_NO_VERSION_ABOVE = 2**63 - 1


# ----------------------------------------------------------------------------------------------
# Reads shared by several calls (inside a transaction or snapshot)


def _model_not_found(model_id: str) -> NotFound:
    return NotFound(f"model {model_id!r} does not exist", reason="MODEL_NOT_FOUND", metadata={"model": model_id})


def _version_not_found(model_id: str, version: int) -> NotFound:
    return NotFound(f"model {model_id!r} has no version {version}", reason="VERSION_NOT_FOUND",
                    metadata={"model": model_id, "version": str(version)})


def _model_exists(db: sqlite3.Connection, model_id: str) -> None:
    if db.execute("SELECT 1 FROM models WHERE model_id = ?", (model_id,)).fetchone() is None:
        raise _model_not_found(model_id)


def _version_exists(db: sqlite3.Connection, model_id: str, version: int) -> None:
    _model_exists(db, model_id)
    if db.execute("SELECT 1 FROM versions WHERE model_id = ? AND version = ?", (model_id, version)).fetchone() is None:
        raise _version_not_found(model_id, version)


def _read_model(db: sqlite3.Connection, model_id: str) -> ModelInfo:
    row = db.execute("SELECT description, latest_version, create_time FROM models WHERE model_id = ?",
                     (model_id,)).fetchone()
    if row is None:
        raise _model_not_found(model_id)
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
        raise _version_not_found(model_id, version)
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
# The database


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
    def _transaction(self):
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
    def _snapshot(self):
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

    # -- models ------------------------------------------------------------------------------

    def create_model(self, model_id: str, description: str, tags: dict[str, str]) -> ModelInfo:
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM models WHERE model_id = ?", (model_id,)).fetchone() is not None:
                raise AlreadyExists(f"model {model_id!r} exists already", reason="MODEL_EXISTS",
                                    metadata={"model": model_id})
            db.execute("INSERT INTO models (model_id, description, create_time) VALUES (?, ?, ?)",
                       (model_id, description, time.time()))
            db.executemany("INSERT INTO model_tags VALUES (?, ?, ?)", [(model_id, k, v) for k, v in tags.items()])
            return _read_model(db, model_id)

    def get_model(self, model_id: str) -> ModelInfo:
        with self._snapshot() as db:
            return _read_model(db, model_id)

    def list_models(self, after: str, count: int) -> list[ModelInfo]:
        """Up to ``count`` models whose names sort after ``after``, in name order."""
        with self._snapshot() as db:
            ids = [r[0] for r in db.execute(
                "SELECT model_id FROM models WHERE model_id > ? ORDER BY model_id LIMIT ?", (after, count))]
            return [_read_model(db, model_id) for model_id in ids]

    def delete_model(self, model_id: str) -> None:
        """Remove the model; its versions, files, aliases and tags go with it (ON DELETE CASCADE)."""
        with self._transaction() as db:
            _model_exists(db, model_id)
            db.execute("DELETE FROM models WHERE model_id = ?", (model_id,))

    def set_model_tag(self, model_id: str, key: str, value: str) -> ModelInfo:
        with self._transaction() as db:
            _model_exists(db, model_id)
            db.execute("INSERT OR REPLACE INTO model_tags VALUES (?, ?, ?)", (model_id, key, value))
            return _read_model(db, model_id)

    def delete_model_tag(self, model_id: str, key: str) -> ModelInfo:
        with self._transaction() as db:
            _model_exists(db, model_id)
            if db.execute("DELETE FROM model_tags WHERE model_id = ? AND key = ?", (model_id, key)).rowcount == 0:
                raise NotFound(f"model {model_id!r} has no tag {key!r}", reason="TAG_NOT_FOUND",
                               metadata={"model": model_id, "key": key})
            return _read_model(db, model_id)

    def set_alias(self, model_id: str, alias: str, version: int) -> ModelInfo:
        """Point ``alias`` at ``version``; the old target is replaced in the same transaction."""
        with self._transaction() as db:
            _version_exists(db, model_id, version)
            db.execute("INSERT OR REPLACE INTO aliases VALUES (?, ?, ?)", (model_id, alias, version))
            return _read_model(db, model_id)

    def delete_alias(self, model_id: str, alias: str) -> ModelInfo:
        with self._transaction() as db:
            _model_exists(db, model_id)
            if db.execute("DELETE FROM aliases WHERE model_id = ? AND alias = ?", (model_id, alias)).rowcount == 0:
                raise NotFound(f"model {model_id!r} has no alias {alias!r}", reason="ALIAS_NOT_FOUND",
                               metadata={"model": model_id, "alias": alias})
            return _read_model(db, model_id)

    # -- versions ----------------------------------------------------------------------------

    def create_version(
        self, model_id: str, kind: str, source: str, files: list[FileEntry], tags: dict[str, str],
        description: str, aliases: list[str], *, check_blobs: Callable[[list[FileEntry]], None],
    ) -> VersionInfo:
        """Record the next version of ``model_id`` (creating the model if needed) with its files, tags and aliases.

        ``check_blobs`` runs inside the transaction: a version never lists a blob that is not stored.
        """
        with self._transaction() as db:
            check_blobs(files)
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
            return _read_version(db, model_id, version)

    def get_version(self, model_id: str, version: int) -> VersionInfo:
        with self._snapshot() as db:
            return _read_version(db, model_id, version)

    def list_versions(self, model_id: str, before: int | None, count: int) -> list[VersionInfo]:
        """Up to ``count`` versions numbered below ``before`` (all when None), newest first."""
        with self._snapshot() as db:
            _model_exists(db, model_id)
            numbers = [r[0] for r in db.execute(
                "SELECT version FROM versions WHERE model_id = ? AND version < ? ORDER BY version DESC LIMIT ?",
                (model_id, _NO_VERSION_ABOVE if before is None else before, count))]
            return [_read_version(db, model_id, n) for n in numbers]

    def delete_version(self, model_id: str, version: int) -> None:
        """Remove the version; its files, tags and the aliases pointing at it go with it (ON DELETE CASCADE)."""
        with self._transaction() as db:
            _version_exists(db, model_id, version)
            db.execute("DELETE FROM versions WHERE model_id = ? AND version = ?", (model_id, version))

    def set_version_tag(self, model_id: str, version: int, key: str, value: str) -> VersionInfo:
        with self._transaction() as db:
            _version_exists(db, model_id, version)
            db.execute("INSERT OR REPLACE INTO version_tags VALUES (?, ?, ?, ?)", (model_id, version, key, value))
            return _read_version(db, model_id, version)

    def resolve(self, model_id: str, version: int | None, alias: str | None) -> VersionInfo:
        """A version by number, by alias, or (neither given) the "default" alias, else the latest version."""
        with self._snapshot() as db:
            _model_exists(db, model_id)
            if version is not None:
                return _read_version(db, model_id, version)
            wanted = alias or "default"
            row = db.execute("SELECT version FROM aliases WHERE model_id = ? AND alias = ?",
                             (model_id, wanted)).fetchone()
            if row is None and alias is None:
                row = db.execute("SELECT MAX(version) FROM versions WHERE model_id = ?", (model_id,)).fetchone()
                if row[0] is None:
                    raise NotFound(f"model {model_id!r} has no versions", reason="VERSION_NOT_FOUND",
                                   metadata={"model": model_id})
            if row is None:
                raise NotFound(f"model {model_id!r} has no alias {wanted!r}", reason="ALIAS_NOT_FOUND",
                               metadata={"model": model_id, "alias": wanted})
            return _read_version(db, model_id, row[0])

    # -- files -------------------------------------------------------------------------------

    def remove_unreferenced(self, sha256s: list[str], remove: Callable[[str], None]) -> None:
        """Call ``remove`` on each of ``sha256s`` that no version lists, inside one write transaction.

        The transaction keeps CreateModelVersion (whose blob check runs in its own transaction) out
        while blobs are removed: a version either lists a blob before it is looked at here, and
        it is kept, or is created after the blob is gone and fails with BLOB_MISSING.
        """
        with self._transaction() as db:
            for sha256 in sha256s:
                if db.execute("SELECT 1 FROM files WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone() is None:
                    remove(sha256)

    def blob_use(self, sha256: str) -> BlobUse | None:
        """One version listing the blob, or None when no version does."""
        with self._snapshot() as db:
            row = db.execute("SELECT model_id, version, path FROM files WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone()
        return BlobUse(*row) if row is not None else None

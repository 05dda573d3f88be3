"""The registry's domain, as the servicer calls it: checked arguments in, metadata and blobs out.

Layout under ``--data-dir``::

    registry.db     models, versions, files, aliases and tags (``metadata``: SQLite, WAL, synchronous=FULL)
    blobs/ ...      file contents by sha256, pending uploads, quarantined blobs (``blobs``)
    LOCK            held (flock) by the one registry process using this folder

Garbage collection (``collect_garbage``) removes pending uploads no live writer touched for the
upload lease and blobs no version lists that nobody wrote, found or queried within the grace.

Every metadata change is one transaction, a blob becomes visible only once its bytes matched
their sha256, and a version is recorded only once every blob it lists is stored, so a crash at
any point leaves either the old state or the new one. The rules for arguments live in
``validation``. Everything here blocks (disk, SQLite); the servicer calls it from worker threads.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from services.runtime.errors import DataLoss, FailedPrecondition, NotFound

from .blobs import BlobReader, BlobStore, Upload
from .integrity import READ_BLOCKS
from .metadata import Database, FileEntry, ModelInfo, VersionInfo
from .validation import (
    MAX_MODEL_INDEX_BYTES,
    check_alias,
    check_files,
    check_kind,
    check_model_index,
    check_model_id,
    check_pickle_free,
    check_read_range,
    check_safetensors,
    check_sha256,
    check_tag,
    check_tags,
    check_text,
    decode_page_token,
    encode_page_token,
    page_size_of,
    parse_model_name,
    parse_reference,
    parse_version_name,
)

log = logging.getLogger(__name__)

#: Stored blobs looked up in one metadata transaction while collecting garbage.
_GC_BATCH = 500


@dataclass
class Garbage:
    """What one garbage collection removed (or, dry, would remove)."""

    partial_uploads: int = 0
    partial_upload_bytes: int = 0
    blobs: int = 0
    blob_bytes: int = 0


class RegistryStore:
    """Models, versions, aliases and tags (SQLite) over a content-addressed blob store.

    ``upload_lease_s``: a pending upload nobody wrote for this long is abandoned (collectable).
    ``gc_grace_s``: an unlisted blob is collected only once nobody wrote, found or queried it for this long.
    ``read_verification``: what reads check before they send (``integrity.READ_VERIFICATIONS``).
    """

    def __init__(self, data_dir: Path, max_blob_bytes: int, *, allow_pickle: bool = False, quota_bytes: int = 0,
                 min_free_bytes: int = 0, upload_lease_s: float = 60.0, gc_grace_s: float = 3600.0,
                 read_verification: str = READ_BLOCKS):
        data_dir = Path(data_dir).expanduser()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.allow_pickle = allow_pickle
        self.upload_lease_s = upload_lease_s
        self.gc_grace_s = gc_grace_s
        self._gc_lock = threading.Lock()
        self._lock_file = open(data_dir / "LOCK", "a+b")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            self._lock_file.close()
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise RuntimeError(f"another registry is using --data-dir {data_dir}; stop it or pick another folder")
            raise
        self.blobs = BlobStore(data_dir, max_blob_bytes, quota_bytes=quota_bytes, min_free_bytes=min_free_bytes,
                               read_verification=read_verification)
        self.db = Database(data_dir / "registry.db")
        log.info("registry data in %s", data_dir)

    def close(self) -> None:
        self.db.close()
        self._lock_file.close()

    # -- models ------------------------------------------------------------------------------

    def create_model(self, name: str, description: str, tags: dict[str, str]) -> ModelInfo:
        model_id = check_model_id(name, "model_id")
        return self.db.create_model(model_id, check_text(description, "description", 10_000), check_tags(tags))

    def get_model(self, name: str) -> ModelInfo:
        return self.db.get_model(parse_model_name(name))

    def list_models(self, page_size: int, page_token: str) -> tuple[list[ModelInfo], str]:
        size = page_size_of(page_size)
        after = decode_page_token(page_token, "models", str) if page_token else ""
        models = self.db.list_models(after, size + 1)  # one more than a page: is there a next one?
        token = encode_page_token("models", models[size - 1].model_id) if len(models) > size else ""
        return models[:size], token

    def delete_model(self, name: str) -> None:
        model_id = parse_model_name(name)
        self.db.delete_model(model_id)
        log.info("deleted model %s", model_id)

    def set_model_tag(self, name: str, key: str, value: str) -> ModelInfo:
        model_id = parse_model_name(name)
        check_tag(key, value)
        return self.db.set_model_tag(model_id, key, value)

    def delete_model_tag(self, name: str, key: str) -> ModelInfo:
        return self.db.delete_model_tag(parse_model_name(name), key)

    def set_alias(self, name: str, alias: str, version: int) -> ModelInfo:
        """Point ``alias`` at ``version``; the old target is replaced in the same transaction."""
        model_id = parse_model_name(name)
        return self.db.set_alias(model_id, check_alias(alias), version)

    def delete_alias(self, name: str, alias: str) -> ModelInfo:
        return self.db.delete_alias(parse_model_name(name), alias)

    # -- versions ----------------------------------------------------------------------------

    def create_version(
        self, name: str, kind: str, source: str, files: list[FileEntry], tags: dict[str, str], description: str,
        aliases: list[str],
    ) -> VersionInfo:
        """Record a version whose blobs are all stored, in one transaction (the model is created if needed)."""
        model_id = parse_model_name(name)
        kind = check_kind(kind)
        source = check_text(source, "source", 4096)
        description = check_text(description, "description", 10_000)
        tags = check_tags(tags)
        aliases = sorted({check_alias(a) for a in aliases})
        files = check_files(files, kind, self.blobs.max_blob_bytes)
        check_pickle_free(files, self.allow_pickle)
        self._check_safetensors(files)
        self._check_model_index(kind, files)
        created = self.db.create_version(model_id, kind, source, files, tags, description, aliases,
                                         check_blobs=self._check_blobs_stored)
        log.info("created %s version %d (%s, %d files)", model_id, created.version, kind, len(files))
        return created

    def _check_safetensors(self, files: list[FileEntry]) -> None:
        """Every *.safetensors file's blob has a safetensors header (read cheaply, tensors untouched).

        Runs before the transaction: a blob missing now is reported as BLOB_MISSING inside it.
        """
        checked: set[str] = set()
        for f in files:
            if f.path.lower().endswith(".safetensors") and f.sha256 not in checked:
                checked.add(f.sha256)
                check_safetensors(f.path, f.sha256, self.blobs.safetensors_problem(f.sha256))

    def _check_model_index(self, kind: str, files: list[FileEntry]) -> None:
        """A pipeline version's stored model_index.json names a pipeline of the kind's family (read when small).

        Runs before the transaction: a blob missing now is reported as BLOB_MISSING inside it.
        """
        index = next((f for f in files if f.path == "model_index.json"), None)
        if index is None or self.blobs.stored_size(index.sha256) is None:
            return
        try:
            content = (self.blobs.path(index.sha256).read_bytes()
                       if index.size_bytes <= MAX_MODEL_INDEX_BYTES else None)
        except FileNotFoundError:  # collected meanwhile: BLOB_MISSING below
            return
        check_model_index(kind, content)

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
        return self.db.get_version(*parse_version_name(name))

    def list_versions(self, parent: str, page_size: int, page_token: str) -> tuple[list[VersionInfo], str]:
        model_id = parse_model_name(parent, "parent")
        size = page_size_of(page_size)
        scope = f"versions:{model_id}"
        before = decode_page_token(page_token, scope, int) if page_token else None
        versions = self.db.list_versions(model_id, before, size + 1)
        token = encode_page_token(scope, versions[size - 1].version) if len(versions) > size else ""
        return versions[:size], token

    def delete_version(self, name: str) -> None:
        """Remove a version and the aliases pointing at it; its blobs stay (other versions may share them)."""
        model_id, version = parse_version_name(name)
        self.db.delete_version(model_id, version)
        log.info("deleted %s version %d", model_id, version)

    def set_version_tag(self, name: str, key: str, value: str) -> VersionInfo:
        model_id, version = parse_version_name(name)
        check_tag(key, value)
        return self.db.set_version_tag(model_id, version, key, value)

    def resolve(self, reference: str) -> VersionInfo:
        """'name' (the "default" alias, else the latest version), 'name@VERSION' or 'name@ALIAS'."""
        return self.db.resolve(*parse_reference(reference))

    # -- blobs -------------------------------------------------------------------------------

    def query_blob(self, sha256: str) -> tuple[int, bool]:
        return self.blobs.query(check_sha256(sha256))

    def begin_upload(self, sha256: str, size_bytes: int, offset: int) -> Upload:
        return self.blobs.begin_upload(sha256, size_bytes, offset)

    def open_blob(self, sha256: str, offset: int, limit: int, chunk_size: int) -> BlobReader:
        """Open a blob for ReadBlob; a blob that versions list but the disk lacks is DATA_LOSS, not NOT_FOUND."""
        check_sha256(sha256)
        chunk_size = check_read_range(offset, limit, chunk_size)
        reader = self.blobs.open_reader(sha256, offset, limit, chunk_size)
        if reader is not None:
            return reader
        used = self.db.blob_use(sha256)
        if used is not None:
            raise DataLoss(
                f"blob {sha256} ({used.model_id} version {used.version}, {used.path}) is missing from the "
                "registry's store; import the model files again to repair it",
                reason="BLOB_MISSING", metadata={"sha256": sha256, "model": used.model_id, "version": str(used.version)},
            )
        raise NotFound(f"blob {sha256} is not stored", reason="BLOB_NOT_FOUND", metadata={"sha256": sha256})

    # -- garbage collection ------------------------------------------------------------------

    def collect_garbage(self, dry_run: bool = False) -> Garbage:
        """Remove abandoned pending uploads and blobs no version lists (report them only, when ``dry_run``).

        Races, and why they are safe:
        - an upload in progress is live in the blob store and its .partial is never taken; one that
          stalled longer than the lease lost its stream already (the servicer ends it), so its
          partial is abandoned; a writer resuming it later starts again from offset 0;
        - a blob just uploaded (or found stored by QueryBlob or WriteBlob) for a version about to be
          created has a fresh mtime and is spared for the grace period (at least the lease); the
          import client retries its uploads once if CreateModelVersion still reports BLOB_MISSING;
        - the check that no version lists a blob and its removal share one metadata transaction
          with CreateModelVersion's blob check, so a version never lists a removed blob.
        """
        with self._gc_lock:
            now = time.time()
            garbage = Garbage()
            garbage.partial_uploads, garbage.partial_upload_bytes = self.blobs.collect_partials(
                now - self.upload_lease_s, dry_run=dry_run)
            cutoff = now - max(self.gc_grace_s, self.upload_lease_s)
            candidates = self.blobs.blobs_older_than(cutoff)

            def remove(sha256: str) -> None:
                size = self.blobs.remove_blob(sha256, cutoff, dry_run=dry_run)
                if size is not None:
                    garbage.blobs += 1
                    garbage.blob_bytes += size

            for start in range(0, len(candidates), _GC_BATCH):
                self.db.remove_unreferenced(candidates[start:start + _GC_BATCH], remove)
        if garbage.partial_uploads or garbage.blobs:
            log.info("%s %d abandoned upload(s) (%d bytes) and %d unlisted blob(s) (%d bytes)",
                     "would collect" if dry_run else "collected", garbage.partial_uploads,
                     garbage.partial_upload_bytes, garbage.blobs, garbage.blob_bytes)
        return garbage

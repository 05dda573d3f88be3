"""A stage's digest-keyed cache of registry models: fetch a version once, load it with from_pretrained.

    cache = ModelCache(RegistryClient(address), cache_dir)
    fetched = cache.fetch("tiny-sd@default", components=["unet", "scheduler"])
    UNet2DConditionModel.from_pretrained(fetched.folder, subfolder="unet", use_safetensors=True)

Layout under ``cache_dir``::

    blobs/<sha256>               one read-only file per content, shared by every version
    models/<model>/<version>/    the version's folder: hard links to the blobs (copies where links fail)
    locks/<sha256>.lock          flock held while one process (or thread) fetches that blob
    locks/<model>@<version>.lock flock held while one fetch links that version's folder

The cache belongs to the server side (the stage services); the client library only downloads
files (``RegistryClient.download_files`` / ``read_blob``), so a client install needs no cache.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from latentwire.client.registry import (
    ModelFilesError,
    RegistryClient,
    TransferResult,
    fsync_dir,
    is_valid_model_name,
    select_files,
    sha256_file,
)
from latentwire.registry.v1 import registry_pb2


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if missing) for the block: one holder at a time, whether the
    others are threads of this process (each opens the file anew) or other processes."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class ModelCache:
    """Fetches registry versions into ``cache_dir`` through ``registry``; safe to share between processes.

    A cached blob is checked by size, and by sha256 the first time this cache object uses it; it
    is downloaded again only if that check fails.
    """

    def __init__(self, registry: RegistryClient, cache_dir: str | os.PathLike):
        self.registry = registry
        self.cache_dir = Path(cache_dir).expanduser()
        # Cached blobs whose sha256 was checked already: (sha256, inode, size, mtime).
        self._verified: set[tuple] = set()

    def fetch(self, version: str | registry_pb2.ModelVersion, components: Iterable[str] | None = None, *,
              allow_pickle: bool = False) -> TransferResult:
        """Fetch a version (a reference is resolved first) and return its model folder, ready for from_pretrained.

        Only ``components`` (all when None), the top-level files and every component's small JSON
        config are fetched. Files of the folder the version does not have are removed.
        """
        if not isinstance(version, registry_pb2.ModelVersion):
            version = self.registry.resolve(version)
        files = select_files(version, components, allow_pickle=allow_pickle)
        if not is_valid_model_name(version.model_id):  # it becomes a folder name here
            raise ModelFilesError(f"model name {version.model_id!r} is not safe as a folder name")
        blobs, locks = self.cache_dir / "blobs", self.cache_dir / "locks"
        blobs.mkdir(parents=True, exist_ok=True)
        locks.mkdir(parents=True, exist_ok=True)
        folder = self.cache_dir / "models" / version.model_id / str(version.version)
        result = TransferResult(folder=folder)
        for sha256, size in sorted({(f.sha256, f.size_bytes) for f in files}):
            self._cache_blob(sha256, size, blobs, locks, result)
        # One fetch at a time links a version's folder: another's clean-up would take this one's half-linked
        # temporary file for a stale one and remove it (jobs naming one new LoRA at once fetched it together).
        with _locked(locks / f"{version.model_id}@{version.version}.lock"):
            self._materialize(version, files, blobs, folder)
        result.files = [f.path for f in files]
        return result

    def _cache_blob(self, sha256: str, size: int, blobs: Path, locks: Path, result: TransferResult) -> None:
        blob = blobs / sha256
        with _locked(locks / f"{sha256}.lock"):  # another process fetching the same blob finishes first
            try:
                info = blob.stat()
            except FileNotFoundError:
                info = None
            if info is not None:
                key = (sha256, info.st_ino, info.st_size, info.st_mtime_ns)
                if info.st_size == size and (key in self._verified or sha256_file(blob) == sha256):
                    self._verified.add(key)
                    result.blobs_reused += 1
                    return
                blob.unlink()  # damaged in the cache: fetch it again
            partial = blobs / f"{sha256}.partial"
            got = self.registry.read_blob(sha256, partial, size_bytes=size)  # verified against sha256
            result.bytes_received += got.bytes_received
            result.resumes += got.resumes
            result.blobs_downloaded += 1
            os.chmod(partial, 0o444)
            os.replace(partial, blob)
            fsync_dir(blobs)
            info = blob.stat()
            self._verified.add((sha256, info.st_ino, info.st_size, info.st_mtime_ns))

    @staticmethod
    def _materialize(version: registry_pb2.ModelVersion, files: list, blobs: Path, folder: Path) -> None:
        """Link each file into the model folder (atomically per file); drop files the version does not have."""
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            target = folder / f.path
            blob = blobs / f.sha256
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists() and os.path.samefile(target, blob):
                continue
            temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            try:
                os.link(blob, temporary)
            except OSError:  # another file system, or links not allowed: copy
                shutil.copyfile(blob, temporary)
            os.replace(temporary, target)
        known = {f.path for f in version.files}
        for path in folder.rglob("*"):
            if path.is_file() and path.relative_to(folder).as_posix() not in known:
                path.unlink()  # left from an older version with this number (a deleted, re-created model)

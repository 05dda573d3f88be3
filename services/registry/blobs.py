"""The registry's blob store: file contents named by their sha256, uploads that resume, reads that verify.

Layout under the data folder::

    blobs/sha256/ab/abcdef...    one read-only file per distinct content, named by its sha256
    uploads/<sha256>.partial     a pending upload; its size is the committed, resumable prefix
    corrupt/<sha256>.<time>      blobs that failed verification on read, kept for inspection

A blob becomes visible only by an atomic rename after its bytes were fsynced and matched their
sha256. Everything here blocks (disk); the servicer calls it from worker threads.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from latentwire.client.registry import fsync_dir
from services.runtime.errors import DataLoss, InvalidArgument

from .validation import MAX_CHUNK_BYTES, check_blob_size, check_sha256

log = logging.getLogger(__name__)


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

    def begin_upload(self, sha256: str, size_bytes: int, offset: int) -> Upload:
        """Start (or resume at ``offset``) the upload of one blob; see ``Upload``."""
        return Upload(self, sha256, size_bytes, offset)

    def open_reader(self, sha256: str, offset: int, limit: int, chunk_size: int) -> BlobReader | None:
        """A reader of ``limit`` bytes (0: to the end) from ``offset``; None when the blob is not stored."""
        try:
            fd = os.open(self.path(sha256), os.O_RDONLY)
        except FileNotFoundError:
            return None
        size = os.fstat(fd).st_size
        if offset > size:
            os.close(fd)
            raise InvalidArgument(f"offset {offset} is past the blob's end ({size} bytes)", reason="OFFSET_OUT_OF_RANGE",
                                  metadata={"field": "offset", "size_bytes": str(size)})
        return BlobReader(self, sha256, fd, size, offset, limit, chunk_size)


class Upload:
    """One WriteBlob stream: appends chunks to the blob's .partial file, hashing as it goes.

    The caller serialises uploads of one sha256 (at most one Upload per blob at a time).
    """

    def __init__(self, blobs: BlobStore, sha256: str, size_bytes: int, offset: int):
        self.blobs = blobs
        self.sha256 = check_sha256(sha256)
        self.size = check_blob_size(size_bytes, blobs.max_blob_bytes)
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
        fsync_dir(target.parent)
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

"""The registry's blob store: file contents named by their sha256, uploads that resume, reads that verify.

Layout under the data folder::

    blobs/sha256/ab/abcdef...    one read-only file per distinct content, named by its sha256
    blobs/crc32/ab/abcdef...     its block checksums (``integrity``), taken from bytes that matched the sha256
    uploads/<sha256>.partial     a pending upload; its size is the committed, resumable prefix
    corrupt/<sha256>.<time>      blobs that failed verification on read or scrub, kept for inspection

A blob becomes visible only by an atomic rename after its bytes were fsynced and matched their
sha256. With ``read_verification`` "blocks" (the default) reads verify what they send: each block
against the checksums recorded when the blob's bytes last matched their sha256 (``VerifiedReader``),
or, for a blob without them, by hashing the whole blob before the last chunk goes out
(``BlobReader``, which records them). With "digest" they send the bytes as stored
(``StoredReader``): the sha256 checked at rest stands for them, no block checksums are taken on
upload or read, and the client's own sha256 of what it received is the check per transfer
(``integrity`` says what each mode costs and catches). ``scrub`` re-hashes blobs at rest
periodically, so damage in blobs (or parts) nobody reads is found too.
An upload is admitted only when its declared size fits ``--max-blob-bytes``, the store's
``--quota-bytes`` and the free disk (less ``--min-free-disk-bytes``), counting what the uploads
in progress still have to write, so many uploads declaring huge sizes cannot overcommit the disk.
A blob's mtime is the last time it was written, found stored by an upload, or queried: garbage
collection (``collect_partials``, ``remove_blob``) goes by it. Everything here blocks (disk); the
servicer calls it from worker threads.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from latentwire.client.file_io import DirectAppender, UncachedReader
from latentwire.client.file_io import pread_full as _pread_full
from latentwire.client.registry import fsync_dir, safetensors_problem
from services.runtime.errors import DataLoss, InvalidArgument, ResourceExhausted

from .integrity import (BLOCK_BYTES, READ_BLOCKS, READ_VERIFICATIONS, BlockSums, read_index, remove_index, write_index,
                        write_marker)
from .validation import MAX_CHUNK_BYTES, check_blob_size, check_sha256

log = logging.getLogger(__name__)

#: Threads hashing upload chunks next to the threads writing them (one chunk per upload at a time).
_HASHING = ThreadPoolExecutor(max_workers=4, thread_name_prefix="blob-sha256")
#: Chunks smaller than this are hashed in line: the hand-off would cost more than it saves.
_PARALLEL_HASH_BYTES = 256 * 1024


def _bytes(n: int) -> str:
    """A byte count for a message: exact, and in GiB to read at a glance."""
    return f"{n} bytes ({n / 1024**3:.2f} GiB)"


def pread_full(fd: int, position: int, length: int, uncached: UncachedReader | None = None) -> bytes:
    """Up to ``length`` bytes of ``fd`` from ``position`` (fewer only at the end of the file); through ``uncached``
    (the same file) where given: read with O_DIRECT, as the blob's upload wrote them, instead of filling the page
    cache."""
    return uncached.read(position, length) if uncached is not None else _pread_full(fd, position, length)


class BlobStore:
    """Files named by their sha256 under ``root``; pending uploads under ``uploads``.

    ``quota_bytes`` (0: none) bounds stored blobs plus pending uploads; ``min_free_bytes`` is the
    disk space uploads leave free. ``read_verification`` (``integrity.READ_VERIFICATIONS``): whether
    reads check each block they send ("blocks") or send the bytes verified at rest ("digest").
    """

    def __init__(self, root: Path, max_blob_bytes: int, *, quota_bytes: int = 0, min_free_bytes: int = 0,
                 read_verification: str = READ_BLOCKS):
        if read_verification not in READ_VERIFICATIONS:
            raise ValueError(f"read_verification must be one of {READ_VERIFICATIONS}, not {read_verification!r}")
        #: Whether uploads and full hashes record block checksums (reads check blocks against them).
        self.block_sums = read_verification == READ_BLOCKS
        self.blobs = root / "blobs" / "sha256"
        self.uploads = root / "uploads"
        self.corrupt = root / "corrupt"
        self.checksums = root / "blobs" / "crc32"
        self.max_blob_bytes = max_blob_bytes
        self.quota_bytes = quota_bytes
        self.min_free_bytes = min_free_bytes
        for folder in (self.blobs, self.uploads, self.corrupt, self.checksums):
            folder.mkdir(parents=True, exist_ok=True)
        # Hash state of pending uploads, so a resumed upload does not re-read its prefix:
        # sha -> (position, hasher, block sums or None).
        self._hash_states: dict[str, tuple[int, "hashlib._Hash", BlockSums | None]] = {}
        self._states_lock = threading.Lock()
        # Uploads with an open stream (sha -> Upload), and the bytes of stored blobs. Admitting an upload,
        # creating its .partial and collecting partials all hold this lock, so none of them interleave.
        self._live: dict[str, Upload] = {}
        self._live_lock = threading.Lock()
        self._stored_bytes = sum(size for _, size, _ in self._stored())

    def _stored(self):
        """(sha256, size, mtime) of every stored blob."""
        for prefix in os.scandir(self.blobs):
            if not prefix.is_dir():
                continue
            for entry in os.scandir(prefix.path):
                try:
                    info = entry.stat()
                except FileNotFoundError:  # collected or quarantined meanwhile
                    continue
                yield entry.name, info.st_size, info.st_mtime

    def _partial_bytes(self, exclude: str) -> int:
        """Bytes on disk of the pending uploads without a live writer (``exclude`` aside)."""
        total = 0
        for entry in os.scandir(self.uploads):
            sha256 = entry.name.removesuffix(".partial")
            if sha256 != exclude and sha256 not in self._live:
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_size
        return total

    def _admit(self, sha256: str, size: int, committed: int) -> None:
        """Refuse (RESOURCE_EXHAUSTED) an upload of ``size`` bytes that the quota or the disk cannot hold.

        Called with ``_live_lock`` held. The uploads in progress count with their declared sizes
        (quota) and the bytes they still have to write (disk), so they cannot overcommit together.
        """
        others = [u for s, u in self._live.items() if s != sha256]
        if self.quota_bytes:
            used = self._stored_bytes + self._partial_bytes(sha256) + sum(u.size for u in others)
            if used + size > self.quota_bytes:
                raise ResourceExhausted(
                    f"a blob of {_bytes(size)} does not fit the registry's quota: {_bytes(used)} of "
                    f"{_bytes(self.quota_bytes)} are used by stored blobs and pending uploads; delete versions and "
                    "run `latentwire models gc`, or raise --quota-bytes",
                    reason="QUOTA_EXCEEDED",
                    metadata={"size_bytes": size, "used_bytes": used, "quota_bytes": self.quota_bytes})
        free = shutil.disk_usage(self.uploads).free
        needed = size - committed + sum(max(0, u.size - u.position) for u in others)
        if needed > free - self.min_free_bytes:
            raise ResourceExhausted(
                f"a blob of {_bytes(size)} does not fit the registry's disk: {_bytes(free)} are free, "
                f"{_bytes(self.min_free_bytes)} stay free and the uploads in progress need "
                f"{_bytes(needed - (size - committed))} more; free disk space and retry",
                reason="DISK_FULL",
                metadata={"size_bytes": size, "free_bytes": free, "min_free_bytes": self.min_free_bytes})

    def _register(self, upload: Upload) -> None:
        self._live[upload.sha256] = upload

    def _release(self, upload: Upload, stored: int = 0) -> None:
        with self._live_lock:
            if self._live.get(upload.sha256) is upload:
                del self._live[upload.sha256]
            self._stored_bytes += stored

    def touch(self, sha256: str) -> None:
        """Mark a stored blob as just used (garbage collection spares it for the grace period)."""
        with contextlib.suppress(OSError):
            os.utime(self.path(sha256))

    def path(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def index_path(self, sha256: str) -> Path:
        """The blob's block checksums (``integrity``)."""
        return self.checksums / sha256[:2] / sha256

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
            self.touch(sha256)  # a client that found it stored is about to list it in a version
            return size, True
        try:
            return self.partial_path(sha256).stat().st_size, False
        except FileNotFoundError:
            return 0, False

    def quarantine(self, sha256: str) -> Path | None:
        """Move a blob that failed verification out of the store, so it is never served and can be re-uploaded."""
        target = self.corrupt / f"{sha256}.{int(time.time())}"
        try:
            size = self.path(sha256).stat().st_size
            os.replace(self.path(sha256), target)
        except FileNotFoundError:
            return None
        remove_index(self.index_path(sha256))
        with self._live_lock:
            self._stored_bytes -= size
        log.error("blob %s failed verification; moved to %s", sha256, target)
        return target

    def remember_hash(self, sha256: str, position: int, hasher, sums: BlockSums | None) -> None:
        with self._states_lock:
            self._hash_states[sha256] = (position, hasher.copy(), None if sums is None else sums.copy())

    def recall_hash(self, sha256: str, position: int):
        """(hasher, block sums) saved at ``position`` for this blob, else None; forgets the saved state."""
        with self._states_lock:
            state = self._hash_states.pop(sha256, None)
        if state is not None and state[0] == position:
            return state[1], state[2]
        return None

    def record_sums(self, sha256: str, size: int, sums: BlockSums | None) -> None:
        """Record the block checksums of bytes that just matched ``sha256`` (None: only that they matched now)."""
        try:
            if sums is None:
                write_marker(self.index_path(sha256), size)
            else:
                write_index(self.index_path(sha256), size, sums.finish())
        except OSError as error:  # reads fall back to hashing the whole blob; the scrub re-hashes it early
            log.warning("could not record the block checksums of blob %s: %s", sha256, error)

    def verify(self, sha256: str) -> bool | None:
        """Hash a stored blob whole; record its block checksums when it matches, quarantine it when not.

        True: intact; False: corrupt (now quarantined); None: not stored.
        """
        try:
            fd = os.open(self.path(sha256), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            hasher, sums = hashlib.sha256(), BlockSums() if self.block_sums else None
            buffer = bytearray(BLOCK_BYTES * 4)
            view = memoryview(buffer)
            position = 0
            while count := os.preadv(fd, [buffer], position):
                hasher.update(view[:count])
                if sums is not None:
                    sums.update(view[:count])
                position += count
        finally:
            os.close(fd)
        if position == size and hasher.hexdigest() == sha256:
            self.record_sums(sha256, size, sums)
            return True
        self.quarantine(sha256)
        return False

    def scrub(self, verified_before: float, *, max_bytes: int = 0) -> tuple[int, int]:
        """Re-hash stored blobs last verified before ``verified_before`` (epoch seconds), oldest first.

        A blob's last verification is its index's mtime (written when its bytes matched their
        sha256); a blob without an index counts as never verified. ``max_bytes`` (0: no bound)
        caps the bytes hashed in one call, so a scrub can be spread over time. Corrupt blobs are
        quarantined (a re-import stores them again). Returns (blobs checked, blobs found corrupt).
        """
        due = []
        for sha256, size, _ in self._stored():
            try:
                verified = self.index_path(sha256).stat().st_mtime
            except FileNotFoundError:
                verified = 0.0
            if verified < verified_before:
                due.append((verified, sha256, size))
        checked = corrupt = hashed = 0
        for _, sha256, size in sorted(due):
            if max_bytes and checked and hashed + size > max_bytes:
                break
            result = self.verify(sha256)
            if result is None:
                continue
            checked += 1
            hashed += size
            corrupt += result is False
        if corrupt:
            log.error("scrub: %d of %d blob(s) checked were corrupt and were quarantined", corrupt, checked)
        return checked, corrupt

    def safetensors_problem(self, sha256: str) -> str | None:
        """What makes a stored blob not a safetensors file (reading its header only); None if it is one or absent."""
        try:
            fd = os.open(self.path(sha256), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return safetensors_problem(lambda offset, length: os.pread(fd, length, offset), os.fstat(fd).st_size)
        finally:
            os.close(fd)

    # -- garbage collection ------------------------------------------------------------------

    def collect_partials(self, older_than: float, *, dry_run: bool) -> tuple[int, int]:
        """Remove pending uploads with no live writer last written before ``older_than`` (epoch seconds).

        Returns (uploads, bytes). A writer that resumes one later finds it gone and starts from 0.
        """
        count = freed = 0
        for entry in list(os.scandir(self.uploads)):
            if not entry.name.endswith(".partial"):
                continue
            sha256 = entry.name.removesuffix(".partial")
            with self._live_lock:  # no upload can open it between this check and the unlink
                if sha256 in self._live:
                    continue
                try:
                    info = os.stat(entry.path)
                except FileNotFoundError:
                    continue
                if info.st_mtime > older_than:
                    continue
                if not dry_run:
                    os.unlink(entry.path)
                    self.recall_hash(sha256, -1)
            count += 1
            freed += info.st_size
        return count, freed

    def blobs_older_than(self, older_than: float) -> list[str]:
        """Stored blobs last written, found or queried before ``older_than`` (candidates for collection)."""
        return [sha256 for sha256, _, mtime in self._stored() if mtime <= older_than]

    def remove_blob(self, sha256: str, older_than: float, *, dry_run: bool) -> int | None:
        """Remove a stored blob unless it was used after ``older_than``; its size, or None when kept or absent."""
        path = self.path(sha256)
        try:
            info = path.stat()
        except FileNotFoundError:
            return None
        if info.st_mtime > older_than:  # queried or found by an upload since it was listed
            return None
        if not dry_run:
            path.unlink(missing_ok=True)
            remove_index(self.index_path(sha256))
            with self._live_lock:
                self._stored_bytes -= info.st_size
            log.info("collected blob %s (%d bytes): no version lists it", sha256, info.st_size)
        return info.st_size

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
        if not self.block_sums:
            reader = StoredReader(self, sha256, fd, size, offset, limit, chunk_size)
        elif (sums := read_index(self.index_path(sha256), size)) is not None:
            reader = VerifiedReader(self, sha256, fd, size, offset, limit, chunk_size, sums)
        else:
            reader = BlobReader(self, sha256, fd, size, offset, limit, chunk_size)
        try:
            reader._uncached = UncachedReader(self.path(sha256), fd)
        except BaseException:
            reader.close()
            raise
        return reader


class Upload:
    """One WriteBlob stream: appends chunks to the blob's .partial file, hashing as it goes.

    The caller serialises uploads of one sha256 (at most one Upload per blob at a time). The upload
    is live (its .partial is never collected, its declared size is reserved) until ``close``.
    """

    def __init__(self, blobs: BlobStore, sha256: str, size_bytes: int, offset: int):
        self.blobs = blobs
        self.sha256 = check_sha256(sha256)
        self.size = check_blob_size(size_bytes, blobs.max_blob_bytes)
        self.complete = False
        self.position = 0
        self._file = None
        self._writer: DirectAppender | None = None  # opened at the first byte, after any resume
        self._hash_state_lost = False
        stored = blobs.stored_size(sha256)
        if stored is not None:
            blobs.touch(sha256)  # the caller is about to list it in a version
            self.complete, self.position = True, stored
            return
        partial = blobs.partial_path(sha256)
        with blobs._live_lock:
            try:
                committed = partial.stat().st_size
            except FileNotFoundError:
                committed = 0
            blobs._admit(self.sha256, self.size, max(0, min(committed, offset)))  # before any byte is written
            self._file = open(partial, "a+b")  # noqa: SIM115 - closed in close()
            committed = os.fstat(self._file.fileno()).st_size
            self.position = min(committed, max(offset, 0))
            blobs._register(self)
        if offset < 0 or offset > committed or offset > size_bytes:
            self._discard(remove_partial=committed == 0)
            raise InvalidArgument(
                f"write offset {offset} does not continue the upload: {committed} bytes are committed; "
                "resume from QueryBlob's committed_size",
                reason="INVALID_WRITE_OFFSET",
                metadata={"field": "offset", "committed_size": str(committed)},
            )
        try:
            self._resume(offset, committed)
        except BaseException:
            self._discard(remove_partial=False)  # no longer live: its reservation goes, collection may take it
            raise

    def _resume(self, offset: int, committed: int) -> None:
        if offset < committed:
            self._file.truncate(offset)  # the client restarts earlier than it could: drop the rest
        self.position = offset
        saved = self.blobs.recall_hash(self.sha256, offset)
        if saved is not None and (saved[1] is not None) == self.blobs.block_sums:
            self._hasher, self._sums = saved
        else:
            self._hasher, self._sums = hashlib.sha256(), BlockSums() if self.blobs.block_sums else None
            self._file.seek(0)
            remaining = offset
            while remaining:
                block = self._file.read(min(remaining, MAX_CHUNK_BYTES))
                if not block:
                    break
                self._hasher.update(block)
                if self._sums is not None:
                    self._sums.update(block)
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
            # sha256 on its own thread while this one writes and sums the blocks (all three release the GIL).
            hashing = _HASHING.submit(self._hasher.update, data) if len(data) >= _PARALLEL_HASH_BYTES else None
            try:
                if self._writer is None:  # O_DIRECT where the disk takes it: no page cache to fill (latentwire.client.file_io)
                    self._writer = DirectAppender(self.blobs.partial_path(self.sha256), self.position)
                self._writer.write(data)
                if self._sums is not None:
                    self._sums.update(data)
            except BaseException:
                self._hash_state_lost = True  # the hashes ran ahead of the file: a resume re-reads the prefix
                raise
            finally:
                if hashing is None:
                    self._hasher.update(data)
                else:
                    hashing.result()
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
        self._stop_writer()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.chmod(partial, 0o444)  # blobs are immutable
        # Before the blob is visible, so its first read checks blocks instead of re-hashing it whole.
        self.blobs.record_sums(self.sha256, self.size, self._sums)
        target = self.blobs.path(self.sha256)
        target.parent.mkdir(exist_ok=True)
        os.replace(partial, target)
        fsync_dir(target.parent)
        self.complete = True
        self.blobs._release(self, stored=self.size)
        log.info("stored blob %s (%d bytes)", self.sha256, self.size)

    def _stop_writer(self) -> None:
        """Write what the writer holds and close it (before the file closes); its error fails the commit (OSError)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def _discard(self, *, remove_partial: bool) -> None:
        with contextlib.suppress(OSError):
            self._stop_writer()
        self._file.close()
        self._file = None
        self.blobs.recall_hash(self.sha256, -1)  # forget any saved state
        if remove_partial:
            self.blobs.partial_path(self.sha256).unlink(missing_ok=True)
        self.blobs._release(self)

    def close(self) -> None:
        """End the stream; an unfinished upload keeps its prefix (and hash state) for a resume."""
        if self._file is not None:
            try:
                self._stop_writer()  # every byte received goes into the partial file
            except OSError:  # a write error: the resume re-reads (and re-hashes) the prefix from disk
                self._hash_state_lost = True
            if not self.complete:
                if not self._hash_state_lost:
                    self.blobs.remember_hash(self.sha256, self.position, self._hasher, self._sums)
            self._file.close()
            self._file = None
        self.blobs._release(self)  # after the hash state is saved: collection may take the partial from now


@dataclass
class Chunk:
    """One piece of a ReadBlob stream."""

    offset: int
    data: bytes


class BlobReader:
    """Reads a byte range of a blob while hashing the whole blob, so corruption is caught before the last chunk.

    ``next()`` reads one chunk ahead: the final chunk is handed out only after the digest of the
    whole stored file matched its name; otherwise the blob is quarantined and DATA_LOSS raised.
    The store uses it for blobs without block checksums (stored before they existed, or whose
    index was lost); a read that verifies records them, so later reads use ``VerifiedReader``.
    """

    def __init__(self, blobs: BlobStore, sha256: str, fd: int, size: int, offset: int, limit: int, chunk_size: int):
        self.blobs = blobs
        self.sha256 = sha256
        self.size = size
        self._fd = fd
        self._uncached: UncachedReader | None = None  # open_reader's (O_DIRECT for what is not cached)
        self._lock = threading.Lock()
        self._hasher = hashlib.sha256()
        self._sums = BlockSums()
        self._start = offset
        self._end = size if limit == 0 else min(size, offset + limit)
        self._chunk_size = chunk_size
        self._position = offset
        self._ahead: Chunk | None = None
        self._started = False
        self._done = False

    def _read(self, position: int, length: int) -> bytes:
        data = pread_full(self._fd, position, length, self._uncached)
        self._hasher.update(data)
        self._sums.update(data)  # the reads run from byte 0 to the end in order
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
                self.blobs.record_sums(self.sha256, self.size, self._sums)
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
                if self._uncached is not None:
                    self._uncached.close()
                os.close(self._fd)
                self._fd = -1


class _RangeReader:
    """A byte range of a blob handed out in chunks (what VerifiedReader and StoredReader share); a subclass says how
    the bytes [start, end) are read (``_bytes``)."""

    def __init__(self, blobs: BlobStore, sha256: str, fd: int, size: int, offset: int, limit: int, chunk_size: int):
        self.blobs = blobs
        self.sha256 = sha256
        self.size = size
        self._fd = fd
        self._uncached: UncachedReader | None = None  # open_reader's (O_DIRECT for what is not cached)
        self._lock = threading.Lock()
        self._start = offset
        self._end = size if limit == 0 else min(size, offset + limit)
        self._chunk_size = chunk_size
        self._position = offset
        self._answered = False
        self._done = False

    def _bytes(self, start: int, end: int) -> bytes:
        raise NotImplementedError

    def next(self) -> Chunk | None:
        """The next chunk to send, or None after the last one. Raises DataLoss when the blob is corrupt."""
        with self._lock:
            if self._done or self._fd < 0:
                return None
            if self._position >= self._end:
                self._done = True
                # an empty range still answers once, with the blob's size
                return None if self._answered else Chunk(self._start, b"")
            end = min(self._position + self._chunk_size, self._end)
            chunk = Chunk(self._position, self._bytes(self._position, end))
            self._position = end
            self._answered = True
            return chunk

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                if self._uncached is not None:
                    self._uncached.close()
                os.close(self._fd)
                self._fd = -1


class VerifiedReader(_RangeReader):
    """Reads a byte range of a blob, checking every block it hands out against the blob's block checksums.

    The checksums were taken from bytes that matched the blob's sha256 (on upload, a full read or
    a scrub), so a chunk is handed out only if every block it touches is unchanged since then. A
    block that fails its checksum makes the reader hash the whole blob: if the blob still matches
    its sha256 the index was wrong, is rewritten and the read goes on; otherwise the blob is
    quarantined and DATA_LOSS raised before any byte of the damaged block is sent. No chunk needs
    to be held back: what goes out has been checked.
    """

    def __init__(self, blobs: BlobStore, sha256: str, fd: int, size: int, offset: int, limit: int, chunk_size: int,
                 sums):
        super().__init__(blobs, sha256, fd, size, offset, limit, chunk_size)
        self._sums = sums
        self._span = b""  # the last verified run of whole blocks, from byte _span_start
        self._span_start = 0

    def _pread(self, position: int, length: int) -> bytes:
        return pread_full(self._fd, position, length, self._uncached)

    def _first_bad_block(self, span: bytes, base: int) -> int | None:
        view = memoryview(span)
        for index in range(base // BLOCK_BYTES, (base + len(span) + BLOCK_BYTES - 1) // BLOCK_BYTES):
            start = index * BLOCK_BYTES - base
            if zlib.crc32(view[start:start + BLOCK_BYTES]) != self._sums[index]:
                return index
        return None

    def _bytes(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the blob, every block they touch checked."""
        cached = self._span_start <= start and end <= self._span_start + len(self._span)
        if not cached:
            base = start - start % BLOCK_BYTES
            stop = min(self.size, end + (-end) % BLOCK_BYTES)
            span = self._pread(base, stop - base)
            if len(span) != stop - base:  # the file is shorter than at open: damaged
                self._fail()
            if self._first_bad_block(span, base) is not None:
                self._recheck(span, base)
            self._span, self._span_start = span, base
        if start == self._span_start and end - start == len(self._span):
            return self._span
        return self._span[start - self._span_start:end - self._span_start]

    def _recheck(self, span: bytes, base: int) -> None:
        """A block failed its checksum: hash the blob whole to tell a damaged blob from a damaged index."""
        if self.blobs.verify(self.sha256) is not True:  # quarantined (or gone meanwhile)
            self._fail(quarantine=False)
        sums = read_index(self.blobs.index_path(self.sha256), self.size)
        if sums is None:
            self._fail(quarantine=False)
        self._sums = sums
        if self._first_bad_block(span, base) is not None:  # the bytes read differ from the bytes on disk now
            self._fail()
        log.warning("blob %s: its block checksums were wrong and were recomputed; the blob is intact", self.sha256)

    def _fail(self, *, quarantine: bool = True):
        self._done = True
        if quarantine:
            self.blobs.quarantine(self.sha256)
        raise DataLoss(
            f"blob {self.sha256} is corrupt on the registry's disk (its bytes no longer match their sha256); "
            "it was taken out of service: import the model files again to repair it",
            reason="BLOB_CORRUPT", metadata={"sha256": self.sha256},
        )

class StoredReader(_RangeReader):
    """Reads a byte range of a blob as stored, without checking it (``--read-verification digest``).

    The blob's bytes matched its sha256 when they were written (and again at every scrub); the
    client hashes what it receives and refuses bytes that do not match. What this reader still
    catches is a file shorter than the blob (DATA_LOSS, quarantined); a changed byte reaches the
    client, whose download fails its sha256 (DOWNLOAD_DIGEST_MISMATCH), and the blob stays in
    service until the next scrub takes it out.
    """

    def _bytes(self, start: int, end: int) -> bytes:
        """Bytes [start, end) as stored. Raises DataLoss when the file is too short."""
        data = pread_full(self._fd, start, end - start, self._uncached)
        if len(data) != end - start:  # the file is shorter than at open: damaged
            self._done = True
            self.blobs.quarantine(self.sha256)
            raise DataLoss(
                f"blob {self.sha256} is corrupt on the registry's disk (it is shorter than its recorded size); "
                "it was taken out of service: import the model files again to repair it",
                reason="BLOB_CORRUPT", metadata={"sha256": self.sha256},
            )
        return data

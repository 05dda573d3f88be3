"""Writing large files as transfers do: dirty pages synced as they accumulate, or no page cache at all.

Blob uploads (the registry's store) and downloads (a client's, a stage's model cache) append
hundreds of MiB to GiB to a new file and end with an fsync. Two ways to do that here:

- ``BackgroundSync``: ordinary buffered writes, with ``fdatasync`` started on a thread every 64 MiB
  so the final fsync waits only for the last stretch.
- ``DirectAppender``: the bytes go to the disk with ``O_DIRECT`` from one reused, page-aligned
  buffer, bypassing the page cache. Copying a transfer into the page cache costs the kernel a fresh
  page per 4 KiB; on virtual machines that hand freed guest memory back to the host (virtio-balloon
  free page reporting) each such page is a host fault as well, which made the kernel's copy the
  registry's largest cost (about 7 CPU seconds per GB on the development VM, against 1 s for the
  same bytes written with O_DIRECT). Large object stores write this way for the same reason
  (MinIO writes objects with O_DIRECT). Where the file system refuses O_DIRECT (tmpfs, some
  network and overlay file systems) it falls back to buffered writes with a ``BackgroundSync``.

Neither replaces the caller's final fsync, on which the durability guarantees rest.
"""
from __future__ import annotations

import errno
import mmap
import os
import threading

#: Alignment O_DIRECT asks of file offsets, lengths and memory: the largest logical block size in use.
DIRECT_ALIGN = 4096


class BackgroundSync:
    """Writes a growing file's dirty pages back to disk on a thread while more is written, so the final
    fsync of a large transfer waits only for the last stretch instead of the whole file.

    Call ``wrote(n)`` after each write; every ``every_bytes`` a ``fdatasync`` is started on the thread
    (one at a time; requests made meanwhile are merged). ``close()`` stops the thread and raises the
    error a background sync met (the kernel reports a write-back error to one sync only, so it must
    not be lost); the caller still ends with its own fsync, which the guarantees rest on.
    """

    #: Bytes written between two background syncs.
    EVERY_BYTES = 64 * 1024 * 1024

    def __init__(self, fd: int, every_bytes: int = EVERY_BYTES):
        self._fd, self._every = fd, every_bytes
        self._pending = 0
        self._error: OSError | None = None
        self._wake = threading.Condition()
        self._requested = self._stopped = False
        self._thread: threading.Thread | None = None

    def wrote(self, count: int) -> None:
        self._pending += count
        if self._pending < self._every:
            return
        self._pending = 0
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="registry-sync", daemon=True)
                self._thread.start()
            self._requested = True
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._requested and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    return
                self._requested = False
            try:
                os.fdatasync(self._fd)
            except OSError as error:
                self._error = self._error or error

    def close(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "write returned no progress")
        view, offset = view[written:], offset + written


def pread_full(fd: int, position: int, length: int) -> bytes:
    """Up to ``length`` bytes of ``fd`` from ``position`` (fewer only at the end of the file), in as few copies as
    the reads allow."""
    parts, remaining = [], length
    while remaining:
        block = os.pread(fd, remaining, position)
        if not block:
            break
        parts.append(block)
        position += len(block)
        remaining -= len(block)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def direct_writes_enabled() -> bool:
    """Whether transfers write with O_DIRECT: on unless $LATENTWIRE_DIRECT_IO is 0, false or off."""
    return os.environ.get("LATENTWIRE_DIRECT_IO", "1").strip().lower() not in ("0", "false", "off", "no")


class DirectAppender:
    """Appends to the file at ``path`` from byte ``offset`` on, with O_DIRECT where the file system takes it.

    ``write(data)`` copies into a page-aligned buffer of ``buffer_bytes``; each full buffer goes to
    the disk in one aligned write. ``flush()`` writes what is left (the unaligned tail through an
    ordinary descriptor), after which the file holds every byte written, as buffered writes would;
    ``close()`` flushes and releases the descriptors. Bytes that do not start at an aligned offset
    (a resumed file of odd length) are written through the ordinary descriptor up to the next
    boundary. Without O_DIRECT (``direct=False``, $LATENTWIRE_DIRECT_IO=0, a refusing file system,
    or a direct write failing with EINVAL) every write goes straight through the ordinary
    descriptor, synced in the background (``BackgroundSync``). One writer at a time: calls from several
    threads are serialised (a ``close`` from another thread waits for a write in progress).
    """

    BUFFER_BYTES = 8 * 1024 * 1024

    def __init__(self, path: str | os.PathLike, offset: int, *, direct: bool | None = None,
                 buffer_bytes: int = BUFFER_BYTES):
        if buffer_bytes <= 0 or buffer_bytes % DIRECT_ALIGN:
            raise ValueError(f"buffer_bytes must be a positive multiple of {DIRECT_ALIGN}")
        self._fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        self._offset = offset  # where the buffer's first byte goes
        self._direct_fd: int | None = None
        self._buffer: mmap.mmap | None = None
        self._filled = 0
        self._sync: BackgroundSync | None = None
        self._lock = threading.Lock()
        if (direct_writes_enabled() if direct is None else direct) and hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                self._direct_fd = None
        if self._direct_fd is not None:
            self._buffer = mmap.mmap(-1, buffer_bytes)  # anonymous maps are page-aligned
            self._view = memoryview(self._buffer)
        else:
            self._sync = BackgroundSync(self._fd)

    @property
    def direct(self) -> bool:
        """Whether writes currently bypass the page cache."""
        return self._direct_fd is not None

    @property
    def position(self) -> int:
        """The file offset after the last byte written (flushed or still buffered)."""
        return self._offset + self._filled

    def write(self, data) -> None:
        with self._lock:
            if self._fd < 0:
                raise ValueError("write to a closed DirectAppender")
            self._write(memoryview(data).cast("B"))

    def _write(self, view: memoryview) -> None:
        if self._direct_fd is not None and self._filled == 0 and self._offset % DIRECT_ALIGN:
            head = min(len(view), DIRECT_ALIGN - self._offset % DIRECT_ALIGN)  # to the next boundary, buffered
            _pwrite_all(self._fd, view[:head], self._offset)
            self._offset += head
            view = view[head:]
        while len(view):
            if self._direct_fd is None:  # buffered from the start, or fell back (the buffer is then empty)
                _pwrite_all(self._fd, view, self._offset)
                self._offset += len(view)
                self._sync.wrote(len(view))
                return
            capacity = len(self._view)
            take = min(len(view), capacity - self._filled)
            self._view[self._filled:self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == capacity:
                self._write_buffer(final=False)

    def _write_buffer(self, *, final: bool) -> None:
        """Write the buffer's aligned part with O_DIRECT (the tail too when ``final``) and keep the rest."""
        aligned = self._filled - self._filled % DIRECT_ALIGN
        if aligned:
            try:
                _pwrite_all(self._direct_fd, self._view[:aligned], self._offset)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                self._fall_back()  # the file system took the open but not the write: write it all buffered
                _pwrite_all(self._fd, self._view[:self._filled], self._offset)
                self._offset += self._filled
                self._sync.wrote(self._filled)
                self._filled = 0
                return
            self._offset += aligned
        rest = self._filled - aligned
        if rest and final:
            _pwrite_all(self._fd, self._view[aligned:self._filled], self._offset)
            self._offset += rest
            rest = 0
        elif rest:
            self._view[:rest] = self._view[aligned:self._filled]
        self._filled = rest

    def _fall_back(self) -> None:
        os.close(self._direct_fd)
        self._direct_fd = None
        self._sync = BackgroundSync(self._fd)

    def flush(self) -> None:
        """Put every byte written into the file (not yet durable: the caller fsyncs)."""
        with self._lock:
            if self._filled:
                self._write_buffer(final=True)

    def close(self) -> None:
        """Flush, stop a background sync (raising the error it met) and release the descriptors."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        try:
            if self._filled and self._fd >= 0:
                self._write_buffer(final=True)
        finally:
            try:
                if self._sync is not None:
                    self._sync.close()
            finally:
                if self._direct_fd is not None:
                    os.close(self._direct_fd)
                    self._direct_fd = None
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
                if self._buffer is not None:
                    self._view.release()
                    self._buffer.close()
                    self._buffer = None

    def __enter__(self) -> DirectAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class UncachedReader:
    """Reads ranges of a file with O_DIRECT, from the disk into a reused page-aligned buffer, not caching them.

    A blob written with O_DIRECT is not in the page cache; reading it through the cache would pay
    the page-per-4-KiB cost ``DirectAppender`` avoided, and leave gigabytes of a blob in the cache
    that the next read of another blob evicts again. ``read(position, length)`` reads the aligned
    range around the bytes asked for and copies them out once (an ordinary ``pread`` copies once
    too). A direct read sees what a cached read would (the kernel writes dirty cached pages back
    first), but it reads the disk even when the bytes are cached: a deliberate trade (object stores
    such as MinIO read large objects this way). Without O_DIRECT (``direct=False``,
    $LATENTWIRE_DIRECT_IO=0, a refusing file system) every read is an ordinary ``pread``. ``fd``
    stays the caller's; ``close()`` releases only what this opened. Not thread-safe: one reader.
    """

    BUFFER_BYTES = 8 * 1024 * 1024

    def __init__(self, path: str | os.PathLike, fd: int, *, direct: bool | None = None):
        self._fd = fd
        self._direct_fd: int | None = None
        self._buffer: mmap.mmap | None = None
        if (direct_writes_enabled() if direct is None else direct) and hasattr(os, "O_DIRECT") and hasattr(os, "preadv"):
            try:
                self._direct_fd = os.open(path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                self._direct_fd = None

    @property
    def direct(self) -> bool:
        return self._direct_fd is not None

    def read(self, position: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``position`` (fewer only at the end of the file)."""
        if length <= 0:
            return b""
        if self._direct_fd is None:
            return self._pread(position, length)
        start = position - position % DIRECT_ALIGN
        stop = position + length
        stop += (-stop) % DIRECT_ALIGN
        if self._buffer is None or len(self._buffer) < stop - start:
            if self._buffer is not None:
                self._buffer.close()
            self._buffer = mmap.mmap(-1, max(self.BUFFER_BYTES, stop - start))
        view = memoryview(self._buffer)
        try:
            got, want = 0, stop - start
            while got < want:
                count = os.preadv(self._direct_fd, [view[got:want]], start + got)
                if count <= 0:
                    break
                got += count
                if count % DIRECT_ALIGN:  # the end of the file
                    break
            skip = position - start
            return bytes(view[skip:min(got, skip + length)]) if got > skip else b""
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            self._drop_direct()  # the file system took the open but not the read
            return self._pread(position, length)
        finally:
            view.release()

    def _pread(self, position: int, length: int) -> bytes:
        return pread_full(self._fd, position, length)

    def _drop_direct(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None

    def close(self) -> None:
        self._drop_direct()
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None

"""Transfers' file writes and reads (latentwire.client.file_io): O_DIRECT appends and uncached reads give back
exactly the bytes written, across resumes at odd offsets, flushes, and the buffered fall-backs.

The registry's uploads and reads and every client download go through these (tests/test_registry*.py run
them through the real service); here each path is driven on its own, on the test's temporary folder.
"""
from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest

from latentwire.client import file_io
from latentwire.client.file_io import DIRECT_ALIGN, DirectAppender, UncachedReader

SIZES = (0, 1, 100, DIRECT_ALIGN - 1, DIRECT_ALIGN, DIRECT_ALIGN + 1, 70_000, 1 << 20, 3 << 20)


def _append_sessions(path, rnd, *, direct):
    """Several appenders one after another (resumes), random chunk sizes and flushes; returns the bytes written."""
    expect = bytearray()
    open(path, "wb").close()
    for _ in range(rnd.randint(1, 4)):
        with DirectAppender(path, len(expect), direct=direct,
                            buffer_bytes=rnd.choice([DIRECT_ALIGN, 2 * DIRECT_ALIGN, 1 << 16, 1 << 20])) as writer:
            for _ in range(rnd.randint(0, 12)):
                data = os.urandom(rnd.choice(SIZES))
                writer.write(data)
                expect += data
                assert writer.position == len(expect)
                if rnd.random() < 0.25:
                    writer.flush()
                    assert os.path.getsize(path) == len(expect)
    return bytes(expect)


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_appends_hold_every_byte_across_resumes_at_odd_offsets(tmp_path, direct):
    rnd = random.Random(7)
    path = tmp_path / "blob.partial"
    for _ in range(6):
        expect = _append_sessions(path, rnd, direct=direct)
        assert path.read_bytes() == expect


def test_direct_appends_bypass_the_buffered_path(tmp_path):
    (tmp_path / "f").touch()
    writer = DirectAppender(tmp_path / "f", 0, direct=True)
    try:
        if not writer.direct:
            pytest.skip("this file system refuses O_DIRECT (the buffered fall-back is tested above)")
        writer.write(os.urandom(3 * DIRECT_ALIGN + 5))
        assert os.path.getsize(tmp_path / "f") == 0  # still in the aligned buffer: nothing went through the cache
    finally:
        writer.close()
    assert os.path.getsize(tmp_path / "f") == 3 * DIRECT_ALIGN + 5


def test_environment_turns_direct_io_off(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTWIRE_DIRECT_IO", "0")
    (tmp_path / "f").touch()
    with DirectAppender(tmp_path / "f", 0) as writer:
        assert not writer.direct
        writer.write(b"abc")
    assert (tmp_path / "f").read_bytes() == b"abc"


def test_a_refused_direct_write_falls_back_without_losing_bytes(tmp_path, monkeypatch):
    """A file system that opens with O_DIRECT but fails the write (EINVAL) gets the bytes buffered, in order."""
    path = tmp_path / "f"
    path.touch()
    writer = DirectAppender(path, 0, direct=True, buffer_bytes=DIRECT_ALIGN)
    if not writer.direct:
        writer.close()
        pytest.skip("this file system refuses O_DIRECT at open")
    direct_fd, real_pwrite = writer._direct_fd, os.pwrite

    def pwrite(fd, data, offset):
        if fd == direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(file_io.os, "pwrite", pwrite)
    data = os.urandom(5 * DIRECT_ALIGN + 123)
    writer.write(data[:DIRECT_ALIGN + 10])
    assert not writer.direct
    writer.write(data[DIRECT_ALIGN + 10:])
    writer.close()
    assert path.read_bytes() == data


def test_a_close_from_another_thread_waits_for_the_write_in_progress(tmp_path):
    """A stream's end closes the writer on another thread than the one writing: every byte whose write returned is
    in the file, and a write after the close raises instead of touching released memory."""
    path = tmp_path / "f"
    path.touch()
    writer = DirectAppender(path, 0, buffer_bytes=2 * DIRECT_ALIGN)
    written = bytearray()

    def keep_writing():
        while True:
            data = os.urandom(10_000)
            try:
                writer.write(data)
            except ValueError:
                return
            written.extend(data)

    thread = threading.Thread(target=keep_writing)
    thread.start()
    time.sleep(0.2)
    writer.close()
    thread.join(10)
    assert not thread.is_alive() and len(written) > 0
    assert path.read_bytes() == bytes(written)


@pytest.mark.parametrize("cache_first", [False, True], ids=["uncached", "cached"])
def test_uncached_reads_return_the_bytes_written(tmp_path, cache_first):
    path = tmp_path / "blob"
    data = os.urandom(5_000_003)
    path.touch()
    with DirectAppender(path, 0) as writer:
        writer.write(data)
    fd = os.open(path, os.O_RDONLY)
    reader = UncachedReader(path, fd)
    try:
        if cache_first:
            assert os.pread(fd, len(data), 0) == data  # every page cached: the reads take the ordinary pread
        rnd = random.Random(3)
        for _ in range(200):
            position = rnd.randrange(0, len(data) + 10)
            length = rnd.choice([0, 1, DIRECT_ALIGN - 1, DIRECT_ALIGN, 5000, 1 << 20, 4 << 20, 9 << 20])
            assert reader.read(position, length) == data[position:position + length], (position, length)
    finally:
        reader.close()
        os.close(fd)


def test_uncached_reads_see_bytes_still_dirty_in_the_cache(tmp_path):
    """A direct read of a range that was just rewritten through the cache returns the new bytes."""
    path = tmp_path / "f"
    path.write_bytes(b"\0" * (4 * DIRECT_ALIGN))
    fd = os.open(path, os.O_RDWR)
    reader = UncachedReader(path, fd)
    try:
        os.pwrite(fd, b"new bytes", DIRECT_ALIGN + 3)
        assert reader.read(DIRECT_ALIGN, 20) == b"\0\0\0new bytes" + b"\0" * 8
    finally:
        reader.close()
        os.close(fd)

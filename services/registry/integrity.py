"""Block checksums of stored blobs: what lets a read verify the bytes it sends without re-hashing the blob.

A blob's sha256 is checked once, when it is written (or when a full read or a scrub hashes it
again). From the same bytes the store records a CRC-32 of every ``BLOCK_BYTES`` block in a small
index file next to the blob store (``blobs/crc32/ab/<sha256>``). A read then checks each block it
sends against that index: a block changed on disk since it matched the sha256 fails its CRC (every
burst of up to 32 flipped bits, and any other change but with probability 2**-32), and the
reader re-hashes the whole blob before it quarantines it, so a damaged index never takes a good
blob out of service. ``zlib.crc32`` runs at about twice sha256's speed and releases the GIL on
large buffers.

Index file layout (little-endian): ``MAGIC`` (8 bytes), the blob's size (8), ``BLOCK_BYTES`` (4),
then one uint32 CRC per block. An index that does not match the blob's size or block size is
ignored (the read hashes the whole blob, as before indexes existed, and writes a new index).

Under ``--read-verification digest`` (``READ_DIGEST``) reads send the bytes as stored and no
block checksums are taken: the blob's sha256 was checked when it was written, the scrub checks
it again at rest, and every client checks the sha256 of what it received. The index then holds
only its header with a block size of 0 (``write_marker``): it records, by its mtime, when the
blob last matched its sha256 (what the scrub goes by), and ``read_index`` ignores it, so a
registry switched back to ``blocks`` hashes such a blob whole on its first read and records its
checksums then.
"""
from __future__ import annotations

import contextlib
import os
import struct
import zlib
from array import array
from pathlib import Path

#: Bytes per checksummed block (ReadBlob's default chunk: a 1 MiB read checks exactly one block).
BLOCK_BYTES = 1024 * 1024
MAGIC = b"LWCRC32\n"
_HEADER = struct.Struct("<8sQI")

#: ``--read-verification`` values. blocks: each block a read sends is checked against its CRC-32 (a block
#: changed at rest is never sent); digest: reads send the bytes as stored, trusting the sha256 checked
#: when they were written and re-checked by the scrub (the client's own sha256 catches what changed since).
READ_BLOCKS = "blocks"
READ_DIGEST = "digest"
READ_VERIFICATIONS = (READ_BLOCKS, READ_DIGEST)


class BlockSums:
    """CRC-32 of consecutive ``BLOCK_BYTES`` blocks of a byte stream fed in pieces of any size."""

    def __init__(self) -> None:
        self.sums = array("I")
        self._crc = 0
        self._filled = 0  # bytes of the current, unfinished block

    def copy(self) -> BlockSums:
        other = BlockSums()
        other.sums = array("I", self.sums)
        other._crc, other._filled = self._crc, self._filled
        return other

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(BLOCK_BYTES - self._filled, len(view))
            self._crc = zlib.crc32(view[:take], self._crc)
            self._filled += take
            view = view[take:]
            if self._filled == BLOCK_BYTES:
                self.sums.append(self._crc)
                self._crc, self._filled = 0, 0

    def finish(self) -> array:
        """The block sums of everything fed (the last, short block included)."""
        if self._filled:
            self.sums.append(self._crc)
            self._crc, self._filled = 0, 0
        return self.sums


def block_count(size: int) -> int:
    return (size + BLOCK_BYTES - 1) // BLOCK_BYTES


def write_index(path: Path, size: int, sums: array) -> None:
    """Write an index atomically (a temporary file renamed over it). No fsync: a lost or torn index only
    makes the next read hash the whole blob again."""
    if len(sums) != block_count(size):
        raise ValueError(f"{len(sums)} block sums for {size} bytes")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = array("I", sums)
    if payload.itemsize != 4:  # pragma: no cover - every platform CPython runs on has a 4-byte "I"
        raise RuntimeError("array('I') is not 32-bit here")
    if struct.pack("=I", 1) != struct.pack("<I", 1):  # pragma: no cover - big-endian hosts
        payload.byteswap()
    with open(temporary, "wb") as file:
        file.write(_HEADER.pack(MAGIC, size, BLOCK_BYTES))
        file.write(payload.tobytes())
    os.replace(temporary, path)


def write_marker(path: Path, size: int) -> None:
    """Record that a blob of ``size`` bytes matched its sha256 just now, without block checksums
    (``READ_DIGEST``): an index holding only its header, block size 0 (``read_index`` ignores it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as file:
        file.write(_HEADER.pack(MAGIC, size, 0))
    os.replace(temporary, path)


def read_index(path: Path, size: int) -> array | None:
    """The block sums recorded for a blob of ``size`` bytes; None when missing or not for this blob."""
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if len(raw) != _HEADER.size + 4 * block_count(size):
        return None
    magic, recorded, block = _HEADER.unpack_from(raw)
    if magic != MAGIC or recorded != size or block != BLOCK_BYTES:
        return None
    sums = array("I")
    sums.frombytes(raw[_HEADER.size:])
    if struct.pack("=I", 1) != struct.pack("<I", 1):  # pragma: no cover - big-endian hosts
        sums.byteswap()
    return sums


def remove_index(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

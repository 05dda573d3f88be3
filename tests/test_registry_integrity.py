"""Blob integrity without re-hashing every read: block checksums, the verified read path, the scrub, the wire codec.

In process (no gRPC server), on a temporary data folder: what a ReadBlob hands out is checked
block by block against checksums taken from bytes that matched the sha256; a damaged block is
never handed out and takes the blob out of service; a damaged index never does; blobs nobody
reads are found by the scrub. The end-to-end case through the real service (a corrupt blob is
DATA_LOSS and a re-import repairs it) is tests/test_registry.py.
"""
from __future__ import annotations

import hashlib
import os
import time
import zlib

import grpc
import pytest

from latentwire.client.registry import _parse_read_blob_response
from latentwire.registry.v1 import registry_pb2
from services.registry.blobs import BlobReader, StoredReader, VerifiedReader
from services.registry.integrity import BLOCK_BYTES, READ_DIGEST, BlockSums, read_index, write_index
from services.registry.store import RegistryStore
from services.registry.wire import WriteBlobChunk, WriteBlobDecoder, encode_read_blob_response
from services.runtime.errors import LatentwireError

MIB = 1024 * 1024


@pytest.fixture()
def store(tmp_path):
    opened = RegistryStore(tmp_path / "data", max_blob_bytes=64 * MIB)
    yield opened
    opened.close()


def put_blob(store: RegistryStore, data: bytes, chunk: int = 3 * MIB // 2) -> str:
    """Upload ``data`` in chunks that do not line up with the checksum blocks; return its sha256."""
    digest = hashlib.sha256(data).hexdigest()
    upload = store.begin_upload(digest, len(data), 0)
    try:
        for offset in range(0, len(data), chunk):
            piece = data[offset:offset + chunk]
            upload.write(digest, len(data), offset, piece, offset + len(piece) == len(data))
    finally:
        upload.close()
    return digest


def read_all(reader) -> bytes:
    parts = []
    try:
        while (chunk := reader.next()) is not None:
            parts.append(bytes(chunk.data))
    finally:
        reader.close()
    return b"".join(parts)


def damage(store: RegistryStore, digest: str, position: int) -> None:
    path = store.blobs.path(digest)
    os.chmod(path, 0o644)
    with open(path, "r+b") as file:
        file.seek(position)
        original = file.read(1)
        file.seek(position)
        file.write(bytes([original[0] ^ 0xFF]))


def block_sums(data: bytes) -> list[int]:
    sums = BlockSums()
    sums.update(data)
    return list(sums.finish())


def test_block_sums_do_not_depend_on_how_the_bytes_arrive():
    data = os.urandom(2 * BLOCK_BYTES + 12345)
    pieces = BlockSums()
    for start in range(0, len(data), 70_001):
        pieces.update(data[start:start + 70_001])
    expected = [zlib.crc32(data[i:i + BLOCK_BYTES]) for i in range(0, len(data), BLOCK_BYTES)]
    assert list(pieces.finish()) == expected == block_sums(data) and len(expected) == 3
    assert block_sums(b"") == []


def test_an_index_for_another_size_is_ignored(tmp_path):
    path = tmp_path / "index"
    write_index(path, 10, block_sums(b"0123456789"))
    assert list(read_index(path, 10)) == block_sums(b"0123456789")
    assert read_index(path, 11) is None and read_index(tmp_path / "missing", 10) is None
    path.write_bytes(path.read_bytes()[:-1])  # torn
    assert read_index(path, 10) is None


def assert_reads_ranges(store, digest: str, data: bytes, reader_class) -> None:
    """The whole blob, ranges and chunk sizes that do not line up with the blocks, and an empty range at the end,
    read by a ``reader_class``."""
    reader = store.open_blob(digest, 0, 0, MIB)
    assert isinstance(reader, reader_class)
    assert read_all(reader) == data
    for offset, limit, chunk in ((5, 0, 70_000), (BLOCK_BYTES - 3, 10, 4096), (100, 2 * BLOCK_BYTES, 4 * MIB)):
        end = len(data) if limit == 0 else offset + limit
        assert read_all(store.open_blob(digest, offset, limit, chunk)) == data[offset:end]
    reader = store.open_blob(digest, len(data), 0, 4096)
    assert reader.next().data == b"" and reader.next() is None
    reader.close()


def test_an_upload_records_block_sums_and_reads_use_them(store):
    data = os.urandom(3 * BLOCK_BYTES + 777)
    digest = put_blob(store, data)
    assert list(read_index(store.blobs.index_path(digest), len(data))) == block_sums(data)
    assert_reads_ranges(store, digest, data, VerifiedReader)


def test_a_resumed_upload_records_the_same_block_sums(tmp_path):
    data = os.urandom(2 * BLOCK_BYTES + 5)
    digest = hashlib.sha256(data).hexdigest()
    for forget in (False, True):  # with the saved hash state, and after a restart (prefix hashed again)
        store = RegistryStore(tmp_path / f"data-{forget}", max_blob_bytes=64 * MIB)
        cut = BLOCK_BYTES + 1000
        upload = store.begin_upload(digest, len(data), 0)
        upload.write(digest, len(data), 0, data[:cut], False)
        upload.close()
        if forget:
            store.blobs.recall_hash(digest, -1)
        upload = store.begin_upload(digest, len(data), cut)
        upload.write(digest, len(data), cut, memoryview(data)[cut:], True)
        upload.close()
        assert list(read_index(store.blobs.index_path(digest), len(data))) == block_sums(data)
        assert read_all(store.open_blob(digest, 0, 0, MIB)) == data
        store.close()


def test_a_damaged_block_is_never_handed_out_and_the_blob_is_quarantined(store):
    data = os.urandom(3 * BLOCK_BYTES)
    digest = put_blob(store, data)
    damage(store, digest, 2 * BLOCK_BYTES + 10)
    reader = store.open_blob(digest, 0, 0, MIB)
    sent = []
    with pytest.raises(LatentwireError) as raised:
        while (chunk := reader.next()) is not None:
            sent.append(bytes(chunk.data))
    reader.close()
    assert raised.value.code == grpc.StatusCode.DATA_LOSS and raised.value.reason == "BLOB_CORRUPT"
    assert b"".join(sent) == data[:2 * BLOCK_BYTES]  # the intact blocks before it, nothing of the damaged one
    assert store.query_blob(digest) == (0, False)  # out of service: a re-upload stores it again
    assert not store.blobs.index_path(digest).exists() and list(store.blobs.corrupt.iterdir())
    assert put_blob(store, data) == digest and read_all(store.open_blob(digest, 0, 0, MIB)) == data


def test_a_range_checks_the_blocks_it_touches(store):
    data = os.urandom(3 * BLOCK_BYTES)
    digest = put_blob(store, data)
    damage(store, digest, BLOCK_BYTES + 5)
    # The first block is intact and checked: it is served. The scrub finds the rest (below).
    assert read_all(store.open_blob(digest, 0, 1000, 4096)) == data[:1000]
    error = None
    try:
        read_all(store.open_blob(digest, BLOCK_BYTES - 10, 20, 4096))  # straddles into the damaged block
    except LatentwireError as raised:
        error = raised
    assert error is not None and error.reason == "BLOB_CORRUPT"


def test_a_damaged_index_does_not_take_a_good_blob_out_of_service(store):
    data = os.urandom(2 * BLOCK_BYTES + 1)
    digest = put_blob(store, data)
    wrong = block_sums(data)
    wrong[1] ^= 1
    write_index(store.blobs.index_path(digest), len(data), wrong)
    assert read_all(store.open_blob(digest, 0, 0, MIB)) == data  # re-hashed whole, matched, index rewritten
    assert list(read_index(store.blobs.index_path(digest), len(data))) == block_sums(data)
    assert store.query_blob(digest) == (len(data), True)


def test_a_blob_without_an_index_is_hashed_whole_and_gets_one(store):
    data = os.urandom(BLOCK_BYTES + 99)
    digest = put_blob(store, data)
    store.blobs.index_path(digest).unlink()  # a blob stored before indexes existed
    reader = store.open_blob(digest, 0, 0, 65536)
    assert isinstance(reader, BlobReader)
    assert read_all(reader) == data
    assert list(read_index(store.blobs.index_path(digest), len(data))) == block_sums(data)
    assert isinstance(store.open_blob(digest, 0, 0, 65536), VerifiedReader)


def test_the_scrub_rehashes_blobs_not_verified_recently_and_quarantines_corrupt_ones(store):
    good, bad = os.urandom(BLOCK_BYTES + 5), os.urandom(3000)
    good_digest, bad_digest = put_blob(store, good), put_blob(store, bad)
    damage(store, bad_digest, 1500)
    assert store.blobs.scrub(time.time() - 3600) == (0, 0)  # both verified just now (on upload)
    index = store.blobs.index_path(good_digest)
    os.utime(index, (1, 1))
    store.blobs.index_path(bad_digest).unlink()  # never verified
    assert store.blobs.scrub(time.time() - 3600, max_bytes=1) == (1, 1)  # one blob per round: the oldest first
    assert store.query_blob(bad_digest) == (0, False)
    assert store.blobs.scrub(time.time() - 3600) == (1, 0)
    assert index.stat().st_mtime > time.time() - 60  # verified again now
    assert store.query_blob(good_digest) == (len(good), True)


@pytest.fixture()
def digest_store(tmp_path):
    """A store under --read-verification digest: no block checksums, reads send the bytes as stored."""
    opened = RegistryStore(tmp_path / "digest-data", max_blob_bytes=64 * MIB, read_verification=READ_DIGEST)
    yield opened
    opened.close()


def test_digest_mode_takes_no_block_sums_and_reads_the_bytes_as_stored(digest_store):
    data = os.urandom(3 * BLOCK_BYTES + 777)
    digest = put_blob(digest_store, data)
    index = digest_store.blobs.index_path(digest)
    assert index.exists() and read_index(index, len(data)) is None  # a marker: verified now, no block sums
    assert_reads_ranges(digest_store, digest, data, StoredReader)
    assert digest_store.blobs.scrub(time.time() - 3600) == (0, 0)  # the marker says: verified on upload


def test_digest_mode_uploads_still_check_the_sha256_and_resume(tmp_path):
    data = os.urandom(2 * BLOCK_BYTES + 5)
    digest = hashlib.sha256(data).hexdigest()
    for forget in (False, True):  # with the saved hash state, and after a restart (prefix hashed again)
        store = RegistryStore(tmp_path / f"data-{forget}", max_blob_bytes=64 * MIB, read_verification=READ_DIGEST)
        cut = BLOCK_BYTES + 1000
        upload = store.begin_upload(digest, len(data), 0)
        upload.write(digest, len(data), 0, data[:cut], False)
        upload.close()
        if forget:
            store.blobs.recall_hash(digest, -1)
        upload = store.begin_upload(digest, len(data), cut)
        upload.write(digest, len(data), cut, memoryview(data)[cut:], True)
        upload.close()
        assert read_all(store.open_blob(digest, 0, 0, MIB)) == data
        store.close()
    store = RegistryStore(tmp_path / "data-bad", max_blob_bytes=64 * MIB, read_verification=READ_DIGEST)
    upload = store.begin_upload(digest, len(data), 0)
    damaged = bytearray(data)
    damaged[BLOCK_BYTES] ^= 1
    with pytest.raises(LatentwireError) as raised:
        upload.write(digest, len(data), 0, bytes(damaged), True)
    upload.close()
    assert raised.value.code == grpc.StatusCode.DATA_LOSS and raised.value.reason == "BLOB_DIGEST_MISMATCH"
    assert store.query_blob(digest) == (0, False)
    store.close()


def test_digest_mode_leaves_damage_at_rest_to_the_scrub_and_the_client(digest_store):
    data = os.urandom(2 * BLOCK_BYTES)
    digest = put_blob(digest_store, data)
    damage(digest_store, digest, BLOCK_BYTES + 10)
    served = read_all(digest_store.open_blob(digest, 0, 0, MIB))
    assert served != data and len(served) == len(data)  # the trade-off: sent as stored...
    assert hashlib.sha256(served).hexdigest() != digest  # ...so the client's sha256 check refuses it
    os.utime(digest_store.blobs.index_path(digest), (1, 1))  # last verified long ago: the scrub is due
    assert digest_store.blobs.scrub(time.time() - 3600) == (1, 1)
    assert digest_store.query_blob(digest) == (0, False)  # out of service: a re-upload stores it again
    assert put_blob(digest_store, data) == digest and read_all(digest_store.open_blob(digest, 0, 0, MIB)) == data
    # A file cut short is caught by the reader itself.
    path = digest_store.blobs.path(digest)
    os.chmod(path, 0o644)
    os.truncate(path, BLOCK_BYTES)
    reader = StoredReader(digest_store.blobs, digest, os.open(path, os.O_RDONLY), len(data), 0, 0, MIB)
    assert reader.next().data == data[:BLOCK_BYTES]
    with pytest.raises(LatentwireError) as raised:
        reader.next()
    reader.close()
    assert raised.value.reason == "BLOB_CORRUPT" and digest_store.query_blob(digest) == (0, False)


def test_a_blob_stored_in_digest_mode_is_hashed_whole_on_its_first_checked_read(tmp_path):
    data = os.urandom(BLOCK_BYTES + 99)
    store = RegistryStore(tmp_path / "data", max_blob_bytes=64 * MIB, read_verification=READ_DIGEST)
    digest = put_blob(store, data)
    store.close()
    store = RegistryStore(tmp_path / "data", max_blob_bytes=64 * MIB)  # switched back to blocks
    reader = store.open_blob(digest, 0, 0, 65536)
    assert isinstance(reader, BlobReader)
    assert read_all(reader) == data
    assert list(read_index(store.blobs.index_path(digest), len(data))) == block_sums(data)
    assert isinstance(store.open_blob(digest, 0, 0, 65536), VerifiedReader)
    store.close()


def test_gc_removes_a_blobs_index_with_it(store):
    digest = put_blob(store, os.urandom(1000))
    assert store.blobs.index_path(digest).exists()
    assert store.blobs.remove_blob(digest, time.time() + 10, dry_run=False) == 1000
    assert not store.blobs.index_path(digest).exists()


@pytest.mark.parametrize("offset,data,size", [(0, b"", 0), (0, b"abc", 3), (5, b"x" * 300, 1 << 40),
                                              ((1 << 40) + 1, os.urandom(MIB), (1 << 41))])
def test_read_blob_responses_encode_as_protobuf_does(offset, data, size):
    encoded = encode_read_blob_response(offset, data, size)
    assert encoded == registry_pb2.ReadBlobResponse(offset=offset, data=data, size_bytes=size).SerializeToString()
    parsed = _parse_read_blob_response(encoded)
    assert (parsed.offset, bytes(parsed.data), parsed.size_bytes) == (offset, data, size)


def test_write_blob_requests_decode_as_protobuf_does():
    request = registry_pb2.WriteBlobRequest(sha256="ab" * 32, size_bytes=1 << 33, offset=12, data=b"\x00" * 5000,
                                            finish_write=True)
    chunk = WriteBlobDecoder.FromString(request.SerializeToString())
    assert isinstance(chunk, WriteBlobChunk)
    assert (chunk.sha256, chunk.size_bytes, chunk.offset, bytes(chunk.data), chunk.finish_write) == (
        request.sha256, request.size_bytes, request.offset, request.data, True)
    empty = WriteBlobDecoder.FromString(b"")
    assert (empty.sha256, empty.size_bytes, empty.offset, bytes(empty.data), empty.finish_write) == ("", 0, 0, b"", False)
    # Anything else goes through protobuf: unknown fields are parsed by it, malformed bytes refused by it.
    unknown = request.SerializeToString() + b"\x30\x01"
    assert WriteBlobDecoder.FromString(unknown) == registry_pb2.WriteBlobRequest.FromString(unknown)
    long_name = registry_pb2.WriteBlobRequest(sha256="a" * 100).SerializeToString()
    assert isinstance(WriteBlobDecoder.FromString(long_name), registry_pb2.WriteBlobRequest)
    with pytest.raises(Exception, match="WriteBlobRequest"):
        WriteBlobDecoder.FromString(b"\x22\x10abc")  # data claims 16 bytes, 3 follow

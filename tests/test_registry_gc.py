"""Registry uploads (issue 11, finding 6, and the renamed-pickle case of finding 8): leases that expire,
garbage collection of abandoned uploads and unlisted blobs, declared sizes bounded by a quota and the
free disk, and safetensors headers checked at CreateModelVersion.

The store's rules run in process on a temporary folder; the lease, the collection on restart, the
periodic one and `latentwire models gc` run against real registry processes on port 0.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile

import grpc
import pytest
from test_registry import REGISTRY_MODULE, controlnet_folder, rpc_error, safetensors_bytes, stop_registry

from latentwire.client.registry import RegistryClient, RegistryError, safetensors_problem
from latentwire.registry.v1 import registry_pb2
from services.registry.metadata import FileEntry
from services.registry.store import RegistryStore
from services.registry.validation import MIN_WIRE_CHUNK_BYTES
from services.runtime.errors import LatentwireError, ModelFolderError
from services.runtime.models import check_model_folder
from services.suite.launcher import start_service, wait_serving

CONTROLNET = "MODEL_KIND_CONTROLNET"
CONFIG = json.dumps({"_class_name": "ControlNetModel"}).encode()
GIB = 1024**3
#: An hour ago: older than any lease or grace these tests use, set on files instead of waiting.
LONG_AGO = time.time() - 3600


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def refused(fn, *args, **kwargs) -> LatentwireError:
    with pytest.raises(LatentwireError) as raised:
        fn(*args, **kwargs)
    return raised.value


def put_blob(store: RegistryStore, data: bytes) -> str:
    upload = store.begin_upload(sha(data), len(data), 0)
    try:
        if not upload.complete:
            upload.write(sha(data), len(data), 0, data, True)
    finally:
        upload.close()
    return sha(data)


def partial_upload(store: RegistryStore, data: bytes, sent: int) -> None:
    """An upload of ``data`` that stopped after ``sent`` bytes (its .partial stays)."""
    upload = store.begin_upload(sha(data), len(data), 0)
    upload.write(sha(data), len(data), 0, data[:sent], False)
    upload.close()


def age(*paths) -> None:
    for path in paths:
        os.utime(path, (LONG_AGO, LONG_AGO))


def version_files(store: RegistryStore, weights_path: str, weights: bytes) -> list[FileEntry]:
    put_blob(store, CONFIG)
    put_blob(store, weights)
    return [FileEntry("config.json", len(CONFIG), sha(CONFIG), ""),
            FileEntry(weights_path, len(weights), sha(weights), "")]


@pytest.fixture()
def store(tmp_path):
    opened = RegistryStore(tmp_path / "data", max_blob_bytes=2**50, upload_lease_s=60, gc_grace_s=600)
    yield opened
    opened.close()


# ----------------------------------------------------------------------------------------------
# Declared sizes (in process)


def test_declared_sizes_beyond_the_quota_or_the_free_disk_are_refused_before_any_byte(tmp_path):
    quota = RegistryStore(tmp_path / "quota", max_blob_bytes=64 * GIB, quota_bytes=GIB)
    try:
        put_blob(quota, b"x" * 1000)
        for size, reason in ((64 * GIB, "QUOTA_EXCEEDED"), (64 * GIB + 1, "BLOB_TOO_LARGE")):
            error = refused(quota.begin_upload, "a" * 64, size, 0)
            assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
            assert str(size) in error.message  # the numbers, to act on
        assert "1000 bytes" in refused(quota.begin_upload, "a" * 64, 64 * GIB, 0).message  # what is used
        assert not list(quota.blobs.uploads.iterdir())  # nothing was written
    finally:
        quota.close()

    disk = RegistryStore(tmp_path / "disk", max_blob_bytes=2**60, min_free_bytes=0)
    try:
        free = shutil.disk_usage(tmp_path).free
        error = refused(disk.begin_upload, "b" * 64, free + GIB, 0)
        assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "DISK_FULL")
        assert not list(disk.blobs.uploads.iterdir())
        # Uploads in progress reserve what they still have to write: two that fit one at a time do not fit together.
        first = disk.begin_upload("c" * 64, free * 6 // 10, 0)
        try:
            assert refused(disk.begin_upload, "d" * 64, free * 6 // 10, 0).reason == "DISK_FULL"
        finally:
            first.close()
        disk.begin_upload("d" * 64, free * 6 // 10, 0).close()  # the first stopped: its reservation went
    finally:
        disk.close()


# ----------------------------------------------------------------------------------------------
# Safetensors headers


def fake_safetensors() -> dict[str, bytes]:
    """Files named .safetensors that are not safetensors, by what is wrong with them."""
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:  # what torch.save writes
        archive.writestr("archive/data.pkl", pickle.dumps({"weight": [1.0, 2.0]}))
    good = safetensors_bytes(b"\x01" * 64)
    length = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + length])
    header["weights"]["data_offsets"] = [0, 65]
    overrun = json.dumps(header).encode()
    return {
        "pickle": pickle.dumps({"weight": [1.0, 2.0]}) + b"\x00" * 64,
        "zip": zipped.getvalue(),
        "huge header length": (2**40).to_bytes(8, "little") + b"{}",
        "not json": (8).to_bytes(8, "little") + b"not json" + b"\x00" * 8,
        "offsets overrun": len(overrun).to_bytes(8, "little") + overrun + b"\x01" * 64,
        "short": b"\x01\x02",
    }


def test_files_named_safetensors_that_are_not_are_refused_at_create_version(store):
    for what, data in fake_safetensors().items():
        files = version_files(store, "diffusion_pytorch_model.safetensors", data)
        error = refused(store.create_version, "fake", CONTROLNET, "test", files, {}, "", [])
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SAFETENSORS"), what
        assert "diffusion_pytorch_model.safetensors" in error.message and "/" not in error.message, what
    assert refused(store.get_model, "fake").reason == "MODEL_NOT_FOUND"  # nothing was recorded
    files = version_files(store, "diffusion_pytorch_model.safetensors", safetensors_bytes(b"\x01" * 64))
    assert store.create_version("fake", CONTROLNET, "test", files, {}, "", []).version == 1


def test_the_header_check_reads_only_the_header(tmp_path):
    data = safetensors_bytes(os.urandom(1 << 20))
    reads = []

    def read(offset: int, length: int) -> bytes:
        reads.append(length)
        return data[offset:offset + length]

    assert safetensors_problem(read, len(data)) is None
    assert sum(reads) < 200  # 8 bytes of length, then the JSON header; never the megabyte of tensor data


def test_a_stage_answers_model_folder_invalid_for_a_renamed_pickle(tmp_path):
    folder = controlnet_folder(tmp_path / "cn", b"unused")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(fake_safetensors()["pickle"])
    with pytest.raises(ModelFolderError) as raised:
        check_model_folder(folder, allow_pickle=False)
    error = raised.value.for_model("cn")
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_FOLDER_INVALID")
    assert "not a safetensors file" in error.message and str(tmp_path) not in error.message


# ----------------------------------------------------------------------------------------------
# Garbage collection (in process)


def test_collection_takes_abandoned_uploads_and_unlisted_blobs_only(store):
    abandoned, recent, live = os.urandom(40_000), os.urandom(40_000), os.urandom(40_000)
    partial_upload(store, abandoned, 20_000)
    partial_upload(store, recent, 20_000)
    writing = store.begin_upload(sha(live), len(live), 0)
    writing.write(sha(live), len(live), 0, live[:20_000], False)
    unlisted, fresh, queried = put_blob(store, b"unlisted" * 100), put_blob(store, b"fresh"), put_blob(store, b"q")
    listed = version_files(store, "diffusion_pytorch_model.safetensors", safetensors_bytes(b"\x01" * 64))
    store.create_version("kept", CONTROLNET, "test", listed, {}, "", [])
    age(store.blobs.partial_path(sha(abandoned)), store.blobs.partial_path(sha(live)),
        *(store.blobs.path(d) for d in (unlisted, queried, *(f.sha256 for f in listed))))
    assert store.query_blob(queried) == (1, True)  # a client that finds a blob stored spares it for the grace

    dry = store.collect_garbage(dry_run=True)
    assert (dry.partial_uploads, dry.partial_upload_bytes, dry.blobs, dry.blob_bytes) == (1, 20_000, 1, 800)
    assert store.blobs.partial_path(sha(abandoned)).exists() and store.blobs.stored_size(unlisted) == 800

    done = store.collect_garbage()
    assert (done.partial_uploads, done.blobs, done.blob_bytes) == (1, 1, 800)
    assert store.query_blob(sha(abandoned)) == (0, False) and store.query_blob(unlisted) == (0, False)
    assert store.query_blob(sha(recent)) == (20_000, False)  # written within the lease
    assert store.query_blob(fresh) == (5, True) and store.query_blob(queried) == (1, True)
    assert all(store.query_blob(f.sha256)[1] for f in listed)  # a version lists them, however old
    writing.write(sha(live), len(live), 20_000, live[20_000:], True)  # the live writer was never disturbed
    writing.close()
    assert store.query_blob(sha(live)) == (len(live), True)
    assert store.collect_garbage().partial_uploads == 0


# ----------------------------------------------------------------------------------------------
# Real registries


def start_registry(data_dir, log_dir, *flags: str):
    service = start_service("registry", REGISTRY_MODULE, ["--port", "0", "--data-dir", str(data_dir), *flags],
                            log_dir=log_dir, timeout=60)
    wait_serving(service.address, 60, "registry")
    service.data_dir = data_dir
    return service


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """One registry for the module: a 1 s upload lease, no grace beyond it, no periodic collection, a 1 GiB quota."""
    service = start_registry(tmp_path_factory.mktemp("gc-data"), tmp_path_factory.mktemp("gc-logs"),
                             "--upload-lease-seconds", "1", "--gc-grace-seconds", "0", "--gc-interval-seconds", "0",
                             "--quota-bytes", str(GIB))
    yield service
    assert stop_registry(service) == 0


@pytest.fixture()
def client(registry):
    with RegistryClient(registry.address, timeout=30) as c:
        yield c


def chunk_requests(data: bytes, start: int = 0, *, finish: bool = True):
    step = MIN_WIRE_CHUNK_BYTES
    return [registry_pb2.WriteBlobRequest(sha256=sha(data), size_bytes=len(data), offset=o, data=data[o:o + step],
                                          finish_write=finish and o + step >= len(data))
            for o in range(start, len(data), step)]


def stalled_writer(client, data: bytes, release: threading.Event):
    """A WriteBlob that sends its first chunk, then nothing until ``release``; returns the call's future."""

    def requests():
        yield chunk_requests(data, finish=False)[0]
        release.wait(60)

    call = client._stub.WriteBlob.future(requests())
    deadline = time.monotonic() + 10
    while client.query_blob(sha(data)).committed_size < MIN_WIRE_CHUNK_BYTES:  # it holds the blob now
        assert time.monotonic() < deadline, "the first chunk never arrived"
        time.sleep(0.02)
    return call


def lease_expired(call) -> RegistryError:
    error = RegistryError.from_rpc(call.exception(timeout=10))
    assert (error.code, error.reason) == (grpc.StatusCode.ABORTED, "UPLOAD_LEASE_EXPIRED")
    assert "QueryBlob" in error.message
    return error


def test_a_stalled_upload_loses_its_lease_and_another_writer_takes_the_blob(client):
    data = os.urandom(4 * MIN_WIRE_CHUNK_BYTES + 5)
    release = threading.Event()
    try:
        stalled = stalled_writer(client, data, release)
        # Without a lease this second writer waited for the lock for ever (here: until its deadline).
        response = client._stub.WriteBlob(iter(chunk_requests(data)), timeout=15)
        assert response.complete and response.committed_size == len(data)
        lease_expired(stalled)
    finally:
        release.set()
    assert client.query_blob(sha(data)).complete


def test_an_upload_resumes_after_its_lease_expired(client, tmp_path):
    source = tmp_path / "blob"
    source.write_bytes(data := os.urandom(3 * MIN_WIRE_CHUNK_BYTES))
    release = threading.Event()
    try:
        lease_expired(stalled_writer(client, data, release))
    finally:
        release.set()
    assert client.query_blob(sha(data)).committed_size == MIN_WIRE_CHUNK_BYTES  # its bytes stayed
    assert client.upload_blob(source, sha(data), len(data)) == (True, len(data) - MIN_WIRE_CHUNK_BYTES)


def test_declared_sizes_are_bounded_over_grpc(client, registry):
    for size, reason in ((64 * GIB, "QUOTA_EXCEEDED"), (65 * GIB, "BLOB_TOO_LARGE")):
        request = registry_pb2.WriteBlobRequest(sha256="e" * 64, size_bytes=size, data=b"x" * MIN_WIRE_CHUNK_BYTES)
        with pytest.raises(grpc.RpcError) as raised:
            client._stub.WriteBlob(iter([request]))
        error = RegistryError.from_rpc(raised.value)
        assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
        assert str(size) in error.message
    assert not (registry.data_dir / "uploads" / f"{'e' * 64}.partial").exists()
    data = os.urandom(MIN_WIRE_CHUNK_BYTES)  # bytes past the declared size are refused as well
    too_long = registry_pb2.WriteBlobRequest(sha256=sha(data), size_bytes=len(data) - 1, data=data, finish_write=True)
    with pytest.raises(grpc.RpcError) as raised:
        client._stub.WriteBlob(iter([too_long]))
    assert RegistryError.from_rpc(raised.value).reason == "BLOB_TOO_LONG"


def test_a_renamed_pickle_is_refused_over_grpc(client, tmp_path):
    folder = controlnet_folder(tmp_path / "cn", b"unused")
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(fake_safetensors()["pickle"])
    with pytest.raises(Exception, match="not a safetensors file"):  # the client's own check, before any upload
        client.import_folder(folder, "renamed-pickle")
    files = []
    for path in (folder / "config.json", weights):
        data = path.read_bytes()
        client.upload_blob(path, sha(data), len(data))
        files.append(registry_pb2.ModelFile(path=path.name, size_bytes=len(data), sha256=sha(data)))
    request = registry_pb2.CreateModelVersionRequest(name="renamed-pickle", kind=registry_pb2.MODEL_KIND_CONTROLNET,
                                                     files=files)
    error = rpc_error(client._call, client._stub.CreateModelVersion, request)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SAFETENSORS")
    assert rpc_error(client.get_model, "renamed-pickle").code == grpc.StatusCode.NOT_FOUND


def test_models_gc_removes_abandoned_uploads_and_unlisted_blobs(client, registry, tmp_path):
    abandoned = os.urandom(3 * MIN_WIRE_CHUNK_BYTES)
    assert not client._stub.WriteBlob(iter(chunk_requests(abandoned, finish=False)[:2])).complete  # stops midway
    unlisted = tmp_path / "unlisted"
    unlisted.write_bytes(os.urandom(5000))
    client.upload_blob(unlisted, sha(unlisted.read_bytes()), 5000)
    version = client.import_folder(controlnet_folder(tmp_path / "cn", os.urandom(3000)), "gc-kept").model_version
    partial = registry.data_dir / "uploads" / f"{sha(abandoned)}.partial"
    blobs = registry.data_dir / "blobs" / "sha256"
    age(partial, *(p for p in blobs.rglob("*") if p.is_file()))

    def gc(*flags: str) -> tuple[int, int, str]:
        completed = subprocess.run([sys.executable, "-m", "latentwire.cli.main", "models", "gc", *flags,
                                    "--registry", registry.address], capture_output=True, text=True, timeout=60)
        assert completed.returncode == 0, completed.stderr
        found = re.search(r"(\d+) abandoned upload\(s\) \(.*\) and (\d+) blob\(s\) no version lists", completed.stdout)
        assert found, completed.stdout
        return int(found[1]), int(found[2]), completed.stdout

    uploads, blobs_removed, shown = gc("--dry-run")
    assert uploads >= 1 and blobs_removed >= 1 and shown.startswith("would remove")
    unlisted_blob = blobs / sha(unlisted.read_bytes())[:2] / sha(unlisted.read_bytes())
    assert partial.exists() and unlisted_blob.exists()  # (not QueryBlob: a blob found stored is spared)
    removed = gc()  # at least what the dry run named (other tests' uploads may have aged past the lease since)
    assert removed[0] >= uploads and removed[1] >= blobs_removed and removed[2].startswith("removed")
    assert not partial.exists() and client.query_blob(sha(abandoned)).committed_size == 0
    assert not client.query_blob(sha(unlisted.read_bytes())).complete
    assert all(client.query_blob(f.sha256).complete for f in version.files)  # listed by gc-kept@1
    assert client.download_files("gc-kept@1", tmp_path / "out").blobs_downloaded == 2


def test_uploads_left_by_a_killed_registry_are_collected_on_restart_and_periodically(tmp_path):
    data_dir, flags = tmp_path / "data", ("--upload-lease-seconds", "1", "--gc-interval-seconds", "0.5")
    service = start_registry(data_dir, tmp_path / "logs", *flags)
    with RegistryClient(service.address, timeout=30) as client:
        for _ in range(3):
            data = os.urandom(2 * MIN_WIRE_CHUNK_BYTES)
            assert not client._stub.WriteBlob(iter(chunk_requests(data, finish=False)[:1])).complete
    service.process.send_signal(signal.SIGKILL)
    service.process.wait(30)
    partials = list((data_dir / "uploads").glob("*.partial"))
    assert len(partials) == 3
    age(*partials)

    service = start_registry(data_dir, tmp_path / "logs", *flags)
    try:
        assert not list((data_dir / "uploads").iterdir())  # collected before the registry reported SERVING
        with RegistryClient(service.address, timeout=30) as client:
            data = os.urandom(2 * MIN_WIRE_CHUNK_BYTES)
            assert not client._stub.WriteBlob(iter(chunk_requests(data, finish=False)[:1])).complete
        partial = data_dir / "uploads" / f"{sha(data)}.partial"
        age(partial)
        deadline = time.monotonic() + 10
        while partial.exists():  # the next periodic round takes it
            assert time.monotonic() < deadline, "no periodic collection"
            time.sleep(0.1)
    finally:
        assert stop_registry(service) == 0


def test_an_import_whose_blobs_were_collected_meanwhile_uploads_them_again(client, registry, tmp_path, monkeypatch):
    folder = controlnet_folder(tmp_path / "cn", os.urandom(2000))
    upload_folder, calls = client.upload_folder, []

    def upload_then_collect(*args, **kwargs):
        result = upload_folder(*args, **kwargs)
        calls.append(result)
        if len(calls) == 1:  # the blobs are stored, no version lists them yet, and collection runs past the grace
            age(*(registry.data_dir / "blobs" / "sha256" / f.sha256[:2] / f.sha256 for f in result.manifest.files))
            client.collect_garbage()
            weights = next(f for f in result.manifest.files if f.path.endswith(".safetensors"))
            assert client.query_blob(weights.sha256).committed_size == 0  # collected
        return result

    monkeypatch.setattr(client, "upload_folder", upload_then_collect)
    imported = client.import_folder(folder, "collected-meanwhile")
    assert imported.created and imported.model_version.version == 1 and len(calls) == 2
    assert client.download_files("collected-meanwhile@1", tmp_path / "out").blobs_downloaded == 2

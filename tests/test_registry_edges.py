"""Registry edges (issue 11, finding 6): chunk sizes on the wire and pickle-based weights sent over gRPC.

Real registry processes on port 0 (the fixtures and helpers of test_registry.py); each refusal is
checked for its code and ErrorInfo reason, and the registry then serves a good call.
"""
from __future__ import annotations

import hashlib
import os

import grpc
import pytest
from test_registry import REGISTRY_MODULE, client, controlnet_folder, registry, rpc_error, stop_registry  # noqa: F401

from latentwire.client.registry import ModelFilesError, RegistryClient, RegistryError, sha256_file
from latentwire.registry.v1 import registry_pb2
from services.registry.config import build_parser
from services.registry.validation import MAX_CHUNK_BYTES, MIN_WIRE_CHUNK_BYTES
from services.suite.launcher import start_service, wait_serving


def stream_error(call) -> RegistryError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return RegistryError.from_rpc(raised.value)


def test_read_blob_refuses_chunk_sizes_outside_the_bounds(client, tmp_path):
    folder = controlnet_folder(tmp_path / "cn", os.urandom(200_000))
    payload = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    version = client.import_folder(folder, "chunky").model_version
    weights = next(f for f in version.files if f.path.endswith(".safetensors"))
    for chunk_size in (1, MIN_WIRE_CHUNK_BYTES - 1, MAX_CHUNK_BYTES + 1, -5):
        error = stream_error(lambda: list(client._stub.ReadBlob(
            registry_pb2.ReadBlobRequest(sha256=weights.sha256, chunk_size=chunk_size))))
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CHUNK_SIZE"), chunk_size
        assert f"{MIN_WIRE_CHUNK_BYTES}..{MAX_CHUNK_BYTES}" in error.message
    # Still serving: the smallest allowed chunk and the default both stream the whole blob.
    for chunk_size, count in ((MIN_WIRE_CHUNK_BYTES, -(-len(payload) // MIN_WIRE_CHUNK_BYTES)), (0, 1)):
        chunks = list(client._stub.ReadBlob(registry_pb2.ReadBlobRequest(sha256=weights.sha256,
                                                                         chunk_size=chunk_size)))
        assert len(chunks) == count and b"".join(c.data for c in chunks) == payload


def test_write_blob_refuses_a_short_chunk_that_is_not_the_last(client, tmp_path):
    data = os.urandom(3 * MIN_WIRE_CHUNK_BYTES)
    digest = hashlib.sha256(data).hexdigest()
    # Byte by byte: the first chunk is refused as soon as a second one follows it.
    chunks = [registry_pb2.WriteBlobRequest(sha256=digest, size_bytes=len(data), offset=o, data=data[o:o + 1],
                                            finish_write=o == len(data) - 1) for o in range(len(data))]
    error = stream_error(lambda: client._stub.WriteBlob(iter(chunks)))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "CHUNK_TOO_SMALL")
    assert str(MIN_WIRE_CHUNK_BYTES) in error.message and error.metadata.get("offset") == "0"
    assert not client.query_blob(digest).complete
    # Still serving: full chunks with a short last one (a file's end) store the blob, through the client too.
    size = MIN_WIRE_CHUNK_BYTES
    response = client._stub.WriteBlob(iter([
        registry_pb2.WriteBlobRequest(sha256=digest, size_bytes=len(data), offset=o, data=data[o:o + size + 7],
                                      finish_write=o + size + 7 >= len(data))
        for o in range(0, len(data), size + 7)]))
    assert response.complete and client.query_blob(digest).complete
    source = tmp_path / "blob"
    source.write_bytes(os.urandom(1024 * 1024 + 17))  # the client's 1 MiB chunks, then 17 bytes
    assert client.upload_blob(source, sha256_file(source), source.stat().st_size) == (True, 1024 * 1024 + 17)


def pickled_folder(path):
    folder = controlnet_folder(path, b"unused")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle bytes")
    return folder


def test_create_version_refuses_pickle_files_sent_over_grpc(client, tmp_path):
    folder = pickled_folder(tmp_path / "pickled")
    # allow_pickle=True only lifts the client's own check: the registry still refuses to store the version.
    error = rpc_error(client.import_folder, folder, "pickled-edge", allow_pickle=True)
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PICKLE_REFUSED")
    assert "diffusion_pytorch_model.bin" in error.message and "--allow-pickle" in error.message
    assert rpc_error(client.get_model, "pickled-edge").code == grpc.StatusCode.NOT_FOUND
    # Still serving: the same model with safetensors weights is recorded.
    good = controlnet_folder(tmp_path / "good", os.urandom(1000))
    assert client.import_folder(good, "pickled-edge").model_version.version == 1


def test_registry_with_allow_pickle_stores_pickle_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTWIRE_ALLOW_PICKLE", "1")
    assert build_parser().parse_args([]).allow_pickle  # the flag's environment variable
    monkeypatch.delenv("LATENTWIRE_ALLOW_PICKLE")
    service = start_service("registry", REGISTRY_MODULE,
                            ["--port", "0", "--data-dir", str(tmp_path / "data"), "--allow-pickle"],
                            log_dir=tmp_path / "logs", timeout=60)
    try:
        wait_serving(service.address, 60, "registry")
        with RegistryClient(service.address, timeout=30) as allowing:
            version = allowing.import_folder(pickled_folder(tmp_path / "pickled"), "pickled",
                                             allow_pickle=True).model_version
            assert [f.path for f in version.files] == ["config.json", "diffusion_pytorch_model.bin"]
            # Downloading it is the client's choice again (moved here from test_registry.py's pickle test).
            with pytest.raises(ModelFilesError, match="pickle"):
                allowing.download_files(version, tmp_path / "out")
            assert allowing.download_files(version, tmp_path / "out", allow_pickle=True).blobs_downloaded == 2
    finally:
        assert stop_registry(service) == 0

"""A registry run with --read-verification digest, end to end over gRPC: what it sends is what it stored.

Reads send the bytes as stored (no block checksums): a blob damaged at rest reaches the client,
whose own sha256 check refuses the download (DATA_LOSS, DOWNLOAD_DIGEST_MISMATCH, nothing left
on disk), until the scrub (here every 2 s) re-hashes the blob and quarantines it; a re-import
then repairs it. The block-checked default is tests/test_registry.py and
tests/test_registry_integrity.py.
"""
from __future__ import annotations

import os
import time

import grpc
import pytest

from latentwire.client.registry import RegistryClient
from services.suite.launcher import start_service, wait_serving
from test_registry import REGISTRY_MODULE, controlnet_folder, rpc_error, safetensors_bytes, stop_registry

SCRUB_INTERVAL_S = 2


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("registry-digest-data")
    service = start_service("registry", REGISTRY_MODULE,
                            ["--port", "0", "--data-dir", str(data_dir), "--read-verification", "digest",
                             "--scrub-interval-seconds", str(SCRUB_INTERVAL_S)],
                            log_dir=tmp_path_factory.mktemp("registry-digest-logs"), timeout=60)
    wait_serving(service.address, 60, "registry")
    service.data_dir = data_dir
    yield service
    assert stop_registry(service) == 0


def test_damage_at_rest_is_refused_by_the_client_and_quarantined_by_the_scrub(registry, tmp_path):
    payload = os.urandom(3 * 1024 * 1024 + 5)
    folder = controlnet_folder(tmp_path / "cn", payload)
    with RegistryClient(registry.address, timeout=30) as client:
        version = client.import_folder(folder, "digest-mode").model_version
        weights = next(f for f in version.files if f.path.endswith(".safetensors"))
        # The blob's last verification (its marker's mtime) set an hour ahead: no scrub round (every 2 s) takes it
        # before the damaged download below; then set long past, so the next round re-hashes it.
        marker = registry.data_dir / "blobs" / "crc32" / weights.sha256[:2] / weights.sha256
        ahead = time.time() + 3600
        os.utime(marker, (ahead, ahead))
        target = tmp_path / "out"
        client.download_files(version, target)  # intact: downloaded and verified by the client
        weights_file = target / "diffusion_pytorch_model.safetensors"
        assert weights_file.read_bytes() == safetensors_bytes(payload)
        weights_file.unlink()

        stored = registry.data_dir / "blobs" / "sha256" / weights.sha256[:2] / weights.sha256
        os.chmod(stored, 0o644)
        with open(stored, "r+b") as file:
            file.seek(2 * 1024 * 1024 + 17)
            file.write(b"\xff\x00")
        error = rpc_error(client.download_files, version, target)
        assert error.code == grpc.StatusCode.DATA_LOSS and error.reason == "DOWNLOAD_DIGEST_MISMATCH"
        assert not weights_file.exists() and not list(target.glob("*.partial"))
        os.utime(marker, (1, 1))

        deadline = time.monotonic() + 30
        while client.query_blob(weights.sha256).complete:
            assert time.monotonic() < deadline, "the scrub did not quarantine the damaged blob within 30 s"
            time.sleep(0.2)
        assert list((registry.data_dir / "corrupt").iterdir())
        client.import_folder(folder, "digest-mode")  # the blob is uploaded again: repaired
        client.download_files(version, target)
        assert weights_file.read_bytes() == safetensors_bytes(payload)

"""The model registry: real registry processes on free ports, each with its own data folder; nothing mocked.

Covers import of the three folder layouts (diffusers, transformers, Hugging Face cache snapshot),
the resource calls with paging, restarts, corruption on disk (DATA_LOSS), resumed transfers after
a cut connection, concurrent imports, name validation, the pickle policy, component downloads,
the shared local cache, and that a downloaded folder generates exactly what the original does.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from latentwire.client.registry import (
    ModelFilesError,
    RegistryClient,
    RegistryError,
    scan_folder,
    select_files,
    sha256_file,
)
from latentwire.registry.v1 import registry_pb2
from services.runtime.model_cache import ModelCache
from services.suite.launcher import start_service, wait_serving

Kind = registry_pb2.ModelKind
REGISTRY_MODULE = "services.registry"


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers


def start_registry(data_dir: Path, log_dir: Path):
    service = start_service("registry", REGISTRY_MODULE, ["--port", "0", "--data-dir", str(data_dir)],
                            log_dir=log_dir, timeout=60)
    wait_serving(service.address, 60, "registry")
    return service


def stop_registry(service) -> int:
    service.process.send_signal(signal.SIGTERM)
    return service.process.wait(30)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """One registry process for the module, with its data folder."""
    data_dir = tmp_path_factory.mktemp("registry-data")
    service = start_registry(data_dir, tmp_path_factory.mktemp("registry-logs"))
    service.data_dir = data_dir
    yield service
    assert stop_registry(service) == 0


@pytest.fixture()
def client(registry):
    with RegistryClient(registry.address, timeout=30) as c:
        yield c


def rpc_error(fn, *args, **kwargs) -> RegistryError:
    with pytest.raises(RegistryError) as raised:
        fn(*args, **kwargs)
    return raised.value


def safetensors_bytes(payload: bytes) -> bytes:
    """A safetensors file holding ``payload`` as one U8 tensor (the registry checks every .safetensors header)."""
    from safetensors.numpy import save

    return save({"weights": np.frombuffer(payload, dtype=np.uint8)})


def controlnet_folder(path: Path, payload: bytes) -> Path:
    """A ControlNet-layout folder whose weight file holds ``payload`` (the registry stores files; it does not load them)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", "_diffusers_version": "0.42.1"}))
    (path / "diffusion_pytorch_model.safetensors").write_bytes(safetensors_bytes(payload))
    return path


def blob_path(registry, sha256: str) -> Path:
    return registry.data_dir / "blobs" / "sha256" / sha256[:2] / sha256


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory) -> Path:
    """A tiny transformers MobileViT image classifier saved with save_pretrained (safetensors), seed 0."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.MobileViTForImageClassification(transformers.MobileViTConfig(
        image_size=32, patch_size=2, num_attention_heads=4, hidden_sizes=[12, 16, 20],
        neck_hidden_sizes=[8, 8, 16, 16, 32, 32, 32], num_labels=10))
    folder = tmp_path_factory.mktemp("classifier") / "tiny-vit"
    model.save_pretrained(folder)
    return folder


def hf_cache_snapshot(folder: Path, hub: Path, repo: str = "latentwire--tiny-vit", revision: str = "0" * 40) -> Path:
    """Lay ``folder`` out as a Hugging Face cache: files in blobs/, snapshot entries are symlinks into ../../blobs/."""
    repo_dir = hub / f"models--{repo}"
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    snapshot = repo_dir / "snapshots" / revision
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = file.relative_to(folder)
        digest = sha256_file(file)
        shutil.copyfile(file, repo_dir / "blobs" / digest)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo_dir / "blobs" / digest, link.parent))
    return snapshot


class CuttingProxy:
    """A TCP proxy that breaks its first connection after ``cut_after`` bytes from the server; later ones pass."""

    def __init__(self, target: str, cut_after: int):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.cut_after = cut_after
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        first = True
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            limit, first = (self.cut_after if first else None), False
            threading.Thread(target=self._pump, args=(downstream, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, limit), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        passed = 0
        try:
            while data := source.recv(65536):
                if limit is not None and passed + len(data) > limit:
                    self.cuts += 1
                    break
                sink.sendall(data)
                passed += len(data)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()

    def close(self) -> None:
        self.listener.close()


# ----------------------------------------------------------------------------------------------
# Import and download


def test_registry_does_not_import_torch():
    code = "import sys, services.registry.__main__; print('torch' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.stdout.strip() == "False", completed.stderr


def test_imported_diffusers_folder_downloads_and_generates_identically(client, tiny_model, tmp_path):
    from reference import reference_pixels

    version = client.import_folder(tiny_model, "tiny-sd", aliases=["default"]).model_version
    assert version.name == "models/tiny-sd/versions/1" and version.kind == Kind.MODEL_KIND_STABLE_DIFFUSION
    assert list(version.components) == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    local = {p.relative_to(tiny_model).as_posix(): p for p in tiny_model.rglob("*") if p.is_file()}
    assert [f.path for f in version.files] == sorted(local)
    for f in version.files:
        assert f.size_bytes == local[f.path].stat().st_size and f.sha256 == sha256_file(local[f.path])
        assert f.component == (f.path.split("/")[0] if "/" in f.path else "")

    downloaded = client.download_files("tiny-sd", tmp_path / "copy")
    assert downloaded.blobs_downloaded == len(local) and downloaded.resumes == 0
    settings = dict(seed=7, steps=2, guidance_scale=7.5, width=64, height=64)
    original = reference_pixels(tiny_model, "a red cube", **settings)
    copy = reference_pixels(tmp_path / "copy", "a red cube", **settings)
    assert np.array_equal(original, copy)


def test_import_transformers_folder_and_hf_cache_snapshot(client, classifier_folder, tmp_path):
    import torch
    import transformers

    plain = client.import_folder(classifier_folder, "tiny-vit").model_version
    assert plain.kind == Kind.MODEL_KIND_IMAGE_CLASSIFIER and list(plain.components) == []
    assert {f.path for f in plain.files} == {"config.json", "model.safetensors"}

    snapshot = hf_cache_snapshot(classifier_folder, tmp_path / "hub")
    assert (snapshot / "model.safetensors").is_symlink()
    from_hub = client.import_folder(snapshot).model_version  # the default name is the repo's
    assert from_hub.name == "models/tiny-vit/versions/2"
    assert from_hub.source == f"hf://latentwire/tiny-vit@{snapshot.name}"
    # Sizes and digests are the real files' (through the symlinks), the same blobs as the plain folder's.
    assert [(f.path, f.size_bytes, f.sha256) for f in from_hub.files] == [
        (f.path, f.size_bytes, f.sha256) for f in plain.files]

    fetched = ModelCache(client, tmp_path / "cache").fetch("tiny-vit@2")
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = transformers.AutoModelForImageClassification.from_pretrained(classifier_folder)(pixels).logits
        got = transformers.AutoModelForImageClassification.from_pretrained(fetched.folder)(pixels).logits
    assert torch.equal(expected, got)


def test_download_of_some_components_and_a_cache_shared_between_versions(client, tiny_model, tmp_path):
    first = client.import_folder(tiny_model, "shared").model_version
    changed = tmp_path / "changed"
    shutil.copytree(tiny_model, changed)
    config = json.loads((changed / "scheduler" / "scheduler_config.json").read_text())
    (changed / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "steps_offset": 0}))
    second = client.import_folder(changed, "shared").model_version

    only_unet = client.download_files(first, tmp_path / "unet-only", components=["unet"])
    # The unet's files, the top-level files, and every component's small JSON config (a stage may
    # read another component's config: the denoiser needs vae/config.json for the scale factor).
    assert sorted(only_unet.files) == ["model_index.json", "scheduler/scheduler_config.json",
                                       "text_encoder/config.json", "tokenizer/tokenizer.json",
                                       "tokenizer/tokenizer_config.json", "unet/config.json",
                                       "unet/diffusion_pytorch_model.safetensors", "vae/config.json"]
    assert sorted(p.relative_to(tmp_path / "unet-only").as_posix()
                  for p in (tmp_path / "unet-only").rglob("*") if p.is_file()) == sorted(only_unet.files)
    with pytest.raises(ModelFilesError, match="no component"):
        client.download_files(first, tmp_path / "x", components=["nope"])

    cache = tmp_path / "cache"
    a = ModelCache(client, cache).fetch(first, components=["unet", "scheduler"])
    assert (a.blobs_downloaded, a.blobs_reused) == (8, 0)  # 4 unet/scheduler/index files + 4 small configs
    b = ModelCache(client, cache).fetch(second, components=["unet", "scheduler"])
    assert (b.blobs_downloaded, b.blobs_reused) == (1, 7)  # only the changed scheduler config travels
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (a.folder / unet).stat().st_ino == (b.folder / unet).stat().st_ino
    assert (a.folder / unet).samefile(cache / "blobs" / next(f.sha256 for f in first.files if f.path == unet))
    assert not (a.folder / "vae" / "diffusion_pytorch_model.safetensors").exists()  # only its small config
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(b.folder, subfolder="unet", use_safetensors=True)

    # A cached blob damaged on disk is caught (sha256 on first use by a new cache object) and fetched again.
    blob = cache / "blobs" / next(f.sha256 for f in first.files if f.path == unet)
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as file:
        file.write(b"\0\0\0\0")
    with RegistryClient(client.address) as fresh:
        again = ModelCache(fresh, cache).fetch(first, components=["unet"])
    assert again.blobs_downloaded == 1
    assert sha256_file(again.folder / unet) == next(f.sha256 for f in first.files if f.path == unet)


def test_concurrent_fetches_of_one_version_into_one_cache_all_get_its_files(client, tiny_model, tmp_path):
    """Jobs that name one new model (a LoRA, say) at once each fetch it: every fetch must end with the folder whole,
    and none may take another's half-linked file for a stale one (each round a fresh cache; eight threads, each
    with its own ModelCache as two services sharing one cache directory have)."""
    version = client.import_folder(tiny_model, "fetched-at-once").model_version
    expected = {f.path: f.sha256 for f in select_files(version, None)}
    for round_ in range(6):
        cache = tmp_path / f"cache-{round_}"
        barrier = threading.Barrier(8)

        def fetch(_):
            barrier.wait()
            return ModelCache(client, cache).fetch(version)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(fetch, range(8)))
        assert sum(r.blobs_downloaded for r in results) == len(set(expected.values()))
        folder = results[0].folder
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == sorted(expected)
        for path, digest in expected.items():
            assert (folder / path).samefile(cache / "blobs" / digest)


# ----------------------------------------------------------------------------------------------
# Resources


def test_models_versions_aliases_tags_and_paging(client, tmp_path):
    for i in range(5):
        client.create_model(f"page-{i}", description=f"model {i}", tags={"i": str(i)})
    assert rpc_error(client.create_model, "page-0").code == grpc.StatusCode.ALREADY_EXISTS
    names, token, pages = [], "", 0
    while True:
        page = client.list_models(page_size=2, page_token=token)
        names += [m.model_id for m in page.models]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    page_models = [n for n in names if n.startswith("page-")]
    assert page_models == [f"page-{i}" for i in range(5)] and names == sorted(names)
    assert pages == -(-len(names) // 2)
    assert rpc_error(client.list_models, page_token="garbage!").code == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error(client.list_models, page_size=-1).code == grpc.StatusCode.INVALID_ARGUMENT

    folder = controlnet_folder(tmp_path / "cn", os.urandom(1000))
    for _ in range(3):
        client.import_folder(folder, "pager")
    first = client.list_model_versions("pager", page_size=2)
    assert [v.version for v in first.model_versions] == [3, 2] and first.next_page_token
    second = client.list_model_versions("models/pager", page_size=2, page_token=first.next_page_token)
    assert [v.version for v in second.model_versions] == [1] and not second.next_page_token
    # A token belongs to its listing: not to another model's, nor to the model list.
    assert rpc_error(client.list_model_versions, "page-0", page_token=first.next_page_token).reason == \
        "INVALID_PAGE_TOKEN"
    assert rpc_error(client.list_models, page_token=first.next_page_token).code == grpc.StatusCode.INVALID_ARGUMENT

    assert dict(client.set_alias("pager", "default", 1).aliases) == {"default": 1}
    assert client.resolve("pager").version == 1
    assert dict(client.set_alias("pager", "default", 3).aliases) == {"default": 3}  # moved in one transaction
    assert client.resolve("pager").version == 3 and client.resolve("pager@default").version == 3
    assert client.resolve("pager@2").version == 2
    assert rpc_error(client.set_alias, "pager", "default", 9).code == grpc.StatusCode.NOT_FOUND
    assert rpc_error(client.set_alias, "pager", "123", 1).code == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error(client.resolve, "pager@nope").code == grpc.StatusCode.NOT_FOUND

    assert dict(client.set_model_tag("pager", "team", "vision").tags) == {"team": "vision"}
    assert dict(client.delete_model_tag("pager", "team").tags) == {}
    assert dict(client.set_model_version_tag("pager", 2, "stage", "staging").tags) == {"stage": "staging"}
    assert dict(client.get_model_version("pager", 2).tags) == {"stage": "staging"}

    client.delete_model_version("pager", 3)  # the alias pointing at it goes too
    assert dict(client.get_model("pager").aliases) == {}
    assert client.resolve("pager").version == 2 and client.get_model("pager").latest_version == 3
    assert rpc_error(client.get_model_version, "pager", 3).reason == "VERSION_NOT_FOUND"
    client.delete_model("pager")
    assert rpc_error(client.get_model, "pager").reason == "MODEL_NOT_FOUND"


@pytest.mark.parametrize("name", ["a/b", "..", "../etc", "a..b", "a\\b", "a\x00b", "line\nbreak", "tab\tx", ".hidden",
                                  "", "x" * 129, "models/", "sp ace"])
def test_bad_model_names_are_rejected(client, name):
    for call in (lambda: client.create_model(name), lambda: client.get_model(name),
                 lambda: client.resolve(name + "@1")):
        error = rpc_error(call)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, (name, error)


def test_bad_requests_are_rejected(client, registry, tmp_path):
    stub = client._stub
    folder = controlnet_folder(tmp_path / "cn", b"weights")
    manifest = client.upload_folder(folder).manifest
    good = [f.to_proto() for f in manifest.files]

    def create(files, kind=Kind.MODEL_KIND_CONTROLNET, name="bad-input"):
        return stub.CreateModelVersion(registry_pb2.CreateModelVersionRequest(name=name, kind=kind, files=files))

    for path in ("../escape.json", "/abs", "a//b", "a/./b", "back\\slash", "ctl\x01"):
        files = good + [registry_pb2.ModelFile(path=path, size_bytes=7, sha256=good[1].sha256,
                                               component=path.split("/")[0] if "/" in path else "")]
        with pytest.raises(grpc.RpcError) as raised:
            create(files)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
    for files, kind in ((good, Kind.MODEL_KIND_UNSPECIFIED), (good, 99), (good[1:], Kind.MODEL_KIND_CONTROLNET),
                        ([good[0], registry_pb2.ModelFile(path="w", size_bytes=1, sha256="ABC")], 2)):
        with pytest.raises(grpc.RpcError) as raised:
            create(files, kind)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for request in (registry_pb2.ReadBlobRequest(sha256="nothex"),
                    registry_pb2.ReadBlobRequest(sha256=good[1].sha256, offset=-1),
                    registry_pb2.ReadBlobRequest(sha256=good[1].sha256, offset=good[1].size_bytes + 1),
                    registry_pb2.ReadBlobRequest(sha256=good[1].sha256, chunk_size=8 * 1024 * 1024)):
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.ReadBlob(request))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.ReadBlob(registry_pb2.ReadBlobRequest(sha256="0" * 64)))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    # An upload whose bytes do not hash to the declared sha256 is discarded, never stored.
    with pytest.raises(grpc.RpcError) as raised:
        stub.WriteBlob(iter([registry_pb2.WriteBlobRequest(sha256="1" * 64, size_bytes=3, offset=0, data=b"abc",
                                                           finish_write=True)]))
    assert raised.value.code() == grpc.StatusCode.DATA_LOSS
    assert not client.query_blob("1" * 64).complete
    with pytest.raises(grpc.RpcError) as raised:
        stub.WriteBlob(iter([registry_pb2.WriteBlobRequest(sha256="2" * 64, size_bytes=3, offset=5, data=b"abc")]))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A gap inside one stream is refused; the bytes before it stay committed for a resume.
    with pytest.raises(grpc.RpcError) as raised:
        stub.WriteBlob(iter([registry_pb2.WriteBlobRequest(sha256="3" * 64, size_bytes=6, offset=0, data=b"abc"),
                             registry_pb2.WriteBlobRequest(sha256="3" * 64, size_bytes=6, offset=4, data=b"ef")]))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.query_blob("3" * 64).committed_size == 3


def test_a_version_with_a_missing_blob_records_nothing(client, tmp_path):
    folder = controlnet_folder(tmp_path / "cn", os.urandom(2048))
    manifest = scan_folder(folder)
    error = rpc_error(client.create_model_version, "half-imported", manifest)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "BLOB_MISSING"
    assert rpc_error(client.get_model, "half-imported").code == grpc.StatusCode.NOT_FOUND
    assert client.import_folder(folder, "half-imported").model_version.version == 1


def test_importing_files_an_alias_already_names_adds_no_version(client, registry, tmp_path):
    """`models import`, `up`'s seeding and the library share RegistryClient.import_folder: same files, same version."""
    folder = controlnet_folder(tmp_path / "cn", os.urandom(4096))
    first = client.import_folder(folder, "same", aliases=["default"])
    assert first.created and first.model_version.version == 1
    assert first.blobs_uploaded + first.blobs_present == 2 and first.bytes_sent >= 4096  # config.json may be stored
    again = client.import_folder(folder, "same", aliases=["default", "production"])
    assert not again.created and again.model_version.version == 1 and again.bytes_sent == 0
    assert dict(client.get_model("same").aliases) == {"default": 1, "production": 1}

    # Without an alias, with tags the aliased version lacks, or asked to: a new version.
    assert client.import_folder(folder, "same").model_version.version == 2
    tagged = client.import_folder(folder, "same", aliases=["default"], tags={"k": "v"})
    assert tagged.created and tagged.model_version.version == 3
    assert not client.import_folder(folder, "same", aliases=["default"], tags={"k": "v"}).created
    assert client.import_folder(folder, "same", aliases=["default"], new_version=True).model_version.version == 4
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(safetensors_bytes(os.urandom(4096)))
    changed = client.import_folder(folder, "same", aliases=["default"])
    assert changed.created and changed.model_version.version == 5 and changed.blobs_uploaded == 1
    assert dict(client.get_model("same").aliases) == {"default": 5, "production": 1}

    # A blob lost from the registry's disk goes up again; the version stays the one the alias names.
    weights = next(f for f in changed.model_version.files if f.path.endswith(".safetensors"))
    blob_path(registry, weights.sha256).unlink()
    completed = subprocess.run(
        [sys.executable, "-m", "latentwire.cli.main", "models", "import", str(folder), "--name", "same",
         "--alias", "default", "--registry", client.address], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "same@5" and "no new version" in completed.stderr
    assert "uploaded 1 blob(s)" in completed.stderr and client.query_blob(weights.sha256).complete
    assert client.get_model("same").latest_version == 5


def test_pickle_folder_refused_unless_allowed(client, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle bytes")
    with pytest.raises(ModelFilesError, match="allow-pickle"):
        client.import_folder(folder, "pickled")
    completed = subprocess.run(
        [sys.executable, "-m", "latentwire.cli.main", "models", "import", str(folder), "--registry", client.address],
        capture_output=True, text=True, timeout=60)
    assert completed.returncode == 1 and "--allow-pickle" in completed.stderr
    assert rpc_error(client.get_model, "pickled").code == grpc.StatusCode.NOT_FOUND

    # The registry refuses it too unless it runs with --allow-pickle (test_registry_edges.py covers that case).
    error = rpc_error(client.import_folder, folder, "pickled", allow_pickle=True)
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PICKLE_REFUSED")


# ----------------------------------------------------------------------------------------------
# Integrity and transfers


def test_corrupted_blob_is_data_loss_and_reimport_repairs_it(client, registry, tmp_path):
    payload = os.urandom(300_000)
    folder = controlnet_folder(tmp_path / "cn", payload)
    version = client.import_folder(folder, "corruptible").model_version
    weights = next(f for f in version.files if f.path.endswith(".safetensors"))
    stored = blob_path(registry, weights.sha256)
    assert stored.read_bytes() == safetensors_bytes(payload) and stat.S_IMODE(stored.stat().st_mode) == 0o444  # blobs are read-only
    os.chmod(stored, 0o644)
    with open(stored, "r+b") as file:
        file.seek(123_456)
        file.write(b"\xff\x00")

    received = 0
    with pytest.raises(grpc.RpcError) as raised:
        for chunk in client._stub.ReadBlob(registry_pb2.ReadBlobRequest(sha256=weights.sha256, chunk_size=32768)):
            received += len(chunk.data)
    assert raised.value.code() == grpc.StatusCode.DATA_LOSS
    assert received < len(payload)  # the final chunk is held back: the corrupt blob is never served whole

    target = tmp_path / "out"
    error = rpc_error(client.download_files, version, target)
    assert error.code == grpc.StatusCode.DATA_LOSS
    assert not (target / "diffusion_pytorch_model.safetensors").exists()
    assert not list(target.glob("*.partial"))
    assert not client.query_blob(weights.sha256).complete  # out of service, so a re-import uploads it again

    client.import_folder(folder, "corruptible")
    client.download_files(version, target)
    assert (target / "diffusion_pytorch_model.safetensors").read_bytes() == safetensors_bytes(payload)


def test_cut_download_resumes_from_its_offset(client, tmp_path):
    payload = os.urandom(8 * 1024 * 1024)
    version = client.import_folder(controlnet_folder(tmp_path / "cn", payload), "big").model_version
    proxy = CuttingProxy(client.address, cut_after=3 * 1024 * 1024)
    try:
        with RegistryClient(proxy.address, chunk_size=256 * 1024) as through_proxy:
            result = through_proxy.download_files("big@1", tmp_path / "out")
    finally:
        proxy.close()
    assert proxy.cuts == 1 and result.resumes >= 1
    total = sum(f.size_bytes for f in version.files)
    assert result.bytes_received == total  # every byte crossed once: the second stream began at the cut
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").read_bytes() == safetensors_bytes(payload)


def test_broken_upload_resumes_from_committed_size(client, tmp_path):
    source = tmp_path / "blob"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    digest, size = sha256_file(source), source.stat().st_size
    data = source.read_bytes()
    half = 1024 * 1024 * 2
    chunks = [registry_pb2.WriteBlobRequest(sha256=digest, size_bytes=size, offset=o, data=data[o:o + 1024 * 1024])
              for o in range(0, half, 1024 * 1024)]
    response = client._stub.WriteBlob(iter(chunks))  # the stream ends before finish_write
    assert (response.committed_size, response.complete) == (half, False)
    assert client.query_blob(digest).committed_size == half
    uploaded, sent = client.upload_blob(source, digest, size)
    assert uploaded and sent == size - half
    assert client.query_blob(digest).complete and client.query_blob(digest).committed_size == size


def test_concurrent_imports_of_one_model_leave_a_consistent_state(client, registry, tmp_path):
    folder = controlnet_folder(tmp_path / "cn", os.urandom(6 * 1024 * 1024))
    command = [sys.executable, "-m", "latentwire.cli.main", "models", "import", str(folder), "--name", "race",
               "--alias", "default", "--new-version", "--registry", client.address]
    # --new-version: both record a version, whichever ends first (else the second may keep the first's).
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert sorted(out.strip() for out, _ in outputs) == ["race@1", "race@2"]
    versions = list(client.iter_model_versions("race"))
    assert [v.version for v in versions] == [2, 1]
    assert versions[0].files == versions[1].files
    assert client.get_model("race").aliases["default"] in (1, 2)
    for f in versions[0].files:
        assert client.query_blob(f.sha256).complete
        assert sha256_file(blob_path(registry, f.sha256)) == f.sha256
        assert not (registry.data_dir / "uploads" / f"{f.sha256}.partial").exists()
    assert client.download_files("race", tmp_path / "out").blobs_downloaded == 2


# ----------------------------------------------------------------------------------------------
# Durability and the CLI


def test_restart_keeps_every_model_version_alias_and_tag(tmp_path, tiny_model):
    data_dir = tmp_path / "data"
    service = start_registry(data_dir, tmp_path / "logs")
    try:
        with RegistryClient(service.address) as client:
            client.import_folder(tiny_model, "keep", aliases=["default"], tags={"origin": "test"})
            client.import_folder(controlnet_folder(tmp_path / "cn", b"cn"), "keep-cn", description="a controlnet")
            client.import_folder(tiny_model, "keep")
            client.set_alias("keep", "production", 2)
            client.set_model_tag("keep", "team", "vision")
            client.set_model_version_tag("keep", 1, "stage", "archived")
            client.create_model("empty", description="no versions yet")
            before = (list(client.iter_models()),
                      [v for m in ("keep", "keep-cn") for v in client.iter_model_versions(m)])
        # A second registry on the same folder refuses to start while the first holds it.
        completed = subprocess.run([sys.executable, "-m", REGISTRY_MODULE, "--port", "0", "--data-dir", str(data_dir)],
                                   capture_output=True, text=True, timeout=60)
        assert completed.returncode == 2 and "another registry" in completed.stderr
    finally:
        assert stop_registry(service) == 0

    service = start_registry(data_dir, tmp_path / "logs")
    try:
        with RegistryClient(service.address) as client:
            after = (list(client.iter_models()),
                     [v for m in ("keep", "keep-cn") for v in client.iter_model_versions(m)])
            assert after == before and len(before[0]) == 3 and len(before[1]) == 3  # messages compare maps as maps
            assert client.resolve("keep@production").version == 2
            version = client.resolve("keep@default")
            expected = len(select_files(version, ["unet"]))  # one download per file
            assert client.download_files(version, tmp_path / "out", components=["unet"]).blobs_downloaded == expected
    finally:
        assert stop_registry(service) == 0


def test_cli_import_list_show_alias_tag_rm(client, tmp_path):
    folder = controlnet_folder(tmp_path / "cli-cn", os.urandom(4096))

    def cli(*args: str) -> str:
        completed = subprocess.run(
            [sys.executable, "-m", "latentwire.cli.main", "models", *args, "--registry", client.address],
            capture_output=True, text=True, timeout=60)
        assert completed.returncode == 0, completed.stderr
        return completed.stdout

    assert cli("import", str(folder), "--alias", "default", "--tag", "k=v").strip() == "cli-cn@1"
    assert cli("import", str(folder)).strip() == "cli-cn@2"
    assert "cli-cn" in cli("list")
    assert cli("alias", "cli-cn", "default", "2").strip() == "cli-cn@default -> 2"
    cli("tag", "cli-cn", "owner", "me")
    cli("tag", "cli-cn@1", "stage", "old")
    shown = cli("show", "cli-cn")
    assert "alias default -> 2" in shown and "tag owner = me" in shown and "models/cli-cn/versions/1" in shown
    assert "diffusion_pytorch_model.safetensors" in cli("show", "cli-cn@1")
    cli("rm", "cli-cn@1")
    assert [v.version for v in client.iter_model_versions("cli-cn")] == [2]
    cli("rm", "cli-cn")
    assert rpc_error(client.get_model, "cli-cn").code == grpc.StatusCode.NOT_FOUND

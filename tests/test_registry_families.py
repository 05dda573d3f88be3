"""Registry kinds per model family: the client's import tells each tiny family folder's kind from its
model_index.json (plain folders and Hugging Face cache snapshots), and the registry refuses a version whose
model_index.json names a pipeline of another family than its kind.
"""
from __future__ import annotations

import json
import os
import shutil
import signal

import grpc
import pytest

from latentwire.client.families import PIPELINE_FAMILIES, REGISTRY_KINDS, family_name_of_index
from latentwire.client.registry import Kind, ModelFilesError, RegistryClient, RegistryError, scan_folder, sha256_file
from services.registry.metadata import FileEntry
from services.registry.store import RegistryStore
from services.runtime.errors import LatentwireError
from services.runtime.families import FAMILIES, family_of_folder
from services.suite.launcher import start_service, wait_serving
from services.tiny_models import create_tiny_model

#: Tiny model family (services.tiny_models) -> the kind its folder imports as.
KINDS = {
    "sd15": Kind.MODEL_KIND_STABLE_DIFFUSION,
    "sdxl": Kind.MODEL_KIND_STABLE_DIFFUSION_XL,
    "sdxl-refiner": Kind.MODEL_KIND_STABLE_DIFFUSION_XL_REFINER,
    "sd3": Kind.MODEL_KIND_STABLE_DIFFUSION_3,
    "flux": Kind.MODEL_KIND_FLUX,
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: create_tiny_model(root / family, family, seed=0) for family in KINDS}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    data = tmp_path_factory.mktemp("registry")
    service = start_service("registry", "services.registry", ["--port", "0", "--data-dir", str(data / "data")],
                            log_dir=data / "logs", timeout=60)
    try:
        wait_serving(service.address, 60, "registry")
        with RegistryClient(service.address, timeout=60) as client:
            yield client
    finally:
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(30) == 0


def hf_cache_snapshot(folder, hub, repo: str, revision: str = "1" * 40):
    """Lay ``folder`` out as a Hugging Face cache: files in blobs/, snapshot entries are symlinks into ../../blobs/."""
    repo_dir = hub / f"models--{repo}"
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    snapshot = repo_dir / "snapshots" / revision
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = sha256_file(file)
        shutil.copyfile(file, repo_dir / "blobs" / digest)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo_dir / "blobs" / digest, link.parent))
    return snapshot


def test_one_family_table():
    """The stages' families (services.runtime.families) read the client's one table of pipeline classes."""
    assert set(REGISTRY_KINDS) == set(FAMILIES)
    for name, family in FAMILIES.items():
        assert family.registry_kind == REGISTRY_KINDS[name]
        assert Kind.Name(Kind.Value(family.registry_kind)) == family.registry_kind  # a kind the contract defines
        assert PIPELINE_FAMILIES[family.pipeline] == ("sdxl" if name == "sdxl-refiner" else name)


@pytest.mark.parametrize("family", list(KINDS))
def test_each_family_folder_gets_its_kind(folders, family):
    manifest = scan_folder(folders[family])
    assert manifest.kind == KINDS[family]
    assert Kind.Name(manifest.kind) == FAMILIES[family_of_folder(folders[family]).name].registry_kind


def test_family_told_by_components_and_refiner_by_its_flags():
    # A pipeline class not in the table: the components tell the family.
    assert family_name_of_index({"_class_name": "MyFluxPipeline",
                                 "transformer": ["diffusers", "FluxTransformer2DModel"]}) == "flux"
    assert family_name_of_index({"_class_name": "Custom", "unet": ["diffusers", "UNet2DConditionModel"],
                                 "text_encoder": ["transformers", "CLIPTextModel"],
                                 "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}) == "sdxl"
    # An SDXL inpainting folder saved from the refiner keeps the refiner's kind.
    assert family_name_of_index({"_class_name": "StableDiffusionXLInpaintPipeline", "text_encoder": [None, None],
                                 "unet": ["diffusers", "UNet2DConditionModel"],
                                 "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}) == "sdxl-refiner"
    with pytest.raises(ValueError, match="does not serve"):
        family_name_of_index({"_class_name": "KandinskyV22Pipeline", "unet": ["diffusers", "UNet2DConditionModel"]})


def test_unknown_pipeline_refused_on_import(folders, tmp_path):
    folder = tmp_path / "kandinsky"
    shutil.copytree(folders["sd15"], folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline",
                                                         "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ModelFilesError, match="KandinskyV22Pipeline.*does not serve"):
        scan_folder(folder)


def test_hf_snapshot_of_sd3_imports_with_every_component(folders, registry, tmp_path):
    """An HF cache snapshot (symlinks into blobs/) imports with its family's kind and every component, so a
    stage fetches only its own (the transformer here) and the text encoder all three encoders."""
    snapshot = hf_cache_snapshot(folders["sd3"], tmp_path / "hub", "stabilityai--tiny-sd3")
    assert (snapshot / "transformer" / "config.json").is_symlink()
    version = registry.import_folder(snapshot).model_version
    assert version.model_id == "tiny-sd3" and version.kind == Kind.MODEL_KIND_STABLE_DIFFUSION_3
    assert version.source == f"hf://stabilityai/tiny-sd3@{'1' * 40}"
    assert list(version.components) == ["scheduler", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                                         "tokenizer_2", "tokenizer_3", "transformer", "vae"]
    fetched = tmp_path / "transformer-only"
    registry.download_files(version, fetched, components=["transformer"])
    weights = {p.relative_to(fetched).as_posix() for p in fetched.rglob("*.safetensors")}
    assert weights == {"transformer/diffusion_pytorch_model.safetensors"}
    assert (fetched / "model_index.json").is_file() and (fetched / "text_encoder_3" / "config.json").is_file()


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_family_versions_list_their_components(folders, registry, family):
    version = registry.import_folder(folders[family], name=f"tiny-{family}").model_version
    assert version.kind == KINDS[family]
    expected = {"sdxl": {"unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"},
                "flux": {"transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}}[family]
    assert expected | {"scheduler", "vae"} == set(version.components)


def test_kind_and_model_index_mismatch_refused(folders, registry):
    manifest = scan_folder(folders["sdxl"])
    manifest.kind = Kind.MODEL_KIND_FLUX
    with pytest.raises(RegistryError) as refused:
        registry.import_folder(manifest, name="mislabelled")
    error = refused.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "KIND_MISMATCH"
    assert "MODEL_KIND_STABLE_DIFFUSION_XL" in error.message and error.metadata["model_index_family"] == "sdxl"
    # SD 1.x recorded as the refiner, and the refiner as the SDXL base, are refused alike.
    for family, wrong in (("sd15", Kind.MODEL_KIND_STABLE_DIFFUSION_XL_REFINER),
                          ("sdxl-refiner", Kind.MODEL_KIND_STABLE_DIFFUSION_XL)):
        manifest = scan_folder(folders[family])
        manifest.kind = wrong
        with pytest.raises(RegistryError) as refused:
            registry.import_folder(manifest, name="mislabelled")
        assert refused.value.reason == "KIND_MISMATCH", family
    with pytest.raises(RegistryError) as missing:
        registry.get_model("mislabelled")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND  # nothing was recorded


def test_store_refuses_an_unreadable_model_index(tmp_path):
    store = RegistryStore(tmp_path / "data", max_blob_bytes=1024 * 1024)
    try:
        def put(data: bytes) -> FileEntry:
            import hashlib

            digest = hashlib.sha256(data).hexdigest()
            upload = store.begin_upload(digest, len(data), 0)
            try:
                if not upload.complete:  # stored already (the same bytes put twice)
                    upload.write(digest, len(data), 0, data, True)
            finally:
                upload.close()
            return FileEntry("model_index.json", len(data), digest, "")

        def refused(data: bytes, kind: str) -> str:
            with pytest.raises(LatentwireError) as raised:
                store.create_version("bad-index", kind, "", [put(data)], {}, "", [])
            assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
            return raised.value.reason

        assert refused(b"{not json", "MODEL_KIND_FLUX") == "INVALID_MODEL_INDEX"
        assert refused(b"[1, 2]", "MODEL_KIND_STABLE_DIFFUSION") == "INVALID_MODEL_INDEX"
        assert refused(json.dumps({"_class_name": "KandinskyV22Pipeline"}).encode(),
                       "MODEL_KIND_STABLE_DIFFUSION") == "INVALID_MODEL_INDEX"
        flux = json.dumps({"_class_name": "FluxPipeline"}).encode()
        assert refused(flux, "MODEL_KIND_STABLE_DIFFUSION_3") == "KIND_MISMATCH"
        created = store.create_version("good-index", "MODEL_KIND_FLUX", "", [put(flux)], {}, "", [])
        assert created.kind == "MODEL_KIND_FLUX"
    finally:
        store.close()

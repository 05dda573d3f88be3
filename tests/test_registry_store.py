"""The registry store in process (no gRPC): metadata, blob uploads and reads, on a temporary data folder.

A quick loop for the registry's domain rules; tests/test_registry.py covers the same store through
the real service, the client and the CLI.
"""
from __future__ import annotations

import hashlib
import json
import os

import grpc
import numpy as np
import pytest
import safetensors.numpy

from latentwire.client.registry import ModelFilesError, scan_folder
from services.registry.metadata import FileEntry
from services.registry.store import RegistryStore
from services.registry.validation import MAX_CHUNK_BYTES
from services.runtime.errors import LatentwireError

CONTROLNET = "MODEL_KIND_CONTROLNET"
CONFIG = json.dumps({"_class_name": "ControlNetModel"}).encode()
#: A small safetensors file (one U8 tensor): every .safetensors a version lists must have a valid header.
WEIGHTS = safetensors.numpy.save({"w": np.arange(16, dtype=np.uint8)})


@pytest.fixture()
def store(tmp_path):
    opened = RegistryStore(tmp_path / "data", max_blob_bytes=64 * 1024 * 1024)
    yield opened
    opened.close()


def refused(fn, *args, **kwargs) -> LatentwireError:
    with pytest.raises(LatentwireError) as raised:
        fn(*args, **kwargs)
    return raised.value


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_blob(store: RegistryStore, data: bytes) -> str:
    """Upload ``data`` in one chunk and return its sha256."""
    digest = sha(data)
    upload = store.begin_upload(digest, len(data), 0)
    try:
        if not upload.complete:
            upload.write(digest, len(data), 0, data, True)
    finally:
        upload.close()
    return digest


def entry(path: str, data: bytes) -> FileEntry:
    return FileEntry(path, len(data), sha(data), path.split("/", 1)[0] if "/" in path else "")


def controlnet_files(store: RegistryStore, weights: bytes) -> list[FileEntry]:
    """A stored ControlNet manifest: config.json and one weight file."""
    put_blob(store, CONFIG)
    put_blob(store, weights)
    return [entry("config.json", CONFIG), entry("diffusion_pytorch_model.safetensors", weights)]


def create(store: RegistryStore, name: str, files: list[FileEntry], *, aliases=(), tags=None):
    return store.create_version(name, CONTROLNET, "test", files, tags or {}, "", list(aliases))


def read_all(reader) -> list[tuple[int, bytes]]:
    chunks = []
    try:
        while (chunk := reader.next()) is not None:
            chunks.append((chunk.offset, chunk.data))
    finally:
        reader.close()
    return chunks


# ----------------------------------------------------------------------------------------------
# Models, aliases and tags


def test_models_create_get_page_and_delete(store):
    for i in range(5):
        store.create_model(f"m-{i}", f"model {i}", {"i": str(i)})
    error = refused(store.create_model, "m-0", "", {})
    assert error.code == grpc.StatusCode.ALREADY_EXISTS and error.reason == "MODEL_EXISTS"
    got = store.get_model("models/m-3")
    assert (got.model_id, got.description, got.tags, got.latest_version) == ("m-3", "model 3", {"i": "3"}, 0)

    names, token, pages = [], "", 0
    while True:
        page, token = store.list_models(2, token)
        names += [m.model_id for m in page]
        pages += 1
        if not token:
            break
    assert names == [f"m-{i}" for i in range(5)] and pages == 3
    assert [m.model_id for m in store.list_models(0, "")[0]] == names  # 0 -> the default page size
    assert refused(store.list_models, -1, "").reason == "INVALID_PAGE_SIZE"
    assert refused(store.list_models, 2, "garbage!").reason == "INVALID_PAGE_TOKEN"

    store.delete_model("m-1")
    assert refused(store.get_model, "m-1").reason == "MODEL_NOT_FOUND"
    assert refused(store.delete_model, "m-1").code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("name", ["a/b", "..", "a..b", ".hidden", "", "x" * 129, "sp ace", "tab\tx"])
def test_bad_model_names_are_invalid_arguments(store, name):
    for call in (lambda: store.create_model(name, "", {}), lambda: store.get_model(name),
                 lambda: store.resolve(name + "@1")):
        error = refused(call)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_MODEL_NAME", name
        assert len(error.message) < 400


def test_tags_and_aliases(store):
    files = controlnet_files(store, WEIGHTS)
    for _ in range(3):
        create(store, "tagged", files)
    assert store.set_model_tag("tagged", "team", "vision").tags == {"team": "vision"}
    assert store.delete_model_tag("tagged", "team").tags == {}
    assert refused(store.delete_model_tag, "tagged", "team").reason == "TAG_NOT_FOUND"
    assert refused(store.set_model_tag, "tagged", "", "x").reason == "INVALID_TAG"
    assert refused(store.set_model_tag, "tagged", "k", "v" * 5001).reason == "INVALID_TAG"
    assert store.set_version_tag("models/tagged/versions/2", "stage", "staging").tags == {"stage": "staging"}
    assert store.get_version("models/tagged/versions/2").tags == {"stage": "staging"}

    assert store.set_alias("tagged", "default", 1).aliases == {"default": 1}
    assert store.set_alias("tagged", "default", 3).aliases == {"default": 3}  # replaced, not added
    assert refused(store.set_alias, "tagged", "default", 9).reason == "VERSION_NOT_FOUND"
    assert refused(store.set_alias, "tagged", "123", 1).reason == "INVALID_ALIAS"
    assert store.delete_alias("tagged", "default").aliases == {}
    assert refused(store.delete_alias, "tagged", "default").reason == "ALIAS_NOT_FOUND"


# ----------------------------------------------------------------------------------------------
# Versions and resolution


def test_versions_page_newest_first_and_tokens_belong_to_their_listing(store):
    files = controlnet_files(store, WEIGHTS)
    for _ in range(3):
        create(store, "paged", files)
    create(store, "other", files)
    first, token = store.list_versions("paged", 2, "")
    assert [v.version for v in first] == [3, 2] and token
    second, end = store.list_versions("models/paged", 2, token)
    assert [v.version for v in second] == [1] and end == ""
    assert refused(store.list_versions, "other", 2, token).reason == "INVALID_PAGE_TOKEN"
    assert refused(store.list_models, 2, token).reason == "INVALID_PAGE_TOKEN"
    assert refused(store.list_versions, "missing", 2, "").reason == "MODEL_NOT_FOUND"


def test_resolve_name_number_and_alias(store):
    files = controlnet_files(store, WEIGHTS)
    store.create_model("empty", "", {})
    assert refused(store.resolve, "empty").reason == "VERSION_NOT_FOUND"
    for _ in range(3):
        create(store, "resolved", files)
    assert store.resolve("resolved").version == 3  # no "default" alias: the latest version
    store.set_alias("resolved", "default", 1)
    store.set_alias("resolved", "production", 2)
    assert store.resolve("resolved").version == 1
    assert store.resolve("resolved@default").version == 1
    assert store.resolve("resolved@production").version == 2
    assert store.resolve("resolved@3").version == 3
    assert refused(store.resolve, "resolved@9").reason == "VERSION_NOT_FOUND"
    assert refused(store.resolve, "resolved@nope").reason == "ALIAS_NOT_FOUND"
    assert refused(store.resolve, "missing@1").reason == "MODEL_NOT_FOUND"
    for bad in ("resolved@", "resolved@0", "resolved@bad alias"):
        assert refused(store.resolve, bad).code == grpc.StatusCode.INVALID_ARGUMENT, bad


def test_a_version_records_its_files_tags_and_aliases(store):
    files = controlnet_files(store, WEIGHTS)
    version = create(store, "recorded", list(reversed(files)), aliases=["default", "production"], tags={"k": "v"})
    assert (version.model_id, version.version, version.kind, version.status) == \
        ("recorded", 1, CONTROLNET, "MODEL_VERSION_STATUS_READY")
    assert [f.path for f in version.files] == ["config.json", "diffusion_pytorch_model.safetensors"]  # sorted
    assert version.tags == {"k": "v"}
    assert store.get_model("recorded").aliases == {"default": 1, "production": 1}
    assert store.get_model("recorded").latest_version == 1

    # Deleting a version takes the aliases pointing at it; the number is never reused.
    create(store, "recorded", files)
    store.delete_version("models/recorded/versions/1")
    assert store.get_model("recorded").aliases == {}
    assert refused(store.get_version, "models/recorded/versions/1").reason == "VERSION_NOT_FOUND"
    assert create(store, "recorded", files).version == 3
    assert refused(store.delete_version, "models/recorded/versions/1").code == grpc.StatusCode.NOT_FOUND
    assert refused(store.get_version, "recorded/1").reason == "INVALID_VERSION_NAME"
    # Blobs stay: a version made of them can still be recorded.
    assert store.query_blob(files[1].sha256) == (len(WEIGHTS), True)


def test_a_version_with_a_missing_blob_records_nothing(store):
    put_blob(store, CONFIG)
    missing = b"never uploaded"
    error = refused(create, store, "half", [entry("config.json", CONFIG),
                                            entry("diffusion_pytorch_model.safetensors", missing)])
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "BLOB_MISSING"
    assert error.metadata == {"path": "diffusion_pytorch_model.safetensors", "sha256": sha(missing), "missing": "1"}
    assert refused(store.get_model, "half").reason == "MODEL_NOT_FOUND"  # not even the model
    # A stored blob listed with another size than it has is missing too.
    weights = put_blob(store, WEIGHTS)
    wrong_size = FileEntry("diffusion_pytorch_model.safetensors", len(WEIGHTS) + 1, weights, "")
    assert refused(create, store, "half", [entry("config.json", CONFIG), wrong_size]).reason == "BLOB_MISSING"


@pytest.mark.parametrize("path", ["../escape.json", "/abs", "a//b", "a/./b", "back\\slash", "ctl\x01", "a/", ""])
def test_version_file_paths_must_stay_inside_the_folder(store, path):
    files = controlnet_files(store, WEIGHTS)
    bad = FileEntry(path, len(CONFIG), sha(CONFIG), path.split("/", 1)[0] if "/" in path else "")
    error = refused(create, store, "paths", [*files, bad])
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_FILE_PATH", path
    assert refused(store.get_model, "paths").reason == "MODEL_NOT_FOUND"


def test_version_manifests_are_checked(store):
    files = controlnet_files(store, WEIGHTS)
    config, weights = files

    def reason(files, kind=CONTROLNET):
        return refused(store.create_version, "checked", kind, "", files, {}, "", []).reason

    assert reason(files, kind="") == "INVALID_KIND"
    assert reason(files, kind="MODEL_KIND_STABLE_DIFFUSION") == "MISSING_FILE"  # no model_index.json
    assert reason([weights]) == "MISSING_FILE"  # no config.json
    assert reason([]) == "NO_FILES"
    assert reason([config, weights, config]) == "DUPLICATE_FILE"
    assert reason([config, FileEntry("w", 1, "ABC", "")]) == "INVALID_SHA256"
    assert reason([config, FileEntry("unet/w", weights.size_bytes, weights.sha256, "")]) == "INVALID_COMPONENT"
    assert reason([config, FileEntry("w", weights.size_bytes + 1, weights.sha256, "")] + [weights]) == \
        "INCONSISTENT_FILES"
    assert reason([config, FileEntry("w", 128 * 1024 * 1024, weights.sha256, "")]) == "INVALID_BLOB_SIZE"
    assert refused(store.create_version, "checked", CONTROLNET, "", files, {}, "", ["1"]).reason == "INVALID_ALIAS"


def test_pickle_weights_are_refused_before_anything_is_sent(tmp_path):
    """The pickle policy lives where folders are scanned (client side): nothing pickled reaches the store."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_bytes(CONFIG)
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle bytes")
    with pytest.raises(ModelFilesError, match="allow-pickle"):
        scan_folder(folder)
    assert [f.path for f in scan_folder(folder, allow_pickle=True).files] == ["config.json",
                                                                             "diffusion_pytorch_model.bin"]


# ----------------------------------------------------------------------------------------------
# Blobs


def test_upload_resumes_from_its_committed_offset(store):
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest, size = sha(data), len(data)
    upload = store.begin_upload(digest, size, 0)
    upload.write(digest, size, 0, data[:1024 * 1024], False)
    upload.write(digest, size, 1024 * 1024, data[1024 * 1024:2 * 1024 * 1024], False)
    upload.close()  # the stream broke: the prefix stays
    assert store.query_blob(digest) == (2 * 1024 * 1024, False)

    assert refused(store.begin_upload, digest, size, 2 * 1024 * 1024 + 1).reason == "INVALID_WRITE_OFFSET"
    upload = store.begin_upload(digest, size, 2 * 1024 * 1024)
    assert refused(upload.write, digest, size, 0, b"x", False).reason == "INVALID_WRITE_OFFSET"
    assert refused(upload.write, digest, size + 1, 2 * 1024 * 1024, b"x", False).reason == "INCONSISTENT_UPLOAD"
    upload.write(digest, size, 2 * 1024 * 1024, data[2 * 1024 * 1024:], True)
    upload.close()
    assert upload.complete and store.query_blob(digest) == (size, True)
    assert store.blobs.path(digest).read_bytes() == data
    assert not store.blobs.partial_path(digest).exists()

    # Once stored, another upload of the same blob is complete at once.
    again = store.begin_upload(digest, size, 0)
    assert again.complete and again.position == size
    again.close()


def test_resume_without_saved_hash_state_rehashes_the_prefix(tmp_path):
    """A registry restarted mid-upload has no hash state in memory; the prefix on disk still counts."""
    data = os.urandom(1024 * 1024 + 5)
    digest, size = sha(data), len(data)
    first = RegistryStore(tmp_path / "data", max_blob_bytes=size)
    upload = first.begin_upload(digest, size, 0)
    upload.write(digest, size, 0, data[:1000], False)
    upload.close()
    first.close()
    second = RegistryStore(tmp_path / "data", max_blob_bytes=size)
    try:
        assert second.query_blob(digest) == (1000, False)
        upload = second.begin_upload(digest, size, 1000)
        upload.write(digest, size, 1000, data[1000:], True)
        upload.close()
        assert second.query_blob(digest) == (size, True)
    finally:
        second.close()


def test_a_sha256_mismatch_is_data_loss_and_discards_the_upload(store):
    digest = "1" * 64
    upload = store.begin_upload(digest, 3, 0)
    error = refused(upload.write, digest, 3, 0, b"abc", True)
    upload.close()
    assert error.code == grpc.StatusCode.DATA_LOSS and error.reason == "BLOB_DIGEST_MISMATCH"
    assert store.query_blob(digest) == (0, False)
    assert not store.blobs.partial_path(digest).exists()


def test_upload_limits(store):
    digest = sha(b"abcdef")
    assert refused(store.begin_upload, "nothex", 3, 0).reason == "INVALID_SHA256"
    assert refused(store.begin_upload, digest, -1, 0).reason == "INVALID_BLOB_SIZE"
    too_large = refused(store.begin_upload, digest, 65 * 1024 * 1024, 0)
    assert (too_large.code, too_large.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "BLOB_TOO_LARGE")
    assert not store.blobs.partial_path(digest).exists()  # refused before any byte was written
    upload = store.begin_upload(digest, 6, 0)
    try:
        assert refused(upload.write, digest, 6, 0, b"abcdefg", False).reason == "BLOB_TOO_LONG"
        assert refused(upload.write, digest, 6, 0, b"x" * (MAX_CHUNK_BYTES + 1), False).reason == "CHUNK_TOO_LARGE"
        assert refused(upload.write, digest, 6, 0, b"abc", True).reason == "BLOB_INCOMPLETE"
    finally:
        upload.close()
    assert store.query_blob(digest) == (3, False)  # the bytes before the refused finish stay committed


def test_reader_ranges(store):
    data = os.urandom(10_000)
    digest = put_blob(store, data)
    assert read_all(store.open_blob(digest, 0, 0, 4096)) == [(0, data[:4096]), (4096, data[4096:8192]),
                                                            (8192, data[8192:])]
    assert read_all(store.open_blob(digest, 5000, 0, 0)) == [(5000, data[5000:])]  # 0 -> the default chunk
    assert read_all(store.open_blob(digest, 100, 250, 100)) == [(100, data[100:200]), (200, data[200:300]),
                                                              (300, data[300:350])]
    assert read_all(store.open_blob(digest, 9_000, 5_000, 4096)) == [(9_000, data[9_000:])]  # limit past the end
    assert read_all(store.open_blob(digest, 10_000, 0, 4096)) == [(10_000, b"")]  # an empty range answers once

    assert refused(store.open_blob, digest, 10_001, 0, 0).reason == "OFFSET_OUT_OF_RANGE"
    assert refused(store.open_blob, digest, -1, 0, 0).reason == "INVALID_RANGE"
    assert refused(store.open_blob, digest, 0, -1, 0).reason == "INVALID_RANGE"
    assert refused(store.open_blob, digest, 0, 0, MAX_CHUNK_BYTES + 1).reason == "INVALID_CHUNK_SIZE"
    assert refused(store.open_blob, "nothex", 0, 0, 0).reason == "INVALID_SHA256"
    assert refused(store.open_blob, "0" * 64, 0, 0, 0).reason == "BLOB_NOT_FOUND"


def test_a_corrupt_blob_is_held_back_and_quarantined(store):
    data = os.urandom(20_000)
    digest = put_blob(store, data)
    stored = store.blobs.path(digest)
    os.chmod(stored, 0o644)
    with open(stored, "r+b") as file:
        file.seek(15_000)
        file.write(b"\xff\x00")
    reader = store.open_blob(digest, 0, 4096, 1024)  # the range's block (here the whole blob) is checked
    sent = []
    with pytest.raises(LatentwireError) as raised:
        while (chunk := reader.next()) is not None:
            sent.append(chunk)
    reader.close()
    assert raised.value.code == grpc.StatusCode.DATA_LOSS and raised.value.reason == "BLOB_CORRUPT"
    assert sum(len(c.data) for c in sent) < 4096  # the last chunk of the range was never handed out
    assert store.query_blob(digest) == (0, False)  # out of service, so a re-upload stores it again
    assert put_blob(store, data) == digest and store.query_blob(digest) == (len(data), True)


def test_a_listed_blob_missing_from_disk_is_data_loss(store):
    files = controlnet_files(store, WEIGHTS)
    create(store, "lost", files)
    os.remove(store.blobs.path(files[1].sha256))
    error = refused(store.open_blob, files[1].sha256, 0, 0, 0)
    assert error.code == grpc.StatusCode.DATA_LOSS and error.reason == "BLOB_MISSING"
    assert error.metadata == {"sha256": files[1].sha256, "model": "lost", "version": "1"}
    assert str(store.data_dir) not in error.message  # no server paths in what the caller reads


def test_one_registry_per_data_folder(store):
    with pytest.raises(RuntimeError, match="another registry"):
        RegistryStore(store.data_dir, max_blob_bytes=1)

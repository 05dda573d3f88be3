"""Client for latentwire.registry.v1.RegistryService: import model folders, manage them, download their files.

    from latentwire.client.registry import RegistryClient

    with RegistryClient("localhost:50055") as registry:
        imported = registry.import_folder("models/tiny-sd", name="tiny-sd", aliases=["default"])
        print(imported.model_version.version)
        fetched = registry.download_files("tiny-sd@default", "tiny-sd-unet", components=["unet"])
        UNet2DConditionModel.from_pretrained(fetched.folder, subfolder="unet", use_safetensors=True)

Import is two-phase, as the contract says: every file's bytes go up first as blobs (only those
QueryBlob reports missing, resuming a pending upload from its committed size), then one
CreateModelVersion records the version. Downloads resume from the last offset after a broken
stream and are verified against sha256 before they are renamed into place. (The stages' shared,
digest-keyed model cache is server code: services/runtime/model_cache.py.)
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import grpc

from latentwire.registry.v1 import registry_pb2, registry_pb2_grpc

from .addresses import DEFAULT_REGISTRY, registry_address  # noqa: F401 - DEFAULT_REGISTRY: the name callers import
from .base import BaseClient
from .file_io import DirectAppender
from .errors import LatentwireError
from . import upscaler_files
from .families import REGISTRY_KINDS, family_name_of_index

#: Pickle-based weight files: unpickling them can run code, so they are refused unless allowed.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
#: Chunk size of uploads and downloads (the contract recommends at most 4 MiB).
DEFAULT_CHUNK_BYTES = 1024 * 1024
MAX_CHUNK_BYTES = 4 * 1024 * 1024
#: Fewest bytes in a chunk on the wire (ReadBlob's chunk_size; every WriteBlob chunk but a stream's last):
#: HTTP/2's default frame size. Smaller chunks only multiply messages; the registry refuses them.
MIN_CHUNK_BYTES = 16 * 1024
#: Codes after which a transfer resumes: the connection broke or the server could not finish.
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
              grpc.StatusCode.ABORTED)
_MODEL_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_PATH_SEGMENT = re.compile(r"[^\x00-\x1f\x7f\\]{1,255}")

Kind = registry_pb2.ModelKind


def default_registry_address() -> str:
    """$LATENTWIRE_REGISTRY, else localhost:50055 (resolved in latentwire.client.addresses)."""
    return registry_address()


#: The registry's failures are LatentwireErrors (code, message, ErrorInfo reason and metadata); the old name stays.
RegistryError = LatentwireError


class ModelFilesError(ValueError):
    """A folder or a manifest latentwire refuses: unknown layout, pickles not allowed, unsafe paths."""


# ----------------------------------------------------------------------------------------------
# Local folders


@dataclass(frozen=True)
class LocalFile:
    """One file of a local model folder: its path in the folder, the real file holding it, size and sha256."""

    path: str
    source: Path
    size_bytes: int
    sha256: str
    component: str

    def to_proto(self) -> registry_pb2.ModelFile:
        return registry_pb2.ModelFile(path=self.path, size_bytes=self.size_bytes, sha256=self.sha256,
                                      component=self.component)


@dataclass
class FolderManifest:
    """What `scan_folder` found: the kind, where it came from, a default name and every file."""

    root: Path
    kind: int
    source: str
    default_name: str
    files: list[LocalFile]

    @property
    def components(self) -> list[str]:
        return sorted({f.component for f in self.files if f.component})

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)


@dataclass
class UploadResult:
    """What `upload_folder` did."""

    manifest: FolderManifest
    bytes_sent: int = 0
    blobs_uploaded: int = 0
    blobs_present: int = 0


@dataclass
class ImportResult:
    """What `import_folder` did: the version the aliases now name, and whether this call recorded it."""

    model_version: registry_pb2.ModelVersion
    manifest: FolderManifest
    #: False when an alias already named a version holding these files: no version was recorded.
    created: bool
    bytes_sent: int = 0
    blobs_uploaded: int = 0
    blobs_present: int = 0


@dataclass
class TransferResult:
    """What a download did; ``folder`` is the model folder to load."""

    folder: Path
    files: list[str] = field(default_factory=list)
    bytes_received: int = 0
    resumes: int = 0
    blobs_downloaded: int = 0
    blobs_reused: int = 0


def sha256_file(path: str | os.PathLike, block_bytes: int = 4 * 1024 * 1024) -> str:
    """Lowercase hex sha256 of a file's content."""
    hasher = hashlib.sha256()
    buffer = bytearray(block_bytes)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        while count := file.readinto(buffer):
            hasher.update(view[:count])
    return hasher.hexdigest()


def is_valid_model_name(name: str) -> bool:
    """The registry's rule for a model name: letters, digits, '-', '_' and '.', 1 to 128, no leading '.', no '..'.

    Checked before anything is sent, and by caches that make the name a folder name.
    """
    return bool(_MODEL_ID.fullmatch(name)) and ".." not in name


def check_relative_path(path: str) -> str:
    """A relative '/'-separated path with no '.', '..' or empty segments (never escapes its folder)."""
    if not path or any(s in (".", "..") or not _PATH_SEGMENT.fullmatch(s) for s in path.split("/")):
        raise ModelFilesError(f"file path {path!r} is not a plain relative path inside the model folder")
    return path


#: Largest safetensors JSON header read when checking a file (safetensors' own limit, 100 MB).
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000
#: Bytes per element of the safetensors dtypes whose sizes are whole bytes (sub-byte types are not size-checked).
_SAFETENSORS_ITEM_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


def safetensors_problem(read: Callable[[int, int], bytes], size_bytes: int) -> str | None:
    """What makes a file that claims to be safetensors not one, or None when its header holds up.

    ``read(offset, length)`` returns the file's bytes there. Only the 8-byte header length and
    the JSON header are read (at most MAX_SAFETENSORS_HEADER_BYTES), never the tensors: the
    header must be a JSON object whose entries' ``data_offsets`` stay inside the file and match
    their dtype and shape. Pickle or zip bytes (a torch.save file renamed) fail the first check.
    Shared by the registry (CreateModelVersion), the stages (model folders) and the client (import).
    """
    if size_bytes < 8:
        return f"it has {size_bytes} bytes, fewer than a safetensors header's 8-byte length"
    head = read(0, 8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "it holds zip or pickle bytes (a torch.save file), not safetensors"
    length = int.from_bytes(head, "little")
    if not 2 <= length <= min(MAX_SAFETENSORS_HEADER_BYTES, size_bytes - 8):
        return (f"its header length {length} does not fit the file ({size_bytes} bytes; "
                f"at most {MAX_SAFETENSORS_HEADER_BYTES})")
    try:
        header = json.loads(read(8, length))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    data_bytes = size_bytes - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shown = name[:40]
        if not isinstance(entry, dict):
            return f"tensor {shown!r} is not described by an object"
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if (
            not isinstance(dtype, str)
            or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
        ):
            return f"tensor {shown!r} lacks a dtype, a shape or two data_offsets"
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes:
            return f"tensor {shown!r} has data_offsets [{begin}, {end}] outside its {data_bytes} data bytes"
        item = _SAFETENSORS_ITEM_BYTES.get(dtype)
        if item is not None:
            count = 1
            for dim in shape:
                count *= dim
            if count * item != end - begin:
                return f"tensor {shown!r} ({dtype} {shape}) needs {count * item} bytes, its offsets hold {end - begin}"
    return None


def safetensors_file_problem(path: str | os.PathLike) -> str | None:
    """``safetensors_problem`` of a local file."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size

        def read(offset: int, length: int) -> bytes:
            file.seek(offset)
            return file.read(length)

        return safetensors_problem(read, size)


def _hf_snapshot(root: Path) -> tuple[Path, str, str] | None:
    """(snapshot folder, source, repo name) for a Hugging Face cache folder, else None.

    Accepts models--org--name/snapshots/<rev>/ or models--org--name/ itself (then refs/main, or
    the only snapshot, picks the revision).
    """
    repo_dir = root.parent.parent if root.parent.name == "snapshots" else root
    if not repo_dir.name.startswith("models--"):
        return None
    repo = repo_dir.name[len("models--"):].split("--")
    if repo_dir is root:
        snapshots = sorted(p for p in (root / "snapshots").glob("*") if p.is_dir())
        ref = root / "refs" / "main"
        if ref.is_file() and (root / "snapshots" / ref.read_text().strip()).is_dir():
            root = root / "snapshots" / ref.read_text().strip()
        elif len(snapshots) == 1:
            root = snapshots[0]
        else:
            raise ModelFilesError(f"{repo_dir} holds {len(snapshots)} snapshots and no refs/main; "
                                  "pass the snapshot folder itself")
    return root, f"hf://{'/'.join(repo)}@{root.name}", repo[-1]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelFilesError(f"{path} is not readable JSON: {error}") from None
    if not isinstance(data, dict):
        raise ModelFilesError(f"{path} does not hold a JSON object")
    return data


#: The training record (services/training writes it: the command, seed and commit that made a model) and the
#: version tags an import makes of it.
TRAINING_RECORD = "RECORD.json"
TRAINING_TAGS = ("training.seed", "training.commit", "training.command")
_TAG_VALUE_CHARS = 5000  # the registry's limit on a tag value


def training_record_tags(folder: str | os.PathLike) -> dict[str, str]:
    """Version tags from the training record of a model folder: ``RECORD.json`` in the folder, else in its parent
    (``python -m services.training all --out DIR`` writes DIR/RECORD.json beside DIR/pipeline/ and DIR/classifier/;
    the shipped services/default_models/ keeps that layout). ``training.seed``, ``training.commit`` and
    ``training.command`` (the record's commands, one per line, in the order they ran); {} when neither folder holds
    a record with a seed, a commit and its command(s), so an unrelated RECORD.json adds nothing. For a single file
    (a LoRA), the folder is the one holding it."""
    root = Path(folder).expanduser()
    if root.is_file():
        root = root.parent
    for candidate in (root / TRAINING_RECORD, root.parent / TRAINING_RECORD):
        try:
            record = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict):
            continue
        commands = record.get("commands") or record.get("command")
        commands = [commands] if isinstance(commands, str) else commands
        seed, commit = record.get("seed"), record.get("commit")
        if (isinstance(seed, int) and not isinstance(seed, bool) and isinstance(commit, str) and commit
                and isinstance(commands, list) and commands and all(isinstance(c, str) for c in commands)):
            command = "\n".join(commands)
            if len(command) > _TAG_VALUE_CHARS:  # keep the last commands: they made the weights as shipped
                command = "...\n" + command[-(_TAG_VALUE_CHARS - 4):]
            return dict(zip(TRAINING_TAGS, (str(seed), commit, command)))
    return {}


def _classify(root: Path, paths: set[str]) -> int:
    """The kind of a folder: model_index.json -> its pipeline family's kind (Stable Diffusion 1.x/2.x, SDXL, the
    SDXL refiner, SD3, Flux); config.json -> ControlNet, tiny preview VAE (AutoencoderTiny) or classifier."""
    if "model_index.json" in paths:
        index = _read_json(root / "model_index.json")
        try:
            family = family_name_of_index(index)
        except ValueError as error:
            raise ModelFilesError(f"{root}: {error}") from None
        for name, value in index.items():
            has_class = isinstance(value, list) and len(value) == 2 and value[1] is not None
            if not name.startswith("_") and has_class and not any(p.startswith(name + "/") for p in paths):
                raise ModelFilesError(f"{root}: model_index.json lists the component {name!r} but its folder is missing")
        return Kind.Value(REGISTRY_KINDS[family])
    if "config.json" in paths:
        config = _read_json(root / "config.json")
        if config.get("_class_name") == "ControlNetModel":
            return Kind.MODEL_KIND_CONTROLNET
        if config.get("_class_name") == "AutoencoderTiny":  # TAESD, TAESDXL, TAESD3, TAEF1
            return Kind.MODEL_KIND_PREVIEW_VAE
        if any(str(a).endswith("ForImageClassification") for a in config.get("architectures") or []):
            return Kind.MODEL_KIND_IMAGE_CLASSIFIER
    raise ModelFilesError(
        f"{root} is not a model folder the registry knows: expected a diffusers pipeline folder (model_index.json: "
        "Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux), a diffusers ControlNetModel or AutoencoderTiny folder or a "
        "transformers *ForImageClassification folder (config.json)"
    )


#: The one file a LoRA or textual-inversion version holds, by kind (the registry requires it, validation.KINDS).
SINGLE_FILE_NAMES = {Kind.MODEL_KIND_LORA: "lora.safetensors", Kind.MODEL_KIND_TEXTUAL_INVERSION: "embedding.safetensors",
                     Kind.MODEL_KIND_UPSCALER: upscaler_files.UPSCALER_FILES[0]}
#: Largest safetensors header read to recognise a LoRA or an embedding (key names and shapes only).
_MAX_HEADER_BYTES = 64 * 1024 * 1024


def single_file_kind(keys: Iterable[str]) -> int | None:
    """The kind of a single .safetensors file from its tensor names: a LoRA (diffusers / PEFT ``*.lora_A.weight``,
    ``*.lora.down.weight``, ``*lora_linear_layer*``; kohya ``lora_unet_*`` / ``lora_te*_*`` with ``lora_down``), a
    textual-inversion embedding (A1111's ``emb_params``, SDXL's ``clip_l`` and ``clip_g``), an ESRGAN-type
    upscaler (RRDBNet, upscaler_files.py), else None."""
    keys = list(keys)
    if upscaler_files.is_rrdbnet(keys):
        return Kind.MODEL_KIND_UPSCALER
    if keys and all(k in ("emb_params", "clip_l", "clip_g") for k in keys):
        return Kind.MODEL_KIND_TEXTUAL_INVERSION
    lora_markers = (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", "lora_linear_layer.", ".lora_down.",
                    ".lora_up.", "_lora.down.", "_lora.up.")
    if any(marker in k for k in keys for marker in lora_markers):
        return Kind.MODEL_KIND_LORA
    return None


def scan_single_file(path: str | os.PathLike) -> FolderManifest | None:
    """A single .safetensors LoRA or textual-inversion embedding as a one-file manifest (stored as
    ``lora.safetensors`` / ``embedding.safetensors``, named after the file); None for any other file (a checkpoint
    to convert). Only the safetensors header is read."""
    file = Path(path).expanduser().absolute()
    if (problem := safetensors_file_problem(file)) is not None:
        raise ModelFilesError(f"{file} is not a safetensors file: {problem}")
    with file.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > _MAX_HEADER_BYTES:
            return None
        header = json.loads(f.read(length))
    kind = single_file_kind(k for k in header if k != "__metadata__")
    if kind is None:
        return None
    real = Path(os.path.realpath(file))
    stored = LocalFile(path=SINGLE_FILE_NAMES[kind], source=real, size_bytes=real.stat().st_size,
                       sha256=sha256_file(real), component="")
    return FolderManifest(root=file.parent, kind=kind, source=str(real), default_name=file.stem, files=[stored])


def _upscaler_pickle(file: Path, allow_pickle: bool) -> FolderManifest:
    """A pickled ESRGAN-type upscaler (.pth) as a one-file manifest stored as ``upscaler.pth``: only with
    ``allow_pickle`` (recognised from its pickle's strings, nothing unpickled)."""
    if not allow_pickle:
        raise ModelFilesError(
            f"{file} is a pickle-based upscaler; unpickling can run arbitrary code, so it is refused: convert it to "
            "safetensors, or pass --allow-pickle (allow_pickle=True) to import it anyway")
    real = Path(os.path.realpath(file.expanduser().absolute()))
    stored = LocalFile(path=upscaler_files.UPSCALER_FILES[1], source=real, size_bytes=real.stat().st_size,
                       sha256=sha256_file(real), component="")
    return FolderManifest(root=real.parent, kind=Kind.MODEL_KIND_UPSCALER, source=str(real), default_name=file.stem,
                          files=[stored])


def scan_folder(path: str | os.PathLike, *, allow_pickle: bool = False) -> FolderManifest:
    """Walk a model folder: classify it, resolve symlinks (Hugging Face snapshots), size and sha256 every file.

    Hidden files and folders (names starting with '.') are skipped. Pickle-based weights
    (.bin/.ckpt/.pt/.pth/.pkl) are refused unless ``allow_pickle``.
    """
    root = Path(path).expanduser()
    if root.is_file() and root.suffix.lower() == ".safetensors" and (single := scan_single_file(root)) is not None:
        return single
    if root.is_file() and root.suffix.lower() in PICKLE_SUFFIXES and upscaler_files.is_upscaler_pickle(root):
        return _upscaler_pickle(root, allow_pickle)
    if root.is_file() and root.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES):
        # Conversion needs torch and diffusers, which this light client never imports (server side).
        raise ModelFilesError(
            f"{root} is a single-file checkpoint: convert it into a diffusers folder first with "
            "`latentwire models convert-single-file FILE OUT_DIR` (server install), then import OUT_DIR")
    if not root.is_dir():
        raise ModelFilesError(f"{root} is not a folder")
    hf = _hf_snapshot(root.absolute())
    if hf is not None:
        root, source, default_name = hf
    else:
        root = root.absolute()
        source, default_name = str(root.resolve()), root.name
    found: list[tuple[str, Path, int]] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real_dir = os.path.realpath(dirpath)
        if real_dir in seen_dirs:  # a symlink loop
            dirnames[:] = []
            continue
        seen_dirs.add(real_dir)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = Path(dirpath) / name
            rel = check_relative_path(full.relative_to(root).as_posix())
            real = Path(os.path.realpath(full))  # HF snapshots: a symlink into ../../blobs/
            try:
                info = real.stat()
            except FileNotFoundError:
                raise ModelFilesError(f"{full} is a broken symlink") from None
            if not stat.S_ISREG(info.st_mode):
                raise ModelFilesError(f"{full} is not a regular file")
            found.append((rel, real, info.st_size))
    if not found:
        raise ModelFilesError(f"{root} holds no files")
    pickles = [rel for rel, _, _ in found if rel.lower().endswith(PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        raise ModelFilesError(
            f"{root} holds pickle-based weights ({', '.join(pickles[:5])}); unpickling can run arbitrary code, "
            "so they are refused: convert them to safetensors, or pass --allow-pickle (allow_pickle=True) to "
            "import them anyway"
        )
    for rel, real, _ in found:
        if rel.lower().endswith(".safetensors") and (problem := safetensors_file_problem(real)) is not None:
            raise ModelFilesError(f"{rel} is not a safetensors file: {problem}")
    kind = _classify(root, {rel for rel, _, _ in found})
    files = [
        LocalFile(path=rel, source=real, size_bytes=size, sha256=sha256_file(real),
                  component=rel.split("/", 1)[0] if "/" in rel else "")
        for rel, real, size in found
    ]
    return FolderManifest(root=root, kind=kind, source=source, default_name=default_name, files=files)


#: Largest JSON file fetched with components not asked for (configs, not tokenizers or weights).
_CONFIG_BYTES = 64 * 1024


def select_files(version: registry_pb2.ModelVersion, components: Iterable[str] | None = None, *,
                 allow_pickle: bool = False) -> list[registry_pb2.ModelFile]:
    """The files of ``components`` (all when None) plus the top-level files and every component's small
    JSON config, checked for safe paths and pickles."""
    files = list(version.files)
    if components is not None:
        wanted = set(components)
        unknown = wanted - set(version.components)
        if unknown:
            raise ModelFilesError(f"{version.name} has no component(s) {', '.join(sorted(unknown))}; "
                                  f"it has {', '.join(version.components) or 'none'}")
        # Small JSON configs of the other components come along: a stage may need another
        # component's config (the denoiser reads vae/config.json for the latent scale factor).
        files = [f for f in files if f.component == "" or f.component in wanted
                 or (f.path.endswith(".json") and f.size_bytes <= _CONFIG_BYTES)]
    for f in files:
        check_relative_path(f.path)
    pickles = [f.path for f in files if f.path.lower().endswith(PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        raise ModelFilesError(f"{version.name} holds pickle-based weights ({', '.join(pickles[:5])}); "
                              "pass allow_pickle=True to fetch them anyway")
    return files


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable, where the file system allows it (the registry, a stage's
    model cache and downloads all rename verified files into place)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _ReadBlobChunk:
    """One ReadBlobResponse as the download loop needs it: ``data`` is a view of the received bytes, not a copy."""

    __slots__ = ("offset", "data", "size_bytes")

    def __init__(self, offset: int, data, size_bytes: int):
        self.offset, self.data, self.size_bytes = offset, data, size_bytes


def _read_varint(view: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _parse_read_blob_response(message: bytes) -> _ReadBlobChunk:
    """Decode a ReadBlobResponse without copying its data (protobuf's parser copies the bytes twice).

    Only the three fields of the contract are read, each as proto3 does (the last one wins);
    anything else (unknown fields, another encoding) goes through protobuf's own parser.
    """
    view = memoryview(message)
    offset = size = 0
    data = view[0:0]
    position = 0
    try:
        while position < len(view):
            tag = view[position]
            position += 1
            if tag == 0x08:
                offset, position = _read_varint(view, position)
            elif tag == 0x18:
                size, position = _read_varint(view, position)
            elif tag == 0x12:
                length, position = _read_varint(view, position)
                if position + length > len(view):
                    raise ValueError("truncated data")
                data = view[position:position + length]
                position += length
            else:
                raise ValueError("unexpected field")
    except (ValueError, IndexError):
        parsed = registry_pb2.ReadBlobResponse.FromString(message)
        return _ReadBlobChunk(parsed.offset, parsed.data, parsed.size_bytes)
    return _ReadBlobChunk(offset - (1 << 64) if offset >> 63 else offset, data,
                          size - (1 << 64) if size >> 63 else size)


class _Sink:
    """Hashes downloaded chunks on one thread and writes them on another, so the next chunk arrives meanwhile.

    hashlib and file writes release the GIL, so the three overlap for real: a download takes about
    the longest of receiving, hashing and writing instead of their sum. The writes append to ``path``
    from ``position`` with O_DIRECT where the disk takes it (``DirectAppender``).
    """

    def __init__(self, path: Path, position: int, hasher, depth: int = 4):
        self._hasher = hasher
        self._writer = DirectAppender(path, position)
        self._error: BaseException | None = None
        self._queues = (queue.Queue(maxsize=depth), queue.Queue(maxsize=depth))
        self._threads = (
            threading.Thread(target=self._drain, args=(self._queues[0], self._hash), name="registry-download-hash",
                             daemon=True),
            threading.Thread(target=self._drain, args=(self._queues[1], self._write), name="registry-download-write",
                             daemon=True),
        )
        for thread in self._threads:
            thread.start()

    def _hash(self, data) -> None:
        self._hasher.update(data)

    def _write(self, data) -> None:
        self._writer.write(data)

    def _drain(self, pending: queue.Queue, work: Callable) -> None:
        while (data := pending.get()) is not None:
            if self._error is None:
                try:
                    work(data)
                except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = error

    def put(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        for pending in self._queues:
            pending.put(data)

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc) -> None:
        for pending in self._queues:
            pending.put(None)
        for thread in self._threads:
            thread.join()
        try:
            self._writer.close()  # the last bytes into the file
        except OSError as error:
            self._error = self._error or error
        if self._error is not None and exc[0] is None:
            raise self._error


# ----------------------------------------------------------------------------------------------
# The client


class RegistryClient(BaseClient):
    """Talks to the registry at ``address`` (host:port).

    ``timeout`` bounds each unary call, in seconds; transfers (WriteBlob, ReadBlob) have no
    deadline, since their length depends on the file size, and resume instead after a break
    (``retries`` consecutive failures without progress are tolerated). ``security`` (a
    ``ChannelSecurity``) makes the channel TLS or mutual TLS; plaintext by default. ``address``
    defaults to $LATENTWIRE_REGISTRY, else localhost:50055. Failures raise LatentwireError.
    """

    stub_class = registry_pb2_grpc.RegistryServiceStub
    default_address = staticmethod(registry_address)

    def __init__(self, address: str | None = None, *, timeout: float | None = 60.0,
                 chunk_size: int = DEFAULT_CHUNK_BYTES, retries: int = 5, **connection):
        if not MIN_CHUNK_BYTES <= chunk_size <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_size must be {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES} bytes")
        # Reconnect quickly after a broken connection: a resumed transfer waits on it.
        super().__init__(address, timeout=timeout, options=[
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ], **connection)
        self.chunk_size = chunk_size
        self.retries = retries
        # ReadBlob as downloads call it: the same RPC, its responses decoded without copying the data.
        self._read_blob_stream = self._channel.unary_stream(
            "/latentwire.registry.v1.RegistryService/ReadBlob",
            request_serializer=registry_pb2.ReadBlobRequest.SerializeToString,
            response_deserializer=_parse_read_blob_response, _registered_method=True)

    # -- models ------------------------------------------------------------------------------

    def create_model(self, model_id: str, *, description: str = "", tags: dict[str, str] | None = None
                     ) -> registry_pb2.Model:
        """Register a new model name (ALREADY_EXISTS if it is taken)."""
        return self._call(self._stub.CreateModel, registry_pb2.CreateModelRequest(
            model_id=model_id, description=description, tags=tags or {})).model

    def get_model(self, name: str) -> registry_pb2.Model:
        """One model ("name" or "models/name") with its aliases and tags."""
        return self._call(self._stub.GetModel, registry_pb2.GetModelRequest(name=name)).model

    def list_models(self, *, page_size: int = 0, page_token: str = "") -> registry_pb2.ListModelsResponse:
        """One page of models, ordered by name."""
        return self._call(self._stub.ListModels,
                          registry_pb2.ListModelsRequest(page_size=page_size, page_token=page_token))

    def iter_models(self, *, page_size: int = 0) -> Iterator[registry_pb2.Model]:
        """Every model, page by page."""
        token = ""
        while True:
            page = self.list_models(page_size=page_size, page_token=token)
            yield from page.models
            token = page.next_page_token
            if not token:
                return

    def delete_model(self, name: str) -> None:
        """Remove a model with all its versions, aliases and tags."""
        self._call(self._stub.DeleteModel, registry_pb2.DeleteModelRequest(name=name))

    def set_model_tag(self, name: str, key: str, value: str) -> registry_pb2.Model:
        return self._call(self._stub.SetModelTag, registry_pb2.SetModelTagRequest(name=name, key=key, value=value)).model

    def delete_model_tag(self, name: str, key: str) -> registry_pb2.Model:
        return self._call(self._stub.DeleteModelTag, registry_pb2.DeleteModelTagRequest(name=name, key=key)).model

    def set_alias(self, name: str, alias: str, version: int) -> registry_pb2.Model:
        """Point ``alias`` at ``version`` (atomically replacing its previous target)."""
        return self._call(self._stub.SetAlias,
                          registry_pb2.SetAliasRequest(name=name, alias=alias, version=version)).model

    def delete_alias(self, name: str, alias: str) -> registry_pb2.Model:
        return self._call(self._stub.DeleteAlias, registry_pb2.DeleteAliasRequest(name=name, alias=alias)).model

    # -- versions ----------------------------------------------------------------------------

    @staticmethod
    def version_name(model: str, version: int) -> str:
        return f"models/{model.removeprefix('models/')}/versions/{version}"

    def get_model_version(self, model: str, version: int) -> registry_pb2.ModelVersion:
        return self._call(self._stub.GetModelVersion,
                          registry_pb2.GetModelVersionRequest(name=self.version_name(model, version))).model_version

    def list_model_versions(self, model: str, *, page_size: int = 0, page_token: str = ""
                            ) -> registry_pb2.ListModelVersionsResponse:
        """One page of a model's versions, newest first."""
        return self._call(self._stub.ListModelVersions, registry_pb2.ListModelVersionsRequest(
            parent=model, page_size=page_size, page_token=page_token))

    def iter_model_versions(self, model: str, *, page_size: int = 0) -> Iterator[registry_pb2.ModelVersion]:
        token = ""
        while True:
            page = self.list_model_versions(model, page_size=page_size, page_token=token)
            yield from page.model_versions
            token = page.next_page_token
            if not token:
                return

    def delete_model_version(self, model: str, version: int) -> None:
        self._call(self._stub.DeleteModelVersion,
                   registry_pb2.DeleteModelVersionRequest(name=self.version_name(model, version)))

    def set_model_version_tag(self, model: str, version: int, key: str, value: str) -> registry_pb2.ModelVersion:
        return self._call(self._stub.SetModelVersionTag, registry_pb2.SetModelVersionTagRequest(
            name=self.version_name(model, version), key=key, value=value)).model_version

    def resolve(self, reference: str) -> registry_pb2.ModelVersion:
        """"name" (the default alias, else the latest version), "name@3" or "name@alias" -> that version."""
        return self._call(self._stub.ResolveModel, registry_pb2.ResolveModelRequest(reference=reference)).model_version

    def _as_version(self, version: str | registry_pb2.ModelVersion) -> registry_pb2.ModelVersion:
        return version if isinstance(version, registry_pb2.ModelVersion) else self.resolve(version)

    # -- blobs -------------------------------------------------------------------------------

    def query_blob(self, sha256: str) -> registry_pb2.QueryBlobResponse:
        return self._call(self._stub.QueryBlob, registry_pb2.QueryBlobRequest(sha256=sha256))

    def upload_blob(self, source: str | os.PathLike, sha256: str, size_bytes: int) -> tuple[bool, int]:
        """Upload one file as a blob unless it is stored; resume a pending upload.

        Returns (whether this call stored it, bytes sent).
        """
        sent = 0
        failures = 0
        while True:
            state = self.query_blob(sha256)
            if state.complete:
                return False, sent
            offset = state.committed_size if state.committed_size <= size_bytes else 0
            counter = [0]
            try:
                response = self._stub.WriteBlob(self._chunks(Path(source), sha256, size_bytes, offset, counter),
                                                wait_for_ready=failures > 0)
                sent += counter[0]
                if response.complete:
                    return True, sent
                raise RegistryError(grpc.StatusCode.INTERNAL, "WriteBlob ended without storing the blob")
            except grpc.RpcError as rpc_error:
                sent += counter[0]
                error = RegistryError.from_rpc(rpc_error)
                # DATA_LOSS: the server discarded a bad upload; INVALID_WRITE_OFFSET: another writer moved it.
                again = error.code in _RETRYABLE or error.code == grpc.StatusCode.DATA_LOSS or \
                    error.reason == "INVALID_WRITE_OFFSET"
                failures = 0 if counter[0] else failures + 1
                if not again or failures > self.retries:
                    raise error from None
                time.sleep(min(2.0, 0.1 * 2 ** failures))

    def collect_garbage(self, *, dry_run: bool = False) -> registry_pb2.CollectGarbageResponse:
        """Remove abandoned uploads and blobs no version lists (with ``dry_run``: only say what would go)."""
        return self._call(self._stub.CollectGarbage, registry_pb2.CollectGarbageRequest(dry_run=dry_run))

    def _chunks(self, source: Path, sha256: str, size_bytes: int, offset: int, counter: list[int]
                ) -> Iterator[registry_pb2.WriteBlobRequest]:
        with open(source, "rb") as file:
            file.seek(offset)
            while True:
                data = file.read(min(self.chunk_size, size_bytes - offset))
                last = offset + len(data) >= size_bytes
                yield registry_pb2.WriteBlobRequest(sha256=sha256, size_bytes=size_bytes, offset=offset, data=data,
                                                    finish_write=last)
                offset += len(data)
                counter[0] += len(data)
                if last:
                    return
                if not data:
                    raise ModelFilesError(f"{source} is shorter than when it was hashed")

    def read_blob(self, sha256: str, dest: str | os.PathLike, *, size_bytes: int | None = None,
                  on_chunk: Callable[[int, int], None] | None = None) -> TransferResult:
        """Download a blob into ``dest``, appending to what ``dest`` already holds (a resumed download).

        A broken stream resumes from the last offset; the bytes are verified against ``sha256``
        (the file is deleted and DATA_LOSS raised when they do not match). ``on_chunk(offset, size)``
        sees every chunk. Returns the bytes received and how many times the stream was resumed.
        """
        dest = Path(dest)
        result = TransferResult(folder=dest.parent)
        for attempt in range(2):
            with open(dest, "a+b") as out:
                hasher, position = hashlib.sha256(), 0
                out.seek(0)
                while block := out.read(MAX_CHUNK_BYTES):
                    hasher.update(block)
                    position += len(block)
                if size_bytes is not None and position > size_bytes:
                    out.truncate(0)
                    hasher, position = hashlib.sha256(), 0
                resumed_from = position
                try:
                    total = self._read_into(sha256, out, hasher, position, result, on_chunk)
                except RegistryError as error:
                    if error.code == grpc.StatusCode.DATA_LOSS:  # bytes of a corrupt blob are worth nothing
                        out.close()
                        dest.unlink(missing_ok=True)
                    raise
                out.flush()
                os.fsync(out.fileno())
            position = dest.stat().st_size
            if position == total and hasher.hexdigest() == sha256:
                return result
            dest.unlink(missing_ok=True)
            if resumed_from == 0 or attempt:  # a stale local prefix gets one fresh try
                raise RegistryError(grpc.StatusCode.DATA_LOSS,
                                    f"blob {sha256}: the downloaded bytes do not match their sha256",
                                    reason="DOWNLOAD_DIGEST_MISMATCH", metadata={"sha256": sha256})
        raise AssertionError("unreachable")

    def _read_into(self, sha256, out, hasher, position, result: TransferResult, on_chunk) -> int:
        """Stream the blob from ``position`` into ``out``, resuming after breaks; return the blob's size."""
        total, failures, first = -1, 0, True
        with _Sink(Path(out.name), position, hasher) as sink:
            while True:
                try:
                    stream = self._read_blob_stream(
                        registry_pb2.ReadBlobRequest(sha256=sha256, offset=position, chunk_size=self.chunk_size),
                        wait_for_ready=not first)
                    for chunk in stream:
                        if chunk.offset != position:
                            stream.cancel()
                            raise RegistryError(grpc.StatusCode.DATA_LOSS,
                                                f"blob {sha256}: chunk at offset {chunk.offset}, expected {position}",
                                                reason="DOWNLOAD_OUT_OF_ORDER")
                        total = chunk.size_bytes
                        sink.put(chunk.data)
                        position += len(chunk.data)
                        result.bytes_received += len(chunk.data)
                        if chunk.data:
                            failures = 0
                        if on_chunk is not None:
                            on_chunk(chunk.offset, len(chunk.data))
                    return total
                except grpc.RpcError as rpc_error:
                    first = False
                    error = RegistryError.from_rpc(rpc_error)
                    failures += 1
                    if error.code not in _RETRYABLE or failures > self.retries:
                        raise error from None
                    result.resumes += 1
                    time.sleep(min(2.0, 0.05 * 2 ** failures))

    # -- import ------------------------------------------------------------------------------

    def upload_folder(self, path: str | os.PathLike, *, allow_pickle: bool = False,
                      manifest: FolderManifest | None = None) -> UploadResult:
        """Scan a folder (unless ``manifest`` is given) and upload every blob the registry does not hold."""
        manifest = manifest or scan_folder(path, allow_pickle=allow_pickle)
        result = UploadResult(manifest=manifest)
        done: set[str] = set()
        for f in manifest.files:
            if f.sha256 in done:
                continue
            done.add(f.sha256)
            uploaded, sent = self.upload_blob(f.source, f.sha256, f.size_bytes)
            result.bytes_sent += sent
            if uploaded:
                result.blobs_uploaded += 1
            else:
                result.blobs_present += 1
        return result

    def create_model_version(self, name: str, manifest: FolderManifest, *, aliases: Iterable[str] = (),
                             tags: dict[str, str] | None = None, description: str = "") -> registry_pb2.ModelVersion:
        """Record a version from an uploaded manifest (FAILED_PRECONDITION, recording nothing, if a blob is missing)."""
        return self._call(self._stub.CreateModelVersion, registry_pb2.CreateModelVersionRequest(
            name=name, kind=manifest.kind, source=manifest.source, files=[f.to_proto() for f in manifest.files],
            tags=tags or {}, description=description, aliases=list(aliases))).model_version

    def import_folder(self, folder: str | os.PathLike | FolderManifest, name: str | None = None, *,
                      aliases: Iterable[str] = (), tags: dict[str, str] | None = None, description: str = "",
                      allow_pickle: bool = False, new_version: bool = False) -> ImportResult:
        """Import a diffusers, transformers or Hugging Face snapshot folder as a version of ``name``.

        The one import path (``latentwire models import`` and ``latentwire up``'s seeding call it):

        1. scan the folder (or take the ``scan_folder`` manifest passed as ``folder``);
        2. upload the blobs the registry lacks (QueryBlob first: usually none on a second import;
           a blob the registry took out of service as corrupt goes up again);
        3. unless ``new_version``: if one of ``aliases`` already names a version with exactly these
           files (and the requested tags and description), keep that version and point the other
           aliases at it, so importing the same folder again adds no version;
        4. otherwise record the version with its aliases, tags and description in one
           CreateModelVersion.

        ``name`` defaults to the folder's name (the repo name for a Hugging Face cache folder).
        A folder the project's trainer made (a ``RECORD.json`` in it or beside it: :func:`training_record_tags`)
        gets its record's ``training.seed``, ``training.commit`` and ``training.command`` tags, under ``tags``.
        A failure at any point records no version; blobs already uploaded are reused next time.
        """
        manifest = folder if isinstance(folder, FolderManifest) else scan_folder(folder, allow_pickle=allow_pickle)
        name = name or manifest.default_name
        if not is_valid_model_name(name):
            raise ModelFilesError(f"{name!r} is not a valid model name; pass one (letters, digits, '-', '_', '.')")
        aliases = list(dict.fromkeys(aliases))
        source = Path(manifest.source)
        # A folder's record, or a single file's (a LoRA: the record in its folder or the one above).
        record = (training_record_tags(manifest.root) if source.is_dir()
                  else training_record_tags(source) if source.is_file() else {})
        tags = {**record, **(tags or {})}
        uploaded = self.upload_folder(manifest.root, manifest=manifest)
        kept = None if new_version else self._aliased_version_holding(name, aliases, manifest, tags, description)
        if kept is not None:
            version = kept
            model = self.get_model(name)
            for alias in aliases:
                if model.aliases.get(alias) != kept.version:
                    self.set_alias(name, alias, kept.version)
        else:
            try:
                version = self.create_model_version(name, manifest, aliases=aliases, tags=tags,
                                                    description=description)
            except RegistryError as error:
                if error.reason != "BLOB_MISSING":
                    raise
                # Garbage collection took a blob this import found stored (it had no version and was
                # older than the registry's grace): upload what is missing again, once.
                again = self.upload_folder(manifest.root, manifest=manifest)
                uploaded.bytes_sent += again.bytes_sent
                uploaded.blobs_uploaded += again.blobs_uploaded
                version = self.create_model_version(name, manifest, aliases=aliases, tags=tags,
                                                    description=description)
        return ImportResult(model_version=version, manifest=manifest, created=kept is None,
                            bytes_sent=uploaded.bytes_sent, blobs_uploaded=uploaded.blobs_uploaded,
                            blobs_present=uploaded.blobs_present)

    def _aliased_version_holding(self, name: str, aliases: list[str], manifest: FolderManifest,
                                 tags: dict[str, str], description: str) -> registry_pb2.ModelVersion | None:
        """The first version one of ``aliases`` names whose files, kind, tags and description match; else None."""
        wanted = sorted((f.path, f.size_bytes, f.sha256) for f in manifest.files)
        for alias in aliases:
            try:
                version = self.resolve(f"{name}@{alias}")
            except RegistryError as error:
                if error.code == grpc.StatusCode.NOT_FOUND:  # no such model or alias yet
                    continue
                raise
            if (
                version.kind == manifest.kind
                and sorted((f.path, f.size_bytes, f.sha256) for f in version.files) == wanted
                and tags.items() <= dict(version.tags).items()
                and description in ("", version.description)
            ):
                return version
        return None

    # -- download ----------------------------------------------------------------------------

    def download_files(self, version: str | registry_pb2.ModelVersion, dest_dir: str | os.PathLike,
                       components: Iterable[str] | None = None, *, allow_pickle: bool = False) -> TransferResult:
        """Download a version's files (only ``components`` and the top-level files, when given) into ``dest_dir``.

        Each file arrives as ``<path>.partial``, is verified, then renamed into place; files already
        there with the right sha256 are kept. A broken stream resumes from its offset.
        """
        version = self._as_version(version)
        files = select_files(version, components, allow_pickle=allow_pickle)
        dest_dir = Path(dest_dir).expanduser()
        result = TransferResult(folder=dest_dir)
        for f in files:
            target = dest_dir / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            result.files.append(f.path)
            if target.is_file() and target.stat().st_size == f.size_bytes and sha256_file(target) == f.sha256:
                result.blobs_reused += 1
                continue
            partial = target.with_name(target.name + ".partial")
            self._download(f.sha256, partial, f.size_bytes, result)
            os.replace(partial, target)
            fsync_dir(target.parent)
        return result

    def _download(self, sha256: str, partial: Path, size_bytes: int, result: TransferResult) -> None:
        got = self.read_blob(sha256, partial, size_bytes=size_bytes)
        result.bytes_received += got.bytes_received
        result.resumes += got.resumes
        result.blobs_downloaded += 1

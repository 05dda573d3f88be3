"""The registry's rules for what callers send: names, aliases, tags, file manifests, ranges and page tokens.

Every check raises ``InvalidArgument`` with a stable reason naming the field, before anything
touches SQLite or the blob store. Nothing here does IO.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from typing import TYPE_CHECKING

# The chunk bounds are shared with the client (a rule lives once): most bytes in one WriteBlob or ReadBlob
# chunk; ReadBlob's chunk size when the request sends 0; fewest bytes in a chunk on the wire (ReadBlob's
# chunk_size, every WriteBlob chunk but a stream's last), so a caller cannot ask for 1-byte messages.
from latentwire.client.families import REGISTRY_KINDS, family_name_of_index, family_of_kind
from latentwire.client.registry import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, PICKLE_SUFFIXES
from latentwire.client.registry import MIN_CHUNK_BYTES as MIN_WIRE_CHUNK_BYTES
from latentwire.client.upscaler_files import UPSCALER_FILES
from services.runtime.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, quote

if TYPE_CHECKING:
    from .metadata import FileEntry

#: Page size when a List request sends 0, and the largest one served.
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
#: Most files in one version.
MAX_FILES = 100_000

#: Version kinds (the names of latentwire.registry.v1.ModelKind) and the file each needs at the top level:
#: a pipeline family's model_index.json (which must name a pipeline of that family, check_model_index),
#: a ControlNet's, a classifier's or a preview VAE's config.json, a LoRA's or an embedding's one safetensors file.
KINDS = {
    **{kind: "model_index.json" for kind in REGISTRY_KINDS.values()},
    "MODEL_KIND_CONTROLNET": "config.json",
    "MODEL_KIND_IMAGE_CLASSIFIER": "config.json",
    "MODEL_KIND_PREVIEW_VAE": "config.json",  # a diffusers AutoencoderTiny folder (TAESD, ...)
    # One-file kinds: the file the client stores a single .safetensors as (latentwire.client.registry).
    "MODEL_KIND_LORA": "lora.safetensors",
    "MODEL_KIND_TEXTUAL_INVERSION": "embedding.safetensors",
    # An ESRGAN-type upscaler: upscaler.safetensors, or upscaler.pth where pickles are allowed (upscaler_files.py).
    "MODEL_KIND_UPSCALER": UPSCALER_FILES,
}
#: Largest model_index.json read to check a version's family (the real ones are under 1 KB).
MAX_MODEL_INDEX_BYTES = 64 * 1024

_MODEL_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_ALIAS = re.compile(r"[A-Za-z0-9_-]{1,128}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"[1-9][0-9]{0,17}")
_PATH_SEGMENT = re.compile(r"[^\x00-\x1f\x7f\\]{1,255}")


# ----------------------------------------------------------------------------------------------
# Names


def check_model_id(model_id: str, field_name: str = "name") -> str:
    """A model's short name: letters, digits, '-', '_' and '.', 1 to 128 characters, not starting with '.'.

    '..' anywhere is refused as well: the name becomes a folder name in client caches.
    """
    if not _MODEL_ID.fullmatch(model_id) or ".." in model_id:
        raise InvalidArgument(
            f"{field_name} {quote(model_id)} is not a valid model name: use 1 to 128 letters, digits, '-', '_' and '.', "
            "not starting with '.' and without '..'",
            reason="INVALID_MODEL_NAME",
            metadata={"field": field_name},
        )
    return model_id


def parse_model_name(name: str, field_name: str = "name") -> str:
    """'models/{model}' or the bare short name -> the short name."""
    return check_model_id(name.removeprefix("models/"), field_name)


def parse_version_name(name: str, field_name: str = "name") -> tuple[str, int]:
    """'models/{model}/versions/{version}' -> (short name, version number)."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "models" or parts[2] != "versions" or not _VERSION.fullmatch(parts[3]):
        raise InvalidArgument(
            f"{field_name} {name!r} is not a version name; expected 'models/{{model}}/versions/{{version}}' "
            "with a version number >= 1",
            reason="INVALID_VERSION_NAME",
            metadata={"field": field_name},
        )
    return check_model_id(parts[1], field_name), int(parts[3])


def parse_reference(reference: str) -> tuple[str, int | None, str | None]:
    """'name', 'name@VERSION' or 'name@ALIAS' -> (short name, version or None, alias or None).

    A bare name asks for neither; the caller falls back to the "default" alias, then the latest version.
    """
    name, sep, ref = reference.partition("@")
    model_id = parse_model_name(name, "reference")
    if sep and not ref:
        raise InvalidArgument(f"reference {reference!r} ends in '@'; use NAME, NAME@VERSION or NAME@ALIAS",
                              reason="INVALID_REFERENCE", metadata={"field": "reference"})
    if ref and ref.isdigit():
        if not _VERSION.fullmatch(ref):
            raise InvalidArgument(f"version {ref!r} is not a version number", reason="INVALID_REFERENCE")
        return model_id, int(ref), None
    return model_id, None, check_alias(ref) if ref else None


def check_alias(alias: str) -> str:
    """Letters, digits, '-' and '_', 1 to 128 characters, not all digits (those are version numbers)."""
    if not _ALIAS.fullmatch(alias) or alias.isdigit():
        raise InvalidArgument(
            f"alias {alias!r} is not valid: use 1 to 128 letters, digits, '-' and '_', not all digits",
            reason="INVALID_ALIAS",
            metadata={"field": "alias"},
        )
    return alias


# ----------------------------------------------------------------------------------------------
# Tags and text


def check_tag(key: str, value: str) -> None:
    """Tag key: 1 to 250 printable characters; value: at most 5000 characters."""
    if not 1 <= len(key) <= 250 or not key.isprintable():
        raise InvalidArgument(f"tag key {key!r} must be 1 to 250 printable characters", reason="INVALID_TAG",
                              metadata={"field": "key"})
    if len(value) > 5000:
        raise InvalidArgument(f"tag {key!r}: the value has {len(value)} characters; at most 5000",
                              reason="INVALID_TAG", metadata={"field": "value"})


def check_tags(tags: dict[str, str]) -> dict[str, str]:
    for key, value in tags.items():
        check_tag(key, value)
    return dict(tags)


def check_text(value: str, field_name: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidArgument(f"{field_name} has {len(value)} characters; at most {limit}",
                              reason="INVALID_ARGUMENT", metadata={"field": field_name})
    return value


def check_kind(kind: str) -> str:
    """One of the kinds the registry stores (the servicer sends "" for an enum number it does not know)."""
    if kind not in KINDS:
        raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}", reason="INVALID_KIND",
                              metadata={"field": "kind"})
    return kind


# ----------------------------------------------------------------------------------------------
# Files and blobs


def check_sha256(sha256: str, field_name: str = "sha256") -> str:
    """Lowercase hex, 64 characters."""
    if not _SHA256.fullmatch(sha256):
        raise InvalidArgument(f"{field_name} {sha256[:80]!r} is not a lowercase hex sha256 (64 characters)",
                              reason="INVALID_SHA256", metadata={"field": field_name})
    return sha256


def check_file_path(path: str) -> str:
    """A relative '/'-separated path without '.', '..' or empty segments, backslashes or control characters."""
    segments = path.split("/")
    if (
        not path
        or len(path) > 1024
        or any(s in (".", "..") or not _PATH_SEGMENT.fullmatch(s) for s in segments)
    ):
        raise InvalidArgument(
            f"file path {path[:200]!r} is not a relative '/'-separated path inside the model folder",
            reason="INVALID_FILE_PATH",
            metadata={"field": "files.path"},
        )
    return path


def check_files(files: list[FileEntry], kind: str, max_blob_bytes: int) -> list[FileEntry]:
    """A version's manifest: safe unique paths, one size per sha256, components matching folders, the kind's
    top-level file present. Returns the files sorted by path."""
    if not files:
        raise InvalidArgument("a version needs at least one file", reason="NO_FILES", metadata={"field": "files"})
    if len(files) > MAX_FILES:
        raise InvalidArgument(f"{len(files)} files; at most {MAX_FILES}", reason="TOO_MANY_FILES")
    sizes: dict[str, int] = {}
    paths: set[str] = set()
    for f in files:
        check_file_path(f.path)
        check_sha256(f.sha256, "files.sha256")
        if f.path in paths:
            raise InvalidArgument(f"file {f.path!r} is listed twice", reason="DUPLICATE_FILE")
        paths.add(f.path)
        if not 0 <= f.size_bytes <= max_blob_bytes:
            raise InvalidArgument(f"file {f.path!r}: size_bytes {f.size_bytes} is outside "
                                  f"0..{max_blob_bytes}", reason="INVALID_BLOB_SIZE")
        if sizes.setdefault(f.sha256, f.size_bytes) != f.size_bytes:
            raise InvalidArgument(f"sha256 {f.sha256} is listed with two sizes", reason="INCONSISTENT_FILES")
        expected = f.path.split("/", 1)[0] if "/" in f.path else ""
        if f.component != expected:
            raise InvalidArgument(
                f"file {f.path!r} belongs to component {expected!r} (its first folder), not {f.component!r}",
                reason="INVALID_COMPONENT", metadata={"field": "files.component"})
    needed = KINDS[kind]
    if isinstance(needed, tuple):  # one of several formats
        needed = next((n for n in needed if n in paths), " or ".join(needed))
    if needed not in paths:
        raise InvalidArgument(f"a {kind} version needs a top-level {needed}", reason="MISSING_FILE",
                              metadata={"path": needed})
    return sorted(files, key=lambda f: f.path)


def check_model_index(kind: str, content: bytes | None) -> None:
    """A pipeline version's model_index.json (its stored bytes; None when too large) names a pipeline of the
    version's kind's family: an SDXL folder recorded as MODEL_KIND_FLUX would load the wrong code in every stage."""
    expected = family_of_kind(kind)
    if expected is None:
        return
    try:
        if content is None:
            raise ValueError(f"it is larger than {MAX_MODEL_INDEX_BYTES} bytes")
        index = json.loads(content)
        if not isinstance(index, dict):
            raise ValueError("it is not a JSON object")
        found = family_name_of_index(index)
    except (ValueError, UnicodeDecodeError) as error:  # json's errors are ValueErrors
        raise InvalidArgument(f"a {kind} version's model_index.json does not name a pipeline latentwire serves: "
                              f"{str(error)[:300]}", reason="INVALID_MODEL_INDEX",
                              metadata={"path": "model_index.json"}) from None
    if found != expected:
        raise InvalidArgument(
            f"kind {kind} does not match the version's model_index.json, which names a {found} pipeline "
            f"(kind {REGISTRY_KINDS[found]}); send that kind, or the files of a {expected} model",
            reason="KIND_MISMATCH", metadata={"field": "kind", "model_index_family": found})


def check_blob_size(size_bytes: int, max_blob_bytes: int) -> int:
    """An upload's declared size: negative is INVALID_ARGUMENT; above --max-blob-bytes, RESOURCE_EXHAUSTED."""
    if size_bytes < 0:
        raise InvalidArgument(f"size_bytes {size_bytes} is negative", reason="INVALID_BLOB_SIZE",
                              metadata={"field": "size_bytes"})
    if size_bytes > max_blob_bytes:
        raise ResourceExhausted(
            f"size_bytes {size_bytes} is more than the {max_blob_bytes} bytes this registry takes in one file "
            "(--max-blob-bytes)",
            reason="BLOB_TOO_LARGE", metadata={"size_bytes": size_bytes, "max_blob_bytes": max_blob_bytes})
    return size_bytes


def check_read_range(offset: int, limit: int, chunk_size: int) -> int:
    """A ReadBlob request's range and chunk size; returns the chunk size to use (0 -> the default)."""
    chunk_size = chunk_size or DEFAULT_CHUNK_BYTES
    if not 0 < chunk_size <= MAX_CHUNK_BYTES:
        raise InvalidArgument(f"chunk_size {chunk_size} is outside 1..{MAX_CHUNK_BYTES}",
                              reason="INVALID_CHUNK_SIZE", metadata={"field": "chunk_size"})
    if offset < 0 or limit < 0:
        raise InvalidArgument("offset and limit must be >= 0", reason="INVALID_RANGE",
                              metadata={"field": "offset" if offset < 0 else "limit"})
    return chunk_size


def check_wire_chunk_size(chunk_size: int) -> int:
    """ReadBlob's chunk_size as a caller sends it: 0 (the default) or MIN_WIRE_CHUNK_BYTES..MAX_CHUNK_BYTES.

    The store reads any chunk size; the lower bound is a transport rule, applied to what arrives over gRPC.
    """
    if chunk_size and not MIN_WIRE_CHUNK_BYTES <= chunk_size <= MAX_CHUNK_BYTES:
        raise InvalidArgument(
            f"chunk_size {chunk_size} is outside {MIN_WIRE_CHUNK_BYTES}..{MAX_CHUNK_BYTES} bytes; "
            "send 0 for the default (1 MiB)",
            reason="INVALID_CHUNK_SIZE", metadata={"field": "chunk_size"})
    return chunk_size


def check_write_chunk_followed(offset: int, length: int) -> None:
    """A WriteBlob chunk that another chunk follows must carry at least MIN_WIRE_CHUNK_BYTES.

    Only a stream's last chunk may be short (the end of a file, or an upload cut short and resumed later).
    """
    if length < MIN_WIRE_CHUNK_BYTES:
        raise InvalidArgument(
            f"WriteBlob chunk at offset {offset} has {length} bytes and is not the stream's last; every chunk "
            f"but the last must carry {MIN_WIRE_CHUNK_BYTES}..{MAX_CHUNK_BYTES} bytes (the client default is 1 MiB)",
            reason="CHUNK_TOO_SMALL", metadata={"field": "data", "offset": str(offset)})


def check_pickle_free(files: list[FileEntry], allow_pickle: bool) -> None:
    """Refuse pickle-based weight files (unpickling runs code) unless the registry runs with --allow-pickle."""
    if allow_pickle:
        return
    pickled = [f.path for f in files if f.path.lower().endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise FailedPrecondition(
            f"{len(pickled)} pickle-based weight file(s), first {quote(pickled[0])}: unpickling runs code, so this "
            f"registry stores no {'/'.join(PICKLE_SUFFIXES)} files; convert the weights to safetensors, or start "
            "the registry with --allow-pickle",
            reason="PICKLE_REFUSED", metadata={"field": "files.path"})


def check_safetensors(path: str, sha256: str, problem: str | None) -> None:
    """Refuse a version file named *.safetensors whose stored bytes are not safetensors (``problem`` says why)."""
    if problem is not None:
        raise InvalidArgument(
            f"file {quote(path)} is named .safetensors but is not a safetensors file: {problem}; upload the real "
            "weights (a pickle renamed .safetensors is refused)",
            reason="INVALID_SAFETENSORS", metadata={"path": path, "sha256": sha256})


# ----------------------------------------------------------------------------------------------
# Paging (AIP-158)


def page_size_of(page_size: int) -> int:
    """0 -> the default; above the maximum -> the maximum (AIP-158); negative -> INVALID_ARGUMENT."""
    if page_size < 0:
        raise InvalidArgument(f"page_size {page_size} is negative", reason="INVALID_PAGE_SIZE",
                              metadata={"field": "page_size"})
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(scope: str, after) -> str:
    """An opaque token naming the listing it belongs to and where the next page starts."""
    raw = json.dumps({"scope": scope, "after": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, scope: str, kind: type):
    """The position inside ``token``; INVALID_ARGUMENT for a token that is garbled or from another listing."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        if data["scope"] != scope or type(data["after"]) is not kind:
            raise ValueError(scope)
        return data["after"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InvalidArgument("page_token is not a token this listing returned; start again without one",
                              reason="INVALID_PAGE_TOKEN", metadata={"field": "page_token"}) from None

"""Models a service holds: local folders or registry models, loaded on demand under a memory bound."""
from __future__ import annotations

import collections
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, TypeVar

import grpc
import torch

from latentwire.common.v1 import status_pb2

from .config import ModelSpec
from .device import dtype_name
from .errors import FailedPrecondition, InvalidArgument, ModelFolderError, NotFound, Unavailable, quote

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Pickle-based weight files: unpickling them can run arbitrary code, so they load only with --allow-pickle.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
#: ModelStore.fetch_of_kind's reasons: the registry has no such model; the name is a model of another kind.
LORA_NOT_FOUND = "LORA_NOT_FOUND"
NOT_A_LORA = "NOT_A_LORA"
EMBEDDING_NOT_FOUND = "EMBEDDING_NOT_FOUND"
NOT_AN_EMBEDDING = "NOT_AN_EMBEDDING"
PREVIEW_VAE_NOT_FOUND = "PREVIEW_VAE_NOT_FOUND"
NOT_A_PREVIEW_VAE = "NOT_A_PREVIEW_VAE"
UPSCALER_NOT_FOUND = "UPSCALER_NOT_FOUND"
NOT_AN_UPSCALER = "NOT_AN_UPSCALER"


@dataclass
class LoadedModel(Generic[T]):
    """A loaded model: its spec, the domain object the service built from it, and its size in memory."""

    spec: ModelSpec
    model: T
    size_bytes: int = 0


def module_bytes(obj: object) -> int:
    """Bytes of the parameters and buffers of every torch module held by ``obj``'s attributes."""
    total = 0
    for value in vars(obj).values():
        if isinstance(value, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in (*value.parameters(), *value.buffers()))
    return total


class ModelStore(Generic[T]):
    """The models one service holds, under a memory bound (least recently used unloaded first).

    Models are local folders given with ``--model`` or registry references. A registry reference
    is resolved on each use (an alias may move), except "name@VERSION", which never changes; its
    files are fetched into a digest-keyed cache shared by versions, then loaded. A model a request
    names that is not in memory is loaded on first use.
    """

    def __init__(
        self,
        specs: list[ModelSpec],
        device: torch.device,
        dtype: torch.dtype,
        loader: Callable[[ModelSpec], T],
        *,
        components: tuple[str, ...],
        registry: str | None = None,
        cache_dir: Path | None = None,
        allow_pickle: bool = False,
        max_bytes: int = 0,
    ):
        self.specs = list(specs)
        self.device = device
        self.dtype = dtype
        self.components = components
        self.max_bytes = max_bytes
        self._loader = loader
        self._local = {s.name: s for s in specs if s.path is not None}
        self._registry_address = registry
        self._registry = None
        self._cache_dir = cache_dir
        self._allow_pickle = allow_pickle
        self._loaded: collections.OrderedDict[str, LoadedModel[T]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)

    @property
    def default_name(self) -> str:
        return self.specs[0].name

    def lookup(self, name: str) -> LoadedModel[T] | None:
        """The loaded model a name means without any I/O: a local name, or an exact "name@VERSION" key."""
        name = name or self.default_name
        with self._lock:
            loaded = self._loaded.get(name)
            if loaded is not None:
                self._loaded.move_to_end(name)
            return loaded

    def resolve(self, name: str) -> ModelSpec:
        """Turn a request's model name into a loadable spec (blocking: may ask the registry and fetch files)."""
        name = name or self.default_name
        if name in self._local:
            return self._local[name]
        if self._registry_address is None:
            known = ", ".join(repr(n) for n in self._local)
            raise NotFound(f"model {quote(name)} is not served here; known models: {known}",
                           reason="MODEL_NOT_FOUND", metadata={"model": name})
        from latentwire.client.registry import ModelFilesError, RegistryError

        self._registry_client()
        try:
            version = self._registry.resolve(name)
            key = f"{version.model_id}@{version.version}"
            if self.lookup(key) is not None:
                return ModelSpec(name=key, path=None)
            fetched = self._model_cache.fetch(version, self._components_of(version), allow_pickle=self._allow_pickle)
        except RegistryError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"model {quote(name)}: {error.message}", reason="MODEL_NOT_FOUND",
                               metadata={"model": name}) from None
            if error.code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(f"model {quote(name)}: {error.message}",
                                      reason="INVALID_MODEL_REFERENCE") from None
            raise Unavailable(f"the model registry failed to provide {quote(name)}: {error.message}",
                              reason="REGISTRY_UNAVAILABLE") from None
        except ModelFilesError as error:
            raise FailedPrecondition(f"model {quote(name)}: {error}", reason="MODEL_FILES_REFUSED") from None
        return ModelSpec(name=key, path=fetched.folder)

    def _registry_client(self):
        """The registry client and model cache, made on first use."""
        if self._registry is None:
            from latentwire.client.registry import RegistryClient

            from .model_cache import ModelCache
            from .security import default_channel_security

            self._registry = RegistryClient(self._registry_address, security=default_channel_security())
            self._model_cache = ModelCache(self._registry, self._cache_dir)
        return self._registry

    def fetch_one_file(self, name: str, kind: str) -> tuple[str, Path]:
        """A registry model of a one-file ``kind`` (MODEL_KIND_LORA, MODEL_KIND_TEXTUAL_INVERSION): its version key
        "name@VERSION" and its fetched file (blocking)."""
        from latentwire.client.registry import SINGLE_FILE_NAMES
        from latentwire.registry.v1 import registry_pb2

        key, folder = self.fetch_of_kind(name, kind)
        return key, folder / SINGLE_FILE_NAMES[registry_pb2.ModelKind.Value(kind)]

    def fetch_of_kind(self, name: str, kind: str, *, allow_pickle: bool = False) -> tuple[str, Path]:
        """A registry model of ``kind`` (MODEL_KIND_LORA, MODEL_KIND_TEXTUAL_INVERSION, MODEL_KIND_PREVIEW_VAE,
        MODEL_KIND_UPSCALER): its version key "name@VERSION" and its fetched folder, top-level files only (blocking).
        NOT_FOUND without a registry or such a model, INVALID_ARGUMENT for a model of another kind (reasons per
        kind); pickle files only with ``allow_pickle``."""
        from latentwire.client.registry import ModelFilesError, RegistryError
        from latentwire.registry.v1 import registry_pb2

        if kind not in ("MODEL_KIND_LORA", "MODEL_KIND_TEXTUAL_INVERSION", "MODEL_KIND_PREVIEW_VAE",
                        "MODEL_KIND_UPSCALER"):
            raise ValueError(f"fetch_of_kind has no reasons for {kind}")  # a caller's bug: add the kind's reasons
        lora, embedding = kind == "MODEL_KIND_LORA", kind == "MODEL_KIND_TEXTUAL_INVERSION"
        preview_vae = kind == "MODEL_KIND_PREVIEW_VAE"
        what = ("LoRA" if lora else "textual-inversion embedding" if embedding else "preview VAE" if preview_vae
                else "upscaler")
        # The reasons are written out at each raise (not held in a variable): tests/test_error_reasons.py finds them
        # in the ``reason=`` expressions.
        if self._registry_address is None:
            raise NotFound(f"{what} {quote(name)}: this service has no model registry (--registry)",
                           reason=LORA_NOT_FOUND if lora else EMBEDDING_NOT_FOUND if embedding else
                           PREVIEW_VAE_NOT_FOUND if preview_vae else UPSCALER_NOT_FOUND, metadata={"model": name})
        registry = self._registry_client()
        try:
            version = registry.resolve(name)
            if registry_pb2.ModelKind.Name(version.kind) != kind:
                raise InvalidArgument(f"{quote(name)} is a {registry_pb2.ModelKind.Name(version.kind)} model, not "
                                      f"the kind a {what} is ({kind})",
                                      reason=NOT_A_LORA if lora else NOT_AN_EMBEDDING if embedding else
                                      NOT_A_PREVIEW_VAE if preview_vae else NOT_AN_UPSCALER, metadata={"model": name})
            fetched = self._model_cache.fetch(version, [], allow_pickle=allow_pickle)
        except RegistryError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"{what} {quote(name)}: {error.message}",
                               reason=LORA_NOT_FOUND if lora else EMBEDDING_NOT_FOUND if embedding else
                               PREVIEW_VAE_NOT_FOUND if preview_vae else UPSCALER_NOT_FOUND,
                               metadata={"model": name}) from None
            if error.code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(f"{what} {quote(name)}: {error.message}",
                                      reason="INVALID_MODEL_REFERENCE") from None
            raise Unavailable(f"the model registry failed to provide {quote(name)}: {error.message}",
                              reason="REGISTRY_UNAVAILABLE") from None
        except ModelFilesError as error:
            raise FailedPrecondition(f"{what} {quote(name)}: {error}", reason="MODEL_FILES_REFUSED") from None
        return f"{version.model_id}@{version.version}", fetched.folder

    def _components_of(self, version) -> list[str]:
        return [c for c in self.components if c in version.components]

    def load(self, spec: ModelSpec) -> LoadedModel[T]:
        """Load ``spec`` unless it is in memory, then unload the least recently used beyond the bound (blocking)."""
        with self._load_locks[spec.name]:  # two requests for one new model load it once
            loaded = self.lookup(spec.name)
            if loaded is not None:
                return loaded
            if spec.path is None:
                raise FailedPrecondition(f"model {quote(spec.name)} was unloaded; retry", reason="MODEL_UNLOADED")
            log.info("loading model %r from %s on %s (%s)", spec.name, spec.path, self.device, dtype_name(self.dtype))
            try:
                model = self._loader(spec)
            except ModelFolderError as error:
                raise error.for_model(spec.name) from None
            loaded = LoadedModel(spec, model, module_bytes(model))
            with self._lock:
                self._loaded[spec.name] = loaded
                self._evict_locked(keep=spec.name)
            return loaded

    def unload(self, name: str) -> LoadedModel[T] | None:
        """Drop a loaded model (a local name or a "name@VERSION" key) from memory; None when it was not loaded.
        Jobs still using it keep their reference; the memory goes when they finish."""
        with self._lock:
            return self._loaded.pop(name, None)

    @property
    def registry(self):
        """The registry client (made on first use); None when the service has no --registry."""
        return self._registry_client() if self._registry_address is not None else None

    def _evict_locked(self, keep: str) -> None:
        if self.max_bytes <= 0:
            return
        while sum(m.size_bytes for m in self._loaded.values()) > self.max_bytes and len(self._loaded) > 1:
            name = next(n for n in self._loaded if n != keep)
            evicted = self._loaded.pop(name)
            # Jobs still using it keep their reference; the memory goes when they finish.
            log.info("unloaded model %r (%d bytes) to stay under %d bytes", name, evicted.size_bytes, self.max_bytes)

    def load_defaults(self) -> None:
        """Load the local models given at start (registry models load on first use, or now if the default)."""
        for spec in self.specs:
            if spec.path is not None:
                self.load(spec)
        if self.specs and self.specs[0].path is None:
            self.load(self.resolve(self.specs[0].name))

    def describe(self) -> list[status_pb2.LoadedModel]:
        """The loaded models, for GetStatus."""
        with self._lock:
            loaded = list(self._loaded.values())
        default = self.default_name
        return [
            status_pb2.LoadedModel(
                name=m.spec.name,
                source=str(m.spec.path),
                device=str(self.device),
                dtype=dtype_name(self.dtype),
                is_default=m.spec.name == default or m.spec.name.split("@")[0] == default,
            )
            for m in loaded
        ]


def check_pipeline_folder(path: Path, components: tuple[str, ...], allow_pickle: bool) -> dict:
    """Check a diffusers pipeline folder before loading: model_index.json, the components, no pickles.

    Returns model_index.json's content. Raises ModelFolderError saying what to fix: at start the
    service refuses to start with it, at request time the call gets FAILED_PRECONDITION.
    """
    index = _read_json(path, "model_index.json", hint="it is not a diffusers pipeline folder")
    for component in components:
        folder = path / component
        if not folder.is_dir():
            raise ModelFolderError(path, f"the component folder {component}/ is missing")
        if component == "scheduler" or component.startswith("tokenizer"):  # no weights: tokenizer, tokenizer_2, ..
            continue
        _check_weights(path, folder, f"{component}/", allow_pickle)
    return index


def check_model_folder(path: Path, allow_pickle: bool) -> dict:
    """Check a standalone diffusers model folder (a ControlNetModel: config.json and weights at the top).

    Returns config.json's content. Raises ModelFolderError saying what to fix (see check_pipeline_folder).
    """
    hint = "it is a pipeline folder; pass a standalone model folder" if (path / "model_index.json").is_file() else \
        "it is not a diffusers model folder"
    config = _read_json(path, "config.json", hint=hint)
    _check_weights(path, path, "the folder", allow_pickle)
    return config


def _read_json(path: Path, name: str, *, hint: str) -> dict:
    """A JSON object file at the top of a model folder."""
    file = path / name
    if not file.is_file():
        raise ModelFolderError(path, f"{name} is missing ({hint})")
    try:
        content = json.loads(file.read_text())
    except (OSError, ValueError):
        raise ModelFolderError(path, f"{name} is not readable JSON") from None
    if not isinstance(content, dict):
        raise ModelFolderError(path, f"{name} does not hold a JSON object")
    return content


def _check_weights(path: Path, folder: Path, what: str, allow_pickle: bool) -> None:
    """Weights are there, as safetensors unless pickles are allowed."""
    has_safetensors = any(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not has_safetensors and pickles and not allow_pickle:
        raise ModelFolderError(
            path, f"{what} holds only pickle-based weights ({', '.join(pickles)}); convert them to safetensors or "
                  "start with --allow-pickle if you trust the files")
    if not has_safetensors and not pickles:
        raise ModelFolderError(path, f"{what} holds no weights (*.safetensors)")
    from latentwire.client.registry import safetensors_file_problem  # the registry's rule, shared

    for file in sorted(folder.glob("*.safetensors")):  # a pickle renamed .safetensors fails here, not in the loader
        if (problem := safetensors_file_problem(file)) is not None:
            raise ModelFolderError(path, f"{file.name} in {what} is not a safetensors file: {problem}")


def use_safetensors(allow_pickle: bool) -> bool | None:
    """The ``use_safetensors`` argument for from_pretrained: required unless pickles are allowed."""
    return None if allow_pickle else True

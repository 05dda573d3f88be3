"""The classifier's model repository, as Triton's model repository and statistics extensions see it.

Transport-free (inference.py turns it into the Open Inference Protocol):

- the index: the models given with ``--model`` (version "1") and, with ``--registry``, every image-classifier
  version in the registry, each READY when it is in memory, else UNAVAILABLE ("unloaded");
- load: a model given at start, or a registry model ("name", "name@VERSION", "name@alias") fetched into the
  model cache, loaded with its batcher and served under its name (requests that name no version then get it);
- unload: drops every loaded version of a name from memory, with its batcher once its queue is empty. The
  default model (the first ``--model``) is never unloaded, nor the last model in memory. The classifier still
  loads a model on first use, so a later request naming an unloaded model loads it again;
- request statistics: success and failure counts and durations of Open Inference Protocol requests per model,
  beside the batcher's own statistics (images, batches, queue and compute time), which count every caller.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import grpc

from latentwire.common.v1 import model_pb2
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, quote

#: An unload the classifier refuses: its default model, or the last model it holds.
MODEL_UNLOAD_REFUSED = "MODEL_UNLOAD_REFUSED"
#: A repository name other than the classifier's one (empty).
REPOSITORY_NOT_FOUND = "REPOSITORY_NOT_FOUND"
#: Load parameters the classifier cannot honour (Triton's "config" and "file:" overrides).
LOAD_PARAMETERS_UNSUPPORTED = "LOAD_PARAMETERS_UNSUPPORTED"
#: The registry's kind of the models the classifier serves.
IMAGE_CLASSIFIER_KIND = "MODEL_KIND_IMAGE_CLASSIFIER"


@dataclass
class IndexEntry:
    """One model version of the repository."""

    name: str
    version: str
    ready: bool


@dataclass
class RequestCounts:
    """Open Inference Protocol requests of one model version since it was loaded."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    last_ms: int = 0


def split_key(key: str) -> tuple[str, str]:
    """A model key ("name" for a local model, "name@VERSION" for a registry model) -> (name, protocol version)."""
    name, _, version = key.partition("@")
    return name, version or "1"


def check_repository(repository_name: str) -> None:
    if repository_name:
        raise NotFound(f"repository {quote(repository_name)} does not exist; this server has one model repository: "
                       "leave repository_name empty", reason=REPOSITORY_NOT_FOUND)


class ModelRepository:
    """Index, load and unload over a ClassifierService's model store, and per-model request counts."""

    def __init__(self, service):
        self._service = service
        self._requests: dict[str, RequestCounts] = defaultdict(RequestCounts)

    # -- request statistics -------------------------------------------------------------------------

    def record(self, key: str, started_ns: int, ok: bool) -> None:
        """Count one request on model ``key`` that began at ``started_ns`` (time.monotonic_ns())."""
        counts, elapsed = self._requests[key], time.monotonic_ns() - started_ns
        if ok:
            counts.success_count += 1
            counts.success_ns += elapsed
            counts.last_ms = time.time_ns() // 1_000_000
        else:
            counts.fail_count += 1
            counts.fail_ns += elapsed

    def requests(self, key: str) -> RequestCounts:
        return self._requests.get(key) or RequestCounts()

    def loaded(self, name: str = "", version: str = "") -> list[tuple[str, object, object]]:
        """(key, model, batcher) of the loaded models matching a protocol name and version (all when no name)."""
        keys = {m.name for m in self._service.models.describe()}
        matches = []
        batchers = self._service._batchers  # the ClassifierService's (same package): model key -> (model, batcher)
        for key, (model, batcher) in sorted(batchers.items()):
            key_name, key_version = split_key(key)
            if key in keys and (not name or key_name == name) and (not version or key_version == version):
                matches.append((key, model, batcher))
        return matches

    # -- the index ------------------------------------------------------------------------------------

    def index(self) -> list[IndexEntry]:
        """Every model version the classifier can serve (blocking: asks the registry)."""
        store = self._service.models
        loaded = {m.name for m in store.describe()}
        entries = {spec.name: IndexEntry(spec.name, "1", spec.name in loaded)
                   for spec in self._service.config.models if spec.path is not None}
        registry = store.registry
        if registry is not None:
            from latentwire.client.registry import RegistryError
            from latentwire.registry.v1 import registry_pb2

            kind = registry_pb2.ModelKind.Value(IMAGE_CLASSIFIER_KIND)
            try:
                for model in registry.iter_models():
                    for version in registry.iter_model_versions(model.name):
                        if version.kind == kind and version.status == registry_pb2.MODEL_VERSION_STATUS_READY:
                            key = f"{version.model_id}@{version.version}"
                            entries[key] = IndexEntry(version.model_id, str(version.version), key in loaded)
            except RegistryError as error:
                raise Unavailable(f"the model registry could not list its models: {error.message}",
                                  reason="REGISTRY_UNAVAILABLE") from None
        for key in loaded - set(entries):  # in memory, though the registry no longer lists it
            entries[key] = IndexEntry(*split_key(key), True)
        return sorted(entries.values(), key=lambda e: (e.name, int(e.version) if e.version.isdigit() else 0))

    # -- load and unload --------------------------------------------------------------------------------

    async def load(self, name: str, parameter_names: list[str]) -> str:
        """Load a model and its batcher (a no-op when it is in memory); returns its key."""
        if not name:
            raise InvalidArgument("model_name is empty; name the model to load", reason="MODEL_NAME_MISSING")
        if parameter_names:
            raise InvalidArgument(f"load parameters {quote(', '.join(sorted(parameter_names)))} are not supported: "
                                  "the classifier loads models as they are stored (import a new registry version "
                                  "to change one)", reason=LOAD_PARAMETERS_UNSUPPORTED)
        key, _, _ = await self._service.classifier_for(model_pb2.ModelReference(name=name))
        self._requests.pop(key, None)  # Triton's statistics start again at each load
        return key

    async def unload(self, name: str) -> list[str]:
        """Drop every loaded version of ``name`` (or the one "name@VERSION" names); returns the keys dropped."""
        if not name:
            raise InvalidArgument("model_name is empty; name the model to unload", reason="MODEL_NAME_MISSING")
        store = self._service.models
        loaded = [m.name for m in store.describe()]
        wanted = [k for k in loaded if k == name or split_key(k)[0] == name]
        default = store.default_name
        if any(k == default or split_key(k)[0] == default for k in wanted):
            raise FailedPrecondition(f"model {quote(name)} is this classifier's default model (its first --model) "
                                     "and cannot be unloaded", reason=MODEL_UNLOAD_REFUSED, metadata={"model": name})
        if wanted and len(wanted) == len(loaded):
            raise FailedPrecondition(f"model {quote(name)} is the last model in memory and cannot be unloaded; load "
                                     "another first", reason=MODEL_UNLOAD_REFUSED, metadata={"model": name})
        if not wanted:
            await self._service.worker.run(self.check_known, name)  # unloading a model not in memory is a no-op
        for key in wanted:
            store.unload(key)
            self._requests.pop(key, None)
        await self._service._forget_unloaded()  # closes the idle batchers of unloaded models
        return wanted

    def check_known(self, name: str) -> None:
        """NOT_FOUND unless ``name`` is a model given at start or a registry model (blocking)."""
        if any(spec.name == name for spec in self._service.config.models):
            return
        registry = self._service.models.registry
        if registry is not None:
            from latentwire.client.registry import RegistryError

            try:
                registry.resolve(name)
                return
            except RegistryError as error:
                if error.code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    raise Unavailable(f"the model registry could not resolve {quote(name)}: {error.message}",
                                      reason="REGISTRY_UNAVAILABLE") from None
        raise NotFound(f"model {quote(name)} is not served here (RepositoryIndex lists the models)",
                       reason="MODEL_NOT_FOUND", metadata={"model": name})

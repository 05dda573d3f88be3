"""Models a service holds: loading them at start and resolving a request's ModelReference."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, TypeVar

import torch

from latentwire.common.v1 import model_pb2, status_pb2

from .config import ModelSpec
from .device import dtype_name
from .errors import FailedPrecondition, NotFound

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Pickle-based weight files: unpickling them can run arbitrary code, so they load only with --allow-pickle.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@dataclass
class LoadedModel(Generic[T]):
    """A loaded model: its spec and the domain object the service built from it."""

    spec: ModelSpec
    model: T


class ModelStore(Generic[T]):
    """The models one service holds, by name; the first spec is the default."""

    def __init__(self, specs: list[ModelSpec], device: torch.device, dtype: torch.dtype):
        self.specs = list(specs)
        self.device = device
        self.dtype = dtype
        self._loaded: dict[str, LoadedModel[T]] = {}

    def load_all(self, loader: Callable[[ModelSpec], T]) -> None:
        """Load every configured model (blocking; run it off the event loop)."""
        for spec in self.specs:
            log.info("loading model %r from %s on %s (%s)", spec.name, spec.path, self.device, dtype_name(self.dtype))
            self._loaded[spec.name] = LoadedModel(spec, loader(spec))

    def get(self, ref: model_pb2.ModelReference | None) -> LoadedModel[T]:
        """Resolve a request's model reference; empty means the default model."""
        name = ref.name if ref is not None else ""
        if not name:
            name = self.specs[0].name
        if name not in {s.name for s in self.specs}:
            known = ", ".join(repr(s.name) for s in self.specs)
            raise NotFound(
                f"model {name!r} is not served here; known models: {known}",
                reason="MODEL_NOT_FOUND",
                metadata={"model": name},
            )
        if name not in self._loaded:
            raise FailedPrecondition(f"model {name!r} is still loading; retry shortly", reason="MODEL_LOADING")
        return self._loaded[name]

    def describe(self) -> list[status_pb2.LoadedModel]:
        """The loaded models, for GetStatus."""
        return [
            status_pb2.LoadedModel(
                name=m.spec.name,
                source=str(m.spec.path),
                device=str(self.device),
                dtype=dtype_name(self.dtype),
                is_default=m.spec.is_default,
            )
            for m in self._loaded.values()
        ]


def check_pipeline_folder(path: Path, components: tuple[str, ...], allow_pickle: bool) -> dict:
    """Check a diffusers pipeline folder before loading: model_index.json, the components, no pickles.

    Returns model_index.json's content. Raises SystemExit with what to fix (this runs at start).
    """
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise SystemExit(f"{path} is not a diffusers model folder: {index_path} is missing")
    index = json.loads(index_path.read_text())
    for component in components:
        folder = path / component
        if not folder.is_dir():
            raise SystemExit(f"{path}: component folder {component}/ is missing")
        has_safetensors = any(folder.glob("*.safetensors"))
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if component in ("tokenizer", "scheduler"):
            continue
        if not has_safetensors and pickles and not allow_pickle:
            raise SystemExit(
                f"{folder} holds only pickle-based weights ({', '.join(pickles)}); convert them to safetensors "
                "or start with --allow-pickle if you trust the files"
            )
        if not has_safetensors and not pickles:
            raise SystemExit(f"{folder} holds no weights (*.safetensors)")
    return index


def use_safetensors(allow_pickle: bool) -> bool | None:
    """The ``use_safetensors`` argument for from_pretrained: required unless pickles are allowed."""
    return None if allow_pickle else True

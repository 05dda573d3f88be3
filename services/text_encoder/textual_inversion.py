"""Textual-inversion embeddings per request, as A1111 applies them (``modules/textual_inversion`` and the
``EmbeddingsWithFixes`` of ``modules/sd_hijack.py``), without adding tokens to the shared tokenizer.

- ``load_embedding`` reads an A1111 embedding file: ``emb_params`` [n, d] (SD 1.x/2.x: the text encoder's), or
  SDXL's ``clip_l`` / ``clip_g`` (text_encoder's / text_encoder_2's).
- ``uses_of`` (the servicer, before the request's work) fetches the request's embeddings through the model store
  and makes them the active ones of the calling context: per tokenizer, each embedding's name as that tokenizer
  writes it (token ids without start and end) and its vectors for that tokenizer's encoder. The context is the
  Encode call's own (each gRPC call runs as its own asyncio task; worker threads get a copy), so other requests on
  the same model see none of it.
- ``weighted.tokenize_weighted`` asks ``find_at`` at each token whether an embedding's name starts there (longest
  name first, as A1111's ``find_embedding_at_position``); where one does, the chunk gets one placeholder token per
  vector and a fix (offset, vectors).
- ``weighted.encode_weighted`` runs the encoder inside ``fixes_for(text_encoder, fixes)``; a forward hook on the
  encoder's token embedding module writes each fix's vectors over the placeholders' embeddings (offset + 1: the
  chunk's start token), as ``EmbeddingsWithFixes`` does.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from services.runtime.errors import InvalidArgument, quote

#: Most embeddings one request names; embeddings kept loaded per process (a few KB each).
MAX_EMBEDDINGS, CACHE_SIZE = 16, 256
#: The embedding file's tensor for each text encoder component: A1111's SD 1.x/2.x files hold one ``emb_params``;
#: SDXL's hold ``clip_l`` (text_encoder) and ``clip_g`` (text_encoder_2).
_KEYS = {"text_encoder": ("emb_params", "clip_l"), "text_encoder_2": ("clip_g",)}


@dataclass(frozen=True)
class Embedding:
    """An embedding's vectors per text encoder component, [n, hidden size] each."""

    name: str
    vectors: dict[str, torch.Tensor]


def load_embedding(path: Path, name: str) -> Embedding:
    """An A1111 embedding file; INVALID_ARGUMENT (EMBEDDING_INVALID) for another layout."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    vectors = {}
    for component, keys in _KEYS.items():
        for key in keys:
            if key in tensors:
                value = tensors[key]
                vectors[component] = value.reshape(-1, value.shape[-1]).float()
    if not vectors:
        raise InvalidArgument(f"embedding {quote(name)} holds none of emb_params, clip_l, clip_g: not an A1111 "
                              "textual-inversion embedding", reason="EMBEDDING_INVALID", metadata={"embedding": name})
    return Embedding(name, vectors)


#: The calling context's embeddings: id(tokenizer) -> [(name token ids, vectors)], longest name first.
_ACTIVE: contextvars.ContextVar[dict[int, list[tuple[tuple[int, ...], torch.Tensor]]] | None] = \
    contextvars.ContextVar("latentwire_embeddings", default=None)
#: The fixes of the encoder call running in this context: (text encoder, fixes per batch row).
_FIXES: contextvars.ContextVar[tuple[torch.nn.Module, list] | None] = contextvars.ContextVar(
    "latentwire_embedding_fixes", default=None)
_INSTALL_LOCK = threading.Lock()
_HOOKED = "_latentwire_embedding_hook"


def find_at(tokenizer, tokens: list[int], position: int) -> tuple[torch.Tensor, int] | None:
    """(vectors, name length in tokens) of the active embedding whose name starts at ``position``, else None."""
    active = _ACTIVE.get()
    if not active:
        return None
    for ids, vectors in active.get(id(tokenizer), ()):
        if tuple(tokens[position:position + len(ids)]) == ids:
            return vectors, len(ids)
    return None


def has_active() -> bool:
    return bool(_ACTIVE.get())


def activate(model, embeddings: list[Embedding]) -> None:
    """Make ``embeddings`` the active ones of the calling context for ``model``'s hosted encoders (a request's
    Encode call: the context ends with the call). INVALID_ARGUMENT (EMBEDDING_MODEL_MISMATCH) for vectors whose
    width is not the encoder's."""
    active: dict[int, list[tuple[tuple[int, ...], torch.Tensor]]] = {}
    for encoder, text_encoder in model.text_encoders.items():
        tokenizer = model.tokenizers[encoder]
        entries = []
        for embedding in embeddings:
            vectors = embedding.vectors.get(encoder)
            if vectors is None:
                continue
            width = text_encoder.get_input_embeddings().embedding_dim
            if vectors.shape[-1] != width:
                raise InvalidArgument(
                    f"embedding {quote(embedding.name)} has {vectors.shape[-1]} features for {encoder}, which takes "
                    f"{width}: it is an embedding for another model", reason="EMBEDDING_MODEL_MISMATCH",
                    metadata={"embedding": embedding.name, "encoder": encoder})
            with model._tokenizer_lock:
                ids = tuple(tokenizer(embedding.name.partition("@")[0], add_special_tokens=False)["input_ids"])
            entries.append((ids, vectors.to(text_encoder.device, text_encoder.dtype)))
            _install(text_encoder.get_input_embeddings())
        # A1111 sorts each first token's candidates by length, longest first.
        active[id(tokenizer)] = sorted(entries, key=lambda entry: len(entry[0]), reverse=True)
    _ACTIVE.set(active)


@contextlib.contextmanager
def fixes_for(text_encoder: torch.nn.Module, fixes: list) -> Iterator[None]:
    """Run one encoder call with ``fixes`` (per batch row: [(offset, vectors), ...]) applied to its token embeddings."""
    if not any(fixes):
        yield
        return
    token = _FIXES.set((text_encoder.get_input_embeddings(), fixes))
    try:
        yield
    finally:
        _FIXES.reset(token)


def _hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    active = _FIXES.get()
    if active is None or active[0] is not module:
        return None
    output = output.clone()
    for row, fixes in enumerate(active[1]):
        for offset, vectors in fixes:
            count = min(output.shape[1] - offset - 1, vectors.shape[0])
            output[row, offset + 1:offset + 1 + count] = vectors[:count]
    return output


def _install(module: torch.nn.Module) -> None:
    if getattr(module, _HOOKED, False):
        return
    with _INSTALL_LOCK:
        if not getattr(module, _HOOKED, False):
            module.register_forward_hook(_hook)
            setattr(module, _HOOKED, True)


async def uses_of(service, model, references) -> list[Embedding]:
    """The request's embeddings (ModelReference messages), fetched through the service's model store and read."""
    references = list(references)
    if len(references) > MAX_EMBEDDINGS:
        raise InvalidArgument(f"embeddings has {len(references)} entries; at most {MAX_EMBEDDINGS}",
                              reason="TOO_MANY_EMBEDDINGS", metadata={"field": "embeddings"})
    if references and model.family.name not in ("sd", "sdxl", "sdxl-refiner"):
        raise InvalidArgument(f"embeddings are set, but textual inversion runs on SD 1.x/2.x and SDXL models, not "
                              f"{model.family.title}; remove them", reason="EMBEDDINGS_NOT_SUPPORTED",
                              metadata={"field": "embeddings"})
    embeddings = []
    for reference in references:
        key, path = await service.worker.run(service.models.fetch_one_file, reference.name,
                                             "MODEL_KIND_TEXTUAL_INVERSION")
        embeddings.append(await service.worker.run(_cached, key, path))
    return embeddings


_CACHE: dict[str, Embedding] = {}
_CACHE_LOCK = threading.Lock()


def _cached(key: str, path: Path) -> Embedding:
    """Embeddings by pinned version key ("name@VERSION"; their files never change), the oldest dropped first."""
    with _CACHE_LOCK:
        if key not in _CACHE:
            if len(_CACHE) >= CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = load_embedding(path, key)
        return _CACHE[key]

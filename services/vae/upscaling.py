"""The VAE stage's Upscale: the request's rules, the registry fetch of an upscaler model and a small cache of loaded
ones (the network itself: upscaler.py).

An upscaler is a one-file registry model (MODEL_KIND_UPSCALER: upscaler.safetensors, or upscaler.pth where the
service runs with --allow-pickle), fetched through the service's model cache like a LoRA, loaded once per version
and kept in a least-recently-used cache of UPSCALER_CACHE_SIZE networks beside the VAEs.
"""
from __future__ import annotations

import collections
import io
import threading
from pathlib import Path

from latentwire.client.upscaler_files import UPSCALER_FILES
from services.runtime import limits
from services.runtime.errors import FailedPrecondition, InvalidArgument, quote

from .upscaler import DEFAULT_TILE_OVERLAP, DEFAULT_TILE_SIZE, Upscaler

#: Loaded upscaler networks kept in memory (RealESRGAN_x4plus is 67 MB in float32).
UPSCALER_CACHE_SIZE = 4
#: Tile sides accepted, in input pixels (0: whole images).
MIN_TILE_SIZE, MAX_TILE_SIZE = 32, 2048
#: An upscale's output side at most this many times the service's --max-image-size (a 4x model on the largest
#: first pass hires fix upscales from).
MAX_OUTPUT_FACTOR = 4


def check_request(request, *, max_batch: int) -> tuple[str, int, int]:
    """An UpscaleRequest's upscaler name, tile size and overlap (defaults filled), before any image is decoded."""
    name = request.upscaler.name
    if not name:
        raise InvalidArgument("upscaler.name is empty; name a registry upscaler model (kind MODEL_KIND_UPSCALER)",
                              reason="INVALID_UPSCALER_REFERENCE", metadata={"field": "upscaler.name"})
    if not request.images:
        raise InvalidArgument("images is empty; send one or more PNG, JPEG or WebP images", reason="IMAGE_EMPTY",
                              metadata={"field": "images"})
    limits.check_batch(len(request.images), max_batch, "images")
    tile = request.tile_size if request.HasField("tile_size") else DEFAULT_TILE_SIZE
    overlap = request.tile_overlap if request.HasField("tile_overlap") else DEFAULT_TILE_OVERLAP
    if tile != 0 and not MIN_TILE_SIZE <= tile <= MAX_TILE_SIZE:
        raise InvalidArgument(f"tile_size is {tile}; use 0 (whole images) or {MIN_TILE_SIZE} to {MAX_TILE_SIZE} "
                              "pixels", reason="INVALID_TILING", metadata={"field": "tile_size"})
    if not 0 <= overlap <= tile // 4:
        raise InvalidArgument(f"tile_overlap is {overlap}; use 0 to a quarter of the tile size ({tile // 4})",
                              reason="INVALID_TILING", metadata={"field": "tile_overlap"})
    return name, tile, overlap


def check_output(images, scale: int, max_image_size: int) -> None:
    """Refuse images whose upscale would be larger than MAX_OUTPUT_FACTOR x --max-image-size on a side."""
    most = MAX_OUTPUT_FACTOR * max_image_size
    for i, image in enumerate(images):
        if max(image.size) * scale > most:
            raise InvalidArgument(
                f"images[{i}] is {image.width}x{image.height} pixels; this {scale}x upscaler would make it "
                f"{image.width * scale}x{image.height * scale}, and this service makes at most {most} per side",
                reason="IMAGE_TOO_LARGE", metadata={"field": f"images[{i}]"})


def fetch(store, name: str, allow_pickle: bool) -> tuple[str, Path]:
    """The registry upscaler ``name``: its version key "name@VERSION" and its file, fetched through the service's
    model cache (blocking; ``ModelStore.fetch_of_kind``'s reasons: UPSCALER_NOT_FOUND, NOT_AN_UPSCALER, ...)."""
    key, folder = store.fetch_of_kind(name, "MODEL_KIND_UPSCALER", allow_pickle=allow_pickle)
    for file in UPSCALER_FILES:
        if (folder / file).is_file():
            return key, folder / file
    raise FailedPrecondition(f"upscaler {quote(name)} holds none of {', '.join(UPSCALER_FILES)}",
                             reason="MODEL_FILES_REFUSED", metadata={"model": name})


class UpscalerCache:
    """Loaded upscalers by version key, device and dtype; least recently used dropped first."""

    def __init__(self, size: int = UPSCALER_CACHE_SIZE):
        self.size = size
        self._items: collections.OrderedDict[tuple, Upscaler] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._load_locks: dict[tuple, threading.Lock] = collections.defaultdict(threading.Lock)

    def get(self, key: str, path: Path, device, dtype, allow_pickle: bool) -> Upscaler:
        """The upscaler ``key`` ("name@VERSION") read from ``path`` (blocking; one load per key at a time)."""
        cache_key = (key, str(device), dtype)
        with self._load_locks[cache_key]:
            with self._lock:
                if cache_key in self._items:
                    self._items.move_to_end(cache_key)
                    return self._items[cache_key]
            loaded = Upscaler.load(path, key, device, dtype, allow_pickle)
            with self._lock:
                self._items[cache_key] = loaded
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
            return loaded


async def upscaler_for(service, cache: UpscalerCache, name: str) -> tuple[str, Upscaler]:
    """The loaded upscaler a request names, fetched and loaded on the service's worker pool."""
    allow_pickle = service.config.allow_pickle
    key, path = await service.worker.run(fetch, service.models, name, allow_pickle)
    return key, await service.worker.run(cache.get, key, path, service.device, service.dtype, allow_pickle)


def png_bytes(image) -> bytes:
    """An 8-bit RGB PIL image as PNG bytes."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()

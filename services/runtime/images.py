"""Encoded images arriving in requests (init images, masks, control images): decode and check them once.

Every service that takes image bytes decodes them here, so a bad image gets the same
INVALID_ARGUMENT everywhere and nothing reaches a model that it cannot take.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from .errors import InvalidArgument

#: Encodings accepted in requests.
FORMATS = ("PNG", "JPEG", "WEBP")
#: 8-bit modes, converted to RGB (or to grayscale for masks) as diffusers' image processors do.
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")
#: Smallest side in pixels: below one latent pixel there is nothing to work with.
MIN_SIDE = 8
#: Most pixels decoded from one image (a 16384 x 16384 "decompression bomb" is refused from its header).
DEFAULT_MAX_PIXELS = 4096 * 4096


def decode_image(data: bytes, field: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode PNG/JPEG/WebP ``data`` into a loaded PIL image, refusing what no stage can use.

    Raises InvalidArgument naming ``field`` for empty or undecodable bytes, other formats, modes
    other than 8-bit grayscale/palette/RGB(A), sides under 8 pixels and more than ``max_pixels``.
    """
    if not data:
        raise InvalidArgument(f"{field} is empty; send PNG, JPEG or WebP bytes", reason="INVALID_IMAGE",
                              metadata={"field": field})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidArgument(
                    f"{field} is {width}x{height} pixels; at most {max_pixels} pixels are accepted",
                    reason="IMAGE_TOO_LARGE", metadata={"field": field})
            image.load()
    except InvalidArgument:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as error:
        raise InvalidArgument(f"{field} could not be decoded as PNG, JPEG or WebP: {error}", reason="INVALID_IMAGE",
                              metadata={"field": field}) from None
    if image.mode not in MODES:
        raise InvalidArgument(
            f"{field} has image mode {image.mode}; send 8-bit grayscale, RGB or RGBA ({', '.join(MODES)})",
            reason="UNSUPPORTED_IMAGE_MODE", metadata={"field": field, "mode": image.mode})
    if min(width, height) < MIN_SIDE:
        raise InvalidArgument(f"{field} is {width}x{height} pixels; each side needs at least {MIN_SIDE}",
                              reason="IMAGE_TOO_SMALL", metadata={"field": field})
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of a decoded image (alpha dropped, palette expanded), as diffusers' convert_rgb does."""
    return image if image.mode == "RGB" else image.convert("RGB")


def encode_png(image: Image.Image) -> bytes:
    """A PIL image as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()

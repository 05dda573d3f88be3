"""Turning one request image into a PIL RGB image, or a per-image error saying why not.

Encoded images follow transformers' load_image (EXIF orientation applied, converted to RGB),
so the service sees exactly what the image-classification pipeline would. The classifier
accepts any image mode Pillow converts to RGB (CMYK JPEGs, 16-bit PNGs) and any size from
1x1 up to --max-image-pixels, unlike the diffusion stages (services/runtime/images.py), whose
inputs become latents and so need 8-bit modes and at least 8 pixels per side.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from services.runtime.errors import InvalidArgument

#: Encodings accepted in ImageInput.encoded_image.
FORMATS = ("PNG", "JPEG", "WEBP")


def decode_image(data: bytes, *, field: str, max_pixels: int) -> Image.Image:
    """PNG/JPEG/WebP bytes -> RGB PIL image; InvalidArgument (naming ``field``) when that is impossible.

    The size is checked from the header, before any pixel is decoded (decompression bombs).
    """
    from transformers.image_utils import load_image

    if not data:
        raise InvalidArgument(f"{field} is empty; send PNG, JPEG or WebP bytes", reason="IMAGE_EMPTY",
                              metadata={"field": field})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            check_size(width, height, field=field, max_pixels=max_pixels)
            image.load()
            return load_image(image)
    except InvalidArgument:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as error:
        detail = "" if isinstance(error, UnidentifiedImageError) else f" ({type(error).__name__}: {error})"
        raise InvalidArgument(f"{field} could not be decoded as PNG, JPEG or WebP{detail}",
                              reason="UNDECODABLE_IMAGE", metadata={"field": field}) from None


def check_size(width: int, height: int, *, field: str, max_pixels: int) -> None:
    """Refuse images with no pixels or more than ``max_pixels``."""
    if width < 1 or height < 1:
        raise InvalidArgument(f"{field} is {width}x{height} pixels: it holds no pixels", reason="IMAGE_EMPTY",
                              metadata={"field": field})
    if width * height > max_pixels:
        raise InvalidArgument(f"{field} is {width}x{height} pixels; at most {max_pixels} pixels are accepted",
                              reason="IMAGE_TOO_LARGE", metadata={"field": field, "max_pixels": str(max_pixels)})


def image_from_pixels(pixels: np.ndarray, *, field: str, max_pixels: int) -> Image.Image:
    """Decoded uint8 RGB pixels [height, width, 3] -> PIL image; InvalidArgument for any other shape."""
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InvalidArgument(f"{field} has shape {list(pixels.shape)}; RGB pixels need [height, width, 3]",
                              reason="INVALID_TENSOR", metadata={"field": field})
    check_size(pixels.shape[1], pixels.shape[0], field=field, max_pixels=max_pixels)
    return Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))  # uint8 [h, w, 3] is RGB

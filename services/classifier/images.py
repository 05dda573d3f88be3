"""The classifier's images: request bytes or pixels -> a PIL RGB image, or an error saying why not.

Encoded images go through the one decoder (services/runtime/images.py), which applies the EXIF
orientation as transformers' load_image does; converted to RGB here, the service sees exactly
what the image-classification pipeline would. Unlike the diffusion stages, whose inputs become
latents, the classifier takes any image mode Pillow converts to RGB (CMYK JPEGs, 16-bit PNGs)
and any size from 1x1 up to --max-image-pixels.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from services.runtime import images, limits
from services.runtime.errors import InvalidArgument


def decode_image(data: bytes, *, field: str, max_pixels: int) -> Image.Image:
    """PNG/JPEG/WebP bytes -> RGB PIL image, as transformers' load_image makes it; InvalidArgument naming ``field``."""
    return images.to_rgb(images.decode_image(data, field, max_pixels=max_pixels, min_side=1, modes=None))


def image_from_pixels(pixels: np.ndarray, *, field: str, max_pixels: int) -> Image.Image:
    """Decoded uint8 RGB pixels [height, width, 3] -> PIL image; InvalidArgument for any other shape."""
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InvalidArgument(f"{field} has shape {list(pixels.shape)}; RGB pixels need [height, width, 3]",
                              reason="INVALID_TENSOR", metadata={"field": field})
    limits.check_image_size(pixels.shape[1], pixels.shape[0], field, max_pixels=max_pixels, min_side=1)
    return Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))  # uint8 [h, w, 3] is RGB

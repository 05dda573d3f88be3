"""Encoded images arriving in requests: the one decoder every service uses.

Init images, masks and control images (orchestrator, VAE, ControlNet) and the classifier's
images are all decoded here, so the same bytes get the same answer and the same ErrorInfo
reason everywhere. Bounds come from ``limits.py``. The size is checked from the header before
any pixel is decoded (decompression bombs), and no message passes on Pillow's own text, which
can hold object reprs.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from . import limits
from .errors import InvalidArgument


def decode_image(data: bytes, field: str, *, max_pixels: int = limits.MAX_INPUT_PIXELS,
                 min_side: int = limits.MIN_IMAGE_SIDE,
                 modes: tuple[str, ...] | None = limits.IMAGE_MODES) -> Image.Image:
    """Decode PNG/JPEG/WebP ``data`` into a loaded PIL image, its EXIF orientation applied.

    The orientation is applied as transformers' and diffusers' ``load_image`` do, so a phone photo
    is seen upright. Raises InvalidArgument naming ``field``: IMAGE_EMPTY for no bytes,
    UNDECODABLE_IMAGE for bytes that are not a whole PNG, JPEG or WebP, IMAGE_TOO_LARGE beyond
    ``max_pixels``, IMAGE_TOO_SMALL for a side under ``min_side``, UNSUPPORTED_IMAGE_MODE for a
    mode outside ``modes`` (None: any mode, for callers that convert to RGB themselves).
    """
    limits.check_image_bytes(data, field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=limits.IMAGE_FORMATS)
            limits.check_image_size(image.width, image.height, field, max_pixels=max_pixels, min_side=min_side)
            image.load()
    except InvalidArgument:
        raise
    except UnidentifiedImageError:
        raise _undecodable(field, "the bytes are not a PNG, JPEG or WebP image") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's messages may carry object reprs: say what is wrong in our words instead.
        raise _undecodable(field, "the image data is truncated or damaged") from None
    if modes is not None:
        limits.check_image_mode(image.mode, field, modes)
    return _upright(image, field)


def _undecodable(field: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"{field} could not be decoded as PNG, JPEG or WebP: {why}", reason="UNDECODABLE_IMAGE",
                           metadata={"field": field})


def _upright(image: Image.Image, field: str) -> Image.Image:
    """The image as displayed: its EXIF orientation applied (a no-op without one)."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
        return image
    except (OSError, ValueError, SyntaxError, TypeError, KeyError):
        raise _undecodable(field, "its EXIF orientation is damaged") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of a decoded image (alpha dropped, palette expanded), as diffusers' convert_rgb does."""
    return image if image.mode == "RGB" else image.convert("RGB")


def encode_png(image: Image.Image) -> bytes:
    """A PIL image as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()

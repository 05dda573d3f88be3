"""img2img's pixel work before and after the suite runs, as AUTOMATIC1111 does it: ``resize_mode``, the inpainting
mask (binary mask, invert, blur), ``inpainting_fill`` and ``inpaint_full_res`` (crop the masked region with
padding, process it at the target size, paste it back), and the overlay of the original image outside the mask.

Copied in behaviour from A1111 (modules/images.py resize_image with upscaler_for_img2img "None", modules/masking.py
get_crop_region / expand_crop_region / fill, modules/processing.py create_binary_mask, apply_overlay and
StableDiffusionProcessingImg2Img.init); keep in step. What happens in latent space there (resize_mode 3 "latent
upscale", inpainting_fill 2 "latent noise" and 3 "latent nothing") the suite does not offer: refused.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from services.runtime.errors import InvalidArgument

LANCZOS = Image.Resampling.LANCZOS
#: Pillow's default resampling of Image.resize, which A1111's fill of resize_mode 2 uses (it names none).
BICUBIC = Image.Resampling.BICUBIC

#: resize_mode 3 (latent upscale) and inpainting_fill 2 / 3 (latent noise / nothing) work on latents.
RESIZE_MODE_NOT_SUPPORTED = "RESIZE_MODE_NOT_SUPPORTED"
INPAINTING_FILL_NOT_SUPPORTED = "INPAINTING_FILL_NOT_SUPPORTED"
#: A1111's img2img_background_color default: what transparent init pixels become.
BACKGROUND = "#ffffff"


@dataclass
class Prepared:
    """What the suite gets (init image and mask, both width x height PNGs) and what the result needs afterwards."""

    init_png: bytes
    mask_png: bytes | None
    #: The original image with the masked region transparent (RGBA), composited over each result; None without mask.
    overlay: Image.Image | None = None
    #: (x, y, w, h): where an inpaint_full_res result goes in the original; None otherwise.
    paste_to: tuple[int, int, int, int] | None = None


def check_modes(resize_mode: int, inpainting_fill: int, masked: bool) -> None:
    """422 for values A1111 has and the suite cannot do (or that A1111 does not have)."""
    if resize_mode not in (0, 1, 2, 3):
        raise InvalidArgument(f"resize_mode is {resize_mode}; use 0 (just resize), 1 (crop and resize) or 2 (resize "
                              "and fill)", reason=RESIZE_MODE_NOT_SUPPORTED, metadata={"field": "resize_mode"})
    if resize_mode == 3:
        raise InvalidArgument("resize_mode 3 (just resize, latent upscale) resizes in latent space, which this "
                              "gateway does not do; use 0 (just resize), 1 (crop and resize) or 2 (resize and fill)",
                              reason=RESIZE_MODE_NOT_SUPPORTED, metadata={"field": "resize_mode"})
    if inpainting_fill not in (0, 1, 2, 3):
        raise InvalidArgument(f"inpainting_fill is {inpainting_fill}; use 0 (fill) or 1 (original)",
                              reason=INPAINTING_FILL_NOT_SUPPORTED, metadata={"field": "inpainting_fill"})
    if masked and inpainting_fill in (2, 3):
        name = "latent noise" if inpainting_fill == 2 else "latent nothing"
        raise InvalidArgument(f"inpainting_fill {inpainting_fill} ({name}) changes the latents under the mask, which "
                              "this gateway does not do; use 0 (fill) or 1 (original)",
                              reason=INPAINTING_FILL_NOT_SUPPORTED, metadata={"field": "inpainting_fill"})


def resize_image(resize_mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's images.resize_image (LANCZOS; upscaler_for_img2img "None"): 0 just resize, 1 crop and resize (the
    middle of the image at the target's aspect ratio), 2 resize and fill (the whole image, the rest filled by
    stretching its edge rows or columns)."""
    def resize(im: Image.Image, w: int, h: int) -> Image.Image:
        return im.resize((w, h), resample=LANCZOS)

    if resize_mode == 0:
        return resize(image, width, height)
    ratio = width / height
    src_ratio = image.width / image.height
    if resize_mode == 1:
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
        resized = resize(image, src_w, src_h)
        result = Image.new("RGB", (width, height))
        result.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return result
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = resize(image, src_w, src_h)
    result = Image.new("RGB", (width, height))
    result.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill_height = height // 2 - src_h // 2
        if fill_height > 0:
            result.paste(resized.resize((width, fill_height), box=(0, 0, width, 0), resample=BICUBIC), box=(0, 0))
            bottom = resized.resize((width, fill_height), box=(0, resized.height, width, resized.height),
                                    resample=BICUBIC)
            result.paste(bottom, box=(0, fill_height + src_h))
    elif ratio > src_ratio:
        fill_width = width // 2 - src_w // 2
        if fill_width > 0:
            result.paste(resized.resize((fill_width, height), box=(0, 0, 0, height), resample=BICUBIC), box=(0, 0))
            right = resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height),
                                   resample=BICUBIC)
            result.paste(right, box=(fill_width + src_w, 0))
    return result


def binary_mask(mask: Image.Image) -> Image.Image:
    """A1111's create_binary_mask: an RGBA mask with transparency is its alpha above 128; else its grayscale."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        return mask.split()[-1].convert("L").point(lambda x: 255 if x > 128 else 0)
    return mask.convert("L")


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    """A1111's separable mask blur (OpenCV's GaussianBlur along x, then along y)."""
    import cv2

    for sigma, horizontal in ((blur_x, True), (blur_y, False)):
        if sigma > 0:
            kernel = 2 * int(2.5 * sigma + 0.5) + 1
            size = (kernel, 1) if horizontal else (1, kernel)
            mask = Image.fromarray(cv2.GaussianBlur(np.array(mask), size, sigma))
    return mask


def crop_region(mask: np.ndarray, pad: int) -> tuple[int, int, int, int]:
    """A1111's masking.get_crop_region: the box (x1, y1, x2, y2) around every nonzero mask pixel, padded."""
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    if len(rows) == 0:  # A1111 gives an empty box here; the whole image is the honest answer
        return 0, 0, w, h
    return (max(int(columns[0]) - pad, 0), max(int(rows[0]) - pad, 0),
            min(int(columns[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h))


def expand_crop_region(region, processing_width: int, processing_height: int, image_width: int,
                       image_height: int) -> tuple[int, int, int, int]:
    """A1111's masking.expand_crop_region: grow the box to the processing size's aspect ratio, within the image."""
    x1, y1, x2, y2 = region
    ratio_crop_region = (x2 - x1) / (y2 - y1)
    ratio_processing = processing_width / processing_height
    if ratio_crop_region > ratio_processing:
        desired_height = (x2 - x1) / ratio_processing
        desired_height_diff = int(desired_height - (y2 - y1))
        y1 -= desired_height_diff // 2
        y2 += desired_height_diff - desired_height_diff // 2
        if y2 >= image_height:
            diff = y2 - image_height
            y2 -= diff
            y1 -= diff
        if y1 < 0:
            y2 -= y1
            y1 -= y1
        if y2 >= image_height:
            y2 = image_height
    else:
        desired_width = (y2 - y1) * ratio_processing
        desired_width_diff = int(desired_width - (x2 - x1))
        x1 -= desired_width_diff // 2
        x2 += desired_width_diff - desired_width_diff // 2
        if x2 >= image_width:
            diff = x2 - image_width
            x2 -= diff
            x1 -= diff
        if x1 < 0:
            x2 -= x1
            x1 -= x1
        if x2 >= image_width:
            x2 = image_width
    return x1, y1, x2, y2


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's masking.fill (inpainting_fill 0): the masked region painted with the colours around it, by blurring
    the unmasked image at shrinking radii and compositing the results."""
    image_mod = Image.new("RGBA", (image.width, image.height))
    image_masked = Image.new("RGBa", (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    image_masked = image_masked.convert("RGBa")
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def flatten(image: Image.Image) -> Image.Image:
    """A1111's images.flatten: transparent pixels over the background colour, then RGB."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, BACKGROUND)
        background.alpha_composite(image)
        return background.convert("RGB")
    return image.convert("RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def prepare(init: bytes, mask: bytes | None, *, width: int, height: int, resize_mode: int, inpainting_fill: int,
            full_res: bool, padding: int, blur_x: int, blur_y: int, invert: bool) -> Prepared:
    """The init image (and mask) as A1111's StableDiffusionProcessingImg2Img.init makes them for one image."""
    check_modes(resize_mode, inpainting_fill, mask is not None)
    with Image.open(io.BytesIO(init)) as opened:
        opened.load()
        image = flatten(opened)
    if mask is None:
        return Prepared(init_png=_png(resize_image(resize_mode, image, width, height)), mask_png=None)
    with Image.open(io.BytesIO(mask)) as opened:
        opened.load()
        image_mask = binary_mask(opened)
    if invert:
        image_mask = ImageOps.invert(image_mask)
    image_mask = blur_mask(image_mask, blur_x, blur_y)
    paste_to = region = None
    if full_res:
        mask_for_overlay = image_mask
        region = crop_region(np.array(image_mask), padding)
        region = expand_crop_region(region, width, height, image_mask.width, image_mask.height)
        x1, y1, x2, y2 = region
        image_mask = resize_image(2, image_mask.crop(region), width, height).convert("L")
        paste_to = (x1, y1, x2 - x1, y2 - y1)
    else:
        image_mask = resize_image(resize_mode, image_mask, width, height).convert("L")
        doubled = np.clip(np.array(image_mask).astype(np.float32) * 2, 0, 255).astype(np.uint8)
        mask_for_overlay = Image.fromarray(doubled)
    if region is None:
        image = resize_image(resize_mode, image, width, height)
    overlay = Image.new("RGBa", (image.width, image.height))
    overlay.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
    overlay = overlay.convert("RGBA")
    if region is not None:
        image = resize_image(2, image.crop(region), width, height)
    if inpainting_fill != 1:
        image = fill(image, image_mask)
    return Prepared(init_png=_png(image), mask_png=_png(image_mask), overlay=overlay, paste_to=paste_to)


def apply_overlay(png: bytes, prepared: Prepared) -> bytes:
    """A1111's apply_overlay on one result PNG: an inpaint_full_res result resized into its place in the original,
    then the original outside the mask composited over it; the PNG keeps its infotext."""
    if prepared.overlay is None:
        return png
    with Image.open(io.BytesIO(png)) as opened:
        opened.load()
        text = opened.info.get("parameters")
        image = opened.convert("RGB")
    if prepared.paste_to is not None:
        x, y, w, h = prepared.paste_to
        base = Image.new("RGBA", (prepared.overlay.width, prepared.overlay.height))
        base.paste(resize_image(1, image, w, h), (x, y))
        image = base
    image = image.convert("RGBA")
    image.alpha_composite(prepared.overlay)
    image = image.convert("RGB")
    buffer = io.BytesIO()
    if text is not None:
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()

"""Control-image preprocessors: pure CPU (numpy and OpenCV), each with named options, defaults and ranges.

Each turns a decoded image into the 8-bit RGB control image a ControlNet is given. The cheap
ones AUTOMATIC1111's ControlNet extension users know are here, under its names and with its
defaults; its resize-with-padding step is left out, since the pipeline resizes the control image
to the generated size afterwards. Model-based annotators (depth, pose, segmentation) are not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import cv2
import numpy as np
from PIL import Image

from services.runtime import images, limits

#: One named option of a preprocessor: its default and inclusive range (kept in services/runtime/limits.py,
#: so the orchestrator checks a request's options without loading OpenCV).
Option = limits.PreprocessorOption


@dataclass(frozen=True)
class Preprocessor:
    """A named image -> control image function and the options it takes."""

    name: str
    description: str
    run: Callable[[np.ndarray, dict[str, float]], np.ndarray]  # RGB uint8 [h, w, 3] -> uint8 [h, w] or [h, w, 3]

    @property
    def options(self) -> tuple[Option, ...]:
        return limits.PREPROCESSORS[self.name]


def _passthrough(rgb: np.ndarray, options: dict[str, float]) -> np.ndarray:
    return rgb


def _canny(rgb: np.ndarray, options: dict[str, float]) -> np.ndarray:
    # diffusers' ControlNet documentation: cv2.Canny on the RGB array, stacked to three channels.
    return cv2.Canny(rgb, options["low_threshold"], options["high_threshold"])


def _invert(rgb: np.ndarray, options: dict[str, float]) -> np.ndarray:
    return 255 - rgb


def _binary(rgb: np.ndarray, options: dict[str, float]) -> np.ndarray:
    # As A1111's "binary": dark strokes on a light background become white on black; 0 or 255 picks Otsu's threshold.
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    threshold = options["threshold"]
    if threshold in (0, 255):
        return cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)[1]
    return cv2.threshold(gray, threshold, 255, cv2.THRESH_BINARY_INV)[1]


def _blur_gaussian(rgb: np.ndarray, options: dict[str, float]) -> np.ndarray:
    return cv2.GaussianBlur(rgb, (0, 0), options["sigma"])


def _tile_resample(rgb: np.ndarray, options: dict[str, float]) -> np.ndarray:
    # As A1111's "tile_resample": downsample by the rate (area filter); the pipeline scales it back up.
    rate = options["down_sampling_rate"]
    if rate < 1.1:
        return rgb
    height, width = rgb.shape[:2]
    size = (max(1, int(width / rate)), max(1, int(height / rate)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def _scribble_xdog(rgb: np.ndarray, options: dict[str, float]) -> np.ndarray:
    # As A1111's "scribble_xdog": a difference of Gaussians, thresholded into white strokes on black.
    pixels = rgb.astype(np.float32)
    fine = cv2.GaussianBlur(pixels, (0, 0), 0.5)
    coarse = cv2.GaussianBlur(pixels, (0, 0), 5.0)
    dog = (255 - np.min(coarse - fine, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros_like(rgb)
    result[2 * (255 - dog.astype(np.int32)) > options["threshold"]] = 255
    return result


def _lineart_standard(rgb: np.ndarray, options: dict[str, float]) -> np.ndarray:
    # As A1111's "lineart_standard (from white bg & black line)": how much darker a pixel is than its blurred surroundings.
    pixels = rgb.astype(np.float32)
    blurred = cv2.GaussianBlur(pixels, (0, 0), options["sigma"])
    intensity = np.min(blurred - pixels, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(strong))) if strong.size else 16.0
    intensity *= 127
    return intensity.clip(0, 255).astype(np.uint8)


PREPROCESSORS: dict[str, Preprocessor] = {
    p.name: p
    for p in (
        Preprocessor("none", "the image itself, as a ready control image (alias: passthrough)", _passthrough),
        Preprocessor("canny", "Canny edges (cv2.Canny), white on black", _canny),
        Preprocessor("invert", "the image's negative (white-background line art to white lines on black)", _invert),
        Preprocessor("binary", "grayscale thresholded and inverted: pixels darker than the threshold become white",
                     _binary),
        Preprocessor("blur_gaussian", "Gaussian blur (for tile and blur ControlNets)", _blur_gaussian),
        Preprocessor("tile_resample", "the image downsampled (area filter), for tile ControlNets", _tile_resample),
        Preprocessor("scribble_xdog", "scribble-like white strokes from a difference of Gaussians", _scribble_xdog),
        Preprocessor("lineart_standard", "line art from dark lines on a light background, white on black",
                     _lineart_standard),
    )
}
# The names (and options) requests are checked against live in limits.py; this table must run exactly those.
if set(PREPROCESSORS) != set(limits.PREPROCESSORS):
    raise ImportError("services/controlnet/preprocessors.py and services/runtime/limits.py name different "
                      f"preprocessors: {sorted(set(PREPROCESSORS) ^ set(limits.PREPROCESSORS))}")


def lookup(name: str) -> Preprocessor:
    """The preprocessor called ``name`` (or an alias); UNKNOWN_PREPROCESSOR naming the valid choices otherwise."""
    return PREPROCESSORS[limits.preprocessor_name(name)]


def resolve_options(preprocessor: Preprocessor, given: Mapping[str, float]) -> dict[str, float]:
    """Every option's value: the given one, checked against its range, or its default."""
    return limits.preprocessor_options(preprocessor.name, given)


def apply(preprocessor: Preprocessor, image: Image.Image, options: dict[str, float]) -> Image.Image:
    """Run ``preprocessor`` with resolved ``options`` on a decoded image; returns an 8-bit RGB image."""
    rgb = np.array(images.to_rgb(image))
    result = preprocessor.run(rgb, options)
    if result.ndim == 2:
        result = np.stack([result] * 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(result, dtype=np.uint8))

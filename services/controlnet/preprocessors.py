"""Control-image preprocessors: pure CPU (numpy and OpenCV), each with named options, defaults and ranges.

Each turns a decoded image into the 8-bit RGB control image a ControlNet is given. The cheap
ones AUTOMATIC1111's ControlNet extension users know are here, under its names and with its
defaults; its resize-with-padding step is left out, since the pipeline resizes the control image
to the generated size afterwards. Model-based annotators (depth, pose, segmentation) are not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import cv2
import numpy as np
from PIL import Image

from services.runtime import images
from services.runtime.errors import InvalidArgument


@dataclass(frozen=True)
class Option:
    """One named option of a preprocessor: its default and its inclusive range."""

    name: str
    default: float
    min_value: float
    max_value: float
    description: str


@dataclass(frozen=True)
class Preprocessor:
    """A named image -> control image function and the options it takes."""

    name: str
    description: str
    options: tuple[Option, ...]
    run: Callable[[np.ndarray, dict[str, float]], np.ndarray]  # RGB uint8 [h, w, 3] -> uint8 [h, w] or [h, w, 3]


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


_THRESHOLD = "threshold in 8-bit gray levels"

PREPROCESSORS: dict[str, Preprocessor] = {
    p.name: p
    for p in (
        Preprocessor("none", "the image itself, as a ready control image (alias: passthrough)", (), _passthrough),
        Preprocessor(
            "canny", "Canny edges (cv2.Canny), white on black",
            (Option("low_threshold", 100, 0, 255, "lower hysteresis " + _THRESHOLD),
             Option("high_threshold", 200, 0, 255, "upper hysteresis " + _THRESHOLD)),
            _canny),
        Preprocessor("invert", "the image's negative (white-background line art to white lines on black)", (),
                     _invert),
        Preprocessor(
            "binary", "grayscale thresholded and inverted: pixels darker than the threshold become white",
            (Option("threshold", 0, 0, 255, _THRESHOLD + "; 0 or 255 choose one by Otsu's method"),),
            _binary),
        Preprocessor(
            "blur_gaussian", "Gaussian blur (for tile and blur ControlNets)",
            (Option("sigma", 9.0, 0.01, 64.0, "standard deviation of the blur in pixels"),),
            _blur_gaussian),
        Preprocessor(
            "tile_resample", "the image downsampled (area filter), for tile ControlNets",
            (Option("down_sampling_rate", 1.0, 1.0, 8.0, "factor to shrink each side by; below 1.1 keeps the image"),),
            _tile_resample),
        Preprocessor(
            "scribble_xdog", "scribble-like white strokes from a difference of Gaussians",
            (Option("threshold", 32, 1, 64, "stroke threshold; lower keeps fainter edges"),),
            _scribble_xdog),
        Preprocessor(
            "lineart_standard", "line art from dark lines on a light background, white on black",
            (Option("sigma", 6.0, 0.5, 32.0, "blur in pixels the lines are measured against"),),
            _lineart_standard),
    )
}

#: Other names accepted for a preprocessor; the empty name (not set) means "none".
ALIASES = {"": "none", "passthrough": "none"}


def lookup(name: str) -> Preprocessor:
    """The preprocessor called ``name`` (or an alias); INVALID_ARGUMENT naming the valid choices otherwise."""
    preprocessor = PREPROCESSORS.get(ALIASES.get(name, name))
    if preprocessor is None:
        raise InvalidArgument(
            f"unknown preprocessor {name!r}; use one of {', '.join(sorted(PREPROCESSORS))} (or passthrough)",
            reason="UNKNOWN_PREPROCESSOR", metadata={"preprocessor": name})
    return preprocessor


def resolve_options(preprocessor: Preprocessor, given: Mapping[str, float]) -> dict[str, float]:
    """Every option's value: the given one, checked against its range, or its default."""
    known = {o.name: o for o in preprocessor.options}
    unknown = sorted(set(given) - set(known))
    if unknown:
        valid = ", ".join(known) if known else "none"
        raise InvalidArgument(
            f"preprocessor {preprocessor.name!r} has no option {unknown[0]!r}; its options: {valid}",
            reason="UNKNOWN_PREPROCESSOR_OPTION", metadata={"preprocessor": preprocessor.name, "option": unknown[0]})
    values = {}
    for option in preprocessor.options:
        value = float(given.get(option.name, option.default))
        if not (math.isfinite(value) and option.min_value <= value <= option.max_value):
            raise InvalidArgument(
                f"preprocessor {preprocessor.name!r}: {option.name} is {value}; use {option.min_value:g} to "
                f"{option.max_value:g} (default {option.default:g})",
                reason="PREPROCESSOR_OPTION_OUT_OF_RANGE",
                metadata={"preprocessor": preprocessor.name, "option": option.name})
        values[option.name] = value
    return values


def apply(preprocessor: Preprocessor, image: Image.Image, options: dict[str, float]) -> Image.Image:
    """Run ``preprocessor`` with resolved ``options`` on a decoded image; returns an 8-bit RGB image."""
    rgb = np.array(images.to_rgb(image))
    result = preprocessor.run(rgb, options)
    if result.ndim == 2:
        result = np.stack([result] * 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(result, dtype=np.uint8))

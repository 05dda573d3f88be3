"""The seeded procedural data set the default models are trained on: one plain shape on a plain background.

Every image is 64x64 RGB: a filled SHAPE in a COLOUR on a BACKGROUND of another colour, at a SIZE and a
POSITION, with a caption in one grammar::

    a [small |large ]COLOUR SHAPE on a BACKGROUND background[ in the top left| in the top right|
                                                             in the bottom left| in the bottom right| in the centre]

Size and position are always drawn; each is named in the caption with probability 1/2 (so the models learn
both the bare and the qualified phrasing). An unnamed position is still one of the five.

Held-out combinations: for every (shape, colour) pair exactly one background is held out, the colour at index
``(colour_index + shape_index + 1) % 8`` of :data:`COLOURS` (never the shape's own colour, as there are only six
shapes). That is 6 x 8 = 48 (colour, shape, background) triples of the 336 possible; training draws never use
them, so every shape, colour and background is still seen in training, only never in those triples.
:data:`HELD_OUT` lists them; evaluation prompts are made from them.

Images are drawn with PIL at twice the size and box-filtered down (anti-aliased edges); a draw is a pure
function of the seed, several thousand images per second on one core.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS", "HELD_OUT", "IMAGE_SIZE", "POSITIONS", "SHAPES", "SIZES", "Sample", "caption", "draw_batch",
    "draw_samples", "held_out_prompts", "is_held_out", "parse_caption", "render",
]

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
#: Palette (RGB). Far apart from each other, so pixel statistics can tell every pair apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "orange": (250, 140, 20),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOUR_NAMES = tuple(COLOURS)
#: Shape diameter in pixels (of 64), before a +-8 % jitter.
SIZES = {"small": 22.0, "large": 38.0}
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")
#: Free border (pixels) around every shape: the outer ring of each image is always pure background.
MARGIN = 4


def _held_out() -> frozenset[tuple[str, str, str]]:
    triples = set()
    for si, shape in enumerate(SHAPES):
        for ci, colour in enumerate(COLOUR_NAMES):
            triples.add((colour, shape, COLOUR_NAMES[(ci + si + 1) % len(COLOUR_NAMES)]))
    return frozenset(triples)


#: The 48 (colour, shape, background) triples that never appear in training draws.
HELD_OUT: frozenset[tuple[str, str, str]] = _held_out()


def is_held_out(colour: str, shape: str, background: str) -> bool:
    """True when (colour, shape, background) is one of the :data:`HELD_OUT` evaluation triples."""
    return (colour, shape, background) in HELD_OUT


@dataclass(frozen=True)
class Sample:
    """One data-set item: its labels, its drawing jitter, and the caption parts it names."""

    shape: str
    colour: str
    background: str
    size: str
    position: str
    name_size: bool
    name_position: bool
    scale: float = 1.0  # size jitter factor
    dx: float = 0.0  # position jitter, pixels
    dy: float = 0.0

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background, self.size if self.name_size else None,
                       self.position if self.name_position else None)


def caption(shape: str, colour: str, background: str, size: str | None = None, position: str | None = None) -> str:
    """The caption in the data set's grammar; ``size``/``position`` None leaves them unnamed."""
    words = "a " + (f"{size} " if size else "") + f"{colour} {shape} on a {background} background"
    return words + (f" in the {position}" if position else "")


_CAPTION = re.compile(
    r"^a (?:(?P<size>small|large) )?(?P<colour>\w+) (?P<shape>\w+) on a (?P<background>\w+) background"
    r"(?: in the (?P<position>top left|top right|bottom left|bottom right|centre))?$")


def parse_caption(text: str) -> dict[str, str | None]:
    """Labels named by a caption: shape, colour, background, size (or None), position (or None).

    Raises ValueError when ``text`` is not in the grammar or names an unknown shape or colour.
    """
    match = _CAPTION.match(text.strip())
    if not match:
        raise ValueError(f"not a data-set caption: {text[:80]!r}")
    labels = match.groupdict()
    if labels["shape"] not in SHAPES:
        raise ValueError(f"unknown shape {labels['shape']!r}; known: {', '.join(SHAPES)}")
    for key in ("colour", "background"):
        if labels[key] not in COLOURS:
            raise ValueError(f"unknown colour {labels[key]!r}; known: {', '.join(COLOURS)}")
    return labels


def _sample(rng: np.random.Generator, held_out: bool) -> Sample:
    if held_out:
        triples = sorted(HELD_OUT)
        colour, shape, background = triples[int(rng.integers(len(triples)))]
    else:
        while True:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
            background = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
            if background != colour and (colour, shape, background) not in HELD_OUT:
                break
    size = ("small", "large")[int(rng.integers(2))]
    position = POSITIONS[int(rng.integers(len(POSITIONS)))]
    name_size, name_position = (bool(v) for v in rng.integers(0, 2, 2))
    scale = float(rng.uniform(0.92, 1.08))
    dx, dy = (float(v) for v in rng.uniform(-2.5, 2.5, 2))
    return Sample(shape, colour, background, size, position, name_size, name_position, scale, dx, dy)


def draw_samples(rng: np.random.Generator, count: int, *, held_out: bool = False) -> list[Sample]:
    """``count`` samples from training combinations (default) or only from :data:`HELD_OUT` ones."""
    return [_sample(rng, held_out) for _ in range(count)]


def _centre(sample: Sample, diameter: float) -> tuple[float, float]:
    near = MARGIN + diameter / 2 + 2.5  # room for the jitter, so the margin always holds
    far = IMAGE_SIZE - near
    mid = IMAGE_SIZE / 2
    x = {"left": near, "right": far}.get(sample.position.split()[-1], mid)
    y = {"top": near, "bottom": far}.get(sample.position.split()[0], mid)
    return x + sample.dx, y + sample.dy


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a shape of radius ``r`` (half its diameter) centred on (cx, cy)."""
    if shape == "circle":
        angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
    if shape == "square":
        s = r * 0.86  # same visual weight as the circle
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":  # pointing up, base at the bottom
        return [(cx, cy - r), (cx + r * 0.98, cy + r * 0.8), (cx - r * 0.98, cy + r * 0.8)]
    if shape == "star":  # five points, one up
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":  # a plus sign, arms a third of the width
        a, w = r, r / 3
        return [(cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w), (cx + a, cy + w),
                (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a), (cx - w, cy + w), (cx - a, cy + w),
                (cx - a, cy - w), (cx - w, cy - w)]
    if shape == "heart":  # the classic parametric heart, scaled to fit the radius
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        k = r / 16.5
        return [(cx + k * xi, cy + k * (yi + 2.5)) for xi, yi in zip(x, y)]
    raise ValueError(f"unknown shape {shape!r}")


def render(sample: Sample) -> Image.Image:
    """Draw one sample as a 64x64 RGB PIL image (deterministic: no randomness here)."""
    scale = 2  # draw at 2x, then box-filter down: anti-aliased edges
    image = Image.new("RGB", (IMAGE_SIZE * scale, IMAGE_SIZE * scale), COLOURS[sample.background])
    diameter = SIZES[sample.size] * sample.scale
    cx, cy = _centre(sample, diameter)
    polygon = [(x * scale, y * scale) for x, y in _outline(sample.shape, cx, cy, diameter / 2)]
    ImageDraw.Draw(image).polygon(polygon, fill=COLOURS[sample.colour])
    return image.reduce(scale)


def draw_batch(seed: int | list[int], count: int, *, held_out: bool = False) -> tuple[np.ndarray, list[Sample]]:
    """``count`` images as a uint8 array (count, 64, 64, 3) and their samples; a pure function of the arguments.

    ``seed`` may be a list (e.g. ``[run_seed, step]``), as numpy's SeedSequence takes, so a trainer can
    draw the batch of any step directly, which makes resumed runs see exactly the data an unbroken run sees.
    """
    rng = np.random.default_rng(seed)
    samples = draw_samples(rng, count, held_out=held_out)
    images = np.stack([np.asarray(render(sample)) for sample in samples])
    return images, samples


def held_out_prompts(count: int = 48, *, seed: int = 0) -> Iterator[tuple[str, Sample]]:
    """``count`` evaluation prompts: every :data:`HELD_OUT` triple in turn (sorted), size and position drawn."""
    rng = np.random.default_rng(seed)
    triples = sorted(HELD_OUT)
    for index in range(count):
        colour, shape, background = triples[index % len(triples)]
        size = ("small", "large")[int(rng.integers(2))]
        name_size = bool(rng.integers(2))
        sample = Sample(shape, colour, background, size, "centre", name_size, False)
        yield sample.caption, sample

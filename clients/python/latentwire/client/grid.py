"""X/Y/Z grids (AUTOMATIC1111's X/Y/Z plot): axis types, value lists with ranges, and the grid request.

A grid is one Generate request with ``GenerateRequest.grid`` set: the orchestrator runs the request once per
cell, each cell with the values of its column (X), row (Y) and grid (Z) applied, as one job, and returns every
cell's image and the labelled grid PNGs::

    from latentwire.client import Client
    from latentwire.client import grid

    request = Client.build_request("a cabin in the woods", steps=20)
    request.grid.CopyFrom(grid.sweep(x=grid.parse_axis("Seed: 1-3"), y=grid.parse_axis("CFG Scale: 5, 7.5")))
    with Client() as client:
        result = grid.run(client, request)      # result.grids[0] is the grid PNG, result.cells every cell's

An axis is written ``TYPE: VALUES`` as in A1111's script: VALUES is a comma-separated list (double quotes keep
commas inside a value), and an item of a number axis may be a range: ``1-5`` (every integer from 1 to 5),
``1-10 (+2)`` (1, 3, 5, 7, 9), ``10-1 (-3)``, ``0.5-1.5 (+0.5)``, ``1-3 [5]`` (five values evenly spaced from 1
to 3, both ends included; integers truncated, as A1111 does). The server expands the items with this same module
(:func:`expand`), so the rule lives once. Differences from A1111, where its behaviour is an accident: a value that
is a plain number is never read as a range ("1e-05"), a space before an opening quote is allowed (``a, "b, c"``),
and a range with step 0 or one that gives no value is refused instead of failing later.

Torch-free, like the rest of the client.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
from google.protobuf.descriptor import FieldDescriptor

from latentwire.orchestrator.v1 import orchestrator_pb2

if TYPE_CHECKING:
    from .client import Client

__all__ = ["AXES", "AxisError", "AxisType", "GridResult", "axes_from_parameters", "expand", "find_axis", "format_label", "list_axes",
           "parse_axis", "run", "split_values", "sweep"]

#: Values one axis may expand to before anything else is checked: a range like "1-1000000000" is refused from
#: its length, not built. The server's own limit on cells (--max-grid-cells) is usually far lower.
MAX_AXIS_VALUES = 10_000

#: A1111's script title, written into a grid PNG's parameters ("Script: X/Y/Z plot").
SCRIPT_TITLE = "X/Y/Z plot"


class AxisError(ValueError):
    """An axis that cannot be used: an unknown type or a value its type does not take. ``axis`` is the axis type's
    name ("" when the type itself is unknown); the message says what is wrong without naming the axis, so the
    caller names it its own way ("--x", "grid x axis")."""

    def __init__(self, axis: str, message: str):
        super().__init__(message)
        self.axis = axis


@dataclass(frozen=True)
class AxisType:
    """One kind of axis: the request setting it varies and how its values read and are labelled."""

    #: Name as A1111's X/Y/Z plot labels it ("Seed", "CFG Scale"), also the legend's prefix.
    name: str
    #: "int", "float", "str", "bool", "seed" (an integer; -1 draws a random seed) or "size" (WIDTHxHEIGHT).
    kind: str
    #: GenerateRequest field it sets; "" for the axes that set more than one (Prompt S/R, Size) or LoRA weight.
    field: str
    #: Other names it is found by, lower case ("cfg", "guidance_scale").
    aliases: tuple[str, ...] = ()
    #: Whether the legend writes "Name: value" (A1111's default) or the bare value (Sampler, Prompt S/R).
    labelled: bool = True
    #: The LoRA a "LoRA weight" axis weighs (``lora=NAME``); "" for every other axis.
    lora: str = ""

    @property
    def key(self) -> str:
        """What the axis varies, for telling two axes of a grid apart (the same field on two axes is refused)."""
        return f"lora={self.lora}" if self.lora else (self.field or self.name.lower())


#: The named axes, as A1111's X/Y/Z plot names them (plus Width, Height, Size and Scheduler); any other scalar
#: GenerateRequest field is an axis by its field name (:func:`find_axis`). Those whose field this build's
#: GenerateRequest does not have (added by later parts of issue 13) are left out by find_axis.
AXES: tuple[AxisType, ...] = (
    AxisType("Seed", "seed", "seed"),
    AxisType("Steps", "int", "num_inference_steps", ("num_inference_steps",)),
    AxisType("CFG Scale", "float", "guidance_scale", ("cfg", "cfg_scale", "guidance", "guidance_scale")),
    AxisType("Sampler", "str", "sampler", labelled=False),
    AxisType("Schedule type", "str", "schedule_type", ("schedule_type",)),
    AxisType("Scheduler", "str", "scheduler", labelled=False),
    AxisType("Prompt S/R", "str", "", ("prompt_sr", "prompt sr", "s/r"), labelled=False),
    AxisType("Width", "int", "width"),
    AxisType("Height", "int", "height"),
    AxisType("Size", "size", ""),
    AxisType("Denoising", "float", "strength", ("denoising strength", "denoising_strength", "strength")),
    AxisType("Eta", "float", "eta"),
    AxisType("Var. seed", "seed", "subseed", ("variation seed", "subseed")),
    AxisType("Var. strength", "float", "subseed_strength", ("variation strength", "subseed_strength")),
    AxisType("Clip skip", "int", "clip_skip", ("clip_skip",)),
    AxisType("Refiner switch at", "float", "refiner_switch_at", ("refiner_switch_at",)),
    AxisType("Tiling", "bool", "tiling"),
)

#: GenerateRequest fields that are no grid axis: they shape the job, not the image (or its cells could not
#: share one grid).
NOT_AXES = frozenset({"priority", "cancel_on_disconnect", "include_pixels", "num_images", "batch_count"})

_KINDS = {
    FieldDescriptor.TYPE_INT32: "int", FieldDescriptor.TYPE_INT64: "int", FieldDescriptor.TYPE_UINT32: "int",
    FieldDescriptor.TYPE_UINT64: "int", FieldDescriptor.TYPE_SINT32: "int", FieldDescriptor.TYPE_SINT64: "int",
    FieldDescriptor.TYPE_DOUBLE: "float", FieldDescriptor.TYPE_FLOAT: "float", FieldDescriptor.TYPE_STRING: "str",
    FieldDescriptor.TYPE_BOOL: "bool",
}
_LORA = re.compile(r"lora\s*=\s*(\S.*)", re.IGNORECASE)


def _scalar_fields() -> dict[str, str]:
    """GenerateRequest's scalar fields (number, string, bool; not repeated) by name, with their kind."""
    fields = {}
    for descriptor in orchestrator_pb2.GenerateRequest.DESCRIPTOR.fields:
        repeated = getattr(descriptor, "is_repeated", None)
        repeated = descriptor.label == FieldDescriptor.LABEL_REPEATED if repeated is None else repeated
        if not repeated and descriptor.type in _KINDS:
            fields[descriptor.name] = _KINDS[descriptor.type]
    return fields


def list_axes() -> list[AxisType]:
    """The named axes this build takes (those whose request field exists), in table order."""
    fields = _scalar_fields()
    return [axis for axis in AXES if not axis.field or axis.field in fields]


def find_axis(text: str) -> AxisType:
    """The axis type ``text`` names, case-insensitive: a name of :data:`AXES` or one of its aliases, a scalar
    GenerateRequest field name ("eta"), or ``lora=NAME`` (the weight of that LoRA). Raises AxisError."""
    wanted = " ".join(text.strip().lower().replace("-", " ").split())
    if not wanted:
        raise AxisError("", "the axis has no type; name one such as Seed, Steps, CFG Scale, Sampler or "
                              "Prompt S/R (`latentwire grid --help` lists them)")
    lora = _LORA.fullmatch(text.strip())
    if lora:
        return AxisType(f"LoRA {lora.group(1).strip()}", "float", "", labelled=True, lora=lora.group(1).strip())
    fields = _scalar_fields()
    for axis in list_axes():
        names = {axis.name.lower(), axis.name.lower().replace(".", ""), *axis.aliases, axis.field}
        if wanted in names or wanted.replace(" ", "_") in names:
            return axis
    name = wanted.replace(" ", "_")
    if name in fields and name not in NOT_AXES:
        return AxisType(name, fields[name], name)
    known = ", ".join(axis.name for axis in list_axes())
    raise AxisError("", f"{_short(text)} is not an axis type; use one of {known}, a scalar request field by name "
                          "(eta, guidance_rescale, ...) or lora=NAME")


def split_values(text: str) -> list[str]:
    """A comma-separated value list as A1111 reads one (a CSV row, each value stripped; double quotes keep commas
    inside a value); empty values are dropped."""
    values = []
    for row in csv.reader([text], skipinitialspace=True):
        values += [value.strip() for value in row]
    return [value for value in values if value]


def parse_axis(spec: str) -> orchestrator_pb2.GridAxis:
    """``"TYPE: VALUES"`` (``"Seed: 1-3, 7"``, ``'Prompt S/R: cat, "a dog, running"'``) -> a GridAxis with the type
    as given and the values split (ranges are expanded by the server, or by :func:`expand`). Raises AxisError."""
    kind, sep, values = spec.partition(":")
    if not sep:
        raise AxisError("", f"{_short(spec)} is not TYPE: VALUES (for example 'Seed: 1, 2, 3' or 'Steps: 10-30 (+10)')")
    axis_type = find_axis(kind)
    items = split_values(values)
    if not items:
        raise AxisError(axis_type.name, "it has no values; list them after the colon")
    return orchestrator_pb2.GridAxis(type=kind.strip(), values=items)


def axes_from_parameters(params: dict[str, str]) -> dict[str, str]:
    """The axes a grid PNG's parameters record (A1111's "X Type" / "X Values" fields, "Fixed X Values" first when
    A1111 wrote the seeds it drew), as ``{"x": "Seed: 1, 2", ...}`` for :func:`parse_axis`; {} for a PNG of no
    grid. ``params`` as latentwire.client.infotext.parse_parameters returns them."""
    axes = {}
    for key in ("x", "y", "z"):
        kind = params.get(f"{key.upper()} Type", "")
        values = params.get(f"Fixed {key.upper()} Values") or params.get(f"{key.upper()} Values", "")
        if kind and kind != "Nothing" and values:
            axes[key] = f"{kind}: {values}"
    return axes


def sweep(x: orchestrator_pb2.GridAxis, y: orchestrator_pb2.GridAxis | None = None,
          z: orchestrator_pb2.GridAxis | None = None, *, legend: bool = True) -> orchestrator_pb2.GridSweep:
    """A GridSweep of up to three axes (X: columns, Y: rows, Z: one grid each)."""
    grid = orchestrator_pb2.GridSweep(x=x, no_legend=not legend)
    if y is not None:
        grid.y.CopyFrom(y)
    if z is not None:
        grid.z.CopyFrom(z)
    return grid


# Ranges as A1111's xyz_grid.py writes them (re_range, re_range_float, re_range_count, re_range_count_float), the
# decimal point escaped: "START-END", "START-END (+STEP)", "START-END [COUNT]".
_NUMBER = r"[+-]?\s*\d+"
_DECIMAL = r"[+-]?\s*\d+(?:\.\d*)?"
_INT_STEP = re.compile(rf"\s*({_NUMBER})\s*-\s*({_NUMBER})(?:\s*\(([+-]\d+)\s*\))?\s*")
_FLOAT_STEP = re.compile(rf"\s*({_DECIMAL})\s*-\s*({_DECIMAL})(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")
_INT_COUNT = re.compile(rf"\s*({_NUMBER})\s*-\s*({_NUMBER})(?:\s*\[(\d+)\s*])?\s*")
_FLOAT_COUNT = re.compile(rf"\s*({_DECIMAL})\s*-\s*({_DECIMAL})(?:\s*\[(\d+(?:\.\d*)?)\s*])?\s*")
_SIZE = re.compile(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _number(text: str, kind: str) -> int | float:
    return int(text.replace(" ", "")) if kind == "int" else float(text.replace(" ", ""))


def _expand_item(axis: AxisType, item: str, limit: int) -> list:
    """The values one item of a number axis stands for: the number, or a range's values."""
    kind = "int" if axis.kind in ("int", "seed") else "float"
    try:
        return [_number(item, kind)]
    except ValueError:
        pass
    step_match = (_INT_STEP if kind == "int" else _FLOAT_STEP).fullmatch(item)
    count_match = (_INT_COUNT if kind == "int" else _FLOAT_COUNT).fullmatch(item)
    if step_match is not None:
        start, end = _number(step_match.group(1), kind), _number(step_match.group(2), kind)
        step = _number(step_match.group(3), kind) if step_match.group(3) is not None else 1
        if step == 0:
            raise AxisError(axis.name, f"range {_short(item)} has step 0; use a step such as (+1)")
        if kind == "int":
            values = range(start, end + 1, step)  # as A1111: END included for a positive step
            count = len(values)
        else:
            count = max(0, math.ceil((end + step - start) / step))
        if count > limit:
            raise AxisError(axis.name, f"range {_short(item)} gives {count} values; at most {limit}")
        if kind == "float":
            values = np.arange(start, end + step, step).tolist()
        values = list(values)
    elif count_match is not None:
        start, end = _number(count_match.group(1), kind), _number(count_match.group(2), kind)
        count = int(float(count_match.group(3))) if count_match.group(3) is not None else 1
        if count > limit:
            raise AxisError(axis.name, f"range {_short(item)} asks for {count} values; at most "
                                       f"{limit}")
        spaced = np.linspace(start=start, stop=end, num=count).tolist()
        values = [int(v) for v in spaced] if kind == "int" else spaced
    else:
        what = "an integer" if kind == "int" else "a number"
        raise AxisError(axis.name, f"{_short(item)} is not {what} or a range such as 1-5, "
                                   "1-10 (+2) or 1-3 [3]")
    if not values:
        raise AxisError(axis.name, f"range {_short(item)} gives no values; check its ends and "
                                   "the sign of its step")
    return values


def expand(axis: AxisType, items: list[str] | tuple[str, ...], *, limit: int = MAX_AXIS_VALUES) -> list:
    """The typed values of an axis from its items: ranges expanded (number axes), numbers parsed, WIDTHxHEIGHT as
    (width, height), booleans from true/false/yes/no/1/0; at most ``limit`` values. Raises AxisError naming the
    axis and the item."""
    if not items:
        raise AxisError(axis.name, "it has no values; list at least one")
    values: list = []
    for item in items:
        if axis.kind in ("int", "float", "seed"):
            values += _expand_item(axis, item, limit - len(values))
        elif axis.kind == "size":
            match = _SIZE.fullmatch(item)
            if match is None:
                raise AxisError(axis.name, f"{_short(item)} is not WIDTHxHEIGHT (such as 512x768)")
            values.append((int(match.group(1)), int(match.group(2))))
        elif axis.kind == "bool":
            word = item.strip().lower()
            if word not in _TRUE + _FALSE:
                raise AxisError(axis.name, f"{_short(item)} is not true or false")
            values.append(word in _TRUE)
        else:
            values.append(item)
        if len(values) > limit:
            raise AxisError(axis.name, f"it has more than {limit} values")
    if axis.kind == "seed":
        for value in values:
            if value < -1 or value >= 2**64:
                raise AxisError(axis.name, f"seed {value} is out of range; use 0 to 2^64-1, or -1 "
                                           "for a random seed")
    return values


def format_value(value) -> str:
    """A value as the legend and the stored request write it (floats rounded to 8 digits, as A1111's labels)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(round(value, 8))
    if isinstance(value, tuple):
        return f"{value[0]}x{value[1]}"
    return str(value)


def format_label(axis: AxisType, value) -> str:
    """The legend text of one value: "Seed: 3", "CFG Scale: 7.5", or the bare value for Sampler and Prompt S/R."""
    text = format_value(value)
    return f"{axis.name}: {text}" if axis.labelled else text


def _short(text: str, limit: int = 40) -> str:
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


@dataclass
class GridResult:
    """What one grid job produced."""

    job_id: str
    seed: int
    #: The labelled grid PNGs, one per Z value (one without a Z axis).
    grids: list[bytes]
    #: Every cell's PNG (with its own parameters text), x fastest, then y, then z.
    cells: list[bytes]
    #: Where each cell lies and its labels, in the order of ``cells``.
    cell_info: list[orchestrator_pb2.GridCell] = field(default_factory=list)
    total_seconds: float = 0.0


def run(client: Client, request: orchestrator_pb2.GenerateRequest,
        on_event: Callable[[orchestrator_pb2.GenerateResponse], None] | None = None) -> GridResult:
    """Run a grid request (``request.grid`` set) to the end through ``client``; ``on_event`` sees every progress
    event. Stopping early (an exception, Ctrl-C) cancels the job when the request asks cancel_on_disconnect.
    Raises LatentwireError."""
    from contextlib import closing

    import grpc

    from .errors import LatentwireError

    job_id = ""
    with closing(client.events(request)) as events:
        for event in events:
            if on_event is not None:
                on_event(event)
            kind = event.WhichOneof("event")
            if kind == "accepted":
                job_id = event.accepted.job_id
            elif kind == "result":
                result = event.result
                return GridResult(job_id=job_id, seed=result.seed, grids=[g.png for g in result.grid_images],
                                  cells=[image.png for image in result.images], cell_info=list(result.grid_cells),
                                  total_seconds=result.total_seconds)
    raise LatentwireError(grpc.StatusCode.INTERNAL, "the stream ended without a result", address=client.address)

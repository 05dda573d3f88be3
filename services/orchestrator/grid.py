"""X/Y/Z grids (AUTOMATIC1111's X/Y/Z plot): a Generate request with ``grid`` set, run as ONE job.

Acceptance (``resolve_grid``, called by request.resolve_request): the axes' types and values are read with the
client's table (latentwire.client.grid: one rule for the CLI and the server), ranges expanded, seeds of -1
drawn, and every cell resolved as a request of its own (the base request with its axis values applied, through
resolve_request), so whatever a cell would be refused for is refused before the job exists, the message naming
the axis (and value) at fault. The job keeps the base params plus a ``GridPlan``: the axes with their resolved
values and, per cell, the params that differ from the base (``overrides``). ``GridPlan.to_proto`` is what the
job store keeps (values explicit), so a restart resolves the same cells. A LoRA weight axis (``lora=NAME``) sets
that LoRA's weight in ``loras``; a Prompt S/R that edits a ``<lora:...>`` tag makes the cell read its own tags;
the LoRAs a cell has of its own are pinned to registry versions with the base's (``pin_cells``).

Running (``run_grid``): the cells one after another, x fastest, then y, then z (A1111's order for axes of equal
cost), each through execution.run_generation with the job's id, so a cell's image equals the same request run
alone, and cancelling the job stops the cell in flight and the rest. Events: a GridCellStarted before each cell,
the cell's own events, and DenoisingStep events counting the steps of all cells together (a cell's steps are
known exactly once its first step arrives; the cells after it count their num_inference_steps until then).
Last: the result, every cell's PNG (its own infotext) in ``images`` and the labelled grid PNGs, one per Z value,
drawn with PIL's default font as A1111's draw_grid_annotations lays them out (X labels centred over the columns,
Y labels centred left of the rows, the Z label above its grid).
"""
from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from latentwire.client import grid as axes_table
from latentwire.client import samplers
from latentwire.orchestrator.v1 import orchestrator_pb2
from services.runtime.errors import FailedPrecondition, InvalidArgument, quote
from services.runtime.jobs import Job

from .deadline import Deadline

if TYPE_CHECKING:
    from .config import OrchestratorSettings
    from .replicas import Stages
    from .request import GenerateParams

log = logging.getLogger(__name__)

#: Most pixels all the cells of one grid job may have together (about 32 cells of 1024x1024): every cell's PNG
#: and the grid PNGs travel in one result message and are kept in the job store.
MAX_GRID_PIXELS = 32 * 1024 * 1024
#: Side assumed for a width or height left to the model's default when the grid's pixels are counted at
#: acceptance (the largest default of the families: SDXL, Flux).
DEFAULT_SIDE_ESTIMATE = 1024
#: Smallest legend font size in pixels; otherwise (cell width + height) / 25, as A1111's draw_grid_annotations.
MIN_FONT_SIZE = 10
_AXIS_KEYS = ("x", "y", "z")


@dataclass(frozen=True)
class GridAxisPlan:
    """One axis of an accepted grid: its type and its values, resolved."""

    #: "x", "y" or "z".
    key: str
    #: The type as the request wrote it ("seed"): written back to the job store and the grid's infotext.
    given: str
    axis: axes_table.AxisType
    #: Typed values (ints, floats, strings, (width, height), bools), seeds of -1 already drawn.
    values: tuple
    #: Legend text of each value ("Seed: 3").
    labels: tuple[str, ...]


@dataclass(frozen=True)
class GridCellPlan:
    """One cell: where it lies and the params it runs with beyond the base's."""

    index: int
    x: int
    y: int
    z: int
    #: (GenerateParams field, value) pairs where the cell differs from the base request.
    overrides: tuple[tuple[str, object], ...]


@dataclass(frozen=True)
class GridPlan:
    """An accepted grid: the axes, the cells in run order and whether the grids carry a legend."""

    axes: tuple[GridAxisPlan, ...]
    cells: tuple[GridCellPlan, ...]
    legend: bool = True

    def axis(self, key: str) -> GridAxisPlan | None:
        return next((axis for axis in self.axes if axis.key == key), None)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Values on the X, Y and Z axes (1 for an absent axis)."""
        x, y, z = (len(axis.values) if axis else 1 for axis in map(self.axis, _AXIS_KEYS))
        return x, y, z

    def to_proto(self) -> orchestrator_pb2.GridSweep:
        """The sweep with every value explicit (ranges expanded, random seeds drawn): resolving it again gives the
        same cells."""
        sweep = orchestrator_pb2.GridSweep(no_legend=not self.legend)
        for axis in self.axes:
            getattr(sweep, axis.key).CopyFrom(orchestrator_pb2.GridAxis(
                type=axis.given, values=[axes_table.format_value(v) if not isinstance(v, float) else repr(v)
                                         for v in axis.values]))
        return sweep

    def cell_proto(self, cell: GridCellPlan, seed: int) -> orchestrator_pb2.GridCell:
        labels = {axis.key: axis.labels[getattr(cell, axis.key)] for axis in self.axes}
        return orchestrator_pb2.GridCell(index=cell.index, x_index=cell.x, y_index=cell.y, z_index=cell.z,
                                         x_label=labels.get("x", ""), y_label=labels.get("y", ""),
                                         z_label=labels.get("z", ""), seed=seed)


# -- acceptance ------------------------------------------------------------------------------------


def resolve_grid(request: orchestrator_pb2.GenerateRequest, base: GenerateParams,
                 settings: OrchestratorSettings) -> GridPlan:
    """The plan of a grid request whose base (the request without ``grid``) resolved to ``base``; every cell is
    resolved as a request of its own. Raises InvalidArgument (the axis named) for what a cell would be refused."""
    from .request import resolve_request

    sweep = request.grid
    max_cells = settings.limits.max_grid_cells
    axes = tuple(_resolve_axis(key, getattr(sweep, key), max_cells) for key in _AXIS_KEYS if sweep.HasField(key))
    if not axes or axes[0].key != "x":
        raise InvalidArgument("grid has no x axis; set grid.x (the axis along the columns), then y and z if "
                              "wanted", reason="GRID_AXIS_MISSING")
    _check_distinct(axes)
    shape = [len(axis.values) for axis in axes]
    count = 1
    for n in shape:
        count *= n
    if count > max_cells:
        raise InvalidArgument(
            f"the grid has {' x '.join(map(str, shape))} = {count} cells; this orchestrator runs at most "
            f"{max_cells} (--max-grid-cells): use fewer values", reason="GRID_TOO_LARGE",
            metadata={"cells": count, "max_grid_cells": max_cells})
    if base.num_images > 1 or base.batch_count > 1:
        raise InvalidArgument("a grid makes one image per cell; leave num_images and batch_count at 1 (sweep seeds "
                              "with a Seed axis instead)", reason="GRID_BATCH_NOT_SUPPORTED")
    for axis in axes:
        if axis.axis.name == "Prompt S/R":
            search = axis.values[0]
            if search not in base.prompt and search not in base.negative_prompt:
                raise InvalidArgument(
                    f"grid {axis.key} axis (Prompt S/R): its first value {quote(search)} is not in the prompt or "
                    "the negative prompt; the first value is the text each value replaces",
                    reason="GRID_PROMPT_SR_NOT_FOUND", metadata={"axis": axis.key})

    base_request = base.to_request()
    if not base_request.HasField("subseed"):
        # A cell that turns variation on (a Var. strength axis) without a variation seed gets the same one as every
        # other cell (A1111 fixes the seeds before the cells), and the same again when the stored job is resolved
        # after a restart (nothing stores a seed drawn here): the seed after the job's.
        base_request.subseed = (base.seed + 1) % 2**64
    by_key = {axis.key: axis for axis in axes}
    nx, ny, nz = (len(by_key[k].values) if k in by_key else 1 for k in _AXIS_KEYS)
    cells = []
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                position = {"x": x, "y": y, "z": z}
                chosen = tuple((by_key[k], position[k]) for k in _AXIS_KEYS if k in by_key)
                params = _resolve_cell(base_request, chosen, settings, resolve_request)
                cells.append(GridCellPlan(index=len(cells), x=x, y=y, z=z, overrides=_differences(base, params)))
    plan = GridPlan(axes=axes, cells=tuple(cells), legend=not sweep.no_legend)
    _check_pixels(plan, base)
    return plan


def _resolve_axis(key: str, message: orchestrator_pb2.GridAxis, max_cells: int) -> GridAxisPlan:
    """One axis's type and values, or InvalidArgument naming the axis."""
    try:
        axis = axes_table.find_axis(message.type)
    except axes_table.AxisError as error:
        raise InvalidArgument(f"grid {key} axis: {error}", reason="GRID_UNKNOWN_AXIS", metadata={"axis": key}) from None
    try:
        values = axes_table.expand(axis, list(message.values), limit=max_cells)
    except axes_table.AxisError as error:
        raise InvalidArgument(f"grid {key} axis ({error.axis}): {error}", reason="GRID_INVALID_VALUE",
                              metadata={"axis": key}) from None
    if axis.kind == "seed":  # A1111: -1 is a random seed, drawn once at acceptance
        values = [secrets.randbelow(2**32) if value == -1 else value for value in values]
    return GridAxisPlan(key=key, given=message.type.strip(), axis=axis, values=tuple(values),
                        labels=tuple(axes_table.format_label(axis, value) for value in values))


def _check_distinct(axes: tuple[GridAxisPlan, ...]) -> None:
    """Two axes may not set the same request field (two Prompt S/R axes may, each with its own search text)."""
    seen: list[tuple[set, GridAxisPlan]] = []
    for axis in axes:
        what = _fields_set(axis)
        for earlier_fields, earlier in seen:
            if what & earlier_fields:
                raise InvalidArgument(
                    f"grid {axis.key} axis ({axis.axis.name}) sets what the {earlier.key} axis ({earlier.axis.name}) "
                    "sets already; sweep each setting on one axis", reason="GRID_DUPLICATE_AXIS",
                    metadata={"axis": axis.key})
        seen.append((what, axis))


def _fields_set(axis: GridAxisPlan) -> set:
    """The request fields an axis sets (what _apply changes), to find two axes that would overwrite each other."""
    kind = axis.axis
    if kind.name == "Prompt S/R":
        return {("prompt s/r", axis.values[0])}
    if kind.name == "Size":
        return {"width", "height"}
    if kind.field == "scheduler":
        return {"scheduler", "sampler", "schedule_type"}
    if kind.field == "sampler":
        return {"sampler", "scheduler"}
    return {kind.key}


def _apply(request: orchestrator_pb2.GenerateRequest, axis: GridAxisPlan, value) -> None:
    """Set one axis value on a request (a copy of the base's)."""
    kind = axis.axis
    if kind.lora:
        _apply_lora_weight(request, kind.lora, value)
    elif kind.name == "Prompt S/R":
        search = axis.values[0]
        request.prompt = request.prompt.replace(search, value)
        request.negative_prompt = request.negative_prompt.replace(search, value)
    elif kind.name == "Size":
        request.width, request.height = value
    elif kind.field == "sampler":
        # A sampler replaces a scheduler class; a combined name ("DPM++ 2M Karras") brings its schedule type.
        request.sampler, request.scheduler = value, ""
        found = samplers.split_combined(value)
        if found is not None and found[1] is not None:
            request.schedule_type = ""
    elif kind.field == "scheduler":
        request.scheduler, request.sampler, request.schedule_type = value, "", ""
    else:
        setattr(request, kind.field, value)


def _apply_lora_weight(request: orchestrator_pb2.GenerateRequest, name: str, weight: float) -> None:
    """Set the weight of LoRA ``name`` (as the prompt's tag or the loras field names it, before any '@') in the
    request's loras field, adding it when the base request lacks it; the field's entry counts over a tag."""
    for lora in request.loras:
        if lora.model.name.partition("@")[0] == name:
            lora.weight = weight
            return
    request.loras.add(weight=weight).model.name = name


def _forget_tag_loras(request: orchestrator_pb2.GenerateRequest, base_prompt: str) -> None:
    """After a Prompt S/R changed the prompt: drop the loras field's entries that the base prompt's <lora:...>
    tags put there (the stored base request lists them), so the cell's own tags count, as A1111 reads a prompt
    S/R of "<lora:x:0.5>" to "<lora:x:1>"."""
    if "<" not in base_prompt:
        return
    from .loras import prompt_loras

    tagged = {entry.model.name.partition("@")[0] for entry in prompt_loras(base_prompt)}
    kept = [entry for entry in request.loras if entry.model.name.partition("@")[0] not in tagged]
    if len(kept) != len(request.loras):
        del request.loras[:]
        request.loras.extend(kept)


def _resolve_cell(base_request: orchestrator_pb2.GenerateRequest, chosen: tuple[tuple[GridAxisPlan, int], ...],
                  settings: OrchestratorSettings, resolve) -> GenerateParams:
    """Resolve the base request with the ``chosen`` (axis, value index) pairs applied. A refusal names the axis
    value at fault: the one that is refused alone, else the cell's combination of values."""
    try:
        return resolve(_cell_request(base_request, chosen), settings)
    except (InvalidArgument, FailedPrecondition) as error:
        culprit = chosen
        if len(chosen) > 1:
            for pair in chosen:
                try:
                    resolve(_cell_request(base_request, (pair,)), settings)
                except (InvalidArgument, FailedPrecondition) as alone:
                    culprit, error = (pair,), alone
                    break
        if len(culprit) == 1:
            axis, i = culprit[0]
            where = f"grid {axis.key} axis ({axis.axis.name}) value {quote(axis.labels[i])}"
        else:
            where = "grid cell " + ", ".join(f"{axis.key} {quote(axis.labels[i])}" for axis, i in culprit)
        raise type(error)(f"{where}: {error.message}", reason=error.reason,
                          metadata={**error.metadata, "axis": ",".join(axis.key for axis, _ in culprit)}) from None


def _cell_request(base_request: orchestrator_pb2.GenerateRequest, chosen: tuple[tuple[GridAxisPlan, int], ...]
                  ) -> orchestrator_pb2.GenerateRequest:
    """The base request with the chosen axis values applied: a Sampler or Scheduler axis first (they reset the
    schedule type a Schedule type axis may then set)."""
    request = orchestrator_pb2.GenerateRequest()
    request.CopyFrom(base_request)
    request.ClearField("grid")
    for axis, i in sorted(chosen, key=lambda pair: pair[0].axis.field not in ("sampler", "scheduler")):
        try:
            _apply(request, axis, axis.values[i])
        except (TypeError, ValueError):  # protobuf refuses a number out of the field's range
            raise InvalidArgument(f"grid {axis.key} axis ({axis.axis.name}) value {quote(axis.labels[i])} is out of "
                                  "the range of its request field", reason="GRID_INVALID_VALUE",
                                  metadata={"axis": axis.key}) from None
    if request.prompt != base_request.prompt:
        _forget_tag_loras(request, base_request.prompt)
    return request


def _differences(base: GenerateParams, cell: GenerateParams) -> tuple[tuple[str, object], ...]:
    return tuple((f.name, getattr(cell, f.name)) for f in dataclasses.fields(cell)
                 if f.name != "grid" and getattr(cell, f.name) != getattr(base, f.name))


async def pin_cells(plan: GridPlan, resolve_model) -> GridPlan:
    """The plan with the LoRAs of cells that have their own (a LoRA axis, a Prompt S/R on a <lora:...> tag) pinned
    to registry versions, as request.pin_models pins the base's: a cell runs exactly the versions of acceptance.
    Nothing else a cell overrides names a model."""
    if not any(name == "loras" for cell in plan.cells for name, _ in cell.overrides):
        return plan
    from .loras import pin_loras

    cells = []
    for cell in plan.cells:
        overrides = tuple((name, await pin_loras(value, resolve_model) if name == "loras" else value)
                          for name, value in cell.overrides)
        cells.append(dataclasses.replace(cell, overrides=overrides))
    return dataclasses.replace(plan, cells=tuple(cells))


def cell_params(params: GenerateParams, cell: GridCellPlan) -> GenerateParams:
    """What one cell runs with: the job's (pinned) params with the cell's overrides, without the grid."""
    return dataclasses.replace(params, grid=None, **dict(cell.overrides))


def _check_pixels(plan: GridPlan, base: GenerateParams) -> None:
    """All the cells' pixels together within MAX_GRID_PIXELS; with include_pixels, one size for every cell."""
    sizes = [(p.width or DEFAULT_SIDE_ESTIMATE, p.height or DEFAULT_SIDE_ESTIMATE)
             for p in (cell_params(base, cell) for cell in plan.cells)]
    total = sum(w * h for w, h in sizes)
    if total > MAX_GRID_PIXELS:
        raise InvalidArgument(
            f"the grid's cells hold {total / 1e6:.1f} megapixels together (a size left to the model counts as "
            f"{DEFAULT_SIDE_ESTIMATE}); at most {MAX_GRID_PIXELS / 1e6:.1f} are made in one job: use fewer cells "
            "or smaller sizes (set width and height)", reason="GRID_TOO_LARGE",
            metadata={"pixels": total, "max_pixels": MAX_GRID_PIXELS})
    if base.include_pixels and len(set(sizes)) > 1:
        raise InvalidArgument("include_pixels needs one size for every cell of a grid; drop the size axis or "
                              "include_pixels", reason="GRID_PIXELS_SIZES_DIFFER")


# -- running ---------------------------------------------------------------------------------------


async def run_grid(stages: Stages, params: GenerateParams, job: Job, deadline: Deadline
                   ) -> AsyncIterator[orchestrator_pb2.GenerateResponse]:
    """Run an accepted grid job: each cell through execution.run_generation, one after another; yield progress
    events (GridCellStarted, the cells' own, DenoisingStep counting all cells' steps) and, last, the result."""
    from .execution import run_generation

    plan: GridPlan = params.grid
    started = time.perf_counter()
    runs = [cell_params(params, cell) for cell in plan.cells]
    # Steps per cell: num_inference_steps until the cell's own first step says how many it runs.
    steps = [run.num_inference_steps for run in runs]
    done = 0
    pngs: list[bytes] = []
    seeds: list[int] = []
    timings: dict[str, float] = {}
    pixels = []
    for i, (cell, run) in enumerate(zip(plan.cells, runs)):
        yield orchestrator_pb2.GenerateResponse(grid_cell=orchestrator_pb2.GridCellStarted(
            cell=plan.cell_proto(cell, run.seed), cell_count=len(plan.cells)))
        result = None
        async for event in run_generation(stages, run, job, deadline):
            kind = event.WhichOneof("event")
            if kind == "step":
                steps[i] = event.step.total_steps
                step = event.step
                step.step, step.total_steps = done + step.step, done + sum(steps[i:])
                step.elapsed_seconds = time.perf_counter() - started
                job.completed_steps, job.total_steps = step.step, step.total_steps
                yield event
            elif kind == "result":
                result = event.result
            else:
                yield event
        done += steps[i]
        pngs.append(result.images[0].png)
        seeds.append(run.seed)
        for timing in result.timings:
            timings[timing.stage] = timings.get(timing.stage, 0.0) + timing.seconds
        if result.HasField("pixels"):
            pixels.append(result.pixels)
    grids = await asyncio.to_thread(draw_grids, plan, pngs)
    response = orchestrator_pb2.GenerateResponse(result=orchestrator_pb2.GenerateResult(
        images=[orchestrator_pb2.GeneratedImage(png=png, index=i) for i, png in enumerate(pngs)],
        seed=params.seed,
        timings=[orchestrator_pb2.StageTiming(stage=stage, seconds=seconds) for stage, seconds in timings.items()],
        total_seconds=time.perf_counter() - started,
        model=params.model,
        grid_images=grids,
        grid_cells=[plan.cell_proto(cell, seed) for cell, seed in zip(plan.cells, seeds)],
    ))
    response.result.image_seeds.extend(seeds)
    if pixels:
        _join_pixels(pixels, response.result.pixels)
    yield response


def _join_pixels(parts, into) -> None:
    """The cells' float32 pixel tensors [1, H, W, 3] as one [cells, H, W, 3] (one size: checked at acceptance)."""
    into.CopyFrom(parts[0])
    into.shape[0] = sum(part.shape[0] for part in parts)
    into.raw_contents = b"".join(part.raw_contents for part in parts)


# -- drawing ---------------------------------------------------------------------------------------


def draw_grids(plan: GridPlan, pngs: list[bytes]) -> list[orchestrator_pb2.GridImage]:
    """One labelled grid PNG per Z value from the cells' PNGs (in cell order)."""
    nx, ny, nz = plan.shape
    x_axis, y_axis, z_axis = (plan.axis(k) for k in _AXIS_KEYS)
    grids = []
    for z in range(nz):
        chunk = pngs[z * nx * ny:(z + 1) * nx * ny]
        cells = [Image.open(io.BytesIO(png)).convert("RGB") for png in chunk]
        image, widths, heights = tile(cells, nx, ny)
        z_label = z_axis.labels[z] if z_axis else ""
        if plan.legend:
            x_labels = list(x_axis.labels)
            y_labels = list(y_axis.labels) if y_axis else [""]
            image = annotate(image, widths, heights, x_labels, y_labels, font_size=_font_size(cells))
            if z_axis:
                image = annotate(image, [image.width], [image.height], [z_label], [""], font_size=_font_size(cells))
        text = _grid_infotext(chunk[0], plan)
        grids.append(orchestrator_pb2.GridImage(png=_png(image, text), z_index=z, z_label=z_label))
    return grids


def tile(cells: list[Image.Image], columns: int, rows: int) -> tuple[Image.Image, list[int], list[int]]:
    """The cells in ``rows`` rows of ``columns`` (row-major), each in the top-left corner of its slot; a column is as
    wide as its widest cell, a row as high as its highest (cells differ with a size axis). Returns the image and
    the column widths and row heights."""
    widths = [max(cells[r * columns + c].width for r in range(rows)) for c in range(columns)]
    heights = [max(cells[r * columns + c].height for c in range(columns)) for r in range(rows)]
    image = Image.new("RGB", (sum(widths), sum(heights)), "black")
    for r in range(rows):
        for c in range(columns):
            image.paste(cells[r * columns + c], (sum(widths[:c]), sum(heights[:r])))
    return image, widths, heights


def _font_size(cells: list[Image.Image]) -> int:
    return max(MIN_FONT_SIZE, (max(c.width for c in cells) + max(c.height for c in cells)) // 25)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: its built-in scalable font
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def annotate(image: Image.Image, widths: list[int], heights: list[int], x_labels: list[str], y_labels: list[str],
             *, font_size: int) -> Image.Image:
    """The grid ``image`` on a white canvas with ``x_labels`` centred above its columns and ``y_labels`` centred
    left of its rows, as A1111's draw_grid_annotations lays them out: the left margin three quarters of a column
    (wider when a word needs it, none without row labels), the top margin the highest column label plus a line
    spacing above and below; labels wrap at word boundaries to their width."""
    font = _font(font_size)
    spacing = font_size // 2
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1), "white"))

    def size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    def wrap(text: str, width: int) -> list[str]:
        lines = [""]
        for word in text.split():
            line = f"{lines[-1]} {word}".strip()
            if size(line)[0] <= width or not lines[-1]:
                lines[-1] = line
            else:
                lines.append(word)
        return lines

    has_rows = any(label for label in y_labels)
    words = [size(word)[0] for label in y_labels for word in label.split()]
    pad_left = max([widths[0] * 3 // 4, *(w + spacing for w in words)]) if has_rows else 0
    columns = [wrap(label, width) for label, width in zip(x_labels, widths)]
    rows = [wrap(label, pad_left - spacing) if label else [] for label in y_labels]

    ascent, descent = font.getmetrics()
    line_height = ascent + descent  # one height for every line, so grids of different labels match in size

    def height(lines: list[str]) -> int:
        return len(lines) * line_height + spacing * max(0, len(lines) - 1)

    pad_top = max(height(lines) for lines in columns) + spacing * 2
    result = Image.new("RGB", (image.width + pad_left, image.height + pad_top), "white")
    result.paste(image, (pad_left, pad_top))
    draw = ImageDraw.Draw(result)

    def write(lines: list[str], center_x: float, top: float) -> None:
        for line in lines:
            draw.text((center_x, top + line_height / 2), line, font=font, fill=(0, 0, 0), anchor="mm")
            top += line_height + spacing

    for c, lines in enumerate(columns):
        write(lines, pad_left + sum(widths[:c]) + widths[c] / 2, pad_top / 2 - height(lines) / 2)
    for r, lines in enumerate(rows):
        write(lines, pad_left / 2, pad_top + sum(heights[:r]) + heights[r] / 2 - height(lines) / 2)
    return result


def _grid_infotext(first_cell_png: bytes, plan: GridPlan) -> str:
    """A grid's "parameters": its first cell's, with the script and its axes appended, as A1111 writes a grid's."""
    text = Image.open(io.BytesIO(first_cell_png)).text.get("parameters", "")
    extras = [f"Script: {axes_table.SCRIPT_TITLE}"]
    for axis in plan.axes:
        name = axis.key.upper()
        values = ", ".join(_csv_item(axes_table.format_value(v)) for v in axis.values)
        extras += [f"{name} Type: {_quote(axis.axis.name)}", f"{name} Values: {_quote(values)}"]
    return f"{text}, {', '.join(extras)}" if text else ", ".join(extras)


def _csv_item(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def _quote(text: str) -> str:
    # As A1111's infotext quote(): JSON-quoted when the value holds a comma, a colon or a newline.
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _png(image: Image.Image, parameters: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()

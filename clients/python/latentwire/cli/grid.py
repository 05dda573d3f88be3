"""`latentwire grid`: an X/Y/Z grid (AUTOMATIC1111's X/Y/Z plot) through a running suite, as one job.

    latentwire grid "a cabin" --x 'Seed: 1-3' --y 'CFG Scale: 5, 7.5' [--z 'Sampler: Euler a, DPM++ 2M'] \\
        [generate options] -o grid.png --cells-dir cells/

Every generate option sets the base request; each axis is ``TYPE: VALUES`` (latentwire.client.grid: ranges
``1-5``, ``1-10 (+2)``, ``1-3 [3]``, quotes around values holding commas). The grid PNGs go to -o (grid.png, then
grid-1.png ... for more Z values), each cell's PNG with its own parameters to --cells-dir.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_AXIS_HELP = ("TYPE: VALUES, e.g. 'Seed: 1-3', 'Steps: 10-30 (+10)', 'CFG Scale: 1-7 [4]', "
              "'Sampler: Euler a, DPM++ 2M', 'Prompt S/R: cat, dog', 'Size: 512x512, 512x768', 'lora=NAME: 0, 0.5, 1', "
              "or any scalar request field ('eta: 0, 0.5')")


def add_command(sub: argparse._SubParsersAction) -> None:
    """Add `latentwire grid`: the generate flags (cli/main.py), the axes and where the images go."""
    from latentwire.client import grid

    from .connection import SERVER_HELP, add_flags
    from .main import _add_generate_flags, cmd_generate

    types = ", ".join(axis.name for axis in grid.list_axes())
    p = sub.add_parser("grid", help="X/Y/Z grid: one request swept over up to three axes, run as one job",
                       description=__doc__ + f"\nAxis types: {types}; any scalar request field by name; lora=NAME.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_generate_flags(p, prompt_required=True, from_png=True)
    p.add_argument("--x", default=None, metavar="'TYPE: VALUES'",
                   help="axis along the columns (required unless --from names a grid PNG, whose axes are then "
                        "used): " + _AXIS_HELP)
    p.add_argument("--y", default=None, metavar="'TYPE: VALUES'", help="axis along the rows")
    p.add_argument("--z", default=None, metavar="'TYPE: VALUES'", help="axis across grids (one grid PNG per value)")
    p.add_argument("--cells-dir", default=None, metavar="DIR",
                   help="also write every cell's PNG (with its own parameters) to DIR as cell-000.png, ...")
    p.add_argument("--no-legend", action="store_true", help="grid PNGs without the axis labels")
    p.add_argument("--server", default=None, help=SERVER_HELP)
    add_flags(p)
    p.set_defaults(func=cmd_generate, grid_command=True, output="grid.png")


def run_grid(args: argparse.Namespace, prompt: str, settings: dict, connection: dict) -> int:
    """The grid half of cmd_generate: the base request from the generate flags' ``settings``, the axes from --x,
    --y, --z; writes the grid PNGs and the cells."""
    from latentwire.client import Client, grid

    from .main import _output_paths

    if args.save_pixels is not None:
        print("error: --save-pixels is not available for a grid; the cells' PNGs are in --cells-dir", file=sys.stderr)
        return 2
    specs = {flag: getattr(args, flag) for flag in ("x", "y", "z")}
    if specs["x"] is None and getattr(args, "from_png", None) is not None:
        from latentwire.client import infotext

        # A grid PNG (ours or A1111's) records its axes: `grid --from grid.png` makes the grid again.
        recorded = grid.axes_from_parameters(infotext.parse_parameters(
            infotext.png_parameters(Path(args.from_png).read_bytes())))
        specs = {flag: specs[flag] or recorded.get(flag) for flag in specs}
    if specs["x"] is None:
        print("error: give --x 'TYPE: VALUES' (or --from a grid PNG, whose axes are used)", file=sys.stderr)
        return 2
    axes = {}
    for flag, spec in specs.items():
        if spec is None:
            continue
        try:
            axis = grid.parse_axis(spec)
            grid.expand(grid.find_axis(axis.type), list(axis.values))  # syntax errors here; the server checks the rest
        except grid.AxisError as error:
            name = f" ({error.axis})" if error.axis else ""
            print(f"error: --{flag}{name}: {error}", file=sys.stderr)
            return 2
        axes[flag] = axis
    on_event = None if args.quiet else GridProgressBar()
    with Client(args.server, timeout=args.timeout, **connection) as client:
        if args.preview_dir is not None:
            from .previews import PreviewWriter

            on_event = PreviewWriter(Path(args.preview_dir), on_event)
        request = client.build_request(prompt, **settings)
        request.grid.CopyFrom(grid.sweep(axes["x"], axes.get("y"), axes.get("z"), legend=not args.no_legend))
        result = grid.run(client, request, on_event)
    paths = _output_paths(Path(args.output), len(result.grids))
    for path, png in zip(paths, result.grids):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
    print(f"seed {result.seed}")
    for path in paths:
        print(f"wrote {path}")
    if args.cells_dir is not None:
        folder = Path(args.cells_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for cell, png in zip(result.cell_info, result.cells):
            path = folder / f"cell-{cell.index:03d}.png"
            path.write_bytes(png)
            labels = ", ".join(label for label in (cell.x_label, cell.y_label, cell.z_label) if label)
            print(f"wrote {path} ({labels})")
    return 0


class GridProgressBar:
    """The generate progress bar, its bar named by the cell that runs ("cell 2/6 [#####.....] 9/24 ..."); the
    per-cell stage events (text encoded, decoded) are left out, one line per cell instead when not on a terminal."""

    def __init__(self, stream=None):
        from .progress import ProgressBar

        class _Bar(ProgressBar):
            cell = "grid"

            def _line(self, text: str, end: str) -> None:
                super()._line(text.replace("denoising [", f"{self.cell} [", 1), end)

        self._bar = _Bar(stream)

    def __call__(self, event) -> None:
        from latentwire.client.progress import describe

        kind = event.WhichOneof("event")
        if kind == "grid_cell":
            self._bar.cell = f"cell {event.grid_cell.cell.index + 1}/{event.grid_cell.cell_count}"
            if not self._bar.tty:
                self._bar._line(describe(event), end="\n")
        elif kind not in ("text_encoded", "image_encoded", "decoded"):
            self._bar(event)

"""X/Y/Z grids (issue 13, part G): axis parsing, acceptance, the labelled grid PNG and a grid run as one job.

Torch-free: the axis syntax of latentwire.client.grid on a table of A1111 forms (ranges, steps, counts, quotes)
and its refusals. Without a suite: resolve_request on grid requests (cells, overrides, the stored request
resolving to the same plan, every refusal with its reason and axis) and the grid drawing (cells tiled under and
right of the labels). Through a suite on the tiny SD 1.5 (32 px, 2 steps): a 2x2 grid is one job whose every cell
equals the same request run alone through Generate, with the steps of all cells counted in its progress; a grid
without legend is exactly its cells; cancelling a grid job stops it in its second cell; bad axes are refused with
INVALID_ARGUMENT before a job exists; `latentwire grid` writes the grid and the cells.
"""
from __future__ import annotations

import io
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from latentwire.client import Client, LatentwireError
from latentwire.client import grid
from latentwire.common.v1 import status_pb2
from latentwire.orchestrator.v1 import orchestrator_pb2

# ----------------------------------------------------------------------------------------------
# Axis syntax (torch-free)

PARSE_CASES = [
    # (spec, axis name, values)
    ("Seed: 1, 2, 3", "Seed", [1, 2, 3]),
    ("seed: 1-3, 7", "Seed", [1, 2, 3, 7]),
    ("Seed: -1, 5", "Seed", [-1, 5]),
    ("Steps: 1-10 (+2)", "Steps", [1, 3, 5, 7, 9]),
    ("Steps: 10-1 (-3)", "Steps", [10, 7, 4]),  # A1111: range(10, 1 + 1, -3)
    ("Steps: 1-3 [3]", "Steps", [1, 2, 3]),
    ("Steps: 1-10 [4]", "Steps", [1, 4, 7, 10]),
    ("Steps: 1-4 [3]", "Steps", [1, 2, 4]),  # linspace 1, 2.5, 4 truncated, as A1111's int()
    ("Steps: 5 - 7", "Steps", [5, 6, 7]),
    ("CFG Scale: 1-3 [5]", "CFG Scale", [1.0, 1.5, 2.0, 2.5, 3.0]),
    ("cfg: 0.5-1.5 (+0.5)", "CFG Scale", [0.5, 1.0, 1.5]),
    ("guidance_scale: 7, 7.5", "CFG Scale", [7.0, 7.5]),
    ("Eta: 1e-05, 0.5", "Eta", [1e-05, 0.5]),  # a plain number is never a range
    ("Sampler: Euler a, DPM++ 2M Karras", "Sampler", ["Euler a", "DPM++ 2M Karras"]),
    ('Prompt S/R: cat, "a dog, running", 1-5', "Prompt S/R", ["cat", "a dog, running", "1-5"]),
    ('prompt s/r: cat,"dog, x"', "Prompt S/R", ["cat", "dog, x"]),
    ("Size: 64x32, 32 x 64", "Size", [(64, 32), (32, 64)]),
    ("Denoising: 0.25-0.75 [3]", "Denoising", [0.25, 0.5, 0.75]),
    ("guidance_rescale: 0, 0.7", "guidance_rescale", [0.0, 0.7]),
    ("Width: 32, 64,, ", "Width", [32, 64]),
]


@pytest.mark.parametrize("spec, name, values", PARSE_CASES, ids=[case[0] for case in PARSE_CASES])
def test_axis_values(spec, name, values):
    axis = grid.parse_axis(spec)
    kind = grid.find_axis(axis.type)
    assert kind.name == name
    assert grid.expand(kind, list(axis.values)) == values


PARSE_ERRORS = [
    ("Seed", "is not TYPE: VALUES"),
    ("Colour: red", "is not an axis type"),
    ("priority: 1", "is not an axis type"),  # shapes the job, not the image
    ("Steps:", "has no values"),
    ("Steps: ten", "is not an integer or a range"),
    ("Steps: 5-1", "gives no values"),
    ("Steps: 1-5 (+0)", "has step 0"),
    ("Steps: 1-1000000000", "gives 1000000000 values"),
    ("CFG Scale: 1-2 [100000]", "asks for 100000 values"),
    ("Size: 64", "is not WIDTHxHEIGHT"),
    ("Seed: -2", "out of range"),
]


@pytest.mark.parametrize("spec, says", PARSE_ERRORS, ids=[case[0] for case in PARSE_ERRORS])
def test_axis_refusals(spec, says):
    with pytest.raises(grid.AxisError, match=says):
        axis = grid.parse_axis(spec)
        grid.expand(grid.find_axis(axis.type), list(axis.values))


def test_labels_as_a1111():
    assert grid.format_label(grid.find_axis("seed"), 3) == "Seed: 3"
    assert grid.format_label(grid.find_axis("cfg"), 7.0) == "CFG Scale: 7.0"
    assert grid.format_label(grid.find_axis("cfg"), 0.1 + 0.2) == "CFG Scale: 0.3"  # rounded to 8 digits
    assert grid.format_label(grid.find_axis("Sampler"), "Euler a") == "Euler a"
    assert grid.format_label(grid.find_axis("Prompt S/R"), "dog") == "dog"


def test_client_grid_module_is_torch_free():
    code = "import sys, latentwire.client.grid, latentwire.cli.grid; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------
# Acceptance without a suite


@pytest.fixture(scope="module")
def settings():
    from services.orchestrator.config import build_parser, settings_from_flags

    return settings_from_flags(build_parser().parse_args([
        "--text-encoder-address", "t:1", "--denoiser-address", "d:1", "--vae-address", "v:1",
        "--max-grid-cells", "4"]))


def _grid_request(*specs: str, **fields) -> orchestrator_pb2.GenerateRequest:
    request = orchestrator_pb2.GenerateRequest(prompt="a cat on a mat", width=32, height=32, num_inference_steps=2,
                                               **fields)
    axes = [orchestrator_pb2.GridAxis(type=spec.split(":")[0], values=grid.split_values(spec.split(":", 1)[1]))
            for spec in specs]
    request.grid.CopyFrom(grid.sweep(*axes))
    return request


def test_cells_resolve_and_the_stored_request_gives_the_same_plan(settings):
    from services.orchestrator.request import resolve_request

    params = resolve_request(_grid_request("Seed: 5, -1", "Sampler: Euler a, DPM++ 2M Karras"), settings)
    plan = params.grid
    assert plan.shape == (2, 2, 1)
    drawn = plan.axes[0].values[1]
    assert 0 <= drawn < 2**32
    overrides = [dict(cell.overrides) for cell in plan.cells]
    assert [(o.get("seed", params.seed), o.get("sampler")) for o in overrides] == [
        (5, "Euler a"), (drawn, "Euler a"), (5, "DPM++ 2M"), (drawn, "DPM++ 2M")]
    assert overrides[2]["schedule_type"] == "Karras"
    assert overrides[0]["schedule_type"] == "Automatic"  # the base has no sampler, so no schedule type either
    # What the job store keeps resolves to the same cells (random seeds included), as after a restart.
    assert resolve_request(params.to_request(), settings) == params


REFUSALS = [
    # (axes, request fields, reason, words of the message)
    (("Colour: red",), {}, "GRID_UNKNOWN_AXIS", "grid x axis: 'Colour' is not an axis type"),
    (("Steps: 2, x",), {}, "GRID_INVALID_VALUE", "grid x axis (Steps): 'x' is not an integer"),
    (("Seed: 1", "Steps: 0, 2"), {}, "INVALID_STEPS", "grid y axis (Steps) value 'Steps: 0': num_inference_steps"),
    (("Sampler: Euler a, Nope",), {}, "UNKNOWN_SAMPLER", "grid x axis (Sampler) value 'Nope'"),
    (("Prompt S/R: dog, cow",), {}, "GRID_PROMPT_SR_NOT_FOUND", "its first value 'dog' is not in the prompt"),
    (("Seed: 1-3", "Steps: 1, 2"), {}, "GRID_TOO_LARGE", "3 x 2 = 6 cells; this orchestrator runs at most 4 "
                                                          "(--max-grid-cells)"),
    (("Steps: 1, 2", "Seed: 1", "num_inference_steps: 3"), {}, "GRID_DUPLICATE_AXIS", "grid z axis (Steps) sets "
                                                                                      "what the x axis"),
    (("Seed: 1, 2",), {"num_images": 2}, "GRID_BATCH_NOT_SUPPORTED", "one image per cell"),
    (("Denoising: 0.5",), {}, "MISSING_INIT_IMAGE", "grid x axis (Denoising) value 'Denoising: 0.5'"),
    (("Size: 32x32, 64x32",), {"include_pixels": True}, "GRID_PIXELS_SIZES_DIFFER", "one size for every cell"),
]


@pytest.mark.parametrize("specs, fields, reason, says", REFUSALS, ids=[case[2] + ":" + case[0][0] for case in REFUSALS])
def test_bad_grids_are_refused_naming_the_axis(settings, specs, fields, reason, says):
    from services.orchestrator.request import resolve_request
    from services.runtime.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as refused:
        resolve_request(_grid_request(*specs, **fields), settings)
    assert refused.value.reason == reason
    assert says in refused.value.message


def test_variation_strength_axis_shares_one_variation_seed(settings):
    from services.orchestrator.request import resolve_request

    params = resolve_request(_grid_request("Var. strength: 0, 0.5, 1", seed=7), settings)
    overrides = [dict(cell.overrides) for cell in params.grid.cells]
    assert overrides[0] == {}
    assert [(o["subseed"], o["subseed_strength"]) for o in overrides[1:]] == [(8, 0.5), (8, 1.0)]
    assert resolve_request(params.to_request(), settings) == params


def test_lora_weight_by_axis_and_by_prompt_search_and_replace(settings):
    from services.orchestrator.request import resolve_request

    def weights(params):
        return [[(entry.model.name, entry.weight) for entry in dict(cell.overrides).get("loras", params.loras)]
                for cell in params.grid.cells]

    by_axis = resolve_request(_grid_request("lora=style: 0, 0.5-1 [2]"), settings)
    assert weights(by_axis) == [[("style", 0.0)], [("style", 0.5)], [("style", 1.0)]]
    assert [axis.labels for axis in by_axis.grid.axes] == [("LoRA style: 0.0", "LoRA style: 0.5", "LoRA style: 1.0")]
    request = _grid_request("Prompt S/R: 0.5, 1")
    request.prompt = "a cat on a mat <lora:style:0.5>"
    by_tag = resolve_request(request, settings)
    assert weights(by_tag) == [[("style", 0.5)], [("style", 1.0)]]
    # The stored request lists the tag's LoRA in the loras field; its cells still read their own tags.
    assert weights(resolve_request(by_tag.to_request(), settings)) == weights(by_tag)


def test_too_many_pixels_are_refused():
    from services.orchestrator.config import build_parser, settings_from_flags
    from services.orchestrator.request import resolve_request
    from services.runtime.errors import InvalidArgument

    roomy = settings_from_flags(build_parser().parse_args([
        "--text-encoder-address", "t:1", "--denoiser-address", "d:1", "--vae-address", "v:1",
        "--max-grid-cells", "64"]))
    request = _grid_request("Seed: 1-32")
    request.width = request.height = 0  # the model's default size counts as 1024 x 1024
    assert len(resolve_request(request, roomy).grid.cells) == 32
    request.grid.x.values[:] = ["1-33"]
    with pytest.raises(InvalidArgument) as refused:
        resolve_request(request, roomy)
    assert refused.value.reason == "GRID_TOO_LARGE" and "megapixels" in refused.value.message


def test_missing_x_axis_is_refused(settings):
    from services.orchestrator.request import resolve_request
    from services.runtime.errors import InvalidArgument

    request = _grid_request("Seed: 1")
    request.grid.ClearField("x")
    request.grid.y.CopyFrom(orchestrator_pb2.GridAxis(type="Seed", values=["1"]))
    with pytest.raises(InvalidArgument) as refused:
        resolve_request(request, settings)
    assert refused.value.reason == "GRID_AXIS_MISSING"


# ----------------------------------------------------------------------------------------------
# Drawing


def _cells(count: int, size: tuple[int, int] = (32, 32)) -> list[bytes]:
    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    return pngs


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _tiled(pngs: list[bytes], columns: int) -> np.ndarray:
    rows = [np.concatenate([_pixels(p) for p in pngs[r:r + columns]], axis=1) for r in range(0, len(pngs), columns)]
    return np.concatenate(rows, axis=0)


def test_grid_png_has_the_cells_and_a_label_region(settings):
    from services.orchestrator.grid import draw_grids
    from services.orchestrator.request import resolve_request

    plan = resolve_request(_grid_request("Seed: 1, 2", "Steps: 2, 3"), settings).grid
    cells = _cells(4)
    (drawn,) = draw_grids(plan, cells)
    image = _pixels(drawn.png)
    height, width, _ = image.shape
    assert width > 64 and height > 64  # a left margin for the Y labels, a top one for the X labels
    np.testing.assert_array_equal(image[height - 64:, width - 64:], _tiled(cells, 2))
    top, left = image[:height - 64], image[height - 64:, :width - 64]
    for band in (top, left):
        assert (band < 128).any(), "no label drawn"  # dark text ...
        assert (band == 255).all(axis=-1).mean() > 0.5  # ... on white
    assert "X Type: Seed, X Values: \"1, 2\", Y Type: Steps" in Image.open(io.BytesIO(drawn.png)).text["parameters"]

    bare = resolve_request(_grid_request("Seed: 1, 2", "Steps: 2, 3", ), settings).grid
    bare = type(bare)(axes=bare.axes, cells=bare.cells, legend=False)
    np.testing.assert_array_equal(_pixels(draw_grids(bare, cells)[0].png), _tiled(cells, 2))


def test_grids_per_z_value_and_cells_of_different_sizes(settings):
    from services.orchestrator.grid import draw_grids
    from services.orchestrator.request import resolve_request

    plan = resolve_request(_grid_request("Size: 32x32, 48x32", "Seed: 1", "Prompt S/R: cat, dog"), settings).grid
    cells = [*_cells(1, (32, 32)), *_cells(1, (48, 32)), *_cells(1, (32, 32)), *_cells(1, (48, 32))]
    grids = draw_grids(plan, cells)
    assert [(g.z_index, g.z_label) for g in grids] == [(0, "cat"), (1, "dog")]
    sizes = {Image.open(io.BytesIO(g.png)).size for g in grids}
    assert len(sizes) == 1 and next(iter(sizes))[0] > 80  # 32 + 48 pixels of cells and the left margin


# ----------------------------------------------------------------------------------------------
# Through a suite


@pytest.fixture(scope="module")
def grid_suite(suite):
    """The session's suite (tests/conftest.py: tiny SD 1.5, the orchestrator's default --max-grid-cells 100)."""
    return suite


@pytest.fixture()
def grid_client(grid_suite):
    with Client(grid_suite.address, timeout=300) as client:
        yield client


BASE = dict(steps=2, width=32, height=32, guidance_scale=7.5, negative_prompt="blurry")


def _events(client: Client, request) -> list[orchestrator_pb2.GenerateResponse]:
    return list(client.events(request))


def test_grid_runs_as_one_job_and_each_cell_equals_generate(grid_client):
    jobs_before = {job.job_id for job in grid_client.list_jobs(page_size=1000).jobs}
    request = Client.build_request("a cat on a mat", **BASE)
    request.grid.CopyFrom(grid.sweep(grid.parse_axis("Seed: 1, 2"), grid.parse_axis("Sampler: Euler a, DDIM")))
    events = _events(grid_client, request)
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[0] == "accepted" and kinds[-1] == "result"
    job_id = events[0].accepted.job_id

    # One queue entry, one job, progress across every cell.
    jobs_after = [job for job in grid_client.list_jobs(page_size=1000).jobs if job.job_id not in jobs_before]
    assert [job.job_id for job in jobs_after] == [job_id]
    cells = [event.grid_cell for event in events if event.WhichOneof("event") == "grid_cell"]
    assert [(c.cell.index, c.cell.x_index, c.cell.y_index, c.cell_count) for c in cells] == [
        (0, 0, 0, 4), (1, 1, 0, 4), (2, 0, 1, 4), (3, 1, 1, 4)]
    assert [c.cell.x_label for c in cells] == ["Seed: 1", "Seed: 2"] * 2
    assert [c.cell.y_label for c in cells] == ["Euler a", "Euler a", "DDIM", "DDIM"]
    steps = [(event.step.step, event.step.total_steps) for event in events if event.WhichOneof("event") == "step"]
    assert [step for step, _ in steps] == list(range(1, 9))
    assert steps[-1] == (8, 8)
    job = grid_client.get_job(job_id)
    assert job.state == status_pb2.JOB_STATE_SUCCEEDED
    assert (job.completed_steps, job.total_steps) == (8, 8)
    assert len(job.result.grid_images) == 1 and len(job.result.images) == 4

    # Every cell equals the same request run alone.
    result = events[-1].result
    assert [(c.index, c.seed) for c in result.grid_cells] == [(0, 1), (1, 2), (2, 1), (3, 2)]
    for cell, image in zip(result.grid_cells, result.images):
        alone = grid_client.generate("a cat on a mat", seed=cell.seed, sampler=cell.y_label, **BASE)
        np.testing.assert_array_equal(_pixels(image.png), _pixels(alone.images[0]))
        assert Image.open(io.BytesIO(image.png)).text == Image.open(io.BytesIO(alone.images[0])).text

    # The labelled grid: the cells in the bottom right, labels above and left.
    drawn = _pixels(result.grid_images[0].png)
    assert drawn.shape[0] > 64 and drawn.shape[1] > 64
    np.testing.assert_array_equal(drawn[-64:, -64:], _tiled([image.png for image in result.images], 2))
    assert (drawn[:-64] < 128).any() and (drawn[-64:, :-64] < 128).any()
    parameters = Image.open(io.BytesIO(result.grid_images[0].png)).text["parameters"]
    assert parameters.startswith("a cat on a mat\nNegative prompt: blurry\n")
    assert "Script: X/Y/Z plot, X Type: Seed" in parameters


def test_grid_without_legend_is_its_cells(grid_client):
    request = Client.build_request("a cat on a mat", seed=3, **BASE)
    request.grid.CopyFrom(grid.sweep(grid.parse_axis("Prompt S/R: cat, dog"), legend=False))
    result = _events(grid_client, request)[-1].result
    assert [Image.open(io.BytesIO(i.png)).text["parameters"].split("\n")[0] for i in result.images] == [
        "a cat on a mat", "a dog on a mat"]
    np.testing.assert_array_equal(_pixels(result.grid_images[0].png), _tiled([i.png for i in result.images], 2))


def test_cancelling_a_grid_job_stops_it(grid_client):
    steps = 150  # per cell: long enough that the cancellation lands in the second cell
    request = Client.build_request("a cat on a mat", seed=1, steps=steps, width=32, height=32,
                                   cancel_on_disconnect=False)
    request.grid.CopyFrom(grid.sweep(grid.parse_axis("Seed: 1, 2, 3")))
    import grpc

    stream = grid_client.stream(request)
    job_id, cancelled, after = "", None, []
    with pytest.raises(grpc.RpcError) as ended:  # the stream ends with the job's status
        for event in stream:
            kind = event.WhichOneof("event")
            if kind == "accepted":
                job_id = event.accepted.job_id
            if cancelled is None and kind == "step" and event.step.step > steps:  # the second cell is denoising
                cancelled = threading.Thread(target=lambda: grid_client.cancel_job(job_id))
                cancelled.start()
            elif cancelled is not None:
                after.append(kind)
    assert ended.value.code() == grpc.StatusCode.CANCELLED
    cancelled.join()
    assert "grid_cell" not in after  # no cell started after the cancellation
    job = grid_client.get_job(job_id)
    assert job.state == status_pb2.JOB_STATE_CANCELLED
    assert steps < job.completed_steps < 2 * steps and job.total_steps == 3 * steps


@pytest.mark.parametrize("specs, reason", [
    (("Colour: red",), "GRID_UNKNOWN_AXIS"),
    (("Steps: 2, many",), "GRID_INVALID_VALUE"),
    (("Seed: 1-11", "Steps: 1-10"), "GRID_TOO_LARGE"),  # 110 cells; the suite runs at most 100
    (("Steps: 0",), "INVALID_STEPS"),
])
def test_bad_grids_get_invalid_argument_and_no_job(grid_client, specs, reason):
    import grpc

    before = len(grid_client.list_jobs(page_size=1000).jobs)
    request = Client.build_request("a cat on a mat", **BASE)
    request.grid.CopyFrom(grid.sweep(*[orchestrator_pb2.GridAxis(
        type=spec.split(":")[0], values=grid.split_values(spec.split(":", 1)[1])) for spec in specs]))
    with pytest.raises(LatentwireError) as refused:
        _events(grid_client, request)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.reason == reason
    assert "grid" in refused.value.message
    assert len(grid_client.list_jobs(page_size=1000).jobs) == before


def test_cli_grid_writes_the_grid_and_the_cells(grid_suite, tmp_path, capsys):
    from latentwire.cli.main import build_parser, run

    args = build_parser().parse_args([
        "grid", "a cat on a mat", "--x", "Seed: 1, 2", "--y", "CFG Scale: 1, 7.5", "--steps", "2", "--width", "32",
        "--height", "32", "--server", grid_suite.address, "-o", str(tmp_path / "grid.png"), "--cells-dir",
        str(tmp_path / "cells"), "-q"])
    assert run(args) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'grid.png'}" in out and "cell-003.png (Seed: 2, CFG Scale: 7.5)" in out
    cells = [(tmp_path / "cells" / f"cell-{i:03d}.png").read_bytes() for i in range(4)]
    drawn = _pixels((tmp_path / "grid.png").read_bytes())
    np.testing.assert_array_equal(drawn[-64:, -64:], _tiled(cells, 2))
    assert "CFG scale: 1," in Image.open(io.BytesIO(cells[0])).text["parameters"]

    # The grid PNG records its settings and axes: `grid --from` makes the same grid again.
    again = build_parser().parse_args(["grid", "--from", str(tmp_path / "grid.png"), "--server", grid_suite.address,
                                       "-o", str(tmp_path / "again.png"), "-q"])
    assert run(again) == 0
    np.testing.assert_array_equal(_pixels((tmp_path / "again.png").read_bytes()), drawn)

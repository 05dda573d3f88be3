#!/usr/bin/env python
"""What live previews cost: the denoiser's own loop (services/denoiser/model.py, loaded from a model folder as
the service loads it) with previews at the default interval (every 5 steps, "approx" JPEG) against the same
loop without previews, in one run, as a share of the step time.

Per model, ``--rounds`` pairs of runs alternate (without, with, without, with, ...) so a noisy machine shifts
both alike; each run denoises ``--steps`` steps at ``--size`` pixels with classifier-free guidance (random
prompt embeddings: the text does not change the cost). Reported:

- in-loop: the time the loop spends in the function it calls after each step (preview.emitter's wrapper: the
  approx map, 8-bit conversion and JPEG on preview steps) with previews, less the same without, as a share of
  the run without previews; timed inside the runs, so other processes' load hardly moves it;
- derived: the median time of one preview on that run's latents divided by ``interval`` step times;
- wall: (median run with previews - median run without) / median run without: what a user would see, but on a
  shared machine the noise between runs is far larger than the previews' cost.

Models: "tiny" is the tests' tiny SD 1.5 (create_tiny_sd; its VAE downsamples 2x, so 256x256 pixels are 128x128
latents); "sd15" is SD 1.5's architecture with random weights (create_tiny_sd(full_size=True), ~4 GB, built once
into --models-dir; 256x256 pixels are 32x32 latents).

    OMP_NUM_THREADS=1 python bench/previews.py                      # tiny and sd15 at 256x256
    OMP_NUM_THREADS=1 python bench/previews.py --models tiny --rounds 5

A benchmark, not a test: it asserts nothing. Table on stdout, JSON in bench/results/previews.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from services.denoiser import preview
from services.denoiser.conditioning import TextConditioning
from services.denoiser.model import DenoiseParams, load_denoiser
from services.runtime import previews as preview_options
from services.runtime.config import ModelSpec
from services.runtime.jobs import Job
from services.tiny_models import create_tiny_sd

CPU = torch.device("cpu")


def _folder(models_dir: Path, name: str) -> Path:
    folder = models_dir / f"bench-previews-{name}"
    if not (folder / "model_index.json").is_file():
        create_tiny_sd(folder, full_size=name == "sd15", seed=0)
    return folder


def _run(model, text, params, options) -> tuple[float, float, list]:
    """One loop run: (its seconds, seconds spent in the after-step function, the step events)."""
    events, spent = [], [0.0]
    emit = preview.emitter(events.append, options, model, params)

    def timed(event) -> None:
        started = time.perf_counter()
        emit(event)
        spent[0] += time.perf_counter() - started

    started = time.perf_counter()
    model.denoise(Job("bench", params.num_inference_steps), text, params, timed)
    return time.perf_counter() - started, spent[0], events


def bench_model(name: str, folder: Path, size: int, steps: int, rounds: int) -> dict:
    model = load_denoiser(ModelSpec(name, folder), CPU, torch.float32, allow_pickle=False)
    width = model.unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(0)
    text = TextConditioning(torch.randn(1, 77, width, generator=generator),
                            torch.randn(1, 77, width, generator=generator))
    params = DenoiseParams(height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                           guidance_rescale=0.0, eta=0.0, seed=1, scheduler="")
    options = preview_options.Previews()  # the default: every 5 steps, approx, JPEG
    _run(model, text, params, options)  # warm-up
    without, with_previews, emit_without, emit_with, previews_made = [], [], [], [], 0
    for _ in range(rounds):
        seconds, spent, _ = _run(model, text, params, None)
        without.append(seconds)
        emit_without.append(spent)
        seconds, spent, events = _run(model, text, params, options)
        with_previews.append(seconds)
        emit_with.append(spent)
        previews_made = sum(1 for e in events if e.preview)
    latents = events[-1].latents
    preview_seconds = []
    for _ in range(30):
        started = time.perf_counter()
        preview.preview(latents, model.family.name, options.format)
        preview_seconds.append(time.perf_counter() - started)
    step = statistics.median(without) / steps
    one_preview = statistics.median(preview_seconds)
    return {
        "model": name, "size": size, "latent_size": list(latents.shape[2:]), "steps": steps, "rounds": rounds,
        "interval": options.interval, "previews_per_run": previews_made,
        "run_without_s": statistics.median(without), "run_with_s": statistics.median(with_previews),
        "step_ms": step * 1e3, "preview_ms": one_preview * 1e3,
        "in_loop_share": (statistics.median(emit_with) - statistics.median(emit_without)) / statistics.median(without),
        "wall_share": statistics.median(with_previews) / statistics.median(without) - 1,
        "derived_share": one_preview / (options.interval * step),
        "preview_bytes": len(preview.preview(latents, model.family.name, options.format)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,sd15", help="comma-separated: tiny, sd15")
    parser.add_argument("--size", type=int, default=256, help="image width and height in pixels")
    parser.add_argument("--steps", type=int, default=10, help="steps per run (previews at 5, 10, ...)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating pairs of runs per model")
    parser.add_argument("--models-dir", default=None,
                        help="where the bench models are built once (default: a folder under the temp dir)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "previews.json"))
    args = parser.parse_args()
    models_dir = Path(args.models_dir or Path(tempfile.gettempdir()) / "latentwire-bench-previews")
    models_dir.mkdir(parents=True, exist_ok=True)
    rows = [bench_model(name, _folder(models_dir, name), args.size, args.steps, args.rounds)
            for name in args.models.split(",")]
    print(f"{'model':6} {'latents':>8} {'step ms':>9} {'preview ms':>11} {'in-loop':>8} {'derived':>8} {'wall':>8}")
    for row in rows:
        latent = "x".join(map(str, row["latent_size"]))
        print(f"{row['model']:6} {latent:>8} {row['step_ms']:9.1f} {row['preview_ms']:11.2f} "
              f"{row['in_loop_share']:8.3%} {row['derived_share']:8.3%} {row['wall_share']:8.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch_threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""What live previews cost: the denoiser's own loop (services/denoiser/model.py, loaded from a model folder as
the service loads it) with previews at the default interval (every 5 steps, JPEG) by each method -- "approx"
(A1111's Approx cheap) and "tiny-vae" (a tiny preview VAE, services/denoiser/preview_vae.py) -- against the same
loop without previews, in one run, as a share of the step time.

Per model, ``--rounds`` rounds of runs alternate (without, approx, tiny-vae, without, ...) so a noisy machine
shifts all alike; each run denoises ``--steps`` steps at ``--size`` pixels with classifier-free guidance (random
prompt embeddings: the text does not change the cost). Reported per model and method:

- in-loop: the time the loop spends in the function it calls after each step (preview.emitter's wrapper: the
  approx map or the preview VAE's decode, 8-bit conversion and JPEG on preview steps) with previews, less the same
  without, as a share of the run without previews; timed inside the runs, so other processes' load hardly moves
  it;
- derived: the median time of one preview on that run's latents divided by ``interval`` step times;
- wall: (median run with previews - median run without) / median run without: what a user would see, but on a
  shared machine the noise between runs is far larger than the previews' cost.

Models: "tiny" is the tests' tiny SD 1.5 (create_tiny_sd; its VAE downsamples 2x, so 256x256 pixels are 128x128
latents) with the tests' tiny TAESD (diffusers' test config, 2x: 256x256 previews); "sd15" is SD 1.5's
architecture with random weights (create_tiny_sd(full_size=True), ~4 GB, built once into --models-dir; 256x256
pixels are 32x32 latents) with a TAESD-sized random AutoencoderTiny (TAESD's architecture, 8x: 256x256 previews).

    OMP_NUM_THREADS=1 python bench/previews.py                      # tiny and sd15 at 256x256
    OMP_NUM_THREADS=1 python bench/previews.py --models tiny --rounds 5
    OMP_NUM_THREADS=1 python bench/previews.py --methods tiny-vae --steps 5 --rounds 2

A benchmark, not a test: it asserts nothing. Table on stdout, JSON in bench/results/previews.json.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from services.denoiser import preview
from services.denoiser.preview_vae import PreviewVae
from services.denoiser.conditioning import TextConditioning
from services.denoiser.model import DenoiseParams, load_denoiser
from services.runtime import previews as preview_options
from services.runtime.config import ModelSpec
from services.runtime.jobs import Job
from services.tiny_models import create_tiny_preview_vae, create_tiny_sd

CPU = torch.device("cpu")


def _folder(models_dir: Path, name: str) -> Path:
    folder = models_dir / f"bench-previews-{name}"
    if not (folder / "model_index.json").is_file():
        create_tiny_sd(folder, full_size=name == "sd15", seed=0)
    return folder


def _preview_vae(models_dir: Path, name: str) -> PreviewVae:
    """The model's preview VAE: the tests' tiny TAESD for "tiny", a TAESD-sized random one for "sd15"."""
    from diffusers import AutoencoderTiny

    folder = models_dir / f"bench-previews-{name}-taesd"
    if not (folder / "config.json").is_file():
        create_tiny_preview_vae(folder, "taesd", full_size=name == "sd15", seed=0)
    return PreviewVae(folder.name, AutoencoderTiny.from_pretrained(folder, use_safetensors=True).eval())


def _run(model, text, params, options, preview_vae=None) -> tuple[float, float, list]:
    """One loop run: (its seconds, seconds spent in the after-step function, the step events)."""
    events, spent = [], [0.0]
    emit = preview.emitter(events.append, options, model, params, preview_vae)

    def timed(event) -> None:
        started = time.perf_counter()
        emit(event)
        spent[0] += time.perf_counter() - started

    started = time.perf_counter()
    model.denoise(Job("bench", params.num_inference_steps), text, params, timed)
    return time.perf_counter() - started, spent[0], events


def bench_model(name: str, folder: Path, preview_vae: PreviewVae, size: int, steps: int, rounds: int,
                methods: list[str]) -> list[dict]:
    model = load_denoiser(ModelSpec(name, folder), CPU, torch.float32, allow_pickle=False)
    width = model.unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(0)
    text = TextConditioning(torch.randn(1, 77, width, generator=generator),
                            torch.randn(1, 77, width, generator=generator))
    params = DenoiseParams(height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                           guidance_rescale=0.0, eta=0.0, seed=1, scheduler="")
    # The default interval (every 5 steps) and format (JPEG), per method.
    options = {method: preview_options.Previews(method=method) for method in methods}
    _, _, warm_up = _run(model, text, params, options[methods[0]], preview_vae)  # warm-up: one run, each method once
    for method in methods:
        preview.render(warm_up[-1].latents, model.family.name, options[method], preview_vae)
    without, emit_without = [], []
    with_previews = {m: [] for m in methods}
    emit_with = {m: [] for m in methods}
    events = {}
    for _ in range(rounds):
        seconds, spent, _ = _run(model, text, params, None)
        without.append(seconds)
        emit_without.append(spent)
        for method in methods:
            seconds, spent, events[method] = _run(model, text, params, options[method], preview_vae)
            with_previews[method].append(seconds)
            emit_with[method].append(spent)
    step = statistics.median(without) / steps
    rows = []
    for method in methods:
        latents = events[method][-1].latents
        preview_seconds = []
        for _ in range(10 if method == "tiny-vae" else 30):
            started = time.perf_counter()
            image = preview.render(latents, model.family.name, options[method], preview_vae)
            preview_seconds.append(time.perf_counter() - started)
        one_preview = statistics.median(preview_seconds)
        rows.append({
            "model": name, "method": method, "size": size, "latent_size": list(latents.shape[2:]),
            "preview_size": list(Image.open(io.BytesIO(image)).size), "steps": steps, "rounds": rounds,
            "interval": options[method].interval,
            "previews_per_run": sum(1 for e in events[method] if e.preview),
            "preview_vae_parameters": sum(p.numel() for p in preview_vae.vae.decoder.parameters())
            if method == "tiny-vae" else 0,
            "run_without_s": statistics.median(without), "run_with_s": statistics.median(with_previews[method]),
            "step_ms": step * 1e3, "preview_ms": one_preview * 1e3,
            "in_loop_share": (statistics.median(emit_with[method]) - statistics.median(emit_without))
            / statistics.median(without),
            "wall_share": statistics.median(with_previews[method]) / statistics.median(without) - 1,
            "derived_share": one_preview / (options[method].interval * step),
            "preview_bytes": len(image),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,sd15", help="comma-separated: tiny, sd15")
    parser.add_argument("--methods", default="approx,tiny-vae", help="comma-separated: approx, tiny-vae")
    parser.add_argument("--size", type=int, default=256, help="image width and height in pixels")
    parser.add_argument("--steps", type=int, default=10, help="steps per run (previews at 5, 10, ...)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating pairs of runs per model")
    parser.add_argument("--models-dir", default=None,
                        help="where the bench models are built once (default: a folder under the temp dir)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "previews.json"))
    args = parser.parse_args()
    models_dir = Path(args.models_dir or Path(tempfile.gettempdir()) / "latentwire-bench-previews")
    models_dir.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    rows = [row for name in args.models.split(",")
            for row in bench_model(name, _folder(models_dir, name), _preview_vae(models_dir, name), args.size,
                                   args.steps, args.rounds, methods)]
    print(f"{'model':6} {'method':8} {'latents':>8} {'preview':>8} {'step ms':>9} {'preview ms':>11} {'in-loop':>8} "
          f"{'derived':>8} {'wall':>8}")
    for row in rows:
        latent, shown = ("x".join(map(str, row[key])) for key in ("latent_size", "preview_size"))
        print(f"{row['model']:6} {row['method']:8} {latent:>8} {shown:>8} {row['step_ms']:9.1f} "
              f"{row['preview_ms']:11.2f} {row['in_loop_share']:8.3%} {row['derived_share']:8.3%} "
              f"{row['wall_share']:8.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch_threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Hires fix with the SDXL refiner: what the suite adds per job over the same composition in process.

One job = AUTOMATIC1111's hires fix with a refiner (services/orchestrator/hires_refiner.py): for each refiner pass
choice ("second pass", A1111's default, and "first pass"), a first pass at --size, the "Latent" upscale by 1.5,
the second pass at denoising strength 0.7, base and refiner handing off at 0.8. In process (A): the diffusers
composition the tests compare with (StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline on the tiny SDXL
base and refiner folders, each call with its own torch.Generator("cpu").manual_seed(seed)), PNG-encoded as the
suite returns it. Through the suite (B): Client.generate on start_suite (text encoder, denoiser, VAE,
orchestrator in their own processes; the refiner served by folder name). --runs pairs alternate A B A B after one
warm-up pair, which also records the max abs pixel difference (float pixels, a conformance check, not asserted).

Reported per choice (medians): in-process and suite seconds per job, the ratio, and the overhead per job
(suite - in-process), in milliseconds and per Denoise run (a job makes 3: base, refiner and the other pass).

    OMP_NUM_THREADS=1 python bench/hires_refiner.py                  # tiny models, 64x64 first pass
    (with the client package installed, or PYTHONPATH=clients/python:. for the service processes)
    OMP_NUM_THREADS=1 python bench/hires_refiner.py --size 128 --steps 10 --runs 5

A benchmark, not a test: it asserts nothing. Table on stdout, JSON in bench/results/hires_refiner.json.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR.parent / "clients" / "python"))

from latentwire.client import Client, hires_refiner  # noqa: E402
from latentwire.client.hires import hires_fix  # noqa: E402
from services.suite.launcher import start_suite  # noqa: E402
from services.tiny_models import create_tiny_model  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SCALE, STRENGTH, SWITCH_AT = 1.5, 0.7, 0.8
CHOICES = (hires_refiner.SECOND, hires_refiner.FIRST)


class InProcess:
    """The diffusers composition of a hires fix with a refiner (as tests/test_hires_refiner.py builds it)."""

    def __init__(self, base: Path, refiner: Path):
        import diffusers

        self.base = diffusers.StableDiffusionXLPipeline.from_pretrained(base, use_safetensors=True)
        self.base_img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**self.base.components)
        self.refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner, use_safetensors=True)
        for pipe in (self.base, self.base_img2img, self.refiner):
            pipe.set_progress_bar_config(disable=True)

    def run(self, choice: str, *, seed: int, steps: int, size: int, output_type: str = "pil"):
        def call(pipe, kind: str = "latent", **kwargs):
            return pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                        output_type=kind, **kwargs).images

        hires = int(size * SCALE) // 8 * 8
        factor = self.base.vae_scale_factor

        def upscale(latents):
            return torch.nn.functional.interpolate(latents, size=(hires // factor, hires // factor), mode="bilinear")

        if choice == hires_refiner.SECOND:
            handed = call(self.base_img2img, image=upscale(call(self.base, width=size, height=size)),
                          strength=STRENGTH, denoising_end=SWITCH_AT)
            return call(self.refiner, output_type, image=handed, denoising_start=SWITCH_AT)
        first = call(self.base, width=size, height=size, denoising_end=SWITCH_AT)
        refined = call(self.refiner, image=first, denoising_start=SWITCH_AT)
        return call(self.refiner, output_type, image=upscale(refined), strength=STRENGTH)

    def png(self, choice: str, **kwargs) -> bytes:
        image = self.run(choice, **kwargs)[0]
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()


def request_settings(choice: str, refiner: str, *, seed: int, steps: int, size: int) -> dict:
    return dict(refiner=refiner, refiner_switch_at=SWITCH_AT, seed=seed, steps=steps, width=size, height=size,
                hires=hires_fix("Latent", scale=SCALE, denoising_strength=STRENGTH, refiner_pass=choice))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="first-pass width and height in pixels (default 64)")
    parser.add_argument("--steps", type=int, default=6, help="steps of each pass (default 6)")
    parser.add_argument("--runs", type=int, default=5, help="timed pairs per choice (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(BENCH_DIR / "results" / "hires_refiner.json"))
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="lw-bench-hires-refiner-"))
    base = create_tiny_model(root / "bench-sdxl", "sdxl", seed=0)
    refiner = create_tiny_model(root / "bench-sdxl-refiner", "sdxl-refiner", seed=0)
    local = InProcess(base, refiner)
    suite = start_suite(base, ports=dict.fromkeys(["orchestrator", "text_encoder", "denoiser", "vae"], 0),
                        log_dir=root / "logs", more_models=(refiner,))
    results = {}
    try:
        with Client(suite.address, timeout=600) as client:
            for choice in CHOICES:
                settings = request_settings(choice, Path(refiner).name, seed=args.seed, steps=args.steps,
                                            size=args.size)
                common = dict(seed=args.seed, steps=args.steps, size=args.size)
                # Warm-up pair: loads everything, and checks the two sides make the same image.
                suite_pixels = client.generate(PROMPT, include_pixels=True, **settings).pixels
                local_pixels = local.run(choice, output_type="np", **common)
                difference = float(np.abs(np.asarray(suite_pixels) - local_pixels).max())
                in_process, through_suite = [], []
                for _ in range(args.runs):
                    started = time.perf_counter()
                    local.png(choice, **common)
                    in_process.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    client.generate(PROMPT, **settings)
                    through_suite.append(time.perf_counter() - started)
                a, b = statistics.median(in_process), statistics.median(through_suite)
                results[choice] = dict(in_process_s=a, suite_s=b, ratio=b / a, overhead_ms=(b - a) * 1000,
                                       overhead_ms_per_denoise=(b - a) * 1000 / 3, max_abs_difference=difference,
                                       in_process_runs_s=in_process, suite_runs_s=through_suite)
    finally:
        suite.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"hires fix + refiner, tiny SDXL, {args.size}x{args.size} -> x{SCALE:g}, {args.steps} steps, "
          f"{args.runs} pairs (medians)")
    print(f"{'refiner pass':<14}{'in-process s':>14}{'suite s':>10}{'ratio':>8}{'overhead ms':>13}"
          f"{'ms/Denoise':>12}{'max |diff|':>12}")
    for choice, r in results.items():
        print(f"{choice:<14}{r['in_process_s']:>14.3f}{r['suite_s']:>10.3f}{r['ratio']:>8.2f}"
              f"{r['overhead_ms']:>13.0f}{r['overhead_ms_per_denoise']:>12.0f}{r['max_abs_difference']:>12.2g}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(dict(size=args.size, steps=args.steps, runs=args.runs, scale=SCALE,
                                      strength=STRENGTH, switch_at=SWITCH_AT, results=results), indent=2))


if __name__ == "__main__":
    main()

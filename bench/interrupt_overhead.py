#!/usr/bin/env python
"""What stopping inside a step costs: a UNet step and a VAE decode with the runtime's interrupt hooks
(services/runtime/interrupt.py: on CPU a check before every layer holding a weight matrix or kernel and every
block, attention in slices) against the same diffusers modules untouched, in one run.

Two copies of one random-weight model (same seed, same weights); per round each runs ``--steps`` forward
passes, the two interleaved so a noisy machine shifts both alike. A job is set on the hooked copy's
thread, as the worker does, so every check reads it. The outputs are compared too (they must be equal).

    python bench/interrupt_overhead.py --size small --steps 5 --rounds 3
    python bench/interrupt_overhead.py --size tiny
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from services.runtime import interrupt
from services.runtime.jobs import Job

#: UNet and VAE configs: "tiny" is the tests' tiny SD model; "small" has SD 1.5's block layout at a quarter of
#: its widths (fits a 2-core machine in seconds per step at 512x512).
CONFIGS = {
    "tiny": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32),
        vae=dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        latent=32, context=(77, 32)),
    "small": dict(
        unet=dict(block_out_channels=(80, 160, 320, 320), layers_per_block=2, sample_size=64, cross_attention_dim=192,
                  attention_head_dim=8),
        vae=dict(block_out_channels=(32, 64, 128, 128), in_channels=3, out_channels=3, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        latent=64, context=(77, 192)),
}


def _time(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--steps", type=int, default=3, help="forward passes per model per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/interrupt_overhead-SIZE.json)")
    args = parser.parse_args()
    config = CONFIGS[args.size]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config["unet"]).eval()
    vae = AutoencoderKL(**config["vae"]).eval()
    hooked_unet, hooked_vae = copy.deepcopy(unet), copy.deepcopy(vae)
    hooks = interrupt.install(hooked_unet) + interrupt.install(hooked_vae)
    generator = torch.Generator().manual_seed(1)
    side = config["latent"]
    latents = torch.randn((1, 4, side, side), generator=generator)
    context = torch.randn((1, *config["context"]), generator=generator)
    timestep = torch.tensor(500)
    job = Job(job_id="bench", total_steps=args.steps)

    def plain_unet():
        return unet(latents, timestep, encoder_hidden_states=context).sample

    def hooked_unet_step():
        with interrupt.running(job):
            return hooked_unet(latents, timestep, encoder_hidden_states=context).sample

    def plain_decode():
        return vae.decode(latents).sample

    def hooked_decode():
        with interrupt.running(job):
            return hooked_vae.decode(latents).sample

    with torch.inference_mode():
        unet_diff = (plain_unet() - hooked_unet_step()).abs().max().item()
        vae_diff = (plain_decode() - hooked_decode()).abs().max().item()
        rows = {"unet step": ([], []), "vae decode": ([], [])}
        for _ in range(args.rounds):
            rows["unet step"][0].append(_time(plain_unet, args.steps))
            rows["unet step"][1].append(_time(hooked_unet_step, args.steps))
            rows["vae decode"][0].append(_time(plain_decode, args.steps))
            rows["vae decode"][1].append(_time(hooked_decode, args.steps))

    result = {"size": args.size, "image_pixels": side * 8, "hooks": hooks, "threads": torch.get_num_threads(),
              "max_abs_diff": {"unet": unet_diff, "vae": vae_diff}, "rows": {}}
    print(f"{args.size}: {side * 8}x{side * 8} image, {hooks} hooks, {torch.get_num_threads()} threads; "
          f"max abs diff unet {unet_diff:g}, vae {vae_diff:g}")
    print(f"{'work':<12}{'diffusers ms':>14}{'hooked ms':>12}{'added ms':>10}{'ratio':>8}")
    for name, (plain, hooked) in rows.items():
        p, h = statistics.median(plain) * 1e3, statistics.median(hooked) * 1e3
        result["rows"][name] = {"diffusers_ms": p, "hooked_ms": h, "added_ms": h - p, "ratio": h / p}
        print(f"{name:<12}{p:>14.1f}{h:>12.1f}{h - p:>10.1f}{h / p:>8.3f}")
    out = Path(args.out or Path(__file__).parent / "results" / f"interrupt_overhead-{args.size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

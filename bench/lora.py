#!/usr/bin/env python
"""What one LoRA costs per step: the denoiser's own loop (services/denoiser/model.py, loaded as the service loads
it) with a LoRA applied by the per-job hooks (services/runtime/lora.py) against the same loop without, and, in the
same run, diffusers' own in-process pipeline with the LoRA loaded by ``load_lora_weights`` + ``set_adapters``
(PEFT's unfused LoRA layers) against that pipeline without, each as a share of its step time.

The LoRA is random (seed 0), rank ``--rank`` on the attention projections, proj_in / proj_out and the
feed-forward of every transformer block (what kohya's trainer targets in a UNet), saved with
``StableDiffusionPipeline.save_lora_weights`` and read back by both sides. Per model, ``--rounds`` rounds
alternate (ours without, ours with, diffusers without, diffusers with), each ``--steps`` steps at ``--size``
pixels with classifier-free guidance (random prompt embeddings: the text does not change the cost). Shares are
given from the median runs and from the fastest runs (the least disturbed on a shared machine).

Models: "tiny" is the tests' tiny SD 1.5 (create_tiny_sd); "sd15" is SD 1.5's architecture with random weights
(create_tiny_sd(full_size=True), ~4 GB, built once into --models-dir; 256x256 pixels are 32x32 latents).

    OMP_NUM_THREADS=1 python bench/lora.py                      # tiny and sd15 at 256x256
    OMP_NUM_THREADS=1 python bench/lora.py --models tiny --rounds 5

Needs peft (the dev extra) for the diffusers side and to build the LoRA. A benchmark, not a test: it asserts
nothing. Table on stdout, JSON in bench/results/lora.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.denoiser.conditioning import TextConditioning  # noqa: E402
from services.denoiser.model import DenoiseParams, load_denoiser  # noqa: E402
from services.runtime import lora  # noqa: E402
from services.runtime.config import ModelSpec  # noqa: E402
from services.runtime.jobs import Job  # noqa: E402
from services.tiny_models import create_tiny_sd  # noqa: E402

CPU = torch.device("cpu")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def _folder(models_dir: Path, name: str) -> Path:
    folder = models_dir / f"bench-lora-{name}"
    if not (folder / "model_index.json").is_file():
        create_tiny_sd(folder, full_size=name == "sd15", seed=0)
    return folder


def _pipeline(folder: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def _lora_file(folder: Path, rank: int) -> Path:
    """A random UNet LoRA of ``rank`` (lora_B random too), saved as diffusers does."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    out = folder / f"lora-r{rank}"
    file = out / "lora.safetensors"
    if not file.is_file():
        pipe = _pipeline(folder)
        torch.manual_seed(0)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=TARGETS),
                                pipe.unet)
        type(pipe).save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                     safe_serialization=True, weight_name="lora.safetensors")
    return file


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench_model(name: str, folder: Path, size: int, steps: int, rounds: int, rank: int) -> dict:
    file = _lora_file(folder, rank)
    model = load_denoiser(ModelSpec(name, folder), CPU, torch.float32, allow_pickle=False)
    width = model.unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 77, width, generator=generator), torch.randn(1, 77, width, generator=generator)
    text = TextConditioning(embeds, negative)
    params = DenoiseParams(height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                           guidance_rescale=0.0, eta=0.0, seed=1, scheduler="")
    loaded = lora.load_lora(file, "sd", "bench")
    uses = [lora.LoraUse(loaded, 0.8)]
    targeted = len(loaded.components["unet"])

    def ours(with_lora: bool) -> None:
        with lora.applied({"unet": model.unet}, uses if with_lora else []):
            model.denoise(Job("bench", steps), text, params, lambda event: None)

    plain_pipe, lora_pipe = _pipeline(folder), _pipeline(folder)
    lora_pipe.load_lora_weights(str(file), adapter_name="bench")
    lora_pipe.set_adapters(["bench"], [0.8])

    def diffusers_run(pipe) -> None:
        pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=steps, guidance_scale=7.5,
             height=size, width=size, generator=torch.Generator("cpu").manual_seed(1), output_type="latent")

    ours(False), ours(True), diffusers_run(plain_pipe), diffusers_run(lora_pipe)  # warm-up
    times: dict[str, list[float]] = {"ours_without": [], "ours_with": [], "diffusers_without": [],
                                     "diffusers_with": []}
    for _ in range(rounds):
        times["ours_without"].append(_timed(lambda: ours(False)))
        times["ours_with"].append(_timed(lambda: ours(True)))
        times["diffusers_without"].append(_timed(lambda: diffusers_run(plain_pipe)))
        times["diffusers_with"].append(_timed(lambda: diffusers_run(lora_pipe)))
    median = {key: statistics.median(values) for key, values in times.items()}
    fastest = {key: min(values) for key, values in times.items()}  # less disturbed by other work on the machine
    return {
        "model": name, "size": size, "steps": steps, "rounds": rounds, "rank": rank, "targeted_modules": targeted,
        **{f"{key}_s": value for key, value in median.items()},
        "step_ms": median["ours_without"] / steps * 1e3,
        "ours_share": median["ours_with"] / median["ours_without"] - 1,
        "diffusers_share": median["diffusers_with"] / median["diffusers_without"] - 1,
        "ours_share_fastest": fastest["ours_with"] / fastest["ours_without"] - 1,
        "diffusers_share_fastest": fastest["diffusers_with"] / fastest["diffusers_without"] - 1,
        "runs_s": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,sd15", help="comma-separated: tiny, sd15")
    parser.add_argument("--size", type=int, default=256, help="image width and height in pixels")
    parser.add_argument("--steps", type=int, default=10, help="steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per model")
    parser.add_argument("--rank", type=int, default=16, help="the LoRA's rank")
    parser.add_argument("--models-dir", default=None,
                        help="where the bench models are built once (default: a folder under the temp dir)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lora.json"))
    args = parser.parse_args()
    models_dir = Path(args.models_dir or Path(tempfile.gettempdir()) / "latentwire-bench-lora")
    models_dir.mkdir(parents=True, exist_ok=True)
    rows = [bench_model(name, _folder(models_dir, name), args.size, args.steps, args.rounds, args.rank)
            for name in args.models.split(",")]
    print(f"{'model':6} {'modules':>8} {'step ms':>9} {'ours +LoRA':>11} {'diffusers +LoRA':>16}   (median; fastest)")
    for row in rows:
        print(f"{row['model']:6} {row['targeted_modules']:>8} {row['step_ms']:9.1f} {row['ours_share']:11.2%} "
              f"{row['diffusers_share']:16.2%}   ({row['ours_share_fastest']:.2%}; "
              f"{row['diffusers_share_fastest']:.2%})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch_threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Train the small AutoencoderKL: 64x64 RGB images <-> 16x16x4 latents, with diffusers' own model class.

Loss: L1 + L2 on pixels in [-1, 1] plus a small KL term (weight 1e-6 on the summed KL), as in the
Stable Diffusion autoencoders minus their perceptual and adversarial terms, which plain shapes do not need.
After training, ``scaling_factor`` is set to 1 / std of the training latents (SD 1.5 measured its 0.18215 the
same way), so the diffusion model sees latents of unit variance.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm import tqdm

from .common import Checkpointer, batch_tensors, fast_forward, save_folder, seed_everything

__all__ = ["build_vae", "reconstruction_error", "train_vae"]

STAGE = "vae"
KL_WEIGHT = 1e-6


def build_vae() -> AutoencoderKL:
    """Three blocks (two downsamplings: 64 -> 16), 4 latent channels, 0.17 M parameters.

    Narrow on purpose: the full-resolution convolutions dominate a training step's cost, and flat-coloured
    shapes need little width.
    """
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=[8, 16, 32],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
    )


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, seed: int, count: int = 256) -> dict:
    """Mean absolute error (0-255 scale) and PSNR (dB) of encode -> decode on held-out data-set images."""
    vae.eval()
    pixels, _ = batch_tensors(seed, "vae-eval", 0, count, held_out=True)
    errors = []
    for chunk in pixels.split(64):
        x = chunk * 2 - 1
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        errors.append((y - x).div(2))
    error = torch.cat(errors)
    mse = float(error.pow(2).mean())
    return {"vae_mae_255": float(error.abs().mean()) * 255, "vae_psnr_db": float(-10 * torch.log10(torch.tensor(mse)))}


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, seed: int, count: int = 512) -> float:
    """1 / std of latents of training images: what ``scaling_factor`` should be for unit-variance latents."""
    vae.eval()
    pixels, _ = batch_tensors(seed, "vae-scale", 0, count)
    latents = torch.cat([vae.encode(chunk * 2 - 1).latent_dist.sample() for chunk in pixels.split(64)])
    return float(1.0 / latents.std())


def train_vae(out: Path, *, seed: int = 0, steps: int = 2000, batch_size: int = 8, lr: float = 1e-3,
              progress: bool = True) -> dict:
    """Train and save the VAE to ``out/vae`` (diffusers format); resumes from ``out/checkpoints/vae.pt``.

    Returns the reconstruction error on held-out images, the scaling factor and the step count.
    """
    out = Path(out)
    seed_everything(seed)
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    checkpoints = Checkpointer(out / "checkpoints" / f"{STAGE}.pt", {"vae": vae}, optimizer)
    start, _ = checkpoints.restore()
    fast_forward(schedule, start)
    vae.train()
    bar = tqdm(range(start, steps), desc="vae", initial=start, total=steps, disable=not progress)
    for step in bar:
        pixels, _ = batch_tensors(seed, STAGE, step, batch_size)
        x = pixels * 2 - 1
        torch.manual_seed(seed * 1_000_003 + step)  # the posterior sample of this step
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(y, x) + F.mse_loss(y, x) + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        checkpoints.maybe_save(step + 1)
    checkpoints.maybe_save(steps, force=True)
    scores = reconstruction_error(vae, seed)
    scaling = latent_scaling_factor(vae, seed)
    vae.register_to_config(scaling_factor=scaling)
    save_folder(out / STAGE, lambda folder: vae.save_pretrained(folder, safe_serialization=True))
    return {**scores, "vae_scaling_factor": scaling, "vae_steps": steps}


def load_vae(out: Path) -> AutoencoderKL:
    """The trained VAE saved by :func:`train_vae` under ``out/vae``."""
    return AutoencoderKL.from_pretrained(Path(out) / STAGE, use_safetensors=True).eval()

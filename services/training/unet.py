"""Train the text-to-image model: a small UNet2DConditionModel and a small CLIPTextModel, jointly, on VAE latents.

- Latents: the trained VAE (frozen) encodes each data-set image; the posterior sample times its
  ``scaling_factor``, exactly what StableDiffusionPipeline's VAE decodes back.
- Text: the project's own CLIP tokenizer (services.tiny_models.tokenizer), padded to 77 tokens as the
  pipeline pads; 10 % of captions are replaced by "" so classifier-free guidance works.
- Objective: epsilon prediction with SD 1.5's noise schedule (DDPM, scaled_linear betas 0.00085..0.012,
  1000 steps), min-SNR-5 loss weighting (Hang et al. 2023: the same quality in far fewer steps), AdamW,
  an exponential moving average of the weights (the EMA weights are what is saved).
- Saved as a complete StableDiffusionPipeline folder (DDIM scheduler with SD 1.5's betas, no safety
  checker), safetensors only: every stage of the suite serves it unchanged.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from services.tiny_models.tokenizer import VOCAB_LIMIT, build_clip_tokenizer

from .common import Checkpointer, batch_tensors, fast_forward, save_folder, seed_everything

__all__ = ["build_text_encoder", "build_unet", "frozen_parts", "scheduler_config", "train_unet"]

STAGE = "pipeline"
#: Share of captions replaced by the empty prompt (classifier-free guidance dropout).
UNCONDITIONAL_SHARE = 0.1

#: SD 1.5's noise schedule (its scheduler_config.json, minus the PNDM-only keys).
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def scheduler_config() -> dict:
    """The noise-schedule settings shared by training (DDPM) and the saved pipeline (DDIM)."""
    return dict(SCHEDULE)


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A two-layer CLIP text tower, width 64, over the project tokenizer's ids (< 1000)."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_LIMIT, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def build_unet() -> UNet2DConditionModel:
    """A three-level UNet on 16x16x4 latents (channels 32/64/64; cross-attention at 8x8 and 4x4)."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def _tokens(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    # Exactly the pipeline's own tokenization (StableDiffusionPipeline.encode_prompt).
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def min_snr_weights(noise_schedule: DDPMScheduler) -> torch.Tensor:
    """Per-timestep loss weights: min-SNR-5 for epsilon prediction."""
    alphas_cumprod = noise_schedule.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=5.0) / snr


def noised_batch(vae: AutoencoderKL, pixels: torch.Tensor, noise_schedule: DDPMScheduler,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The VAE's sampled latents of ``pixels`` noised at random timesteps: (noisy, noise, timesteps), drawn from
    ``generator`` in this order (posterior sample, noise, timesteps)."""
    with torch.no_grad():
        posterior = vae.encode(pixels * 2 - 1).latent_dist
        latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator))
        latents = latents * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator)
    return noise_schedule.add_noise(latents, noise, timesteps), noise, timesteps


def weighted_loss(prediction: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  loss_weight: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, weighted by its timestep's ``loss_weight``."""
    per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * loss_weight[timesteps]).mean()


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def build_pipeline(vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel,
                   tokenizer: CLIPTokenizer) -> StableDiffusionPipeline:
    """The trained parts assembled as diffusers' StableDiffusionPipeline (DDIM, no safety checker)."""
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), unet=unet.eval(),
                                   tokenizer=tokenizer, scheduler=DDIMScheduler(**scheduler_config()),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def frozen_parts(pipeline: Path) -> tuple[AutoencoderKL, UNet2DConditionModel, CLIPTextModel, CLIPTokenizer]:
    """A trained pipeline folder's VAE, UNet, text encoder (in eval mode, no gradients) and tokenizer: what the
    ControlNet and LoRA trainers train against."""
    pipeline = Path(pipeline)
    vae = AutoencoderKL.from_pretrained(pipeline / "vae", use_safetensors=True).eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet", use_safetensors=True).eval().requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(pipeline / "text_encoder", use_safetensors=True).eval()
    text_encoder.requires_grad_(False)
    return vae, unet, text_encoder, CLIPTokenizer.from_pretrained(pipeline / "tokenizer")


def train_unet(out: Path, *, seed: int = 0, steps: int = 6000, batch_size: int = 32, lr: float = 1e-3,
               max_seconds: float | None = None, progress: bool = True) -> dict:
    """Train the UNet and text encoder on ``out/vae``'s latents and save the pipeline to ``out/pipeline``.

    Resumes from ``out/checkpoints/pipeline.pt``. ``max_seconds`` ends training early (the pipeline is
    then saved from the steps done, and the returned ``unet_steps`` says how many).
    """
    out = Path(out)
    seed_everything(seed)
    vae = AutoencoderKL.from_pretrained(out / "vae", use_safetensors=True).eval().requires_grad_(False)
    tokenizer = build_clip_tokenizer()
    text_encoder = build_text_encoder(tokenizer)
    unet = build_unet()
    ema_text, ema_unet = copy.deepcopy(text_encoder).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    warmup = min(200, steps // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    noise_schedule = DDPMScheduler.from_config(scheduler_config())  # ignores the DDIM-only keys
    loss_weight = min_snr_weights(noise_schedule)
    modules = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text_encoder": ema_text}
    checkpoints = Checkpointer(out / "checkpoints" / f"{STAGE}.pt", modules, optimizer)
    start, extra = checkpoints.restore()
    fast_forward(schedule, start)
    trained_seconds = float(extra.get("seconds", 0.0))
    began = time.monotonic()
    unet.train()
    text_encoder.train()
    step = start
    bar = tqdm(range(start, steps), desc="unet", initial=start, total=steps, disable=not progress)
    for step in bar:
        if max_seconds is not None and trained_seconds + time.monotonic() - began >= max_seconds:
            break
        pixels, samples = batch_tensors(seed, STAGE, step, batch_size)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        captions = [s.caption for s in samples]
        drop = torch.rand(len(captions), generator=generator) < UNCONDITIONAL_SHARE
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        noisy, noise, timesteps = noised_batch(vae, pixels, noise_schedule, generator)
        hidden = text_encoder(_tokens(tokenizer, captions))[0]
        prediction = unet(noisy, timesteps, hidden).sample
        loss = weighted_loss(prediction, noise, timesteps, loss_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        checkpoints.maybe_save(step + 1, {"seconds": trained_seconds + time.monotonic() - began})
    else:
        step = steps
    seconds = trained_seconds + time.monotonic() - began
    checkpoints.maybe_save(step, {"seconds": seconds}, force=True)
    pipeline = build_pipeline(vae, ema_text, ema_unet, tokenizer)
    save_folder(out / STAGE, lambda folder: pipeline.save_pretrained(folder, safe_serialization=True))
    return {"unet_steps": step, "unet_seconds": round(seconds, 1), "unet_batch_size": batch_size}

"""The denoising loop: a Stable Diffusion model's UNet and scheduler.

The loop mirrors diffusers' StableDiffusionPipeline.__call__ step for step (same noise draw,
same scheduler calls, same guidance arithmetic) and reuses its helpers (randn_tensor,
retrieve_timesteps, rescale_noise_cfg), so a split run equals the in-process pipeline. It runs
one scheduler instance per job, built from the model's config, so jobs can run side by side.
"""
from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import dataclass
from typing import Callable

import diffusers
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from latentwire.services.runtime.config import ModelSpec
from latentwire.services.runtime.errors import InvalidArgument
from latentwire.services.runtime.jobs import Job
from latentwire.services.runtime.models import check_pipeline_folder, use_safetensors


@dataclass(frozen=True)
class DenoiseParams:
    """Validated parameters of one denoising run."""

    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    guidance_rescale: float
    eta: float
    seed: int
    scheduler: str


@dataclass(frozen=True)
class StepEvent:
    """One finished step, as the worker thread reports it."""

    step: int
    total_steps: int
    timestep: float
    elapsed_seconds: float


@dataclass(frozen=True)
class DenoiseOutput:
    """The final latents of a run."""

    latents: torch.Tensor
    height: int
    width: int
    scheduler: str
    elapsed_seconds: float


def _compatible_schedulers(scheduler) -> list[str]:
    """Scheduler class names diffusers declares compatible with the model's scheduler, which import here."""
    names = {type(scheduler).__name__}
    for cls in scheduler.compatibles:
        try:
            if issubclass(cls, diffusers.SchedulerMixin):
                names.add(cls.__name__)
        except (ImportError, TypeError):  # optional dependency missing (e.g. torchsde)
            continue
    return sorted(n for n in names if not _needs_missing_dependency(n))


def _needs_missing_dependency(name: str) -> bool:
    if name == "DPMSolverSDEScheduler":
        try:
            import torchsde  # noqa: F401
        except ImportError:
            return True
    return False


class DenoiserModel:
    """UNet plus scheduler config of one model folder, on one device and dtype."""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, allow_pickle: bool):
        index = check_pipeline_folder(spec.path, ("unet", "scheduler"), allow_pickle)
        self.unet = UNet2DConditionModel.from_pretrained(
            spec.path, subfolder="unet", torch_dtype=dtype, use_safetensors=use_safetensors(allow_pickle)
        ).to(device)
        self.unet.eval()
        scheduler_cls = getattr(diffusers, index["scheduler"][1])
        scheduler = scheduler_cls.from_pretrained(spec.path, subfolder="scheduler")
        # The pipeline's constructor repairs outdated scheduler configs (steps_offset, clip_sample);
        # build one around the UNet and scheduler so this service sees the very same config.
        pipeline = StableDiffusionPipeline(
            vae=None, text_encoder=None, tokenizer=None, unet=self.unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        self.scheduler_config = pipeline.scheduler.config
        self.default_scheduler = type(pipeline.scheduler).__name__
        self.schedulers = _compatible_schedulers(pipeline.scheduler)
        self.vae_scale_factor = _vae_scale_factor(spec.path)
        self.device = device
        self.dtype = dtype

    @property
    def max_steps(self) -> int:
        """Most steps the scheduler can place: one per training timestep, less the timestep offset
        (DDIM with steps_offset=1 and 1000 steps would index past the last training timestep)."""
        config = self.scheduler_config
        return int(config.get("num_train_timesteps", 1000)) - int(config.get("steps_offset", 0) or 0)

    @property
    def default_size(self) -> int:
        """Default image width and height in pixels (the UNet's sample size times the VAE scale)."""
        sample_size = self.unet.config.sample_size
        sample_size = sample_size if isinstance(sample_size, int) else sample_size[0]
        return int(sample_size) * self.vae_scale_factor

    def make_scheduler(self, name: str):
        """A fresh scheduler for one job: the model's own, or ``name`` built from its config (diffusers' from_config)."""
        name = name or self.default_scheduler
        if name not in self.schedulers:
            raise InvalidArgument(
                f"scheduler {name!r} is not available for this model; choose one of {', '.join(self.schedulers)}",
                reason="UNKNOWN_SCHEDULER",
                metadata={"scheduler": name},
            )
        return getattr(diffusers, name).from_config(self.scheduler_config)

    def check_embeds(self, prompt_embeds: torch.Tensor, negative: torch.Tensor | None, do_cfg: bool, max_batch: int):
        """Refuse embeddings this UNet cannot take."""
        width = self.unet.config.cross_attention_dim
        if prompt_embeds.shape[0] < 1 or prompt_embeds.shape[1] < 1 or prompt_embeds.shape[2] != width:
            raise InvalidArgument(
                f"prompt_embeds has shape {list(prompt_embeds.shape)}; this UNet needs [batch >= 1, tokens >= 1, {width}]",
                reason="INVALID_TENSOR",
                metadata={"field": "prompt_embeds"},
            )
        if prompt_embeds.shape[0] > max_batch:
            raise InvalidArgument(
                f"prompt_embeds holds {prompt_embeds.shape[0]} images; this service denoises at most {max_batch} at once",
                reason="BATCH_TOO_LARGE",
            )
        if do_cfg:
            if negative is None:
                raise InvalidArgument(
                    "guidance_scale > 1 needs negative_prompt_embeds (classifier-free guidance); send them "
                    "or set guidance_scale <= 1",
                    reason="MISSING_NEGATIVE_EMBEDS",
                )
            if negative.shape != prompt_embeds.shape:
                raise InvalidArgument(
                    f"negative_prompt_embeds has shape {list(negative.shape)}, prompt_embeds "
                    f"{list(prompt_embeds.shape)}; they must match",
                    reason="INVALID_TENSOR",
                    metadata={"field": "negative_prompt_embeds"},
                )

    def do_classifier_free_guidance(self, guidance_scale: float) -> bool:
        """Same rule as the pipeline: guidance above 1, and not a guidance-distilled (LCM-style) UNet."""
        return guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    @torch.inference_mode()
    def denoise(
        self,
        job: Job,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        params: DenoiseParams,
        emit: Callable[[StepEvent], None],
    ) -> DenoiseOutput:
        """Run the loop; ``emit`` is called after every step; stops before a step once the job is cancelled."""
        started = time.perf_counter()
        device, unet = self.device, self.unet
        scheduler = self.make_scheduler(params.scheduler)
        generator = torch.Generator("cpu").manual_seed(params.seed)
        do_cfg = self.do_classifier_free_guidance(params.guidance_scale)
        prompt_embeds = prompt_embeds.to(device=device, dtype=self.dtype)
        if do_cfg:
            prompt_embeds = torch.cat([negative_prompt_embeds.to(device=device, dtype=self.dtype), prompt_embeds])
        batch = prompt_embeds.shape[0] // (2 if do_cfg else 1)

        timesteps, num_inference_steps = retrieve_timesteps(scheduler, params.num_inference_steps, device)
        shape = (batch, unet.config.in_channels, params.height // self.vae_scale_factor, params.width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        latents = latents * scheduler.init_noise_sigma
        step_parameters = set(inspect.signature(scheduler.step).parameters)
        extra_step_kwargs = {}
        if "eta" in step_parameters:
            extra_step_kwargs["eta"] = params.eta
        if "generator" in step_parameters:
            extra_step_kwargs["generator"] = generator
        timestep_cond = None
        if unet.config.time_cond_proj_dim is not None:
            guidance = torch.tensor(params.guidance_scale - 1).repeat(batch)
            timestep_cond = StableDiffusionPipeline.get_guidance_scale_embedding(
                None, guidance, embedding_dim=unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        total = len(timesteps)
        job.total_steps = total
        for i, t in enumerate(timesteps):
            job.raise_if_cancelled()
            latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
            latent_model_input = scheduler.scale_model_input(latent_model_input, t)
            noise_pred = unet(
                latent_model_input,
                t,
                encoder_hidden_states=prompt_embeds,
                timestep_cond=timestep_cond,
                return_dict=False,
            )[0]
            if do_cfg:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + params.guidance_scale * (noise_pred_text - noise_pred_uncond)
                if params.guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=params.guidance_rescale)
            latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
            job.completed_steps = i + 1
            emit(StepEvent(i + 1, total, float(t), time.perf_counter() - started))
        return DenoiseOutput(latents, params.height, params.width, type(scheduler).__name__, time.perf_counter() - started)


def _vae_scale_factor(path) -> int:
    """2 ** (VAE levels - 1), as the pipeline computes it; 8 when the folder has no VAE config."""
    config = path / "vae" / "config.json"
    if not config.is_file():
        return 8
    return 2 ** (len(json.loads(config.read_text())["block_out_channels"]) - 1)


def check_params(params: DenoiseParams, *, max_steps: int, max_image_size: int) -> None:
    """Refuse out-of-range parameters with a message saying what to send instead."""
    if params.num_inference_steps < 1 or params.num_inference_steps > max_steps:
        raise InvalidArgument(
            f"num_inference_steps is {params.num_inference_steps}; use 1 to {max_steps}",
            reason="INVALID_STEPS",
        )
    for name, value in (("height", params.height), ("width", params.width)):
        if value <= 0 or value % 8 != 0:
            raise InvalidArgument(f"{name} is {value}; use a positive multiple of 8 pixels", reason="INVALID_SIZE")
        if value > max_image_size:
            raise InvalidArgument(
                f"{name} is {value} pixels; this service allows at most {max_image_size}", reason="IMAGE_TOO_LARGE"
            )
    if not math.isfinite(params.guidance_scale) or not 0 <= params.guidance_scale <= 100:
        raise InvalidArgument(f"guidance_scale is {params.guidance_scale}; use a value from 0 to 100")
    if not math.isfinite(params.guidance_rescale) or not 0 <= params.guidance_rescale <= 1:
        raise InvalidArgument(f"guidance_rescale is {params.guidance_rescale}; use a value from 0 to 1")
    if not math.isfinite(params.eta) or not 0 <= params.eta <= 1:
        raise InvalidArgument(f"eta is {params.eta}; use a value from 0 to 1")

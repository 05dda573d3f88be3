"""The flow-matching denoising loops: an SD3 or Flux transformer and its flow-matching scheduler.

The loops mirror diffusers' pipelines step for step, as model.py does for SD 1.x (same random draws in
the same order, same scheduler calls, same guidance arithmetic) and reuse their helpers (randn_tensor,
retrieve_timesteps, calculate_shift, Flux's latent packing): StableDiffusion3Pipeline (and, with an init
image, StableDiffusion3Img2ImgPipeline) for SD3; FluxPipeline, FluxImg2ImgPipeline and FluxInpaintPipeline
(64-channel transformer, mask blending) for Flux. ControlNet and the SDXL base/refiner hand-off are not
served for these families, nor SD3 inpainting.

Flux's guidance is distilled: ``guidance_scale`` goes into the transformer's guidance embedding, there is
no classifier-free guidance and no negative prompt. Flux's loop runs on packed latents ([B, tokens, 4C]);
a run returns them, and checkpoints hold them, unpacked to [B, C, H/f, W/f] (an exact reshape), neither
unscaled nor unshifted (the VAE service does that).

One deliberate difference: the job's CPU generator goes to ``scheduler.step`` when the step takes one. The
pipelines pass none, so a stochastic step (FlowMatchEulerDiscreteScheduler with stochastic_sampling, Heun with
s_churn) draws from torch's global generator there and no two runs agree; here such a run is reproducible and
resumes bit for bit. The deterministic steps (the models' defaults) draw nothing, so conformance is unchanged.
"""
from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable

import diffusers
import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux.pipeline_flux_img2img import FluxImg2ImgPipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from services.runtime import families, interrupt, limits
from services.runtime.config import ModelSpec
from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.runtime.jobs import Job, StepTimes, Work
from services.runtime.models import check_pipeline_folder, use_safetensors

from .checkpoint import Checkpoint, CheckpointWriter, restore
from .schedule import ConditioningSchedule, flow_inputs
from .model import (DenoiseOutput, DenoiseParams, DenoiserBase, ImageInputs, StepEvent, check_handoff,
                    check_image_distributions)
from .noise import check_init_latents, initial_noise

if TYPE_CHECKING:
    from .conditioning import TextConditioning
    from .step_batching import StepBatcher

#: Flow-matching schedulers latentwire may build for SD3 and Flux (all in limits.SCHEDULERS). diffusers lists
#: none as compatible with another, so the set is named here; a model offers those whose set_timesteps takes
#: what its pipeline passes (see FlowDenoiser._offers). Not FlowMatchLCMScheduler: it serves LCM-distilled
#: models only, and its step state holds the network output's size, which checkpoints cannot carry.
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
#: FluxPipeline.default_sample_size: Flux's default image is 128 latent pixels times the VAE scale.
FLUX_DEFAULT_SAMPLE_SIZE = 128


class FlowDenoiser(DenoiserBase):
    """Transformer plus scheduler config of one SD3 or Flux model folder, on one device and dtype."""

    #: Whether the model takes denoising_start / denoising_end / image.latents (an SDXL base/refiner hand-off).
    supports_handoff = False

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, allow_pickle: bool):
        index = check_pipeline_folder(spec.path, ("transformer", "scheduler"), allow_pickle)
        self.index = index
        self.family = families.family_of_index(index)
        if self.family not in (families.SD3, families.FLUX):
            raise ValueError(f"FlowDenoiser serves SD3 and Flux models, not {self.family.title}")
        self.is_flux = self.family is families.FLUX
        transformer_cls = getattr(diffusers, index["transformer"][1])
        self.transformer = transformer_cls.from_pretrained(
            spec.path, subfolder="transformer", torch_dtype=dtype, use_safetensors=use_safetensors(allow_pickle)
        ).to(device)
        self.transformer.eval()
        # Cancellation and deadlines take effect between the transformer's blocks and attention slices.
        interrupt.install(self.transformer)
        #: How long a step takes, by its size, from this model's completed runs (refusals of work that cannot fit).
        self.step_times = StepTimes()
        scheduler = getattr(diffusers, index["scheduler"][1]).from_pretrained(spec.path, subfolder="scheduler")
        self.scheduler_config = scheduler.config
        self.default_scheduler = type(scheduler).__name__
        self.schedulers = sorted(
            name for name in {self.default_scheduler, *FLOW_SCHEDULERS}
            if name in limits.SCHEDULERS and self._offers(getattr(diffusers, name))
        )
        vae = _vae_config(spec.path)
        # The pipelines: 2 ** (VAE levels - 1), 8 without a VAE (the tiny models' one-level VAEs give 1).
        self.vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1) if vae else 8
        config = self.transformer.config
        #: Channels of the (unpacked) latents: Flux packs 2x2 patches, so its transformer sees 4x as many.
        self.latent_channels = config.in_channels // 4 if self.is_flux else config.in_channels
        sample_size = FLUX_DEFAULT_SAMPLE_SIZE if self.is_flux else config.sample_size
        self.default_height = self.default_width = int(sample_size) * self.vae_scale_factor
        #: Height and width are multiples of this: Flux packs 2x2 latent patches, SD3 patchifies by patch_size.
        self.size_multiple = self.vae_scale_factor * (2 if self.is_flux else config.patch_size)
        self.device = device
        self.dtype = dtype

    def _offers(self, scheduler_cls) -> bool:
        """Whether the family's pipeline can run with ``scheduler_cls``: its set_timesteps takes the arguments
        the pipeline passes (Flux: sigmas and mu; SD3: mu with dynamic shifting) and it can noise an init image."""
        needed = {"sigmas", "mu"} if self.is_flux else (
            {"mu"} if self.scheduler_config.get("use_dynamic_shifting") else set())
        accepted = set(inspect.signature(scheduler_cls.set_timesteps).parameters)
        return needed <= accepted and hasattr(scheduler_cls, "scale_noise")

    @property
    def default_size(self) -> int:
        """Default image width and height in pixels (square for both families)."""
        return self.default_height

    @property
    def max_steps(self) -> int:
        """Most steps the scheduler can place: one per training timestep."""
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    def do_classifier_free_guidance(self, guidance_scale: float) -> bool:
        """SD3: guidance above 1, as StableDiffusion3Pipeline. Flux: never (its guidance is embedded)."""
        return not self.is_flux and guidance_scale > 1

    def work(self, params: DenoiseParams, batch: int, image: ImageInputs | None = None,
             resume_from: Checkpoint | None = None) -> Work:
        """A run's work for the estimate: steps over so many latent pixels as the transformer sees (rows doubled
        by SD3's guidance), as many as will run (the last ``strength`` of them with an init image, those after
        a checkpoint)."""
        rows = batch * (2 if self.do_classifier_free_guidance(params.guidance_scale) else 1)
        tokens = (params.height // self.vae_scale_factor) * (params.width // self.vae_scale_factor)
        steps = params.num_inference_steps
        if image is not None:
            steps = _img2img_steps(steps, params.strength)
        if resume_from is not None:
            steps = max(0, steps - resume_from.completed_steps)
        return Work(self.step_times, rows * tokens, steps)

    def check_size(self, params: DenoiseParams) -> None:
        """Height and width must be multiples of the VAE scale times the patch (Flux packs 2x2 latent patches)."""
        patch = 2 if self.is_flux else self.transformer.config.patch_size
        for name, value in (("height", params.height), ("width", params.width)):
            if value <= 0 or value % self.size_multiple:
                raise InvalidArgument(
                    f"{name} is {value}; {self.family.title} needs a positive multiple of {self.size_multiple} "
                    f"pixels (the VAE's scale {self.vae_scale_factor} times {patch}x{patch} latent patches)",
                    reason="INVALID_SIZE", metadata={"field": name})

    def check_text(self, text: TextConditioning, do_cfg: bool, max_batch: int) -> None:
        """Refuse combined text conditioning this transformer cannot take."""
        config = self.transformer.config
        width, pooled_width = config.joint_attention_dim, config.pooled_projection_dim
        prompt = text.prompt_embeds
        if prompt.ndim != 3 or prompt.shape[0] < 1 or prompt.shape[1] < 1 or prompt.shape[2] != width:
            raise InvalidArgument(
                f"text_embeddings give prompt embeddings of shape {list(prompt.shape)}; this {self.family.title} "
                f"transformer needs [batch >= 1, tokens >= 1, {width}]", reason="INVALID_TEXT_EMBEDDINGS",
                metadata={"field": "text_embeddings"})
        limits.check_batch(prompt.shape[0], max_batch, "prompt_embeds")
        pooled = text.pooled_prompt_embeds
        if pooled is None or list(pooled.shape) != [prompt.shape[0], pooled_width]:
            raise InvalidArgument(
                f"text_embeddings give pooled embeddings of shape {None if pooled is None else list(pooled.shape)}; "
                f"this {self.family.title} transformer needs [{prompt.shape[0]}, {pooled_width}] (the CLIP "
                "encoders' pooled output)", reason="INVALID_TEXT_EMBEDDINGS", metadata={"field": "text_embeddings"})
        if not do_cfg:
            return
        for field, tensor, like in (("negative_prompt_embeds", text.negative_prompt_embeds, prompt),
                                    ("negative_pooled_prompt_embeds", text.negative_pooled_prompt_embeds, pooled)):
            if tensor is None:
                raise InvalidArgument(
                    f"guidance_scale > 1 needs {field} (classifier-free guidance); send the negative prompt's "
                    "embeddings or set guidance_scale <= 1", reason="MISSING_NEGATIVE_EMBEDS",
                    metadata={"field": field})
            if tensor.shape != like.shape:
                raise InvalidArgument(
                    f"{field} has shape {list(tensor.shape)}, the prompt's {list(like.shape)}; they must match",
                    reason="INVALID_TEXT_EMBEDDINGS", metadata={"field": "text_embeddings"})

    def check_image_inputs(self, image: ImageInputs | None, params: DenoiseParams, batch: int) -> None:
        """Refuse a size, init image or request field this loop cannot take, or a strength that leaves no step."""
        self.check_size(params)
        check_handoff(self, params, image)  # refuses denoising_start / denoising_end / image.latents
        if image is None:
            return
        if image.inpainting and not self.is_flux:
            raise InvalidArgument(
                f"inpainting is not served for {self.family.title} models; send the init image without a mask "
                "(image-to-image)", reason="INPAINTING_NOT_SUPPORTED", metadata={"field": "image.mask"})
        latent_shape = [1, self.latent_channels, params.height // self.vae_scale_factor,
                        params.width // self.vae_scale_factor]
        shift = image.shift_factor
        if image.init_latents is not None:  # image-to-image from latents (hires fix)
            check_init_latents(image.init_latents, latent_shape, batch, params.width, params.height, "model")
        else:
            check_image_distributions(image, params, latent_shape, "model")
        if not math.isfinite(shift):
            raise InvalidArgument(f"shift_factor is {shift}; it must be a finite number",
                                  reason="INVALID_TENSOR", metadata={"field": "shift_factor"})
        # Not limits.check_strength: these pipelines' get_timesteps keep a fractional step (2 steps at strength
        # 0.2 run 1), so only a strength that leaves no step at all is refused.
        strength, steps = params.strength, params.num_inference_steps
        if not math.isfinite(strength) or not 0 <= strength <= 1 or _img2img_steps(steps, strength) < 1:
            raise InvalidArgument(
                f"strength is {strength:g}; with an init image use a value above 0 and at most 1 (the last "
                "strength x steps of the schedule run)", reason="INVALID_STRENGTH", metadata={"field": "strength"})

    @torch.inference_mode()
    def denoise(
        self,
        job: Job,
        text: TextConditioning,
        params: DenoiseParams,
        emit: Callable[[StepEvent], None],
        image: ImageInputs | None = None,
        open_controlnet=None,
        resume_from: Checkpoint | None = None,
        include_checkpoints: bool = False,
        checkpoint_interval_s: float = 0.0,
        schedule: ConditioningSchedule | None = None,
        compiled: bool = False,
        step_batcher: StepBatcher | None = None,
    ) -> DenoiseOutput:
        """Run the loop; ``emit`` is called after every step; stops before a step once the job is cancelled.

        Random draws happen in the pipelines' order from one CPU generator seeded with ``params.seed``: the
        init image's latent sample, the noise, the masked image's latent sample. With ``include_checkpoints``
        a step's event carries a checkpoint (latents unpacked, as results; at most one per
        ``checkpoint_interval_s``); ``resume_from`` continues a run
        from one (everything before the loop is rebuilt from the request, then the checkpoint is restored).
        ``step_batcher`` (its calling convention ``TRANSFORMER``): each step's transformer forward goes through it,
        shared with other jobs' loops (step_batching.py); None: this loop calls the transformer itself.
        """
        if open_controlnet is not None:  # the servicer refuses these first (_check_controlnet_mode)
            raise FailedPrecondition(f"this denoiser runs no ControlNet with {self.family.title} models; remove the "
                                     "ControlNet units", reason="CONTROLNET_NOT_SUPPORTED",
                                     metadata={"field": "controlnet.units"})
        self.check_size(params)
        started = time.perf_counter()
        device, transformer = self.device, self.transformer
        if compiled and getattr(self, "compiled_network", None) is not None:
            transformer = self.compiled_network  # --compile (acceleration.py)
        scheduler = self.make_scheduler(params.scheduler, params.scheduler_options)
        generator = torch.Generator("cpu").manual_seed(params.seed)
        do_cfg = self.do_classifier_free_guidance(params.guidance_scale)
        prompt_embeds = text.prompt_embeds.to(device=device, dtype=self.dtype)
        pooled_prompt_embeds = text.pooled_prompt_embeds.to(device=device, dtype=self.dtype)
        batch = prompt_embeds.shape[0]
        if do_cfg:  # StableDiffusion3Pipeline: negative rows first
            prompt_embeds = torch.cat([text.negative_prompt_embeds.to(device=device, dtype=self.dtype), prompt_embeds])
            pooled_prompt_embeds = torch.cat(
                [text.negative_pooled_prompt_embeds.to(device=device, dtype=self.dtype), pooled_prompt_embeds])
        dtype = prompt_embeds.dtype
        # Prompt editing / alternation (schedule.py): each segment's embeddings prepared as above.
        per_step = None if schedule is None else schedule.prepare(
            lambda segment: flow_inputs(segment, device, self.dtype, do_cfg))

        timesteps = self._timesteps(scheduler, params, image is not None)
        inputs = self._prepare_latents(scheduler, generator, image, params, batch, timesteps, dtype)
        latents = inputs.latents

        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        if self.is_flux:
            # FluxPipeline: image ids per latent patch, zero text ids, the distilled guidance embedded.
            height, width = inputs.shape[2], inputs.shape[3]
            latent_image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
            text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=device, dtype=self.dtype)
            guidance = None
            if transformer.config.guidance_embeds:
                guidance = torch.full([1], params.guidance_scale, device=device, dtype=torch.float32)
                guidance = guidance.expand(latents.shape[0])
            if image is None:
                scheduler.set_begin_index(0)  # FluxPipeline (FluxImg2ImgPipeline.get_timesteps set its own)

        total = len(timesteps)
        job.total_steps = total
        # Everything so far follows from the request and the seed; what the steps change is the checkpoint.
        checkpoints = (CheckpointWriter(scheduler, generator, checkpoint_interval_s) if include_checkpoints
                       else None)
        start = 0
        if resume_from is not None:
            restored = restore(resume_from, scheduler=scheduler, generator=generator,
                               latents_like=self._unpack(latents, params), total_steps=total, device=device)
            latents = self._pack(restored)
            start = job.completed_steps = job.first_step = resume_from.completed_steps
        job.steps_started = time.monotonic()  # what a step takes, for the estimates (jobs.StepTimes)
        # The transformer forward of a step: the transformer itself, or the batcher's (the same call, maybe stacked
        # with other jobs' rows: step_batching.py).
        session = step_batcher.join(job) if step_batcher is not None else None
        network = transformer if session is None else session.transformer
        try:
            for i, t in enumerate(timesteps[start:], start):
                job.raise_if_cancelled()
                if per_step is not None:
                    prompt_embeds, pooled_prompt_embeds = per_step.at(i)
                if self.is_flux:
                    # Copied from diffusers.pipelines.flux.pipeline_flux.FluxPipeline.__call__ (the loop body)
                    timestep = t.expand(latents.shape[0]).to(latents.dtype)
                    noise_pred = network(
                        hidden_states=latents,
                        timestep=timestep / 1000,
                        guidance=guidance,
                        pooled_projections=pooled_prompt_embeds,
                        encoder_hidden_states=prompt_embeds,
                        txt_ids=text_ids,
                        img_ids=latent_image_ids,
                        joint_attention_kwargs={},
                        return_dict=False,
                    )[0]
                else:
                    # Copied from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3
                    # .StableDiffusion3Pipeline.__call__ (the loop body, without skip-layer guidance)
                    latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
                    timestep = t.expand(latent_model_input.shape[0])
                    noise_pred = network(
                        hidden_states=latent_model_input,
                        timestep=timestep,
                        encoder_hidden_states=prompt_embeds,
                        pooled_projections=pooled_prompt_embeds,
                        joint_attention_kwargs=None,
                        return_dict=False,
                    )[0]
                    if do_cfg:
                        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                        noise_pred = noise_pred_uncond + params.guidance_scale * (
                            noise_pred_text - noise_pred_uncond)
                latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                if inputs.mask is not None:
                    # FluxInpaintPipeline: keep the unmasked region from the init image, noised to the next step's
                    # level.
                    init_latents_proper = inputs.image_latents
                    if i < len(timesteps) - 1:
                        init_latents_proper = scheduler.scale_noise(
                            init_latents_proper, torch.tensor([timesteps[i + 1]]), inputs.noise)
                    latents = (1 - inputs.mask) * init_latents_proper + inputs.mask * latents
                job.completed_steps = i + 1
                checkpoint = (checkpoints.capture(i + 1, total, lambda: self._unpack(latents, params))
                              if checkpoints is not None else None)
                emit(StepEvent(i + 1, total, float(t), time.perf_counter() - started, checkpoint, latents))
                if job.finishes_after(i + 1):  # finished early (Finish): these latents are the result
                    break
        finally:
            if session is not None:
                session.leave()
        return DenoiseOutput(self._unpack(latents, params), params.height, params.width, type(scheduler).__name__,
                             time.perf_counter() - started)

    def _unpack(self, latents: torch.Tensor, params: DenoiseParams) -> torch.Tensor:
        """The loop's latents as [B, C, H/f, W/f]: Flux's unpacked (a reshape, exact both ways), SD3's as they are.
        Results and checkpoints hold this form, so a checkpoint's latents are a 4-D tensor for every family."""
        if not self.is_flux:
            return latents
        return FluxPipeline._unpack_latents(latents, params.height, params.width, self.vae_scale_factor)

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of ``_unpack``: Flux's 2x2 patches packed into tokens."""
        if not self.is_flux:
            return latents
        batch, channels, height, width = latents.shape
        return FluxPipeline._pack_latents(latents, batch, channels, height, width)

    def _timesteps(self, scheduler, params: DenoiseParams, img2img: bool) -> torch.Tensor:
        """The pipelines' timesteps: Flux's linspace sigmas and mu from the image's token count; SD3's mu only
        with dynamic shifting; with an init image the last ``strength`` of them (get_timesteps)."""
        config, device = scheduler.config, self.device
        kwargs = {}
        if self.is_flux:
            n = params.num_inference_steps
            sigmas = np.linspace(1.0, 1 / n, n)
            if getattr(config, "use_flow_sigmas", False):
                sigmas = None
            image_seq_len = (params.height // self.vae_scale_factor // 2) * (params.width // self.vae_scale_factor // 2)
            kwargs = {"sigmas": sigmas, "mu": calculate_shift(
                image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5), config.get("max_shift", 1.15))}
        elif config.get("use_dynamic_shifting", None):
            patch = self.transformer.config.patch_size
            image_seq_len = ((params.height // self.vae_scale_factor // patch)
                             * (params.width // self.vae_scale_factor // patch))
            kwargs = {"mu": calculate_shift(
                image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5), config.get("max_shift", 1.16))}
        timesteps, num_inference_steps = retrieve_timesteps(scheduler, params.num_inference_steps, device, **kwargs)
        if img2img:
            # FluxImg2ImgPipeline.get_timesteps (copied from StableDiffusion3Img2ImgPipeline.get_timesteps):
            # only the last strength * steps run; it sets the scheduler's begin index.
            timesteps, _ = FluxImg2ImgPipeline.get_timesteps(
                SimpleNamespace(scheduler=scheduler), num_inference_steps, params.strength, device)
        return timesteps

    def _prepare_latents(self, scheduler, generator, image: ImageInputs | None, params: DenoiseParams, batch: int,
                         timesteps, dtype) -> _Latents:
        """The pipelines' prepare_latents (and FluxInpaintPipeline's prepare_mask_latents), in their order of
        random draws; the loop's tensors are packed for Flux."""
        device, channels = self.device, self.latent_channels
        if self.is_flux:
            # FluxPipeline.prepare_latents: the latent size rounds down to whole 2x2 patches.
            height = 2 * (params.height // (self.vae_scale_factor * 2))
            width = 2 * (params.width // (self.vae_scale_factor * 2))
        else:
            height, width = params.height // self.vae_scale_factor, params.width // self.vae_scale_factor
        shape = (batch, channels, height, width)
        pack = self._pack
        variation, from_size = params.variation, None
        if variation is not None:  # the seed resize's latent size, computed as this model computes latent sizes
            from_size = ((2 * (variation.resize_from_height // (self.vae_scale_factor * 2)),
                          2 * (variation.resize_from_width // (self.vae_scale_factor * 2))) if self.is_flux else
                         (variation.resize_from_height // self.vae_scale_factor,
                          variation.resize_from_width // self.vae_scale_factor))

        def noise_of(shape):  # the pipeline's randn_tensor, with A1111's variation seed and seed resize (noise.py)
            return initial_noise(shape, generator, device=device, dtype=dtype, seed=params.seed, variation=variation,
                                 from_latent_size=from_size)

        if image is None:
            return _Latents(pack(noise_of(shape)), shape)
        # FluxImg2ImgPipeline / FluxInpaintPipeline / StableDiffusion3Img2ImgPipeline.prepare_latents: the init
        # image's latent sample (retrieve_latents(vae.encode(image), generator), here drawn from the VAE service's
        # distribution), shifted and scaled, repeated for the batch, then noised to the first timestep.
        if image.init_latents is not None:  # the pipelines take latents as the image as they are (hires fix)
            image_latents = image.init_latents.to(device=device, dtype=dtype)
        else:
            image_latents = self._sample(image.image_mean, image.image_std, image, generator, dtype)
        image_latents = torch.cat([image_latents] * (batch // image_latents.shape[0]), dim=0)
        noise = noise_of(shape)
        latent_timestep = timesteps[:1].repeat(batch)
        latents = scheduler.scale_noise(image_latents, latent_timestep, noise)
        if not image.inpainting:
            return _Latents(pack(latents), shape)
        # FluxInpaintPipeline.prepare_mask_latents: the mask at latent size, the masked image's latent sample
        # (drawn as the pipeline draws it; the 64-channel transformer does not take it), repeated per image.
        mask = torch.nn.functional.interpolate(image.mask, size=(height, width)).to(device=device, dtype=dtype)
        self._sample(image.masked_mean, image.masked_std, image, generator, dtype)
        mask = mask.repeat(batch // mask.shape[0], 1, 1, 1)
        return _Latents(pack(latents), shape, image_latents=pack(image_latents), noise=pack(noise),
                        mask=pack(mask.repeat(1, channels, 1, 1)))

    def _sample(self, mean: torch.Tensor, std: torch.Tensor, image: ImageInputs, generator, dtype) -> torch.Tensor:
        """DiagonalGaussianDistribution.sample(generator) on the VAE service's distribution, then
        (x - shift_factor) * scaling_factor as the pipelines' _encode_vae_image."""
        mean = mean.to(device=self.device, dtype=dtype)
        sample = mean + std.to(device=self.device, dtype=dtype) * randn_tensor(
            mean.shape, generator=generator, device=self.device, dtype=dtype)
        return (sample - image.shift_factor) * image.scaling_factor


@dataclass
class _Latents:
    """The loop's starting latents and what FluxInpaintPipeline's blending needs (all packed for Flux)."""

    latents: torch.Tensor
    #: The unpacked latents' shape [B, C, H/f, W/f].
    shape: tuple[int, int, int, int]
    image_latents: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    #: 1 where the image is repainted, 0 where the init image is kept.
    mask: torch.Tensor | None = None


def _img2img_steps(num_inference_steps: int, strength: float) -> int:
    """Steps an image-to-image run takes: StableDiffusion3Img2ImgPipeline.get_timesteps (FluxImg2ImgPipeline's
    copy) starts at int(steps - strength x steps), keeping a fractional step."""
    init_timestep = min(num_inference_steps * strength, num_inference_steps)
    return num_inference_steps - int(max(num_inference_steps - init_timestep, 0))


def _vae_config(path) -> dict | None:
    """The folder's vae/config.json, or None when it has no VAE."""
    config = path / "vae" / "config.json"
    return json.loads(config.read_text()) if config.is_file() else None

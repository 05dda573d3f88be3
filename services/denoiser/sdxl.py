"""The SDXL denoising loop: a UNet with added conditioning (pooled text embeddings and add_time_ids).

It is DenoiserModel's loop (model.py) with SDXL's hooks, mirroring diffusers step for step:
StableDiffusionXLPipeline for text-to-image (with denoising_end, the base half of a base + refiner job),
StableDiffusionXLImg2ImgPipeline with an init image (strength) or with hand-off latents (denoising_start,
no noise added: the refiner half), StableDiffusionXLInpaintPipeline with a mask (4-channel UNets blend,
9-channel inpainting UNets take the mask and masked-image latents), StableDiffusionXLControlNetPipeline
when ControlNet residuals come in. A refiner (model_index.json requires_aesthetics_score) conditions on
aesthetic scores instead of the target size.
"""
from __future__ import annotations

from types import SimpleNamespace

import diffusers
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

from services.runtime import families
from services.runtime.config import ModelSpec
from services.runtime.errors import InvalidArgument

from .conditioning import INVALID_TEXT_EMBEDDINGS, TextConditioning
from .model import DenoiseParams, DenoiserModel, ImageInputs, MicroConditioning


class SdxlDenoiser(DenoiserModel):
    """UNet (with text_time added conditioning) plus scheduler config of an SDXL base or refiner folder."""

    supports_handoff = True

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, allow_pickle: bool,
                 family: families.Family | None = None):
        index = self._load_unet(spec, device, dtype, allow_pickle)
        self.family = family or families.family_of_index(index)
        if self.unet.config.addition_embed_type != "text_time":
            from services.runtime.errors import ModelFolderError

            raise ModelFolderError(spec.path, "the UNet has no SDXL added conditioning (addition_embed_type "
                                              "text_time); it is not an SDXL UNet")
        #: The refiner's add_time_ids hold aesthetic scores instead of the target size.
        self.requires_aesthetics_score = bool(index.get("requires_aesthetics_score", False))
        # The SDXL pipelines keep the scheduler config as saved (no repairs, unlike StableDiffusionPipeline).
        scheduler = getattr(diffusers, index["scheduler"][1]).from_pretrained(spec.path, subfolder="scheduler")
        self._set_scheduler(scheduler)

    # -- checks -------------------------------------------------------------------------------------

    def check_text(self, text: TextConditioning, do_cfg: bool, max_batch: int) -> None:
        """Refuse conditioning this UNet cannot take: the sequence width, the pooled size its added
        embedding expects (the time ids plus the pooled text embeddings), the batch."""
        super().check_text(text, do_cfg, max_batch)
        pooled = text.pooled_prompt_embeds
        expected = self.unet.add_embedding.linear_1.in_features - self._time_ids_length() * \
            self.unet.config.addition_time_embed_dim
        if pooled is None or pooled.ndim != 2 or pooled.shape[0] != text.batch or pooled.shape[1] != expected:
            raise InvalidArgument(
                f"the pooled text embeddings have shape {None if pooled is None else list(pooled.shape)}; this "
                f"UNet needs [{text.batch}, {expected}] (text_encoder_2's pooled output)",
                reason=INVALID_TEXT_EMBEDDINGS,
                metadata={"field": "text_embeddings[text_encoder_2].pooled_prompt_embeds"})

    def _time_ids_length(self) -> int:
        return 5 if self.requires_aesthetics_score else 6

    def check_image_inputs(self, image: ImageInputs | None, params: DenoiseParams, batch: int) -> None:
        """DenoiserModel's checks (hand-off included), and a refiner refines an image."""
        if image is None and self.requires_aesthetics_score:
            raise InvalidArgument(
                "an SDXL refiner refines an image: send the base model's latents in image.latents with "
                "denoising_start, or an init image in image.image_latents", reason="REFINER_NEEDS_IMAGE",
                metadata={"field": "image"})
        super().check_image_inputs(image, params, batch)

    # -- hooks of the loop --------------------------------------------------------------------------

    def _timesteps(self, scheduler, params: DenoiseParams, image: ImageInputs | None, device):
        """StableDiffusionXLPipeline's schedule, or the image pipelines' get_timesteps (strength, or
        denoising_start for a hand-off)."""
        timesteps, num_inference_steps = retrieve_timesteps(scheduler, params.num_inference_steps, device)
        if image is not None:
            timesteps, num_inference_steps = StableDiffusionXLImg2ImgPipeline.get_timesteps(
                SimpleNamespace(scheduler=scheduler), num_inference_steps, params.strength, device,
                denoising_start=params.denoising_start or None,
            )
        return timesteps

    def _truncate(self, scheduler, params: DenoiseParams, timesteps):
        """denoising_end: stop at the "discrete timestep cutoff", as every SDXL pipeline does."""
        if not params.denoising_end:
            return timesteps
        # Copied from StableDiffusionXLPipeline.__call__ (the same code is in the img2img and inpaint pipelines).
        num_train_timesteps = scheduler.config.num_train_timesteps
        discrete_timestep_cutoff = int(round(num_train_timesteps - (params.denoising_end * num_train_timesteps)))
        num_inference_steps = len(list(filter(lambda ts: ts >= discrete_timestep_cutoff, timesteps)))
        return timesteps[:num_inference_steps]

    def _conditioning(self, text: TextConditioning, params: DenoiseParams, image: ImageInputs | None, do_cfg: bool):
        """prompt_embeds and added_cond_kwargs {text_embeds, time_ids} as the pipeline builds them."""
        device, dtype, batch = self.device, self.dtype, text.batch
        prompt_embeds = text.prompt_embeds.to(device=device, dtype=dtype)
        add_text_embeds = text.pooled_prompt_embeds.to(device=device, dtype=dtype)
        micro = params.micro or MicroConditioning()
        height, width = params.height, params.width
        original_size = (micro.original_height or height, micro.original_width or width)
        crops_coords_top_left = (micro.crop_top, micro.crop_left)
        target_size = (micro.target_height or height, micro.target_width or width)
        text_encoder_projection_dim = int(add_text_embeds.shape[-1])
        if image is None:
            # StableDiffusionXLPipeline.__call__: concatenated, then repeated per image.
            add_time_ids = StableDiffusionXLPipeline._get_add_time_ids(
                SimpleNamespace(unet=self.unet), original_size, crops_coords_top_left, target_size, dtype=dtype,
                text_encoder_projection_dim=text_encoder_projection_dim)
            negative_add_time_ids = add_time_ids
            if do_cfg:
                prompt_embeds = torch.cat([text.negative_prompt_embeds.to(device=device, dtype=dtype), prompt_embeds])
                add_text_embeds = torch.cat(
                    [text.negative_pooled_prompt_embeds.to(device=device, dtype=dtype), add_text_embeds])
                add_time_ids = torch.cat([negative_add_time_ids, add_time_ids], dim=0)
            add_time_ids = add_time_ids.to(device).repeat(batch, 1)
        else:
            # StableDiffusionXLImg2ImgPipeline / StableDiffusionXLInpaintPipeline.__call__: repeated, then
            # concatenated; the refiner's time ids carry the aesthetic scores.
            add_time_ids, add_neg_time_ids = StableDiffusionXLImg2ImgPipeline._get_add_time_ids(
                SimpleNamespace(unet=self.unet,
                                config=SimpleNamespace(requires_aesthetics_score=self.requires_aesthetics_score)),
                original_size, crops_coords_top_left, target_size, micro.aesthetic_score,
                micro.negative_aesthetic_score, original_size, crops_coords_top_left, target_size, dtype=dtype,
                text_encoder_projection_dim=text_encoder_projection_dim)
            add_time_ids = add_time_ids.repeat(batch, 1)
            if do_cfg:
                prompt_embeds = torch.cat([text.negative_prompt_embeds.to(device=device, dtype=dtype), prompt_embeds])
                add_text_embeds = torch.cat(
                    [text.negative_pooled_prompt_embeds.to(device=device, dtype=dtype), add_text_embeds])
                add_neg_time_ids = add_neg_time_ids.repeat(batch, 1)
                add_time_ids = torch.cat([add_neg_time_ids, add_time_ids], dim=0)
            add_time_ids = add_time_ids.to(device)
        return prompt_embeds, {"text_embeds": add_text_embeds, "time_ids": add_time_ids}


#: Largest size or crop coordinate in micro_conditioning, in pixels (the model saw sizes up to a few thousand).
MAX_MICRO_PIXELS = 16384


def check_micro(micro: MicroConditioning) -> None:
    """Sizes and crops from 0 (sizes: the image's) to MAX_MICRO_PIXELS, scores finite."""
    for name in ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width"):
        value = getattr(micro, name)
        if not 0 <= value <= MAX_MICRO_PIXELS:
            raise InvalidArgument(f"micro_conditioning.{name} is {value}; use 0 to {MAX_MICRO_PIXELS} pixels",
                                  reason="INVALID_MICRO_CONDITIONING", metadata={"field": f"micro_conditioning.{name}"})
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        value = getattr(micro, name)
        if not -1000 <= value <= 1000:  # also refuses NaN and infinities
            raise InvalidArgument(f"micro_conditioning.{name} is {value}; use a finite score (the refiner was "
                                  "trained on 0 to 10)", reason="INVALID_MICRO_CONDITIONING",
                                  metadata={"field": f"micro_conditioning.{name}"})

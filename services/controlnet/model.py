"""ControlNets and their per-run state, as diffusers' StableDiffusionControlNetPipeline and
StableDiffusionXLControlNetPipeline use them.

A ``ResidualsRun`` holds what stays fixed for one denoising run (the prepared control images,
the prompt embeddings, SDXL's added conditioning, each unit's scale and guidance range) and computes
one step's summed residuals the way the pipelines and ``MultiControlNetModel`` do, so the UNet that
adds them gets exactly what it would get in-process.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from diffusers import ControlNetModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from services.runtime import images, interrupt, limits
from services.runtime.config import ModelSpec
from services.runtime.errors import InvalidArgument, ModelFolderError, quote
from services.runtime.models import check_model_folder, use_safetensors

from . import preprocessors

# The pipeline's control image processor: RGB, resized to the generated size, in [0, 1] (not normalised).
# Its vae_scale_factor only rounds the size down to a multiple of it; sizes are checked to be
# multiples of 8 first, so with 8 it never changes them.
_CONTROL_IMAGE_PROCESSOR = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this service (from its flags)."""

    max_image_size: int
    max_batch: int
    max_units: int
    max_input_pixels: int


@dataclass(frozen=True)
class UnitSettings:
    """One ControlNet unit of a request: its image, preprocessor and how strongly and when it applies."""

    image: bytes
    preprocessor: str = "none"
    preprocessor_options: dict[str, float] = field(default_factory=dict)
    conditioning_scale: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0


@dataclass(frozen=True)
class RunSettings:
    """What stays fixed for one ComputeResiduals run."""

    units: list[UnitSettings]
    width: int
    height: int
    batch_size: int
    classifier_free_guidance: bool
    guess_mode: bool
    total_steps: int


@dataclass
class Residuals:
    """One step's summed residuals: added to the UNet's down-block outputs and to its mid-block output."""

    down_block_residuals: list[torch.Tensor]
    mid_block_residual: torch.Tensor
    compute_seconds: float


class ControlNet:
    """One ControlNetModel folder (config.json and weights, not a pipeline), on one device and dtype."""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, allow_pickle: bool):
        config = check_model_folder(spec.path, allow_pickle)
        if config.get("_class_name") != "ControlNetModel":
            raise ModelFolderError(spec.path, f"config.json names a {quote(config.get('_class_name'))}, not a "
                                              "diffusers ControlNetModel")
        self.net = ControlNetModel.from_pretrained(
            spec.path, torch_dtype=dtype, use_safetensors=use_safetensors(allow_pickle)
        ).to(device)
        self.net.eval()
        # Cancellation and deadlines take effect between the ControlNet's blocks and attention slices.
        interrupt.install(self.net)
        # The conditioning embedding halves the control image once per block after the first: its
        # output must have the latents' size, so the control image is this many times larger.
        self.downsampling = 2 ** (len(self.net.config.conditioning_embedding_out_channels) - 1)
        #: An SDXL ControlNet: it takes the UNet's added conditioning (pooled text embeddings and add_time_ids).
        self.text_time = self.net.config.addition_embed_type == "text_time"
        self.device = device
        self.dtype = dtype

    @property
    def signature(self) -> tuple:
        """What must agree between ControlNets whose residuals are summed (and fed to one UNet)."""
        c = self.net.config
        return (c.in_channels, c.cross_attention_dim, self.downsampling, tuple(c.block_out_channels),
                tuple(c.down_block_types), c.layers_per_block, c.addition_embed_type,
                c.projection_class_embeddings_input_dim)

    def describe(self) -> str:
        c = self.net.config
        return (f"in_channels {c.in_channels}, cross_attention_dim {c.cross_attention_dim}, control image "
                f"downsampling {self.downsampling}, block_out_channels {list(c.block_out_channels)}")


def check_settings(settings: RunSettings, run_limits: Limits) -> None:
    """Refuse a run this service cannot or will not do, before any model is loaded (the orchestrator runs
    the same checks from services/runtime/limits.py when it accepts the request)."""
    for name, value in (("width", settings.width), ("height", settings.height)):
        limits.check_size(name, value, run_limits.max_image_size)
    limits.check_batch(settings.batch_size, run_limits.max_batch, "batch_size")
    if settings.total_steps < 1:
        raise InvalidArgument(f"total_steps is {settings.total_steps}; use at least 1", reason="INVALID_STEPS",
                              metadata={"field": "total_steps"})
    limits.check_controlnet_count(len(settings.units), run_limits.max_units, required=True)
    for index, unit in enumerate(settings.units):
        field_name = f"units[{index}]"
        limits.check_controlnet_unit(field_name, unit.conditioning_scale, unit.guidance_start, unit.guidance_end)
        limits.check_image_bytes(unit.image, f"{field_name}.image")
        limits.check_preprocessor(unit.preprocessor, unit.preprocessor_options)


def control_image(unit: UnitSettings, field_name: str, max_input_pixels: int) -> Image.Image:
    """Decode a unit's image and run its preprocessor: the control image before resizing (blocking)."""
    preprocessor = preprocessors.lookup(unit.preprocessor)
    options = preprocessors.resolve_options(preprocessor, unit.preprocessor_options)
    image = images.decode_image(unit.image, field_name, max_pixels=max_input_pixels)
    return preprocessors.apply(preprocessor, image, options)


def check_preview_size(width: int, height: int, max_image_size: int) -> None:
    """Refuse a Preprocess size outside 0 (keep the image's own) to ``max_image_size``."""
    for name, value in (("width", width), ("height", height)):
        if not 0 <= value <= max_image_size:
            raise InvalidArgument(f"{name} is {value}; use 0 (keep the image's own) to {max_image_size} pixels",
                                  reason="INVALID_SIZE", metadata={"field": name})


def resize_preview(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize a control image as the pipeline does (the image processor's Lanczos); 0 keeps that side's size."""
    if not width and not height:
        return image
    return _CONTROL_IMAGE_PROCESSOR.resize(image, height or image.height, width or image.width)


class ResidualsRun:
    """The fixed state of one run and the per-step computation, as StableDiffusionControlNetPipeline does it."""

    def __init__(self, settings: RunSettings, nets: list[ControlNet], prompt_embeds: torch.Tensor, limits: Limits,
                 add_text_embeds: torch.Tensor | None = None, add_time_ids: torch.Tensor | None = None):
        """Check the run against its ControlNets and prepare every control image (blocking: decodes and preprocesses).

        ``add_text_embeds`` and ``add_time_ids``: SDXL's added conditioning as the UNet gets it (rows as
        ``prompt_embeds``), required by an SDXL ControlNet (addition_embed_type "text_time"), refused otherwise.
        """
        first = nets[0]
        for index, net in enumerate(nets[1:], start=1):
            if net.signature != first.signature:
                raise InvalidArgument(
                    f"units[{index}]'s ControlNet ({net.describe()}) does not match units[0]'s ({first.describe()}); "
                    "summed residuals need ControlNets of one architecture", reason="CONTROLNET_MISMATCH")
        for name, value in (("width", settings.width), ("height", settings.height)):
            if value % first.downsampling:
                raise InvalidArgument(
                    f"{name} is {value}; these ControlNets need a multiple of {first.downsampling} pixels",
                    reason="INVALID_SIZE", metadata={"field": name})
        self.settings = settings
        self.nets = nets
        self.device, self.dtype = first.device, first.dtype
        cfg = settings.classifier_free_guidance
        # As the pipeline: guess mode is asked for, or implied by the first ControlNet's global pooling.
        self.guess_mode = bool(settings.guess_mode or first.net.config.global_pool_conditions)

        rows = 2 * settings.batch_size if cfg else settings.batch_size
        cross_attention_dim = first.net.config.cross_attention_dim
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != rows or prompt_embeds.shape[2] != cross_attention_dim:
            guidance = "with classifier-free guidance (unconditional first)" if cfg else "without guidance"
            raise InvalidArgument(
                f"prompt_embeds has shape {list(prompt_embeds.shape)}; {guidance} this run needs "
                f"[{rows}, tokens, {cross_attention_dim}]", reason="INVALID_TENSOR",
                metadata={"field": "prompt_embeds"})
        prompt_embeds = prompt_embeds.to(device=self.device, dtype=self.dtype)
        # In guess mode with guidance the ControlNets see only the conditional half.
        self.encoder_hidden_states = prompt_embeds.chunk(2)[1] if self.guess_mode and cfg else prompt_embeds
        self.added_cond_kwargs = self._added_conditioning(first, rows, add_text_embeds, add_time_ids)

        factor = first.downsampling
        self.sample_shape = [settings.batch_size if self.guess_mode or not cfg else 2 * settings.batch_size,
                             first.net.config.in_channels, settings.height // factor, settings.width // factor]
        self.images = [
            self._prepare_image(control_image(unit, f"units[{index}].image", limits.max_input_pixels))
            for index, unit in enumerate(settings.units)
        ]

    def _added_conditioning(self, net: ControlNet, rows: int, text_embeds: torch.Tensor | None,
                            time_ids: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
        """StableDiffusionXLControlNetPipeline's controlnet_added_cond_kwargs (guess mode with guidance: the
        conditional half), checked against the ControlNet's added embedding; None for an SD 1.x/2.x ControlNet."""
        if not net.text_time:
            for name, value in (("add_text_embeds", text_embeds), ("add_time_ids", time_ids)):
                if value is not None:
                    raise InvalidArgument(
                        f"{name} is set, but these ControlNets take no added conditioning (SD 1.x/2.x); send "
                        "add_text_embeds and add_time_ids only to an SDXL ControlNet",
                        reason="INVALID_TENSOR", metadata={"field": name})
            return None
        missing = [name for name, value in (("add_text_embeds", text_embeds), ("add_time_ids", time_ids))
                   if value is None]
        if missing:
            raise InvalidArgument(
                f"these ControlNets are SDXL ControlNets and need the UNet's added conditioning; set "
                f"{' and '.join(missing)} (the pooled text embeddings and add_time_ids, as the UNet gets them)",
                reason="ADDED_CONDITIONING_REQUIRED", metadata={"field": missing[0]})
        config = net.net.config
        for name, value in (("add_text_embeds", text_embeds), ("add_time_ids", time_ids)):
            if value.ndim != 2 or value.shape[0] != rows:
                raise InvalidArgument(f"{name} has shape {list(value.shape)}; this run needs [{rows}, size] (rows "
                                      "as prompt_embeds)", reason="INVALID_TENSOR", metadata={"field": name})
        # The added embedding's input: the pooled text embedding, then each time id embedded in
        # addition_time_embed_dim (ControlNetModel.forward concatenates them).
        width = text_embeds.shape[1] + time_ids.shape[1] * config.addition_time_embed_dim
        if width != config.projection_class_embeddings_input_dim:
            raise InvalidArgument(
                f"add_text_embeds [{rows}, {text_embeds.shape[1]}] and add_time_ids [{rows}, {time_ids.shape[1]}] "
                f"make an added embedding of {width} numbers; these ControlNets take "
                f"{config.projection_class_embeddings_input_dim} (the pooled size plus "
                f"{config.addition_time_embed_dim} per time id)", reason="INVALID_TENSOR",
                metadata={"field": "add_time_ids"})
        text_embeds = text_embeds.to(device=self.device, dtype=self.dtype)
        time_ids = time_ids.to(device=self.device, dtype=self.dtype)
        if self.guess_mode and self.settings.classifier_free_guidance:
            text_embeds, time_ids = text_embeds.chunk(2)[1], time_ids.chunk(2)[1]
        return {"text_embeds": text_embeds, "time_ids": time_ids}

    def _prepare_image(self, image: Image.Image) -> torch.Tensor:
        # StableDiffusionControlNetPipeline.prepare_image, for one image and num_images_per_prompt=1.
        s = self.settings
        tensor = _CONTROL_IMAGE_PROCESSOR.preprocess(image, height=s.height, width=s.width).to(dtype=torch.float32)
        tensor = tensor.repeat_interleave(s.batch_size, dim=0)
        tensor = tensor.to(device=self.device, dtype=self.dtype)
        if s.classifier_free_guidance and not self.guess_mode:
            tensor = torch.cat([tensor] * 2)
        return tensor

    def scales(self, step_index: int) -> list[float]:
        """Each unit's conditioning scale at a step: 0 outside its guidance range (the pipeline's controlnet_keep)."""
        total = self.settings.total_steps
        return [
            unit.conditioning_scale
            * (1.0 - float(step_index / total < unit.guidance_start or (step_index + 1) / total > unit.guidance_end))
            for unit in self.settings.units
        ]

    def check_step(self, step_index: int, timestep: float, sample: torch.Tensor) -> None:
        """Refuse a step input that does not belong to this run."""
        if not 0 <= step_index < self.settings.total_steps:
            raise InvalidArgument(f"step_index is {step_index}; this run has steps 0 to {self.settings.total_steps - 1}",
                                  reason="INVALID_STEP_INDEX", metadata={"field": "step.step_index"})
        if not math.isfinite(timestep):
            raise InvalidArgument(f"timestep is {timestep}; send the scheduler's timestep",
                                  reason="INVALID_TIMESTEP", metadata={"field": "step.timestep"})
        if list(sample.shape) != self.sample_shape:
            cfg, guess = self.settings.classifier_free_guidance, self.guess_mode
            rows = ("batch_size (guess mode: the conditional half only)" if cfg and guess
                    else "2 * batch_size (classifier-free guidance)" if cfg else "batch_size")
            raise InvalidArgument(
                f"sample has shape {list(sample.shape)}; this run needs {self.sample_shape}: {rows} rows, the "
                f"ControlNet's in_channels, and height and width divided by {self.nets[0].downsampling}",
                reason="INVALID_TENSOR", metadata={"field": "step.sample"})

    @torch.inference_mode()
    def step(self, step_index: int, timestep: float, sample: torch.Tensor) -> Residuals | None:
        """The summed residuals of every active unit at one step, or None when none applies (blocking).

        Sums like MultiControlNetModel: the first active unit's residuals, then each later one's
        added in unit order. Units with scale 0 at this step are skipped: the pipeline runs them
        and adds residuals multiplied by 0, which changes nothing.
        """
        self.check_step(step_index, timestep, sample)
        active = [(net, image, scale) for net, image, scale in zip(self.nets, self.images, self.scales(step_index))
                  if scale != 0]
        if not active:
            return None
        started = time.perf_counter()
        sample = sample.to(device=self.device, dtype=self.dtype)
        down: list[torch.Tensor] = []
        mid = None
        for net, image, scale in active:
            down_k, mid_k = net.net(
                sample,
                float(timestep),
                encoder_hidden_states=self.encoder_hidden_states,
                controlnet_cond=image,
                conditioning_scale=scale,
                guess_mode=self.guess_mode,
                added_cond_kwargs=self.added_cond_kwargs,
                return_dict=False,
            )
            if mid is None:
                down, mid = list(down_k), mid_k
            else:
                down = [previous + current for previous, current in zip(down, down_k)]
                mid = mid + mid_k
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return Residuals(down, mid, time.perf_counter() - started)

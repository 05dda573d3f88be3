"""The denoising loop: a Stable Diffusion model's UNet and scheduler, and ``load_denoiser``, which picks the loop
of a model's family (this one for SD 1.x/2.x, sdxl.py for SDXL and its refiner, flow.py for SD3 and Flux).

The loop mirrors diffusers' pipelines step for step (same random draws in the same order,
same scheduler calls, same guidance arithmetic) and reuses their helpers (randn_tensor,
retrieve_timesteps, get_timesteps, rescale_noise_cfg), so a split run equals the in-process
pipeline: StableDiffusionPipeline for text-to-image, StableDiffusionImg2ImgPipeline with an init
image, StableDiffusionInpaintPipeline with an init image and a mask (9-channel inpainting UNets
and standard UNets with mask blending), and StableDiffusionControlNetPipeline when ControlNet
residuals come in from the ControlNet service. It runs one scheduler instance per job, built
from the model's config, so jobs can run side by side.
"""
from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import math
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Protocol

import diffusers
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from latentwire.denoiser.v1 import denoiser_pb2
from services.runtime import families, interrupt, limits
from services.runtime.config import ModelSpec
from services.runtime.errors import InvalidArgument, ModelFolderError, quote
from services.runtime.jobs import Job, StepTimes, Work
from services.runtime.models import check_pipeline_folder, use_safetensors

from .checkpoint import Checkpoint, CheckpointWriter, restore
from .conditioning import TextConditioning
from .schedule import ConditioningSchedule
from .step_batching import StepBatcher
from .noise import Variation, check_init_latents, initial_noise


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size and aesthetic-score conditioning (add_time_ids); 0 sizes mean the image's size."""

    original_height: int = 0
    original_width: int = 0
    crop_top: int = 0
    crop_left: int = 0
    target_height: int = 0
    target_width: int = 0
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


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
    strength: float = 1.0
    #: Fraction of the schedule at which a hand-off run starts (diffusers' denoising_start); 0: unset.
    denoising_start: float = 0.0
    #: Fraction of the schedule at which the run stops for a hand-off (diffusers' denoising_end); 0: unset.
    denoising_end: float = 0.0
    #: SDXL's add_time_ids inputs; None: the pipeline's defaults.
    micro: MicroConditioning | None = None
    #: Scheduler config options set on top of the model's config (a named sampler and schedule type), as
    #: (option, value) pairs; empty: none.
    scheduler_options: tuple[tuple[str, object], ...] = ()
    #: Variation seed and seed resize (noise.py); None: off.
    variation: Variation | None = None


@dataclass(frozen=True)
class ImageInputs:
    """An init image from the VAE service: latent distributions (unsampled) and, for inpainting, the mask;
    or the latents another run handed off (``latents``, with denoising_start)."""

    image_mean: torch.Tensor | None = None
    image_std: torch.Tensor | None = None
    scaling_factor: float = 0.0
    masked_mean: torch.Tensor | None = None
    masked_std: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    #: Hand-off latents [batch, channels, latent height, latent width], as a denoising_end run returned them.
    latents: torch.Tensor | None = None
    #: The VAE's shift factor (SD3 and Flux).
    shift_factor: float = 0.0
    #: Image-to-image from latents (hires fix, DenoiseRequest.init_latents), already at the run's latent size.
    init_latents: torch.Tensor | None = None

    @property
    def inpainting(self) -> bool:
        return self.mask is not None


class ControlNetSession(Protocol):
    """An open ControlNet stream for one run (see controlnet.py)."""

    guess_mode: bool

    def residuals(self, step_index: int, timestep: float, sample: torch.Tensor):
        """The summed residuals (down list, mid) for one step, or None when no ControlNet applies."""

    def close(self, ok: bool) -> None:
        """End the stream."""


#: Opens a ControlNet session given the run's fixed inputs (prompt embeds, batch, CFG, total steps).
OpenControlNet = Callable[..., ControlNetSession]


@dataclass(frozen=True)
class StepEvent:
    """One finished step, as the worker thread reports it."""

    step: int
    total_steps: int
    timestep: float
    elapsed_seconds: float
    #: The loop's state after the step, when the run was asked for checkpoints (and its scheduler allows them).
    checkpoint: Checkpoint | None = None
    #: The loop's latents after the step, as it holds them (Flux's packed), for a preview (preview.py); not sent.
    latents: torch.Tensor | None = None
    #: Preview image of the latents after the step (preview.py), when the run asked for previews; else empty.
    preview: bytes = b""
    #: Format of ``preview``: "jpeg" or "webp".
    preview_format: str = ""


@dataclass(frozen=True)
class DenoiseOutput:
    """The final latents of a run."""

    latents: torch.Tensor
    height: int
    width: int
    scheduler: str
    elapsed_seconds: float


def _compatible_schedulers(scheduler) -> list[str]:
    """Scheduler class names diffusers declares compatible with the model's scheduler, which import here and
    which latentwire offers (limits.SCHEDULERS)."""
    names = {type(scheduler).__name__}
    for cls in scheduler.compatibles:
        try:
            if issubclass(cls, diffusers.SchedulerMixin):
                names.add(cls.__name__)
        except (ImportError, TypeError):  # optional dependency missing (e.g. torchsde)
            continue
    # Only schedulers limits.py names: the orchestrator refuses any other before a job is stored.
    return sorted(n for n in names if n in limits.SCHEDULERS and not _needs_missing_dependency(n))


def _needs_missing_dependency(name: str) -> bool:
    if name == "DPMSolverSDEScheduler":
        try:
            import torchsde  # noqa: F401
        except ImportError:
            return True
    return False


class DenoiserBase:
    """What every family's denoiser shares: its description and the scheduler a job gets.

    A subclass sets ``family``, ``index`` (model_index.json), ``scheduler_config``, ``default_scheduler``,
    ``schedulers`` (the names it offers), ``default_height``/``default_width`` and ``latent_channels``.
    """

    family: families.Family

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """Text encoders whose per-encoder embeddings the model takes (none: SD takes prompt_embeds)."""
        return families.text_encoders(self.index) if self.family.multi_encoder else ()

    def describe(self) -> denoiser_pb2.DescribeModelResponse:
        """What the model is and what it defaults to (the DescribeModel RPC)."""
        return denoiser_pb2.DescribeModelResponse(
            family=self.family.name,
            text_encoders=list(self.text_encoders),
            default_width=self.default_width,
            default_height=self.default_height,
            default_guidance_scale=self.family.default_guidance_scale,
            guidance_distilled=self.family.guidance_distilled,
            default_scheduler=self.default_scheduler,
            schedulers=self.schedulers,
            latent_channels=self.latent_channels,
            requires_aesthetics_score=bool(self.index.get("requires_aesthetics_score", False)),
        )

    def make_scheduler(self, name: str, options: tuple[tuple[str, object], ...] = ()):
        """A fresh scheduler for one job: the model's own, or ``name`` built from its config (diffusers'
        from_config), with ``options`` (a sampler's and schedule type's, see latentwire.client.samplers) set on top
        of the config."""
        return copy.deepcopy(self.scheduler_prototype(name, options))

    def scheduler_prototype(self, name: str, options: tuple[tuple[str, object], ...] = ()):
        """What ``make_scheduler`` copies (refusing the same names and options): never use it to run a loop.

        diffusers' from_config costs about 2 ms (config parsing, signature checks); a job gets a deep copy of a
        prototype built once per (scheduler, options) instead: the same state, in a fifth of the time."""
        if not name:
            name = self.default_scheduler
        elif name not in self.schedulers:
            limits.check_scheduler(name)  # a name latentwire offers at all, else the same refusal as the orchestrator
            raise InvalidArgument(
                f"scheduler {quote(name)} is not available for this model; choose one of {', '.join(self.schedulers)}",
                reason="UNKNOWN_SCHEDULER",
                metadata={"scheduler": name},
            )
        key = (name, options)
        prototypes = self.__dict__.setdefault("_scheduler_prototypes", {})
        try:
            prototype = prototypes.get(key)
        except TypeError:  # an unhashable option value: build it each time
            return self._build_scheduler(name, options)
        if prototype is None:
            prototype = self._build_scheduler(name, options)
            if len(prototypes) < 64:  # requests choose the options: the cache stays bounded
                prototypes[key] = prototype
        return prototype

    def _build_scheduler(self, name: str, options: tuple[tuple[str, object], ...]):
        scheduler_cls = getattr(diffusers, name)
        if not options:
            return scheduler_cls.from_config(self.scheduler_config)
        accepted = inspect.signature(scheduler_cls.__init__).parameters
        unknown = [option for option, _ in options if option not in accepted]
        if unknown:
            raise InvalidArgument(
                f"scheduler {name} has no option {', '.join(unknown)}; leave it unset or choose another sampler or "
                "schedule type", reason="INVALID_SCHEDULER_OPTIONS", metadata={"scheduler": name})
        for option, value in options:
            allowed = _OPTION_VALUES.get(option)
            if allowed is not None and value not in allowed:
                raise InvalidArgument(
                    f"scheduler option {option} is {quote(value)}; use one of {', '.join(map(str, allowed))}",
                    reason="INVALID_SCHEDULER_OPTIONS", metadata={"scheduler": name, "option": option})
        try:
            # from_config warns about and drops unknown keys; every key here is one the class takes (checked above).
            return scheduler_cls.from_config(self.scheduler_config, **dict(options))
        except (ValueError, NotImplementedError) as error:  # e.g. two sigma schedules, an unknown algorithm_type
            raise InvalidArgument(
                f"scheduler {name} refuses these options ({_describe_options(options)}); set at most one sigma "
                "schedule and values the scheduler knows", reason="INVALID_SCHEDULER_OPTIONS",
                metadata={"scheduler": name}) from error


#: Values a scheduler option may take, where diffusers would only fail later, inside the loop (set_timesteps
#: refuses an unknown spacing; a solver order above 3 has no update rule).
_OPTION_VALUES = {"timestep_spacing": ("linspace", "leading", "trailing"), "solver_order": (1, 2, 3)}


def _describe_options(options: tuple[tuple[str, object], ...]) -> str:
    """Options as "name=value" for a message; string values quoted (and cut short) as errors.quote does."""
    return ", ".join(f"{option}={quote(value) if isinstance(value, str) else value}" for option, value in options)


class DenoiserModel(DenoiserBase):
    """UNet plus scheduler config of one SD 1.x/2.x model folder, on one device and dtype.

    The loop (``denoise``) is shared with SDXL (sdxl.py), which overrides the hooks that differ: the
    schedule (``_timesteps``, ``_truncate``), the conditioning the UNet takes (``_conditioning``) and
    the checks of its inputs.
    """

    family: families.Family = families.SD
    #: Whether the model takes denoising_start / denoising_end / image.latents (a hand-off between two models).
    supports_handoff = False

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, allow_pickle: bool):
        index = self._load_unet(spec, device, dtype, allow_pickle)
        scheduler_cls = getattr(diffusers, index["scheduler"][1])
        scheduler = scheduler_cls.from_pretrained(spec.path, subfolder="scheduler")
        # The pipeline's constructor repairs outdated scheduler configs (steps_offset, clip_sample);
        # build one around the UNet and scheduler so this service sees the very same config.
        pipeline = StableDiffusionPipeline(
            vae=None, text_encoder=None, tokenizer=None, unet=self.unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        self._set_scheduler(pipeline.scheduler)

    def _load_unet(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, allow_pickle: bool) -> dict:
        """Load the UNet; returns model_index.json's content."""
        index = check_pipeline_folder(spec.path, ("unet", "scheduler"), allow_pickle)
        self.index = index
        self.unet = UNet2DConditionModel.from_pretrained(
            spec.path, subfolder="unet", torch_dtype=dtype, use_safetensors=use_safetensors(allow_pickle)
        ).to(device)
        self.unet.eval()
        # Cancellation and deadlines take effect between the UNet's blocks and attention slices, not only
        # between steps (a step on a large image takes minutes on CPU).
        interrupt.install(self.unet)
        #: How long a step takes, by its size, from this model's completed runs (refusals of work that cannot fit).
        self.step_times = StepTimes()
        self.vae_scale_factor = _vae_scale_factor(spec.path)
        self.device = device
        self.dtype = dtype
        return index

    def _set_scheduler(self, scheduler) -> None:
        self.scheduler_config = scheduler.config
        self.default_scheduler = type(scheduler).__name__
        self.schedulers = _compatible_schedulers(scheduler)

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

    @property
    def default_height(self) -> int:
        """Default image height in pixels, as the pipeline computes it."""
        return self.default_size

    @property
    def default_width(self) -> int:
        """Default image width in pixels, as the pipeline computes it."""
        return self.default_size

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the loop denoises (the UNet's output)."""
        return int(self.unet.config.out_channels)

    def work(self, params: DenoiseParams, batch: int, image: ImageInputs | None = None,
             resume_from: Checkpoint | None = None) -> Work:
        """A run's work for the estimate: steps of so many latent elements as the UNet sees (rows doubled by
        guidance), as many as will run (the last ``strength`` of them with an init image, the part of the
        schedule between denoising_start and denoising_end, those after a checkpoint)."""
        rows = batch * (2 if self.do_classifier_free_guidance(params.guidance_scale) else 1)
        latent_elements = (params.height // self.vae_scale_factor) * (params.width // self.vae_scale_factor)
        steps = params.num_inference_steps
        if params.denoising_start or params.denoising_end:
            steps = max(1, math.ceil(steps * ((params.denoising_end or 1.0) - params.denoising_start)))
        elif image is not None:
            steps = min(steps, int(steps * params.strength))
        if resume_from is not None:
            steps = max(0, steps - resume_from.completed_steps)
        return Work(self.step_times, rows * latent_elements, steps)

    def check_text(self, text: TextConditioning, do_cfg: bool, max_batch: int) -> None:
        """Refuse text conditioning this UNet cannot take."""
        prompt_embeds, negative = text.prompt_embeds, text.negative_prompt_embeds
        width = self.unet.config.cross_attention_dim
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] < 1 or prompt_embeds.shape[1] < 1 \
                or prompt_embeds.shape[2] != width:
            field = "text_embeddings" if self.family.multi_encoder else "prompt_embeds"
            raise InvalidArgument(
                f"{field} give prompt embeddings of shape {list(prompt_embeds.shape)}; this UNet needs "
                f"[batch >= 1, tokens >= 1, {width}]",
                reason="INVALID_TEXT_EMBEDDINGS" if self.family.multi_encoder else "INVALID_TENSOR",
                metadata={"field": field},
            )
        limits.check_batch(prompt_embeds.shape[0], max_batch, "prompt_embeds")
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

    def check_embeds(self, prompt_embeds: torch.Tensor, negative: torch.Tensor | None, do_cfg: bool, max_batch: int):
        """Refuse embeddings this UNet cannot take (``check_text`` of a single-encoder model's embeddings)."""
        self.check_text(TextConditioning(prompt_embeds, negative), do_cfg, max_batch)

    def do_classifier_free_guidance(self, guidance_scale: float) -> bool:
        """Same rule as the pipeline: guidance above 1, and not a guidance-distilled (LCM-style) UNet."""
        return guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    @property
    def is_inpainting_unet(self) -> bool:
        """A dedicated inpainting UNet: 9 input channels (latents, mask, masked-image latents)."""
        return self.unet.config.in_channels == 9

    def check_image_inputs(self, image: ImageInputs | None, params: DenoiseParams, batch: int) -> None:
        """Refuse an init image or mask this UNet cannot take, or a strength that leaves no step."""
        check_handoff(self, params, image)
        if image is None:
            if self.is_inpainting_unet:
                raise InvalidArgument(
                    "this model has an inpainting UNet (9 input channels); send an init image and a mask",
                    reason="INPAINTING_MODEL_NEEDS_MASK")
            return
        if self.is_inpainting_unet and not image.inpainting:
            raise InvalidArgument(
                "this model has an inpainting UNet (9 input channels); image-to-image needs a mask too",
                reason="INPAINTING_MODEL_NEEDS_MASK")
        latent_shape = [1, 4 if self.is_inpainting_unet else self.unet.config.in_channels,
                        params.height // self.vae_scale_factor, params.width // self.vae_scale_factor]
        if image.init_latents is not None:  # image-to-image from latents (hires fix)
            check_init_latents(image.init_latents, latent_shape, batch, params.width, params.height, "UNet")
            limits.check_strength(params.strength, params.num_inference_steps)
            return
        if image.latents is not None:  # a hand-off: the latents replace the init image
            shape = list(image.latents.shape)
            if shape[1:] != latent_shape[1:] or shape[0] < 1 or batch % shape[0]:
                raise InvalidArgument(
                    f"image.latents has shape {shape}; for {batch} image(s) of {params.width}x{params.height} this "
                    f"UNet needs [{batch}, {', '.join(map(str, latent_shape[1:]))}] (the latents of the first "
                    "model's denoising_end run, same size)", reason="INVALID_TENSOR",
                    metadata={"field": "image.latents"})
            return
        if image.image_mean is None:
            raise InvalidArgument("image has neither image_latents nor latents; send the VAE service's Encode "
                                  "result", reason="INVALID_TENSOR", metadata={"field": "image.image_latents"})
        check_image_distributions(image, params, latent_shape, "UNet")
        limits.check_strength(params.strength, params.num_inference_steps)

    # -- hooks the SDXL loop overrides -----------------------------------------------------------------

    def _timesteps(self, scheduler, params: DenoiseParams, image: ImageInputs | None, device):
        """The schedule (StableDiffusionPipeline; the image pipelines start part-way)."""
        timesteps, num_inference_steps = retrieve_timesteps(scheduler, params.num_inference_steps, device)
        if image is not None:
            # The image pipelines start part-way: only the last strength * steps run.
            timesteps, num_inference_steps = StableDiffusionImg2ImgPipeline.get_timesteps(
                SimpleNamespace(scheduler=scheduler), num_inference_steps, params.strength, device
            )
        return timesteps

    def _truncate(self, scheduler, params: DenoiseParams, timesteps):
        """The schedule after the latents are prepared (SDXL's denoising_end cuts it here)."""
        return timesteps

    def _conditioning(self, text: TextConditioning, params: DenoiseParams, image: ImageInputs | None, do_cfg: bool):
        """(encoder_hidden_states, added_cond_kwargs) as the UNet takes them, negatives first with guidance."""
        prompt_embeds = text.prompt_embeds.to(device=self.device, dtype=self.dtype)
        if do_cfg:
            prompt_embeds = torch.cat([text.negative_prompt_embeds.to(device=self.device, dtype=self.dtype),
                                       prompt_embeds])
        return prompt_embeds, None

    @torch.inference_mode()
    def denoise(
        self,
        job: Job,
        text: TextConditioning,
        params: DenoiseParams,
        emit: Callable[[StepEvent], None],
        image: ImageInputs | None = None,
        open_controlnet: OpenControlNet | None = None,
        resume_from: Checkpoint | None = None,
        include_checkpoints: bool = False,
        checkpoint_interval_s: float = 0.0,
        schedule: ConditioningSchedule | None = None,
        step_batcher: StepBatcher | None = None,
        compiled: bool = False,
    ) -> DenoiseOutput:
        """Run the loop; ``emit`` is called after every step; stops before a step once the job is cancelled.

        ``schedule``: per-step text conditioning (prompt editing, schedule.py), taking over from ``text``.
        Random draws happen in the pipelines' order from one CPU generator seeded with ``params.seed``:
        the init image's latent sample, the noise, the masked image's latent sample, then the scheduler's.
        With ``include_checkpoints`` a step's event carries a checkpoint (every step, or the first step at least
        ``checkpoint_interval_s`` after the last checkpoint); ``resume_from`` continues a run
        from one (everything before the loop is rebuilt from the request, then the checkpoint is restored).
        ``step_batcher`` (its calling convention ``UNET``): the UNet forwards of each step go through it, shared
        with other jobs' loops (step_batching.py); None: this loop calls the UNet itself.
        """
        started = time.perf_counter()
        device, unet = self.device, self.unet
        scheduler = self.make_scheduler(params.scheduler, params.scheduler_options)
        generator = torch.Generator("cpu").manual_seed(params.seed)
        do_cfg = self.do_classifier_free_guidance(params.guidance_scale)
        batch = text.batch
        dtype = self.dtype

        timesteps = self._timesteps(scheduler, params, image, device)
        latent_size = (params.height // self.vae_scale_factor, params.width // self.vae_scale_factor)
        inputs = _prepare_latents(self, scheduler, generator, image, params, batch, timesteps, latent_size, dtype,
                                  do_cfg)

        step_parameters = set(inspect.signature(scheduler.step).parameters)
        extra_step_kwargs = {}
        if "eta" in step_parameters:
            extra_step_kwargs["eta"] = params.eta
        if "generator" in step_parameters:
            extra_step_kwargs["generator"] = generator
        prompt_embeds, added_cond_kwargs = self._conditioning(text, params, image, do_cfg)
        per_step = None if schedule is None else schedule.prepare(
            lambda segment: self._conditioning(segment, params, image, do_cfg))
        timesteps = self._truncate(scheduler, params, timesteps)
        if len(timesteps) == 0:
            raise InvalidArgument(f"denoising_end {params.denoising_end:g} leaves no step of this schedule; raise it "
                                  "or the steps", reason="INVALID_DENOISING_FRACTION",
                                  metadata={"field": "denoising_end"})
        timestep_cond = None
        if unet.config.time_cond_proj_dim is not None:
            guidance = torch.tensor(params.guidance_scale - 1).repeat(batch)
            timestep_cond = StableDiffusionPipeline.get_guidance_scale_embedding(
                None, guidance, embedding_dim=unet.config.time_cond_proj_dim
            ).to(device=device, dtype=inputs.latents.dtype)

        total = len(timesteps)
        job.total_steps = total
        # Everything so far follows from the request and the seed; what the steps change is the checkpoint.
        checkpoints = (CheckpointWriter(scheduler, generator, checkpoint_interval_s) if include_checkpoints
                       else None)
        latents, start = inputs.latents, 0
        if resume_from is not None:
            latents = restore(resume_from, scheduler=scheduler, generator=generator, latents_like=inputs.latents,
                              total_steps=total, device=device)
            start = job.completed_steps = job.first_step = resume_from.completed_steps
        controlnet = None
        if open_controlnet is not None:
            extra = {} if added_cond_kwargs is None else {"add_text_embeds": added_cond_kwargs["text_embeds"],
                                                          "add_time_ids": added_cond_kwargs["time_ids"]}
            controlnet = open_controlnet(prompt_embeds=prompt_embeds, batch_size=batch, classifier_free_guidance=do_cfg,
                                         total_steps=total, **extra)
        ok = False
        job.steps_started = time.monotonic()  # what a step takes, for the estimates (jobs.StepTimes)
        # The network forward of a step: the UNet itself, or the batcher's (same call, maybe stacked with others).
        session = step_batcher.join(job) if step_batcher is not None else None
        if session is not None:
            network = session.forward
        elif compiled and getattr(self, "compiled_network", None) is not None:
            network = self.compiled_network  # --compile (acceleration.py): same call, compiled
        else:
            network = unet
        try:
            for i, t in enumerate(timesteps[start:], start):
                job.raise_if_cancelled()
                if per_step is not None:  # prompt editing / alternation: this iteration's conditioning
                    prompt_embeds, added_cond_kwargs = per_step.at(i)
                latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
                latent_model_input = scheduler.scale_model_input(latent_model_input, t)
                down_residuals = mid_residual = None
                if controlnet is not None:
                    guess = controlnet.guess_mode and do_cfg
                    # StableDiffusion(XL)ControlNetPipeline: in guess mode the ControlNets see the conditional half.
                    control_input = scheduler.scale_model_input(latents, t) if guess else latent_model_input
                    residuals = controlnet.residuals(i, float(t), control_input)
                    if residuals is not None:
                        down_residuals, mid_residual = (
                            [r.to(device=device, dtype=dtype) for r in residuals[0]],
                            residuals[1].to(device=device, dtype=dtype),
                        )
                        if guess:
                            down_residuals = [torch.cat([torch.zeros_like(d), d]) for d in down_residuals]
                            mid_residual = torch.cat([torch.zeros_like(mid_residual), mid_residual])
                if self.is_inpainting_unet:
                    latent_model_input = torch.cat(
                        [latent_model_input, inputs.mask, inputs.masked_image_latents], dim=1)
                noise_pred = network(
                    latent_model_input,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    timestep_cond=timestep_cond,
                    down_block_additional_residuals=down_residuals,
                    mid_block_additional_residual=mid_residual,
                    added_cond_kwargs=added_cond_kwargs,
                    return_dict=False,
                )[0]
                if do_cfg:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + params.guidance_scale * (noise_pred_text - noise_pred_uncond)
                    if params.guidance_rescale > 0.0:
                        noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text,
                                                       guidance_rescale=params.guidance_rescale)
                latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if inputs.blend_mask is not None:
                    # Stable Diffusion (XL) inpainting with a standard UNet: keep the unmasked region from the
                    # init image, noised to the next step's level.
                    init_latents_proper = inputs.image_latents
                    if i < len(timesteps) - 1:
                        init_latents_proper = scheduler.add_noise(
                            init_latents_proper, inputs.noise, torch.tensor([timesteps[i + 1]]))
                    latents = (1 - inputs.blend_mask) * init_latents_proper + inputs.blend_mask * latents
                job.completed_steps = i + 1
                checkpoint = checkpoints.capture(i + 1, total, latents) if checkpoints is not None else None
                emit(StepEvent(i + 1, total, float(t), time.perf_counter() - started, checkpoint, latents))
                if job.finishes_after(i + 1):  # finished early (Finish): these latents are the result
                    break
            ok = True
        finally:
            if session is not None:
                session.leave()
            if controlnet is not None:
                controlnet.close(ok)
        return DenoiseOutput(latents, params.height, params.width, type(scheduler).__name__, time.perf_counter() - started)


def check_image_distributions(image: ImageInputs, params: DenoiseParams, latent_shape: list[int],
                              network: str) -> None:
    """Refuse an init image's latent distributions (and an inpainting mask) whose shapes do not fit a
    ``params.width`` x ``params.height`` run of a ``network`` ("UNet", "model") with ``latent_shape`` latents,
    or a scaling factor that is not positive."""
    tensors_to_check = [("image_latents", image.image_mean), ("image_latents", image.image_std)]
    if image.inpainting:
        tensors_to_check += [("masked_image_latents", image.masked_mean), ("masked_image_latents", image.masked_std)]
    for field, tensor in tensors_to_check:
        if tensor is None or list(tensor.shape) != latent_shape:
            raise InvalidArgument(
                f"{field} has shape {None if tensor is None else list(tensor.shape)}; for a "
                f"{params.width}x{params.height} image this {network} needs {latent_shape}",
                reason="INVALID_TENSOR", metadata={"field": field})
    if image.inpainting and list(image.mask.shape) != [1, 1, *latent_shape[2:]]:
        raise InvalidArgument(
            f"mask has shape {list(image.mask.shape)}; it must be [1, 1, {latent_shape[2]}, {latent_shape[3]}]",
            reason="INVALID_TENSOR", metadata={"field": "mask"})
    if not math.isfinite(image.scaling_factor) or image.scaling_factor <= 0:
        raise InvalidArgument(f"scaling_factor is {image.scaling_factor}; it must be positive",
                              reason="INVALID_TENSOR", metadata={"field": "scaling_factor"})


def check_handoff(model, params: DenoiseParams, image: ImageInputs | None) -> None:
    """The hand-off fields (denoising_start, denoising_end, image.latents) only on a model that takes them, and
    together as they belong: denoising_start continues image.latents, and image.latents need denoising_start."""
    limits.check_denoising_range(params.denoising_start, params.denoising_end)
    latents = image is not None and image.latents is not None
    if not getattr(model, "supports_handoff", False):
        for name, used in (("denoising_start", params.denoising_start), ("denoising_end", params.denoising_end),
                           ("image.latents", latents)):
            if used:
                raise InvalidArgument(f"{name} is set, but a {model.family.title} model does not hand off between "
                                      "two models; leave it unset", reason="HANDOFF_NOT_SUPPORTED",
                                      metadata={"field": name})
        return
    if params.denoising_start and not latents:
        raise InvalidArgument("denoising_start is set without image.latents; send the latents of the first model's "
                              "denoising_end run in image.latents", reason="HANDOFF_MISMATCH",
                              metadata={"field": "image.latents"})
    if latents and not params.denoising_start:
        raise InvalidArgument("image.latents is set without denoising_start; set denoising_start to the first "
                              "run's denoising_end", reason="HANDOFF_MISMATCH", metadata={"field": "denoising_start"})
    if latents and image.inpainting:
        raise InvalidArgument("a hand-off (image.latents) cannot be combined with a mask; send one or the other",
                              reason="HANDOFF_MISMATCH", metadata={"field": "image.mask"})


def load_denoiser(spec: ModelSpec, device: torch.device, dtype: torch.dtype, allow_pickle: bool,
                  acceleration=None):
    """The denoising loop of a model folder's family: DenoiserModel (SD 1.x/2.x), SdxlDenoiser (SDXL and its
    refiner) or FlowDenoiser (SD3, Flux); ``acceleration`` (acceleration.Acceleration): --channels-last, --compile."""
    index = check_pipeline_folder(spec.path, (), allow_pickle)
    try:
        family = families.family_of_index(index)
    except ValueError as error:
        raise ModelFolderError(spec.path, str(error)) from None
    if family.name in ("sdxl", "sdxl-refiner"):
        from .sdxl import SdxlDenoiser

        model = SdxlDenoiser(spec, device, dtype, allow_pickle, family)
    elif family.name in ("sd3", "flux"):
        if importlib.util.find_spec(f"{__package__}.flow") is None:
            raise ModelFolderError(spec.path, f"this denoiser cannot run {family.title} models")
        from .flow import FlowDenoiser

        model = FlowDenoiser(spec, device, dtype, allow_pickle)
    else:
        model = DenoiserModel(spec, device, dtype, allow_pickle)
    if acceleration is not None:
        from . import acceleration as accelerate

        accelerate.apply(model, acceleration)
    return model


@dataclass
class _Latents:
    """The loop's starting point and what the inpainting steps need."""

    latents: torch.Tensor
    noise: torch.Tensor | None = None
    image_latents: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    masked_image_latents: torch.Tensor | None = None
    blend_mask: torch.Tensor | None = None


def _sample(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator, device, dtype) -> torch.Tensor:
    """DiagonalGaussianDistribution.sample(generator), on the distribution the VAE service returned."""
    mean = mean.to(device=device, dtype=dtype)
    noise = randn_tensor(mean.shape, generator=generator, device=device, dtype=dtype)
    return mean + std.to(device=device, dtype=dtype) * noise


def _prepare_latents(model: DenoiserModel, scheduler, generator, image: ImageInputs | None, params: DenoiseParams,
                     batch: int, timesteps, latent_size, dtype, do_cfg: bool) -> _Latents:
    """The pipelines' prepare_latents (and prepare_mask_latents), in their order of random draws."""
    device = model.device
    variation = params.variation
    from_size = None if variation is None else (variation.resize_from_height // model.vae_scale_factor,
                                                variation.resize_from_width // model.vae_scale_factor)

    def noise_of(shape):  # the pipeline's randn_tensor, with A1111's variation seed and seed resize (noise.py)
        return initial_noise(shape, generator, device=device, dtype=dtype, seed=params.seed, variation=variation,
                             from_latent_size=from_size)

    if image is None:  # StableDiffusionPipeline
        shape = (batch, model.unet.config.in_channels, *latent_size)
        latents = noise_of(shape)
        return _Latents(latents * scheduler.init_noise_sigma)

    if image.latents is not None:
        # StableDiffusionXLImg2ImgPipeline.prepare_latents with 4-channel latents as the image and
        # add_noise=False (denoising_start): the hand-off latents as they are, no random draw.
        init_latents = image.latents.to(device=device, dtype=dtype)
        if batch > init_latents.shape[0]:
            init_latents = torch.cat([init_latents] * (batch // init_latents.shape[0]), dim=0)
        return _Latents(init_latents)
    latent_timestep = timesteps[:1].repeat(batch)
    if image.init_latents is not None:
        # StableDiffusion(XL)Img2ImgPipeline.prepare_latents with latents as the image (image.shape[1] == 4): no
        # VAE sample, no scaling; repeated for the batch, then noised to the first timestep.
        init_latents = image.init_latents.to(device=device, dtype=dtype)
        init_latents = torch.cat([init_latents] * (batch // init_latents.shape[0]), dim=0)
        return _Latents(scheduler.add_noise(init_latents, noise_of(init_latents.shape), latent_timestep))
    if not image.inpainting:  # StableDiffusion(XL)Img2ImgPipeline.prepare_latents
        init_latents = image.scaling_factor * _sample(image.image_mean, image.image_std, generator, device, dtype)
        init_latents = torch.cat([init_latents] * batch, dim=0)
        noise = noise_of(init_latents.shape)
        return _Latents(scheduler.add_noise(init_latents, noise, latent_timestep))

    # StableDiffusionInpaintPipeline.prepare_latents, then prepare_mask_latents.
    is_strength_max = params.strength == 1.0
    blending = not model.is_inpainting_unet
    image_latents = None
    if blending or not is_strength_max:
        image_latents = image.scaling_factor * _sample(image.image_mean, image.image_std, generator, device, dtype)
        image_latents = image_latents.repeat(batch // image_latents.shape[0], 1, 1, 1)
    shape = (batch, image.image_mean.shape[1], *latent_size)
    noise = noise_of(shape)
    latents = noise if is_strength_max else scheduler.add_noise(image_latents, noise, latent_timestep)
    latents = latents * scheduler.init_noise_sigma if is_strength_max else latents

    mask = image.mask.to(device=device, dtype=dtype)
    masked_image_latents = image.scaling_factor * _sample(image.masked_mean, image.masked_std, generator, device, dtype)
    mask = mask.repeat(batch // mask.shape[0], 1, 1, 1)
    masked_image_latents = masked_image_latents.repeat(batch // masked_image_latents.shape[0], 1, 1, 1)
    blend_mask = mask if blending else None
    mask = torch.cat([mask] * 2) if do_cfg else mask
    masked_image_latents = torch.cat([masked_image_latents] * 2) if do_cfg else masked_image_latents
    return _Latents(latents, noise, image_latents, mask, masked_image_latents.to(device=device, dtype=dtype),
                    blend_mask)


def _vae_scale_factor(path) -> int:
    """2 ** (VAE levels - 1), as the pipeline computes it; 8 when the folder has no VAE config."""
    config = path / "vae" / "config.json"
    if not config.is_file():
        return 8
    return 2 ** (len(json.loads(config.read_text())["block_out_channels"]) - 1)


def check_params(params: DenoiseParams, *, max_steps: int, max_image_size: int) -> None:
    """Refuse out-of-range parameters with a message saying what to send instead (the orchestrator runs the
    same checks from services/runtime/limits.py before it accepts a job)."""
    limits.check_steps(params.num_inference_steps, max_steps)
    for name, value in (("height", params.height), ("width", params.width)):
        limits.check_size(name, value, max_image_size)
    limits.check_guidance(params.guidance_scale, params.guidance_rescale, params.eta)

"""A Generate request and its rules: defaults filled, limits checked, images decoded, before a job exists.

`resolve_request` is the orchestrator's whole acceptance check and turns a GenerateRequest into a
`GenerateParams`: every default filled in and the seed drawn. `pin_models` then fixes the model, the
refiner and the ControlNet model references to registry versions. One default depends on the model and
is filled when the job runs (execution.py, from the denoiser's DescribeModel): the guidance scale, which
stays None here unless the request (or --default-guidance-scale) sets it; a pinned model gives the same
default every time, so the job is still reproducible. The result is what a job holds from acceptance to
its end: running it resolves nothing again. What the job store keeps is `GenerateParams.to_request()`,
the same request with everything explicit, so resolving it again after a restart (its images decoded
once more, there) gives back equal params and the same image.

Nothing here does I/O beyond what it is given; `infotext` writes the settings in AUTOMATIC1111's PNG
"parameters" format.
"""
from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from latentwire.client import samplers
from latentwire.common.v1 import model_pb2
from latentwire.controlnet.v1 import controlnet_pb2
from latentwire.orchestrator.v1 import orchestrator_pb2
from services.runtime import images, previews as preview_options
from services.runtime.errors import QUOTE_LIMIT, FailedPrecondition, InvalidArgument, quote
from services.runtime.limits import (MAX_STEP_MESSAGE_INTERVAL_MS, check_controlnet_count, check_controlnet_unit,
                                     check_guidance, check_mask_size, check_num_images, check_preprocessor,
                                     check_prompt, check_scheduler, check_scheduler_steps, check_size, check_steps,
                                     check_strength, check_variation)

from . import batches, hires
from . import prompts
from .config import OrchestratorSettings
from .loras import infotext_prompt, pin_embeddings, pin_loras, resolve_embeddings, resolve_loras
from .placement import check_pins

if TYPE_CHECKING:
    from .grid import GridPlan

#: Job priorities a request may ask for; higher runs first.
MIN_PRIORITY, MAX_PRIORITY = -100, 100


@dataclass(frozen=True)
class GenerateParams:
    """A request with defaults filled in and limits checked: what a job runs with."""

    model: str
    prompt: str
    negative_prompt: str
    seed: int
    num_inference_steps: int
    #: None: the model's default (its family's pipeline default), filled when the job runs.
    guidance_scale: float | None
    guidance_rescale: float
    eta: float
    width: int
    height: int
    num_images: int
    scheduler: str
    include_pixels: bool
    init_image: bytes = b""
    mask_image: bytes = b""
    strength: float = 1.0
    #: ControlNet units with their defaults filled (scale, start, end, preprocessor).
    controlnets: tuple[controlnet_pb2.ControlNetUnit, ...] = ()
    guess_mode: bool = False
    #: Placement pins: (stage, device label) pairs from the request's stage_devices.
    stage_devices: tuple[tuple[str, str], ...] = ()
    #: Queue priority, -100 to 100; higher runs first.
    priority: int = 0
    #: SDXL refiner model reference ("" for none), pinned like the model.
    refiner: str = ""
    #: Fraction of the schedule at which the refiner takes over (0 without a refiner).
    refiner_switch_at: float = 0.0
    #: Sampler by its table name (latentwire.client.samplers, "DPM++ 2M"), "" when the request named none.
    sampler: str = ""
    #: Its schedule type by table name ("Karras"; "Automatic" when the request named none); "" without a sampler.
    schedule_type: str = ""
    #: A1111's "Clip skip" (0 or 1: the last layer); see services/text_encoder/a1111.py.
    clip_skip: int = 0
    #: Variation seed and its strength (0: off), seed resize from (0, 0: off); see services/denoiser/noise.py.
    subseed: int = 0
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    #: Batches of num_images run one after another (batches.py).
    batch_count: int = 1
    #: Hires fix (hires.py); None: off.
    hires: hires.HiresParams | None = None
    #: Live previews (services/runtime/previews.py), None for none.
    previews: preview_options.Previews | None = None
    #: Seamless tiling: circular padding in the denoiser's and the VAE's convolutions.
    tiling: bool = False
    #: VaeTiling of the decode (0: automatic).
    vae_tiling: int = 0
    #: X/Y/Z grid (grid.py): the axes and cells of a grid job; None for one generation.
    grid: GridPlan | None = None
    #: LoRAs (LoraWeight): the field's and the prompt's tags' (loras.py), pinned by pin_models.
    loras: tuple = ()
    #: Textual-inversion embedding references the prompts may use (loras.py), pinned by pin_models.
    embeddings: tuple[str, ...] = ()
    #: DenoisingStep events at most every this many milliseconds (0: every step); see execution._Progress.
    step_event_interval_ms: int = 0

    @property
    def scheduler_choice(self) -> tuple[str, dict[str, object]]:
        """The diffusers scheduler class the denoiser builds ("" for the model's own) and the config options it
        sets on top of the model's config: the sampler's and schedule type's, or none for a scheduler name."""
        if not self.sampler:
            return self.scheduler, {}
        sampler = samplers.find_sampler(self.sampler)
        return sampler.scheduler, samplers.options_of(sampler, samplers.find_schedule_type(self.schedule_type),
                                                     seed=self.seed)

    @property
    def mode(self) -> str:
        """"text-to-image", "image-to-image" or "inpainting"."""
        if self.mask_image:
            return "inpainting"
        return "image-to-image" if self.init_image else "text-to-image"

    @property
    def controlnet_models(self) -> tuple[str, ...]:
        """The ControlNet model references the job uses, each once, in unit order."""
        return tuple(dict.fromkeys(unit.model.name for unit in self.controlnets))

    def to_request(self) -> orchestrator_pb2.GenerateRequest:
        """This request with every default explicit, as the job store keeps it: resolving it again gives equal
        params (same seed, same pinned models)."""
        request = orchestrator_pb2.GenerateRequest(
            model=model_pb2.ModelReference(name=self.model),
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seed=self.seed,
            num_inference_steps=self.num_inference_steps,
            guidance_rescale=self.guidance_rescale,
            eta=self.eta,
            width=self.width,
            height=self.height,
            num_images=self.num_images,
            scheduler=self.scheduler,
            include_pixels=self.include_pixels,
            init_image=self.init_image,
            mask_image=self.mask_image,
            controlnets=self.controlnets,
            guess_mode=self.guess_mode,
            stage_devices=dict(self.stage_devices),
            priority=self.priority,
            sampler=self.sampler,
            schedule_type=self.schedule_type,
            clip_skip=self.clip_skip,
            subseed_strength=self.subseed_strength,
            seed_resize_from_w=self.seed_resize_from_w,
            seed_resize_from_h=self.seed_resize_from_h,
            batch_count=self.batch_count,
        )
        if self.subseed_strength:
            request.subseed = self.subseed
        if self.hires is not None:
            request.hires.CopyFrom(self.hires.to_proto())
        if self.init_image:
            request.strength = self.strength  # refused without an init image
        if self.guidance_scale is not None:  # absent: the model's default, filled again when the job runs
            request.guidance_scale = self.guidance_scale
        if self.refiner:
            request.refiner.name = self.refiner
            request.refiner_switch_at = self.refiner_switch_at
        if self.previews is not None:
            request.previews.CopyFrom(preview_options.to_proto(self.previews, request.previews))
        request.tiling, request.vae_tiling = self.tiling, self.vae_tiling
        request.step_event_interval_ms = self.step_event_interval_ms
        if self.grid is not None:
            request.grid.CopyFrom(self.grid.to_proto())
        request.loras.extend(self.loras)  # every LoRA, pinned; the prompt keeps its tags (loras.py)
        request.embeddings.extend(model_pb2.ModelReference(name=name) for name in self.embeddings)
        return request


#: Default strength without one in the request, as diffusers' pipelines default.
DEFAULT_STRENGTH = {"image-to-image": 0.8, "inpainting": 1.0}
#: Fraction of the schedule at which a refiner takes over when the request names none (as diffusers' SDXL docs
#: and A1111 default).
DEFAULT_REFINER_SWITCH_AT = 0.8


def resolve_request(request: orchestrator_pb2.GenerateRequest, settings: OrchestratorSettings) -> GenerateParams:
    """Fill defaults and refuse, before any work starts, what breaks a limit (InvalidArgument, or
    FailedPrecondition for what this orchestrator is not configured to run)."""
    limits = settings.limits
    check_prompt(request.prompt)
    for name, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        if len(text) > limits.max_prompt_chars:
            raise InvalidArgument(
                f"{name} is {len(text)} characters; at most {limits.max_prompt_chars} are accepted",
                reason="PROMPT_TOO_LONG",
            )
    steps = request.num_inference_steps if request.HasField("num_inference_steps") else limits.default_steps
    # The stages run these same checks (services/runtime/limits.py): nothing they would refuse is stored as a job.
    check_steps(steps, limits.max_steps)
    for name, value in (("width", request.width), ("height", request.height)):
        check_size(name, value, limits.max_image_size, zero_means="the model's default")
    num_images = request.num_images or 1
    check_num_images(num_images, limits.max_images)
    guidance = request.guidance_scale if request.HasField("guidance_scale") else limits.default_guidance_scale
    # Without a guidance scale the model's default applies (known once the denoiser describes the model): only
    # guidance_rescale and eta are checked then.
    check_guidance(0.0 if guidance is None else guidance, request.guidance_rescale, request.eta)
    refiner, switch_at = _check_refiner(request)
    check_scheduler(request.scheduler)
    sampler, schedule_type = resolve_sampler(request.sampler, request.schedule_type, request.scheduler)
    prompts.check_prompts(request.prompt, request.negative_prompt, request.clip_skip)
    # The model's own scheduler is the denoiser's to check.
    check_scheduler_steps(samplers.find_sampler(sampler).scheduler if sampler else request.scheduler, steps)
    if not MIN_PRIORITY <= request.priority <= MAX_PRIORITY:
        raise InvalidArgument(f"priority is {request.priority}; use {MIN_PRIORITY} to {MAX_PRIORITY}",
                              reason="INVALID_PRIORITY")
    width, height = request.width, request.height
    size_source = _check_images(request, limits)
    if size_source is not None:
        # As A1111 does: without an explicit size the output takes the init (or first control) image's size.
        width = width or size_source[0] // 8 * 8
        height = height or size_source[1] // 8 * 8
        for name, value in (("width", width), ("height", height)):
            if value < 8 or value > limits.max_image_size:
                raise InvalidArgument(
                    f"the output would be {value} pixels {name}; use 8 to {limits.max_image_size} (set {name} "
                    "or send a smaller image)", reason="IMAGE_TOO_LARGE" if value > 8 else "IMAGE_TOO_SMALL")
    strength = 1.0
    if request.init_image:
        mode = "inpainting" if request.mask_image else "image-to-image"
        strength = request.strength if request.HasField("strength") else DEFAULT_STRENGTH[mode]
        check_strength(strength, steps)
    elif request.HasField("strength"):
        raise InvalidArgument("strength is set without init_image; send the image to start from",
                              reason="MISSING_INIT_IMAGE")
    if request.controlnets and settings.has_controlnet:
        check_controlnet_count(len(request.controlnets), limits.max_controlnets)
    controlnets = tuple(_resolve_unit(i, unit, settings) for i, unit in enumerate(request.controlnets))
    check_pins(settings.placement, request.stage_devices)
    seed = request.seed if request.HasField("seed") else secrets.randbelow(2**32)
    check_variation(request.subseed_strength, request.seed_resize_from_w, request.seed_resize_from_h,
                    limits.max_image_size)
    subseed = 0
    if request.subseed_strength:  # as A1111: a variation seed left unset is drawn
        subseed = request.subseed if request.HasField("subseed") else secrets.randbelow(2**32)
    batch_count = request.batch_count or 1
    batches.check_batch_count(batch_count, seed, num_images)
    hires_fix = hires.resolve_hires(request, steps=steps, num_images=num_images, max_image_size=limits.max_image_size,
                                    max_steps=limits.max_steps)
    params = GenerateParams(
        model=request.model.name or limits.default_model,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        seed=seed,
        num_inference_steps=steps,
        guidance_scale=guidance,
        guidance_rescale=request.guidance_rescale,
        eta=request.eta,
        width=width,
        height=height,
        num_images=num_images,
        scheduler=request.scheduler,
        include_pixels=request.include_pixels,
        init_image=request.init_image,
        mask_image=request.mask_image,
        strength=strength,
        controlnets=controlnets,
        guess_mode=request.guess_mode,
        stage_devices=tuple(sorted(request.stage_devices.items())),
        priority=request.priority,
        refiner=refiner,
        refiner_switch_at=switch_at,
        sampler=sampler,
        schedule_type=schedule_type,
        clip_skip=request.clip_skip,
        subseed=subseed,
        subseed_strength=request.subseed_strength,
        seed_resize_from_w=request.seed_resize_from_w,
        seed_resize_from_h=request.seed_resize_from_h,
        batch_count=batch_count,
        hires=hires_fix,
        previews=preview_options.from_proto(request.previews) if request.HasField("previews") else None,
        tiling=request.tiling,
        vae_tiling=preview_options.check_vae_tiling(request.vae_tiling),
        loras=resolve_loras(request.loras, request.prompt),
        embeddings=resolve_embeddings(request.embeddings),
        step_event_interval_ms=check_step_event_interval(request.step_event_interval_ms),
    )
    if request.HasField("grid"):  # an X/Y/Z grid: its cells are resolved as requests too (grid.py)
        from .grid import resolve_grid

        params = dataclasses.replace(params, grid=resolve_grid(request, params, settings))
    return params


def check_step_event_interval(interval_ms: int) -> int:
    """GenerateRequest.step_event_interval_ms, checked: 0 (every step) to MAX_STEP_MESSAGE_INTERVAL_MS."""
    if not 0 <= interval_ms <= MAX_STEP_MESSAGE_INTERVAL_MS:
        raise InvalidArgument(
            f"step_event_interval_ms is {interval_ms}; send 0 (an event every step) or the least milliseconds "
            f"between two step events, at most {MAX_STEP_MESSAGE_INTERVAL_MS}",
            reason="INVALID_STEP_EVENT_INTERVAL", metadata={"field": "step_event_interval_ms"})
    return interval_ms


def resolve_sampler(sampler_name: str, schedule_type_name: str, scheduler: str) -> tuple[str, str]:
    """A request's sampler and schedule type as their table names (latentwire.client.samplers), ("", "") when it
    names no sampler. A pre-1.9 combined name ("DPM++ 2M Karras") gives its sampler and schedule type."""
    if not sampler_name:
        if schedule_type_name:
            raise InvalidArgument("schedule_type is set without sampler; name the sampler too (for example "
                                  "'DPM++ 2M'; `latentwire samplers` lists them)", reason="MISSING_SAMPLER")
        return "", ""
    if scheduler:
        raise InvalidArgument("sampler and scheduler are both set; name the sampler (an A1111 name) or the "
                              "diffusers scheduler class, not both", reason="SAMPLER_AND_SCHEDULER")
    found = samplers.split_combined(sampler_name)
    if found is None:
        matches = samplers.close_matches(sampler_name)
        hint = f"did you mean {', '.join(repr(m) for m in matches)}? " if matches else ""
        raise InvalidArgument(f"sampler {quote(sampler_name)} is not a sampler latentwire knows; {hint}"
                              "`latentwire samplers` lists them", reason="UNKNOWN_SAMPLER",
                              metadata={"sampler": sampler_name[:QUOTE_LIMIT]})
    sampler, combined_type = found
    schedule_type = combined_type
    if schedule_type_name:
        schedule_type = samplers.find_schedule_type(schedule_type_name)
        if schedule_type is None:
            names = [t.name for t in samplers.SCHEDULE_TYPES]
            raise InvalidArgument(f"schedule_type {quote(schedule_type_name)} is not a schedule type latentwire "
                                  f"knows; choose one of {', '.join(names)}", reason="UNKNOWN_SCHEDULE_TYPE",
                                  metadata={"schedule_type": schedule_type_name[:QUOTE_LIMIT]})
        if combined_type is not None and combined_type is not schedule_type:
            raise InvalidArgument(f"sampler {quote(sampler_name)} carries schedule type {combined_type.name}, but "
                                  f"schedule_type is {schedule_type.name}; drop one of them",
                                  reason="SCHEDULE_TYPE_CONFLICT")
    type_name = schedule_type.name if schedule_type is not None else samplers.AUTOMATIC
    if type_name not in sampler.schedule_types:
        raise InvalidArgument(f"sampler {sampler.name} does not take schedule type {type_name}; choose one of "
                              f"{', '.join(sampler.schedule_types)}", reason="SCHEDULE_TYPE_NOT_AVAILABLE",
                              metadata={"sampler": sampler.name, "schedule_type": type_name})
    return sampler.name, type_name


def check_sampler_fits(params: GenerateParams, family: str, schedulers: list[str] | tuple[str, ...]) -> None:
    """The request's sampler must be one the model takes: its family, and a scheduler class the model's denoiser
    offers (DescribeModel's ``schedulers``)."""
    if not params.sampler:
        return
    sampler = samplers.find_sampler(params.sampler)
    if family in sampler.families and sampler.scheduler in schedulers:
        return
    fitting = [s.name for s in samplers.SAMPLERS if family in s.families and s.scheduler in schedulers]
    choose = f"choose one of {', '.join(fitting)}" if fitting else "leave sampler empty for the model's own scheduler"
    raise InvalidArgument(f"sampler {sampler.name} does not fit this model (family {family}); {choose}",
                          reason="SAMPLER_NOT_AVAILABLE",
                          metadata={"sampler": sampler.name, "family": family})


def _check_refiner(request: orchestrator_pb2.GenerateRequest) -> tuple[str, float]:
    """The refiner reference and its switch fraction (default 0.8); ("", 0.0) without a refiner."""
    if not request.refiner.name:
        if request.HasField("refiner_switch_at"):
            raise InvalidArgument("refiner_switch_at is set without refiner; name the refiner model to hand off to",
                                  reason="MISSING_REFINER")
        return "", 0.0
    switch_at = request.refiner_switch_at if request.HasField("refiner_switch_at") else DEFAULT_REFINER_SWITCH_AT
    if not 0.0 < switch_at < 1.0:  # NaN fails too
        raise InvalidArgument(f"refiner_switch_at is {switch_at:g}; use a fraction of the schedule between 0 and 1 "
                              "(exclusive), such as 0.8", reason="INVALID_REFINER_SWITCH")
    return request.refiner.name, switch_at


async def pin_models(params: GenerateParams, resolve_model: Callable[[str], Awaitable[str]]) -> GenerateParams:
    """``params`` with the model, the refiner and every ControlNet model pinned to the version ``resolve_model``
    names ("name@VERSION"), so every stage loads exactly that version and moving an alias later does not change
    the job."""
    units = []
    for unit in params.controlnets:
        pinned = controlnet_pb2.ControlNetUnit()
        pinned.CopyFrom(unit)
        if unit.model.name:
            pinned.model.name = await resolve_model(unit.model.name)
        units.append(pinned)
    model = await resolve_model(params.model) if params.model else params.model
    refiner = await resolve_model(params.refiner) if params.refiner else params.refiner
    loras = await pin_loras(params.loras, resolve_model)
    embeddings = await pin_embeddings(params.embeddings, resolve_model)
    grid = params.grid
    if grid is not None:  # a grid cell's own LoRAs (grid.py)
        from .grid import pin_cells

        grid = await pin_cells(grid, resolve_model)
    return dataclasses.replace(params, model=model, refiner=refiner, controlnets=tuple(units), loras=loras, grid=grid,
                               embeddings=embeddings)


def _check_images(request: orchestrator_pb2.GenerateRequest, limits) -> tuple[int, int] | None:
    """Decode every image once to refuse a bad one before any stage works; return the size the output
    defaults to (init image, else first control image), or None for text-to-image."""
    max_pixels = limits.max_input_pixels
    if request.mask_image and not request.init_image:
        raise InvalidArgument("mask_image is set without init_image; inpainting needs the image to repaint",
                              reason="MISSING_INIT_IMAGE")
    size = None
    if request.init_image:
        init = images.decode_image(request.init_image, "init_image", max_pixels=max_pixels)
        size = init.size
        if request.mask_image:
            mask = images.decode_image(request.mask_image, "mask_image", max_pixels=max_pixels)
            check_mask_size(mask.size, init.size, "init_image")
    for i, unit in enumerate(request.controlnets):
        control = images.decode_image(unit.image, f"controlnets[{i}].image", max_pixels=max_pixels)
        size = size or control.size
    return size


def _resolve_unit(index: int, unit: controlnet_pb2.ControlNetUnit,
                  settings: OrchestratorSettings) -> controlnet_pb2.ControlNetUnit:
    """Check one ControlNet unit's numbers and fill its defaults (scale 1, start 0, end 1, preprocessor "none")."""
    field = f"controlnets[{index}]"
    if not settings.has_controlnet:
        raise FailedPrecondition(
            "this orchestrator has no ControlNet service; start one and pass --controlnet-address (or place "
            "controlnet replicas in --placement)",
            reason="CONTROLNET_NOT_CONFIGURED")
    resolved = controlnet_pb2.ControlNetUnit()
    resolved.CopyFrom(unit)
    scale = unit.conditioning_scale if unit.HasField("conditioning_scale") else 1.0
    start = unit.guidance_start if unit.HasField("guidance_start") else 0.0
    end = unit.guidance_end if unit.HasField("guidance_end") else 1.0
    check_controlnet_unit(field, scale, start, end)
    check_preprocessor(unit.preprocessor, unit.preprocessor_options)
    resolved.conditioning_scale, resolved.guidance_start, resolved.guidance_end = scale, start, end
    resolved.preprocessor = unit.preprocessor or "none"
    return resolved


def infotext(params: GenerateParams, *, model: str, scheduler: str, width: int, height: int, index: int,
             guidance_scale: float | None = None, guidance_distilled: bool = False) -> str:
    """Generation settings in AUTOMATIC1111's PNG "parameters" format, which many tools read.

    ``guidance_scale``: the one the job ran with (the model's default when the request sent none); for a
    guidance-distilled model (Flux) it is written as Forge does: "CFG scale: 1, Distilled CFG Scale: X"."""
    guidance = params.guidance_scale if guidance_scale is None else guidance_scale
    lines = [infotext_prompt(params.prompt, params.loras)]  # the field's LoRAs as tags too, as A1111 writes them
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    settings = [
        f"Steps: {params.num_inference_steps}",
        *([f"Sampler: {params.sampler}", f"Schedule type: {params.schedule_type}"] if params.sampler
          else [f"Sampler: {scheduler}"]),
        *(["CFG scale: 1", f"Distilled CFG Scale: {guidance:g}"] if guidance_distilled
          else [f"CFG scale: {guidance:g}"]),
        f"Seed: {params.seed}",
        f"Size: {width}x{height}",
        f"Model: {model or 'default'}",
    ]
    if params.clip_skip > 1:
        settings.append(f"Clip skip: {params.clip_skip}")
    if params.embeddings:  # the textual-inversion embeddings, pinned (A1111 writes their hashes as "TI hashes")
        settings.append(f'Embeddings: "{", ".join(params.embeddings)}"')
    if params.subseed_strength:
        settings += [f"Variation seed: {params.subseed}", f"Variation seed strength: {params.subseed_strength:g}"]
    if params.seed_resize_from_w:
        settings.append(f"Seed resize from: {params.seed_resize_from_w}x{params.seed_resize_from_h}")
    if params.init_image:
        settings.append(f"Denoising strength: {params.strength:g}")
    if params.hires is not None:
        settings += hires.infotext_fields(params.hires)
    if params.tiling:
        settings.append("Tiling: True")
    if params.refiner:
        settings += [f"Refiner: {params.refiner}", f"Refiner switch at: {params.refiner_switch_at:g}"]
    if params.num_images > 1:
        settings += [f"Batch size: {params.num_images}", f"Batch pos: {index}"]
    for i, unit in enumerate(params.controlnets):
        settings.append(
            f'ControlNet {i}: "Module: {unit.preprocessor}, Model: {unit.model.name or "default"}, '
            f'Weight: {unit.conditioning_scale:g}, Guidance Start: {unit.guidance_start:g}, '
            f'Guidance End: {unit.guidance_end:g}"')
    lines.append(", ".join(settings))
    return "\n".join(lines)

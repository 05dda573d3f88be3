"""Samplers and schedule types by their AUTOMATIC1111 / SD.Next names, mapped to diffusers schedulers (no torch).

The one table: the orchestrator resolves a GenerateRequest's ``sampler`` and ``schedule_type`` with it, and
``latentwire samplers`` lists it without a server. A run's scheduler is
``getattr(diffusers, sampler.scheduler).from_config(model's scheduler config, **sampler options, **schedule type
options)``: the model's own config (betas, prediction type, ...) with these few options set on top, as diffusers'
"A1111/k-diffusion -> Diffusers" table (docs: api/schedulers/overview) and SD.Next's sd_samplers_diffusers.py do.

Samplers (diffusion: SD 1.x/2.x, SDXL and its refiner; flow matching: SD3 and Flux)

=================  ===============================  ====================================================================
Name               diffusers class                  options
=================  ===============================  ====================================================================
DPM++ 2M           DPMSolverMultistepScheduler      algorithm_type="dpmsolver++", solver_order=2
DPM++ SDE          DPMSolverSDEScheduler            noise_sampler_seed=<the job's seed>
DPM++ 2M SDE       DPMSolverMultistepScheduler      algorithm_type="sde-dpmsolver++", solver_order=2
DPM++ 2M SDE Heun  DPMSolverMultistepScheduler      algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="heun"
DPM++ 3M           DPMSolverMultistepScheduler      algorithm_type="dpmsolver++", solver_order=3
DPM++ 3M SDE       DPMSolverMultistepScheduler      algorithm_type="sde-dpmsolver++", solver_order=3
Euler a            EulerAncestralDiscreteScheduler
Euler              EulerDiscreteScheduler
LMS                LMSDiscreteScheduler
Heun               HeunDiscreteScheduler
DPM2               KDPM2DiscreteScheduler
DPM2 a             KDPM2AncestralDiscreteScheduler
DDIM               DDIMScheduler
DDPM               DDPMScheduler
PLMS               PNDMScheduler                    skip_prk_steps=True
UniPC              UniPCMultistepScheduler
DEIS               DEISMultistepScheduler
LCM                LCMScheduler
Euler FlowMatch    FlowMatchEulerDiscreteScheduler  (SD3, Flux)
Heun FlowMatch     FlowMatchHeunDiscreteScheduler   (SD3 only: Flux's pipeline passes sigmas it cannot take)
=================  ===============================  ====================================================================

Not here: "DPM++ 2S a", "DPM fast", "DPM adaptive" and "Restart" (diffusers has no scheduler for them), "TCD"
(TCDScheduler is not among the schedulers the denoiser offers, limits.SCHEDULERS).

Schedule types (A1111 1.9+ "Schedule type"; only on samplers whose class takes the option)

============  ==============================  ==========================================================
Name          options                         meaning
============  ==============================  ==========================================================
Automatic     (none)                          the model's own schedule (its scheduler config)
Uniform       timestep_spacing="linspace"     timesteps evenly spaced over the whole training range
Karras        use_karras_sigmas=True          Karras et al. (2022) noise levels
Exponential   use_exponential_sigmas=True     noise levels evenly spaced in log sigma
Beta          use_beta_sigmas=True            noise levels from a beta distribution (Lee et al. 2024)
SGM Uniform   timestep_spacing="trailing"     evenly spaced, ending at the last training timestep
============  ==============================  ==========================================================

Names match case-insensitively, with runs of spaces taken as one. The pre-1.9 combined names ("DPM++ 2M
Karras", "DPM++ SDE Karras", "LMS Karras", "DPM++ 2M SDE Exponential", ...) are a sampler name followed by a
schedule type name, and mean exactly that sampler with that schedule type.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from latentwire.denoiser.v1 import denoiser_pb2

__all__ = ["AUTOMATIC", "SAMPLERS", "SCHEDULE_TYPES", "Sampler", "ScheduleType", "close_matches", "find_sampler",
           "find_schedule_type", "options_from_proto", "options_of", "options_to_proto", "split_combined"]

#: Families of the diffusion samplers and of the flow-matching ones (latentwire.client.families names).
DIFFUSION_FAMILIES = ("sd", "sdxl", "sdxl-refiner")
FLOW_FAMILIES = ("sd3", "flux")

#: The schedule type that sets nothing: the model's own schedule.
AUTOMATIC = "Automatic"


@dataclass(frozen=True)
class ScheduleType:
    """A named schedule type and the scheduler config options it sets."""

    name: str
    #: (option, value) pairs passed to the scheduler class's from_config.
    options: tuple[tuple[str, object], ...]
    description: str


#: Every schedule type, in the order A1111 lists them.
SCHEDULE_TYPES = (
    ScheduleType(AUTOMATIC, (), "the model's own schedule (its scheduler config)"),
    ScheduleType("Uniform", (("timestep_spacing", "linspace"),), "timesteps evenly spaced over the training range"),
    ScheduleType("Karras", (("use_karras_sigmas", True),), "Karras et al. (2022) noise levels"),
    ScheduleType("Exponential", (("use_exponential_sigmas", True),), "noise levels evenly spaced in log sigma"),
    ScheduleType("Beta", (("use_beta_sigmas", True),), "noise levels from a beta distribution"),
    ScheduleType("SGM Uniform", (("timestep_spacing", "trailing"),),
                 "evenly spaced timesteps ending at the last training timestep"),
)

#: Schedule types of a class that takes timestep_spacing only, and of one that also takes the sigma options.
_SPACING = (AUTOMATIC, "Uniform", "SGM Uniform")
_SIGMAS = (AUTOMATIC, "Uniform", "Karras", "Exponential", "Beta", "SGM Uniform")


@dataclass(frozen=True)
class Sampler:
    """A named sampler: the diffusers scheduler class and the options that make it this sampler."""

    name: str
    #: diffusers scheduler class name.
    scheduler: str
    #: (option, value) pairs passed to the class's from_config on top of the model's scheduler config.
    options: tuple[tuple[str, object], ...] = ()
    #: Schedule types this sampler takes (those whose options its class has).
    schedule_types: tuple[str, ...] = _SIGMAS
    #: Model families it fits (latentwire.client.families names); a model still offers only the classes its
    #: denoiser lists (ListSchedulers).
    families: tuple[str, ...] = DIFFUSION_FAMILIES
    #: Whether the class draws Brownian-tree noise that the job's seed seeds (noise_sampler_seed), as A1111 seeds
    #: it; diffusers would otherwise seed it from torch's global generator.
    seeded_noise: bool = False

    @property
    def flow_matching(self) -> bool:
        """Whether this is a flow-matching sampler (SD3, Flux)."""
        return self.families[0] in FLOW_FAMILIES


_DPM_PP = "dpmsolver++"
_SDE_DPM_PP = "sde-dpmsolver++"

#: Every sampler, in the order A1111 lists them, then SD.Next's flow-matching ones.
SAMPLERS = (
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", (("algorithm_type", _DPM_PP), ("solver_order", 2))),
    Sampler("DPM++ SDE", "DPMSolverSDEScheduler", seeded_noise=True),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", (("algorithm_type", _SDE_DPM_PP), ("solver_order", 2))),
    Sampler("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler",
            (("algorithm_type", _SDE_DPM_PP), ("solver_order", 2), ("solver_type", "heun"))),
    Sampler("DPM++ 3M", "DPMSolverMultistepScheduler", (("algorithm_type", _DPM_PP), ("solver_order", 3))),
    Sampler("DPM++ 3M SDE", "DPMSolverMultistepScheduler", (("algorithm_type", _SDE_DPM_PP), ("solver_order", 3))),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", schedule_types=_SPACING),
    Sampler("Euler", "EulerDiscreteScheduler"),
    Sampler("LMS", "LMSDiscreteScheduler"),
    Sampler("Heun", "HeunDiscreteScheduler"),
    Sampler("DPM2", "KDPM2DiscreteScheduler"),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler"),
    Sampler("DDIM", "DDIMScheduler", schedule_types=_SPACING),
    Sampler("DDPM", "DDPMScheduler", schedule_types=_SPACING),
    Sampler("PLMS", "PNDMScheduler", (("skip_prk_steps", True),), schedule_types=_SPACING),
    Sampler("UniPC", "UniPCMultistepScheduler"),
    Sampler("DEIS", "DEISMultistepScheduler"),
    Sampler("LCM", "LCMScheduler", schedule_types=_SPACING),
    Sampler("Euler FlowMatch", "FlowMatchEulerDiscreteScheduler", schedule_types=(AUTOMATIC,),
            families=FLOW_FAMILIES),
    Sampler("Heun FlowMatch", "FlowMatchHeunDiscreteScheduler", schedule_types=(AUTOMATIC,), families=("sd3",)),
)


def _key(name: str) -> str:
    """The matching form of a name: lower case, runs of white space as one space."""
    return " ".join(name.split()).lower()


_SAMPLERS_BY_KEY = {_key(s.name): s for s in SAMPLERS}
_TYPES_BY_KEY = {_key(t.name): t for t in SCHEDULE_TYPES}


def find_sampler(name: str) -> Sampler | None:
    """The sampler named ``name`` exactly (case-insensitively), or None; see split_combined for combined names."""
    return _SAMPLERS_BY_KEY.get(_key(name))


def find_schedule_type(name: str) -> ScheduleType | None:
    """The schedule type named ``name`` (case-insensitively), or None."""
    return _TYPES_BY_KEY.get(_key(name))


def split_combined(name: str) -> tuple[Sampler, ScheduleType | None] | None:
    """A sampler name, or a pre-1.9 combined name ("DPM++ 2M Karras"), as (sampler, schedule type or None);
    None when it is neither. A plain sampler name wins ("Euler a" is a sampler, not "Euler" + "a")."""
    sampler = find_sampler(name)
    if sampler is not None:
        return sampler, None
    key = _key(name)
    for type_key, schedule_type in _TYPES_BY_KEY.items():
        if key.endswith(" " + type_key):
            sampler = find_sampler(key[: -len(type_key) - 1])
            if sampler is not None:
                return sampler, schedule_type
    return None


def close_matches(name: str, candidates: list[str] | tuple[str, ...] | None = None, n: int = 3) -> list[str]:
    """Up to ``n`` names like ``name`` among ``candidates`` (default: every sampler name), for error messages."""
    names = list(candidates) if candidates is not None else [s.name for s in SAMPLERS]
    by_key = {_key(c): c for c in names}
    return [by_key[k] for k in difflib.get_close_matches(_key(name), list(by_key), n=n, cutoff=0.5)]


def options_of(sampler: Sampler, schedule_type: ScheduleType | None, seed: int | None = None) -> dict[str, object]:
    """The from_config options of ``sampler`` with ``schedule_type`` (None or Automatic: the sampler's alone);
    ``seed`` (the job's) seeds the noise of a sampler with ``seeded_noise``."""
    options = dict(sampler.options)
    if schedule_type is not None:
        options.update(schedule_type.options)
    if sampler.seeded_noise and seed is not None:
        options["noise_sampler_seed"] = seed
    return options


#: The options SchedulerOptions (denoiser.proto) carries; the table uses no others.
OPTION_NAMES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "timestep_spacing", "algorithm_type",
                "solver_order", "skip_prk_steps", "noise_sampler_seed", "solver_type")
_PRESENCE = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "skip_prk_steps", "noise_sampler_seed")


def options_to_proto(options: dict[str, object]) -> denoiser_pb2.SchedulerOptions:
    """``options`` (names from OPTION_NAMES) as the SchedulerOptions a DenoiseRequest carries."""
    return denoiser_pb2.SchedulerOptions(**options)


def options_from_proto(message: denoiser_pb2.SchedulerOptions) -> dict[str, object]:
    """The options a SchedulerOptions sets (unset fields left out), in OPTION_NAMES order."""
    options: dict[str, object] = {}
    for name in OPTION_NAMES:
        if name in _PRESENCE:
            if message.HasField(name):
                options[name] = getattr(message, name)
        elif getattr(message, name):
            options[name] = getattr(message, name)
    return options

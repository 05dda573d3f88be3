"""Orchestrator configuration: where the stage services are, request limits and defaults.

The flags are parsed once, at start, into an ``OrchestratorSettings`` (placement file read and
checked there); request resolution, the job queue and execution all take that object and read
nothing else.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from services.runtime.config import add_flag, add_limit_flag, common_parser
from services.runtime.limits import (MAX_BATCH, MAX_CONTROLNET_UNITS, MAX_IMAGE_SIZE, MAX_INPUT_PIXELS, MAX_STEPS,
                                     MAX_STEP_MESSAGE_INTERVAL_MS)

from .placement import Placement, resolve_placement

#: Default port of the orchestrator, the suite's client-facing address.
DEFAULT_PORT = 50051


#: The orchestrator's --max-concurrent-jobs default: a ceiling; the stages' capacity decides (--admission stages).
DEFAULT_MAX_RUNNING_JOBS = 64
#: --admission: "stages" (the stage replicas' capacity) or "fixed" (--max-concurrent-jobs).
ADMISSION_MODES = ("stages", "fixed")
#: Jobs run at once with --admission stages before any stage replica has said how many it runs.
FALLBACK_RUNNING_JOBS = 4


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m services.orchestrator`."""
    parser = common_parser("latentwire orchestrator (client-facing; sequences the stage services)", DEFAULT_PORT,
                           needs_model=False, max_concurrent_jobs=DEFAULT_MAX_RUNNING_JOBS,
                           max_concurrent_jobs_help="most jobs run at once; with --admission stages, fewer when the "
                                                    "stage replicas run fewer together")
    add_flag(parser, "--admission", default="stages", choices=ADMISSION_MODES,
             help="how many jobs run at once: 'stages': as many as the text encoder, denoiser and VAE replicas that "
                  "are up run together (for each stage the sum of its replicas' --max-concurrent-jobs, read with "
                  "GetStatus; the smallest stage's), at most --max-concurrent-jobs, and "
                  f"{FALLBACK_RUNNING_JOBS} until they have answered; 'fixed': --max-concurrent-jobs")
    add_flag(parser, "--text-encoder-address",
             help="host:port of the text encoder service, or dns:///HOST:PORT for every address HOST resolves to "
                  "(required unless --placement lists the stage)")
    add_flag(parser, "--denoiser-address",
             help="host:port of the denoiser service, or dns:///HOST:PORT for every address HOST resolves to "
                  "(required unless --placement lists the stage)")
    add_flag(parser, "--vae-address", help="host:port of the VAE service, or dns:///HOST:PORT for every address HOST "
                                           "resolves to (required unless --placement lists the stage)")
    add_flag(parser, "--controlnet-address", default=None,
             help="host:port of the ControlNet service, needed for ControlNet requests: the orchestrator loads "
                  "models on it and names it to the denoiser by this HOST:PORT, which must be one of the "
                  "denoiser's own --controlnet-address entries (the denoiser never dials an address it is sent)")
    add_flag(parser, "--placement", default=None,
             help="YAML (or JSON) file listing each stage's replicas, {address: HOST:PORT, device: LABEL} each "
                  "(docs/deployment.md); a stage it does not list uses its --*-address flag")
    add_flag(parser, "--discovery-interval-s", default=10.0, type=float,
             help="seconds between two resolutions of a stage address given as dns:///HOST:PORT (every address "
                  "HOST resolves to is a replica: a Kubernetes headless Service; services/orchestrator/discovery.py); "
                  "a failed replica or a job without a healthy one also triggers one, at most once a second")
    add_flag(parser, "--replica-wait-s", default=10.0, type=float,
             help="seconds a job waits for a healthy replica of a stage before failing with UNAVAILABLE")
    add_flag(parser, "--step-timeout-s", default=120.0, type=float,
             help="seconds without a step from the denoiser after which its replica counts as lost and the job "
                  "resumes elsewhere (0: no limit; keepalive catches dead links on its own)")
    add_flag(parser, "--denoiser-step-interval-ms", default=100, type=int,
             help="the denoiser sends a step message at most every this many milliseconds (steps with a checkpoint "
                  "or preview, and the last, always; 0: every step); callers still get one DenoisingStep per step. "
                  "Each message costs CPU on both ends, which on a small host slows the denoising loop itself")
    add_flag(parser, "--max-failovers", default=3, type=int,
             help="replica switches one job may make before a stage failure ends it")
    add_flag(parser, "--classifier-address", default=None,
             help="host:port of the classifier service; ClassifierService and the Open Inference Protocol are "
                  "then routed to it (without it they answer FAILED_PRECONDITION)")
    add_flag(parser, "--registry", default=None,
             help="host:port of the model registry; model references are then pinned to a version per job")
    add_flag(parser, "--default-model", default="",
             help="model reference used when a request names none (empty: each stage's default model)")
    # Flags for limits the stages share (services/runtime/limits.py) may only lower them, so nothing a stage
    # would refuse is accepted here.
    add_limit_flag(parser, "--max-steps", hard_limit=MAX_STEPS, default=150,
                   help="most denoising steps a request may ask for")
    add_limit_flag(parser, "--max-image-size", hard_limit=MAX_IMAGE_SIZE, default=1024,
                   help="largest width or height a request may ask for, in pixels")
    add_limit_flag(parser, "--max-images", hard_limit=MAX_BATCH, default=8, help="most images per request")
    add_flag(parser, "--jobs-db", default=None,
             help="where the jobs and their results are kept: a SQLite file, so a restart loses none (default: in "
                  "memory), or a PostgreSQL URI (postgresql://USER@HOST:PORT/DB) that several orchestrator replicas "
                  "share: one queue, one job history, a job of a replica that died taken over by another "
                  "(services/orchestrator/jobs_postgres.py)")
    add_flag(parser, "--job-lease-s", default=10.0, type=float,
             help="with a PostgreSQL --jobs-db: seconds a replica's claim on a running job lasts without renewal "
                  "(renewed every fifth of it); a replica that died loses its jobs to another this long after its "
                  "last renewal")
    add_flag(parser, "--max-queued-jobs", default=64, type=int,
             help="jobs waiting beyond the running ones (--max-concurrent-jobs); more get RESOURCE_EXHAUSTED")
    add_flag(parser, "--max-stored-jobs", default=10000, type=int,
             help="finished jobs kept in the job store; the oldest are deleted beyond it")
    add_limit_flag(parser, "--max-controlnets", hard_limit=MAX_CONTROLNET_UNITS, minimum=0,
                   help="most ControlNets per request")
    add_limit_flag(parser, "--max-input-pixels", hard_limit=MAX_INPUT_PIXELS,
                   help="largest init image, mask or control image accepted, in pixels (width times height)")
    add_flag(parser, "--max-prompt-chars", default=2000, type=int, help="longest prompt or negative prompt, in characters")
    add_flag(parser, "--max-grid-cells", default=100, type=int,
             help="most cells of one X/Y/Z grid job (GenerateRequest.grid; each cell is one generation)")
    add_flag(parser, "--default-steps", default=20, type=int, help="steps when a request sends 0")
    add_flag(parser, "--default-guidance-scale", default=None, type=float,
             help="guidance scale when a request sends none; unset (None), each model's own, as its family's "
                  "diffusers pipeline defaults: 7.5 SD 1.x/2.x, 5 SDXL, 7 SD3, 3.5 Flux's distilled guidance")
    return parser


@dataclass(frozen=True)
class RequestLimits:
    """What one Generate request may ask for, and the defaults it gets: the flags of the same names (their
    defaults live with the flags, in build_parser, only)."""

    max_steps: int
    max_image_size: int
    max_images: int
    max_controlnets: int
    max_input_pixels: int
    max_prompt_chars: int
    default_steps: int
    #: None: the model's own default (DescribeModel), filled when the job runs.
    default_guidance_scale: float | None
    #: Model reference for a request that names none ("": each stage's default model).
    default_model: str
    #: Most cells of one X/Y/Z grid job (services/orchestrator/grid.py).
    max_grid_cells: int = 100


@dataclass(frozen=True)
class OrchestratorSettings:
    """Everything the orchestrator is configured with beyond the common service flags, resolved once from them
    (settings_from_flags)."""

    #: The replicas of every placed stage (placement.py); the required stages always have some.
    placement: Placement
    limits: RequestLimits
    #: Seconds a job waits for a healthy replica of a stage before failing with UNAVAILABLE.
    replica_wait_s: float
    #: Seconds without a denoiser step after which its replica counts as lost (0: no limit).
    step_timeout_s: float
    #: Replica switches one job may make before a stage failure ends it.
    max_failovers: int
    #: The denoiser sends a step message at most every this many milliseconds (DenoiseRequest.step_message_interval_ms).
    denoiser_step_interval_ms: int
    #: The classifier service that classification calls are forwarded to (None: they are refused).
    classifier_address: str | None
    #: The job store: a SQLite file (None: in memory) or a postgresql:// URI (shared by replicas).
    jobs_db: str | None
    #: Jobs waiting beyond the running ones; more are refused with RESOURCE_EXHAUSTED.
    max_queued_jobs: int
    #: Finished jobs kept in the store.
    max_stored_jobs: int
    #: Seconds a replica's claim (lease) on a running job lasts without renewal (a PostgreSQL --jobs-db only).
    job_lease_s: float = 10.0
    #: "stages": run as many jobs as the stage replicas run together (capped by --max-concurrent-jobs);
    #: "fixed": --max-concurrent-jobs.
    admission: str = "stages"

    @property
    def has_controlnet(self) -> bool:
        """Whether ControlNet requests can run here (a ControlNet service is placed)."""
        return "controlnet" in self.placement


def settings_from_flags(flags: argparse.Namespace) -> OrchestratorSettings:
    """The settings the parsed orchestrator flags describe; ValueError saying which flag to fix."""
    for name in ("max_steps", "max_image_size", "max_images", "max_input_pixels", "max_prompt_chars",
                 "default_steps", "max_stored_jobs", "max_grid_cells"):
        if getattr(flags, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} is {getattr(flags, name)}; use at least 1")
    if flags.discovery_interval_s <= 0:
        raise ValueError(f"--discovery-interval-s is {flags.discovery_interval_s}; use a number of seconds above 0")
    if flags.job_lease_s <= 0:
        raise ValueError(f"--job-lease-s is {flags.job_lease_s}; use a number of seconds above 0")
    for name in ("max_controlnets", "max_queued_jobs", "max_failovers", "replica_wait_s", "step_timeout_s",
                 "denoiser_step_interval_ms"):
        if getattr(flags, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} is {getattr(flags, name)}; use 0 or more")
    if flags.denoiser_step_interval_ms > MAX_STEP_MESSAGE_INTERVAL_MS:
        raise ValueError(f"--denoiser-step-interval-ms is {flags.denoiser_step_interval_ms}; use at most "
                         f"{MAX_STEP_MESSAGE_INTERVAL_MS}")
    limits = RequestLimits(
        max_steps=flags.max_steps, max_image_size=flags.max_image_size, max_images=flags.max_images,
        max_controlnets=flags.max_controlnets, max_input_pixels=flags.max_input_pixels,
        max_prompt_chars=flags.max_prompt_chars, default_steps=flags.default_steps,
        default_guidance_scale=flags.default_guidance_scale, default_model=flags.default_model or "",
        max_grid_cells=flags.max_grid_cells)
    return OrchestratorSettings(
        placement=resolve_placement(flags), limits=limits, replica_wait_s=flags.replica_wait_s,
        step_timeout_s=flags.step_timeout_s, max_failovers=flags.max_failovers,
        denoiser_step_interval_ms=flags.denoiser_step_interval_ms,
        classifier_address=flags.classifier_address or None, jobs_db=flags.jobs_db or None,
        max_queued_jobs=flags.max_queued_jobs, max_stored_jobs=flags.max_stored_jobs, job_lease_s=flags.job_lease_s,
        admission=flags.admission)

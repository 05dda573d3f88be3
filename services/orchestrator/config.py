"""Orchestrator configuration: where the stage services are, request limits and defaults."""
from __future__ import annotations

import argparse

from services.runtime.config import add_flag, common_parser

#: Default port of the orchestrator, the suite's client-facing address.
DEFAULT_PORT = 50051


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m services.orchestrator`."""
    parser = common_parser("latentwire orchestrator (client-facing; sequences the stage services)", DEFAULT_PORT,
                           needs_model=False)
    add_flag(parser, "--text-encoder-address",
             help="host:port of the text encoder service (required unless --placement lists the stage)")
    add_flag(parser, "--denoiser-address",
             help="host:port of the denoiser service (required unless --placement lists the stage)")
    add_flag(parser, "--vae-address", help="host:port of the VAE service (required unless --placement lists the stage)")
    add_flag(parser, "--controlnet-address", default=None,
             help="host:port of the ControlNet service, as the denoiser reaches it; needed for ControlNet requests")
    add_flag(parser, "--placement", default=None,
             help="YAML (or JSON) file listing each stage's replicas, {address: HOST:PORT, device: LABEL} each "
                  "(docs/deployment.md); a stage it does not list uses its --*-address flag")
    add_flag(parser, "--replica-wait-s", default=10.0, type=float,
             help="seconds a job waits for a healthy replica of a stage before failing with UNAVAILABLE")
    add_flag(parser, "--step-timeout-s", default=120.0, type=float,
             help="seconds without a step from the denoiser after which its replica counts as lost and the job "
                  "resumes elsewhere (0: no limit; keepalive catches dead links on its own)")
    add_flag(parser, "--max-failovers", default=3, type=int,
             help="replica switches one job may make before a stage failure ends it")
    add_flag(parser, "--classifier-address", default=None,
             help="host:port of the classifier service; ClassifierService and the Open Inference Protocol are "
                  "then routed to it (without it they answer FAILED_PRECONDITION)")
    add_flag(parser, "--registry", default=None,
             help="host:port of the model registry; model references are then pinned to a version per job")
    add_flag(parser, "--default-model", default="",
             help="model reference used when a request names none (empty: each stage's default model)")
    add_flag(parser, "--max-steps", default=150, type=int, help="most denoising steps a request may ask for")
    add_flag(parser, "--max-image-size", default=1024, type=int, help="largest width or height a request may ask for, in pixels")
    add_flag(parser, "--max-images", default=8, type=int, help="most images per request")
    add_flag(parser, "--jobs-db", default=None,
             help="SQLite file holding the jobs and their results, so a restart loses none (default: in memory)")
    add_flag(parser, "--max-queued-jobs", default=64, type=int,
             help="jobs waiting beyond the running ones (--max-concurrent-jobs); more get RESOURCE_EXHAUSTED")
    add_flag(parser, "--max-stored-jobs", default=10000, type=int,
             help="finished jobs kept in the job store; the oldest are deleted beyond it")
    add_flag(parser, "--max-controlnets", default=4, type=int, help="most ControlNets per request")
    add_flag(parser, "--max-input-pixels", default=4096 * 4096, type=int,
             help="largest init image, mask or control image accepted, in pixels (width times height)")
    add_flag(parser, "--max-prompt-chars", default=2000, type=int, help="longest prompt or negative prompt, in characters")
    add_flag(parser, "--default-steps", default=20, type=int, help="steps when a request sends 0")
    add_flag(parser, "--default-guidance-scale", default=7.5, type=float, help="guidance scale when a request sends none")
    return parser


def check_addresses(parser: argparse.ArgumentParser, extra: argparse.Namespace) -> None:
    """Refuse to start without every stage's replicas (a placement file, the address flags, or both)."""
    from .placement import resolve_placement

    try:
        extra.placement_replicas = resolve_placement(extra)
    except ValueError as error:
        parser.error(str(error))

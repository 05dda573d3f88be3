"""Finishing a running job early: AUTOMATIC1111's interrupt and skip (CancelJob with mode INTERRUPT or SKIP).

diffusers' pipelines stop the same way when ``pipe._interrupt`` is set in ``callback_on_step_end``: the loop runs
no more steps and the latents as they are after the last one are decoded. Here the orchestrator asks the denoiser
replica running the job's current Denoise to stop at a step boundary (DenoiserService/Finish; a run that starts
after the request carries ``finish_after_step`` instead, a resumed one too), then decodes as usual and the job
SUCCEEDS with those images (``GenerateResult.finished_early``).

What stops, as A1111's ``processing.py`` does with ``shared.state.interrupted`` / ``skipped``:

- INTERRUPT: the pass in progress ends after the step (``at_step``, or the step in progress); a hires fix's second
  pass and the refiner's run do not start once it landed (A1111's ``sample_hr_pass`` returns the first pass's
  samples when interrupted: the image is the first pass's, at the first pass's size); later batches of
  ``batch_count`` do not run (A1111 breaks its ``n_iter`` loop).
- SKIP: the same for the current batch only; the next batch runs as usual (A1111 clears ``skipped`` at the top of
  each batch).
- The infotext names the requested steps (A1111 keeps ``p.steps``); ``GenerateResult.steps_run`` says how many ran.

``at_step`` counts the job's steps as its DenoisingStep events do (every pass and batch, 1-based). The state lives
on the orchestrator's tracked job (``of(job)``), set up by the servicer for every job it runs. The request reaches
it through the job store (``request_finish``), which also stores it on the job's row (GetJob's finish_mode and
finish_at_step): with PostgreSQL, a CancelJob on a replica that does not run the job is carried by the row and a
NOTIFY to the replica that does (jobs_postgres.py), which applies it here as its own CancelJob would.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from latentwire.orchestrator.v1 import orchestrator_pb2

log = logging.getLogger(__name__)

INTERRUPT = orchestrator_pb2.CANCEL_MODE_INTERRUPT
SKIP = orchestrator_pb2.CANCEL_MODE_SKIP

#: Seconds one Finish call to a denoiser replica may take.
FINISH_TIMEOUT_S = 5.0


class EarlyFinish:
    """The finish-early state of one running job: what was asked, and the Denoise run it applies to."""

    def __init__(self) -> None:
        #: INTERRUPT or SKIP once asked; 0: not asked (or a SKIP that was used up by its batch).
        self.mode = 0
        #: The job step after which to stop; 0: after the step in progress when it lands.
        self.at_step = 0
        #: The job's steps done when the request landed (what "the step in progress" is measured from).
        self.steps_when_asked = 0
        #: Whether some run stopped before its last step (GenerateResult.finished_early).
        self.finished_early = False
        #: Steps relayed so far, every pass and batch (GenerateResult.steps_run).
        self.steps_run = 0
        self._run: tuple | None = None  # (replica channel, denoise job id, job steps before the run)
        self._sent = True
        self._sending: asyncio.Task | None = None

    # -- asked by CancelJob ------------------------------------------------------------------------

    def request(self, mode: int, at_step: int, job_steps: int) -> None:
        """Record an INTERRUPT or SKIP (an INTERRUPT is not turned into a SKIP by a later request) and tell the
        denoiser running the job, if one is."""
        if self.mode != INTERRUPT:
            self.mode = mode
        self.at_step, self.steps_when_asked, self._sent = at_step, job_steps, False
        self.send_soon()

    @property
    def asked(self) -> bool:
        return self.mode != 0

    def reached(self, job_steps: int) -> bool:
        """Whether the request applies now: asked, and its step is at or before ``job_steps`` (or "next")."""
        return self.asked and (self.at_step == 0 or self.at_step <= job_steps)

    # -- the passes and batches --------------------------------------------------------------------

    def stops_passes(self, job_steps: int) -> bool:
        """A hires fix's second pass or the refiner's run does not start (A1111's sample_hr_pass)."""
        return self.reached(job_steps)

    def stops_batches(self, job_steps: int) -> bool:
        """No later batch starts (INTERRUPT); a SKIP that was reached is used up here, and the next batch runs."""
        if self.mode == SKIP and self.reached(job_steps):
            self.mode, self.at_step = 0, 0
            return False
        return self.mode == INTERRUPT and self.reached(job_steps)

    # -- the Denoise runs (execution._denoise) -----------------------------------------------------

    def run_started(self, channel, denoise_job_id: str, base: int) -> int:
        """A Denoise attempt starts on ``channel`` with ``base`` job steps before its first: remember it, and
        return its DenoiseRequest.finish_after_step (0: every step)."""
        self._run = (channel, denoise_job_id, base)
        if not self.asked:
            return 0
        self._sent = True  # the request carries it
        if self.at_step == 0 or self.at_step <= base:
            return 1  # asked before the run began: one step (A1111's sampler stops at its first check)
        return self.at_step - base

    def run_ended(self, relayed: int, total: int) -> None:
        """The run's result arrived after ``relayed`` of its ``total`` steps."""
        self._run = None
        if relayed < total:
            self.finished_early = True

    def step_relayed(self) -> None:
        """One more step ran (counted once, a resumed run's repeated steps not)."""
        self.steps_run += 1
        if not self._sent:
            self.send_soon()

    def send_soon(self) -> None:
        """Send the request to the running Denoise (in the background; again at the next step if it was not
        running there yet)."""
        if self._run is None or self._sent or (self._sending is not None and not self._sending.done()):
            return
        self._sending = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        if self._run is None:  # the run ended meanwhile
            return
        channel, job_id, base = self._run
        after = 0 if self.at_step == 0 else max(0, self.at_step - base)
        if self.at_step == 0 and self.steps_when_asked > base:
            after = self.steps_when_asked - base + 1  # the step that was in progress when asked
        try:
            await denoiser_pb2_grpc.DenoiserServiceStub(channel).Finish(
                denoiser_pb2.FinishRequest(job_id=job_id, after_step=after), timeout=FINISH_TIMEOUT_S)
            self._sent = True
        except grpc.RpcError as error:  # not running there yet (NOT_FOUND), or the replica is lost: next step
            log.info("job %s: Finish on the denoiser: %s", job_id, error.code().name)


def of(job) -> EarlyFinish | None:
    """The finish-early state of the orchestrator's tracked job (None for a job run without one: grid cells)."""
    return getattr(job, "early_finish", None)


def attach(job) -> EarlyFinish:
    """Give the orchestrator's tracked job (services.runtime.jobs.Job) its finish-early state."""
    job.early_finish = EarlyFinish()
    return job.early_finish

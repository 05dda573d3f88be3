"""gRPC servicer for latentwire.orchestrator.v1.OrchestratorService: proto in, domain calls, proto out.

Where the work is: request.py (a request's rules: resolve_request, pin_models), jobs.py (the job
store and queue), execution.py (one job through the stages), replicas.py and placement.py (the
stage replicas and failover), classification.py (forwarding to the classifier). The settings
(config.py) are resolved once at start.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from latentwire.client.result_chunks import split_result, strip_result
from latentwire.denoiser.v1 import denoiser_pb2
from latentwire.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from services.runtime import telemetry
from services.runtime.channels import aio_channel
from services.runtime.errors import Cancelled, FailedPrecondition, InvalidArgument, from_rpc_error
from services.runtime.jobs import JobState
from services.runtime.security import current_caller
from services.runtime.server import Service

from .classification import ClassificationRouter
from .config import FALLBACK_RUNNING_JOBS, OrchestratorSettings
from .deadline import Deadline
from . import interrupts
from .execution import run_generation
from .grid import run_grid
from .job_backends import JobBackend, open_job_backend
from .jobs import FinishAnswer, LiveJob, job_id_from_name
from .discovery import replica_security
from .placement import REPLICA_CHANNEL_OPTIONS, REQUIRED_STAGES as ADMISSION_STAGES, StagePools
from .replicas import Stages
from .request import pin_models, resolve_request
from .upscale_models import pin_upscaler

log = logging.getLogger(__name__)

#: CancelJob: a mode that is not a CancelMode, a negative at_step, or at_step with CANCEL.
INVALID_CANCEL_REQUEST = "INVALID_CANCEL_REQUEST"
#: CancelJob with INTERRUPT or SKIP on a grid job: its cells are separate runs; cancel it instead.
FINISH_NOT_SUPPORTED = "FINISH_NOT_SUPPORTED"


class OrchestratorService(Service, orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """Client-facing service: runs generations across the stage services."""

    service_name = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name

    def __init__(self, config, settings: OrchestratorSettings):
        super().__init__(config)
        self.settings = settings
        self._channels: list[grpc.aio.Channel] = []
        self._pools: StagePools | None = None
        self.stages: Stages | None = None
        self.jobs: JobBackend | None = None
        self.classification = ClassificationRouter(settings.classifier_address)

    async def load(self) -> None:
        """Open a channel to every stage replica and watch its health (inside the event loop, which grpc.aio
        channels belong to)."""
        config, settings = self.config, self.settings
        options = dict(
            max_message_bytes=config.max_message_bytes,
            keepalive_time_s=config.keepalive_time_s,
            keepalive_timeout_s=config.keepalive_timeout_s,
        )

        def replica_channel(address: str, server_name: str | None = None) -> grpc.aio.Channel:
            # server_name: a replica found by DNS (discovery.py) is dialled by IP; TLS verifies the name it came by.
            return aio_channel(address, **options, extra_options=REPLICA_CHANNEL_OPTIONS,
                               security=replica_security(server_name) if server_name else None)

        self._pools = StagePools(settings.placement, replica_channel, wait_s=settings.replica_wait_s)
        self._pools.start()
        registry = None
        if config.registry:
            registry = aio_channel(config.registry, **options)
            self._channels.append(registry)
        self._channels += self.classification.connect(**options)
        self.stages = Stages(self._pools, registry, step_timeout_s=settings.step_timeout_s,
                             max_failovers=settings.max_failovers,
                             denoiser_step_interval_ms=settings.denoiser_step_interval_ms)
        await self._start_jobs()

    async def _start_jobs(self) -> None:
        """Open the job store, queue again what a previous run left unfinished, start the runner."""
        settings = self.settings
        if not settings.jobs_db:
            log.warning("jobs are kept in memory only; pass --jobs-db FILE to keep them across restarts")
        # SQLite (a file, or memory) or, for a postgresql:// URI, the queue shared with other replicas.
        self.jobs = await open_job_backend(settings.jobs_db, self._run_job, max_running=self._running_limit(),
                                           max_queued=settings.max_queued_jobs, keep_jobs=settings.max_stored_jobs,
                                           lease_s=settings.job_lease_s, on_change=self._queue_changed,
                                           on_finish=self._finish_requested)
        # A stored request is resolved already (defaults filled, models pinned): resolving it again only
        # rebuilds the job's params (and refuses it if this start's limits no longer allow it).
        recovered = await self.jobs.start(lambda request: resolve_request(request, settings))
        if recovered:
            log.info("%d job(s) from before the restart are queued again", recovered)
        if settings.admission == "stages":
            self._pools.watch_capacity(self._admit_from_stages)
            self._admit_from_stages()

    def _stage_totals(self) -> dict[str, int]:
        """Jobs the SERVING replicas of each admission stage run together (0: none up, or none has said yet)."""
        return {stage: self._pools[stage].capacity for stage in ADMISSION_STAGES if stage in self._pools}

    def _running_limit(self, totals: dict[str, int] | None = None) -> int:
        """Jobs to run at once now: --max-concurrent-jobs, or with --admission stages at most what the text
        encoder, denoiser and VAE replicas that are up run together (the smallest stage's total of ``totals``),
        until they have said so FALLBACK_RUNNING_JOBS."""
        ceiling = self.config.max_concurrent_jobs
        if self.settings.admission != "stages":
            return ceiling
        smallest = min((totals if totals is not None else self._stage_totals()).values(), default=0)
        return min(ceiling, smallest or FALLBACK_RUNNING_JOBS)

    def _admit_from_stages(self) -> None:
        """A stage's capacity may have changed (a replica came up or went down): run as many jobs as it allows.
        While a stage has no replica up the last limit stays (its jobs wait for a replica, as --replica-wait-s says)."""
        totals = self._stage_totals()
        if not totals or min(totals.values()) == 0 or self.jobs is None:
            return
        limit = self._running_limit(totals)
        if limit != self.jobs.max_running:
            log.info("running up to %d jobs at once (the stages' capacity: %s)", limit,
                     ", ".join(f"{stage} {total}" for stage, total in totals.items()))
            self.jobs.set_max_running(limit)

    def _queue_changed(self, queued: int, running: int) -> None:
        """The queue depth changed: export it (latentwire_queue_depth)."""
        telemetry.metrics.queue_depth.set(queued)

    def register(self, server: grpc.aio.Server) -> list[str]:
        orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(self, server)
        return [self.service_name, *self.classification.register(server)]

    async def Generate(self, request: orchestrator_pb2.GenerateRequest, context):
        """Accept a generation as a job (resolved, models pinned, stored, queued) and stream its progress to the
        result."""
        deadline = Deadline.of_call(context)
        params = resolve_request(request, self.settings)
        # Versions are fixed at acceptance, not when the job leaves the queue: moving an alias later changes nothing.
        params = await pin_models(params, lambda name: self.stages.resolve_model(name, deadline))
        params = await pin_upscaler(params, self.stages, deadline)  # a hires fix's registry upscaler model
        job = await self.jobs.submit(params, deadline, owner=current_caller().principal)
        ended = False
        try:
            async for event in _chunked(self.jobs.watch(job.job_id)):
                yield event
            ended = True
        finally:
            # The call ended before the job: the caller cancelled, disconnected or ran out of time (grpc
            # cancels the handler or closes this generator). The job goes on unless asked otherwise (its own
            # deadline still applies). A job that already ended is not affected.
            if not ended and request.cancel_on_disconnect:
                self.jobs.cancel_soon(job.job_id)

    async def _run_job(self, job: LiveJob):
        """The queue's runner: one job through the stages, tracked in GetStatus."""
        tracked = self.tracker.start(job.job_id, total_steps=job.params.num_inference_steps)
        # Finishing early (CancelJob INTERRUPT / SKIP, interrupts.py); a grid's cells are separate runs: not there.
        finish = interrupts.attach(tracked) if job.params.grid is None else None
        if finish is not None and job.finish_mode:
            # Asked before this run set up (just claimed), or of an earlier run of the job (taken over, restarted).
            self._ask_finish(job, finish, tracked, job.finish_mode, job.finish_at_step)
        state = JobState.JOB_STATE_FAILED
        try:
            # A grid job (GenerateRequest.grid) runs its cells one after another, each through run_generation.
            run = run_grid if job.params.grid is not None else run_generation
            async for event in run(self.stages, job.params, tracked, job.deadline):
                if finish is not None and event.HasField("result"):
                    event.result.finished_early = finish.finished_early
                    event.result.steps_run = finish.steps_run
                yield event
            state = JobState.JOB_STATE_SUCCEEDED
        except Cancelled:
            state = JobState.JOB_STATE_CANCELLED
            raise
        except asyncio.CancelledError:
            state = JobState.JOB_STATE_CANCELLED
            tracked.cancel()
            raise
        finally:
            self.tracker.finish(tracked, state)

    # The job RPCs see the caller's own jobs only (an admin's: every job); another principal's job is NOT_FOUND,
    # word for word as a job that does not exist.

    async def GetJob(self, request: orchestrator_pb2.GetJobRequest, context):
        """One of the caller's jobs: state, progress, queue position, and its result once it succeeded."""
        job_id = job_id_from_name(request.name)
        job = await self.jobs.get(job_id, owner=_jobs_owner())
        if job.HasField("result"):
            # A result over 1 MiB comes without its PNGs and pixels (flagged), so the answer fits any client's
            # default 4 MiB limit; WatchJob replays them in chunks.
            job.result.CopyFrom(strip_result(job.result))
        return orchestrator_pb2.GetJobResponse(job=job)

    async def ListJobs(self, request: orchestrator_pb2.ListJobsRequest, context):
        """A page of the caller's jobs (an admin's: every job), newest first, without their results."""
        if request.state not in JobState.values():
            raise InvalidArgument(f"state {request.state} is not a JobState", reason="INVALID_STATE")
        return await self.jobs.list(request.page_size, request.page_token, request.state, owner=_jobs_owner())

    async def CancelJob(self, request: orchestrator_pb2.CancelJobRequest, context):
        """Cancel one of the caller's queued or running jobs."""
        job_id = job_id_from_name(request.name)
        owner = _jobs_owner()
        if request.mode not in orchestrator_pb2.CancelMode.values():
            raise InvalidArgument(f"mode {request.mode} is not a CancelMode; use CANCEL, INTERRUPT or SKIP",
                                  reason=INVALID_CANCEL_REQUEST, metadata={"field": "mode"})
        finishing = request.mode in (interrupts.INTERRUPT, interrupts.SKIP)
        if request.at_step < 0 or (request.at_step and not finishing):
            raise InvalidArgument(f"at_step is {request.at_step}; use a step number >= 0, with mode INTERRUPT or "
                                  "SKIP only", reason=INVALID_CANCEL_REQUEST, metadata={"field": "at_step"})
        await self.jobs.get(job_id, with_result=False, owner=owner)  # NOT_FOUND first
        if finishing:
            finished = await self._finish_early(job_id, owner, request.mode, request.at_step)
            if finished is not None:
                return orchestrator_pb2.CancelJobResponse(job=finished)
        # A running job stops at the stages' next step; report it once it has.
        return orchestrator_pb2.CancelJobResponse(job=await self.jobs.cancel_and_wait(job_id, owner=owner))

    async def _finish_early(self, job_id: str, owner: str | None, mode: int, at_step: int,
                            wait_s: float = 2.0) -> orchestrator_pb2.Job | None:
        """CancelJob with INTERRUPT or SKIP on a running job (interrupts.py), on whichever orchestrator runs it (the
        job store carries the request there: ``_finish_requested``): the job, after up to ``wait_s`` seconds for an
        interrupted one to end, with the finish_mode / finish_at_step it will apply; None when it is not running (a
        queued job is cancelled)."""
        answer = await self.jobs.request_finish(job_id, mode, at_step, wait_s=wait_s, owner=owner)
        if answer is FinishAnswer.GRID:
            raise FailedPrecondition(f"job {job_id} is a grid job, whose cells run one by one; INTERRUPT and SKIP "
                                     "apply to single generations: cancel it (mode CANCEL)",
                                     reason=FINISH_NOT_SUPPORTED, metadata={"field": "mode"})
        if answer is not FinishAnswer.ASKED:
            return None
        return await self.jobs.get(job_id, with_result=False, owner=owner)

    def _finish_requested(self, job: LiveJob, mode: int, at_step: int) -> None:
        """The job store's hook: a finish-early request for a job running here, made on this orchestrator or on
        another replica. A run that has not set up yet takes it from ``job.finish_mode`` (``_run_job``)."""
        tracked = self.tracker.active(job.job_id)
        finish = interrupts.of(tracked[0]) if tracked else None
        if finish is not None:
            self._ask_finish(job, finish, tracked[0], mode, at_step)

    @staticmethod
    def _ask_finish(job: LiveJob, finish: interrupts.EarlyFinish, tracked, mode: int, at_step: int) -> None:
        """Apply INTERRUPT / SKIP to the job's run and tell its watchers (FinishRequested)."""
        finish.request(mode, at_step, tracked.completed_steps)
        event = orchestrator_pb2.GenerateResponse(
            finish_requested=orchestrator_pb2.FinishRequested(mode=mode, at_step=at_step))
        job.history.append(event)
        job.publish(event)

    async def WatchJob(self, request: orchestrator_pb2.WatchJobRequest, context):
        """Re-attach to one of the caller's jobs: what happened so far, then every later event, then the result."""
        async for event in _chunked(self.jobs.watch(job_id_from_name(request.name), owner=_jobs_owner())):
            yield orchestrator_pb2.WatchJobResponse(event=event)

    async def begin_shutdown(self, grace: float) -> None:
        """Take no more jobs; let the running ones finish within ``grace``; the rest wait in SQLite for the next start."""
        if self.jobs is not None:
            await self.jobs.shutdown(grace)

    async def ListSchedulers(self, request: orchestrator_pb2.ListSchedulersRequest, context):
        """Ask the denoiser which schedulers the model accepts."""
        try:
            response = await self.stages.denoiser.ListSchedulers(
                denoiser_pb2.ListSchedulersRequest(model=request.model), timeout=context.time_remaining()
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error, "denoiser") from None
        return orchestrator_pb2.ListSchedulersResponse(
            default_scheduler=response.default_scheduler, schedulers=response.schedulers
        )

    async def close(self) -> None:
        if self.jobs is not None:
            await self.jobs.close()
        if self._pools is not None:
            await self._pools.close()
        for channel in self._channels:
            await channel.close()
        await super().close()


async def _chunked(events):
    """A job's events as they go on the wire: a result over 1 MiB becomes ResultChunk events and the stripped result
    (latentwire.client.result_chunks), so no message exceeds a default client's 4 MiB receive limit."""
    async for event in events:
        if event.WhichOneof("event") == "result":
            for part in split_result(event.result):
                yield part
        else:
            yield event


def _jobs_owner() -> str | None:
    """The principal whose jobs this call may read and cancel: the caller's own, or None (every job) for an admin."""
    caller = current_caller()
    return None if caller.is_admin else caller.principal

"""Job bookkeeping shared by every service: admission, cancellation, deadlines, the status snapshot, and the
running estimates of how long work takes that let a service refuse work that cannot fit its deadline."""
from __future__ import annotations

import collections
import threading
import time
import uuid
from dataclasses import dataclass, field

from latentwire.common.v1 import status_pb2

from . import interrupt
from .errors import Cancelled, DeadlineExceeded, LatentwireError, ResourceExhausted
from .timestamps import to_timestamp

JobState = status_pb2.JobState

#: Completed jobs remembered per size of work, and sizes remembered per model and kind of work.
ESTIMATE_WINDOW = 20
ESTIMATE_SIZES = 64


class StepTimes:
    """How long one step of work of a given size takes (a denoising step over so many latent elements, a VAE
    encode of so many pixels) on one model, from the jobs of that size that completed; the estimate of a
    job is the lowest of the last ESTIMATE_WINDOW of them times its steps, None before one completed.

    Kept simple on purpose, and optimistic, so that what is refused surely cannot fit: only jobs of the
    same size count (time is not linear in size: fixed costs weigh on small images, attention on large
    ones), and the lowest time is the one least burdened by warm-up or a busy machine.
    """

    def __init__(self) -> None:
        self._seconds: collections.OrderedDict[float, collections.deque[float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def observe(self, size: float, seconds: float, steps: int) -> None:
        """Remember one completed job: ``steps`` steps of ``size`` took ``seconds``."""
        if steps <= 0 or seconds <= 0:
            return
        with self._lock:
            times = self._seconds.pop(size, None) or collections.deque(maxlen=ESTIMATE_WINDOW)
            times.append(seconds / steps)
            self._seconds[size] = times
            while len(self._seconds) > ESTIMATE_SIZES:
                self._seconds.popitem(last=False)

    def estimate(self, size: float, steps: int) -> float | None:
        """Seconds ``steps`` steps of ``size`` take at least, or None without a completed job of that size."""
        with self._lock:
            times = self._seconds.get(size)
            return None if not times else min(times) * steps


@dataclass(frozen=True)
class Work:
    """What a job will do, for the estimate: ``steps`` steps (else the job's ``total_steps``) of work of
    ``size`` (latent elements, pixels), timed by ``times``."""

    times: StepTimes
    size: float
    steps: int | None = None


@dataclass
class Job:
    """One job on one service. The worker thread checks it (``check``, also from the model's hooks, see
    interrupt.py); the RPC handler and the shutdown set ``cancel`` or ``interrupt``."""

    job_id: str
    total_steps: int
    #: When the work must stop (``time.monotonic()`` seconds): the deadline of the call that started it.
    deadline: float | None = None
    work: Work | None = None
    #: Steps done before this service took the job over (a denoiser run resumed from a checkpoint).
    first_step: int = 0
    #: When the steps began (``time.monotonic()``), after the job's setup; None: at ``started``.
    steps_started: float | None = None
    started: float = field(default_factory=time.monotonic)
    #: Wall-clock start and end (seconds since the epoch) for the status's timestamps; ``started`` and
    #: ``finished`` are monotonic so that elapsed times survive clock steps.
    start_time: float = field(default_factory=time.time)
    end_time: float | None = None
    state: int = JobState.JOB_STATE_RUNNING
    completed_steps: int = 0
    steps_at_cancel: int = -1
    finished: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)
    #: Why the work stops when it was not the caller: the service is shutting down.
    _interruption: LatentwireError | None = None
    #: Finish early (AUTOMATIC1111's interrupt): the step after which a denoising loop stops and returns its latents
    #: as they are then; None: every step runs.
    finish_after_step: int | None = None

    def finish_early(self, after_step: int = 0) -> int:
        """Make the loop stop after step ``after_step`` (0, or a step already done: the step in progress); returns
        the step it stops after. An earlier request stands if it stops sooner."""
        step = max(after_step, self.completed_steps + 1)
        if self.finish_after_step is None or step < self.finish_after_step:
            self.finish_after_step = step
        return self.finish_after_step

    def finishes_after(self, step: int) -> bool:
        """Whether the loop stops once ``step`` is done (finish_early)."""
        return self.finish_after_step is not None and step >= self.finish_after_step

    def cancel(self) -> None:
        """Ask the worker to stop (at its next block or step: interrupt.py); remembers how far it had got."""
        if not self._cancel.is_set():
            self.steps_at_cancel = self.completed_steps
            self._cancel.set()

    def interrupt(self, error: LatentwireError) -> None:
        """Stop the work as ``cancel`` does, but ending it with ``error`` (not CANCELLED): nobody cancelled it."""
        if not self._cancel.is_set():
            self._interruption = error
            self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        """Called by the worker between steps and by the model's hooks inside one: raise Cancelled when the job
        was cancelled, the interruption's error when the service stopped it, DeadlineExceeded past its deadline."""
        if self._cancel.is_set():
            error = self._interruption
            if error is not None:
                raise type(error)(error.message, reason=error.reason, metadata=error.metadata)
            raise Cancelled(f"job {self.job_id} was cancelled after step {self.completed_steps}")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceeded(
                f"the call's deadline passed after {time.monotonic() - self.started:.1f} s of work, during step "
                f"{self.completed_steps + 1} of {self.total_steps}; allow more time or ask for less work",
                metadata={"completed_steps": self.completed_steps})

    raise_if_cancelled = check

    def to_proto(self) -> status_pb2.JobStatus:
        end = self.finished if self.finished is not None else time.monotonic()
        return status_pb2.JobStatus(
            job_id=self.job_id,
            state=self.state,
            completed_steps=self.completed_steps,
            total_steps=self.total_steps,
            steps_at_cancel=self.steps_at_cancel,
            elapsed_seconds=end - self.started,
            start_time=to_timestamp(self.start_time),
            end_time=to_timestamp(self.end_time),
        )


class JobTracker:
    """Admits at most ``max_active`` jobs and keeps a bounded history of finished ones."""

    def __init__(self, max_active: int, history: int = 64):
        self.max_active = max_active
        self._active: dict[str, Job] = {}
        self._recent: collections.deque[Job] = collections.deque(maxlen=history)
        self._lock = threading.Lock()

    def start(self, job_id: str, total_steps: int = 1, *, work: Work | None = None,
              deadline: float | None = None) -> Job:
        """Admit a job, or raise RESOURCE_EXHAUSTED when the service is full.

        The job's deadline is the earlier of ``deadline`` and that of the call being served
        (interrupt.call_deadline: the direct caller's gRPC deadline). With ``work`` whose rate has an
        estimate, a job estimated to need more time than its deadline leaves is refused before it starts
        (DEADLINE_EXCEEDED, reason DEADLINE_TOO_SHORT); without an estimate it runs, and stops at its deadline.
        """
        job_id = job_id or uuid.uuid4().hex
        deadline = interrupt.earliest(deadline, interrupt.call_deadline())
        if work is not None and deadline is not None:
            steps = total_steps if work.steps is None else work.steps
            _refuse_if_too_long(work.times.estimate(work.size, steps), deadline - time.monotonic())
        with self._lock:
            if len(self._active) >= self.max_active:
                raise ResourceExhausted(
                    f"this service is running {len(self._active)} jobs, its limit; retry later",
                    reason="SERVICE_BUSY",
                    metadata={"max_concurrent_jobs": str(self.max_active)},
                )
            # Two calls with one job id (a retry racing its original) get distinct entries.
            key = job_id if job_id not in self._active else f"{job_id}#{uuid.uuid4().hex[:6]}"
            job = Job(job_id=job_id, total_steps=total_steps, deadline=deadline, work=work)
            self._active[key] = job
            job._key = key  # type: ignore[attr-defined]
            return job

    def finish(self, job: Job, state: int) -> None:
        """Move a job to the history with its final state; a job that succeeded updates its work's estimate."""
        with self._lock:
            job.state = state
            job.finished = time.monotonic()
            job.end_time = time.time()
            self._active.pop(getattr(job, "_key", job.job_id), None)
            self._recent.appendleft(job)
        if state == JobState.JOB_STATE_SUCCEEDED and job.work is not None:
            began = job.started if job.steps_started is None else job.steps_started
            job.work.times.observe(job.work.size, job.finished - began, job.completed_steps - job.first_step)

    def active(self, job_id: str) -> list[Job]:
        """The running jobs with id ``job_id`` (more than one only while a retry races its original)."""
        with self._lock:
            return [job for job in self._active.values() if job.job_id == job_id]

    def snapshot(self) -> tuple[list[status_pb2.JobStatus], list[status_pb2.JobStatus]]:
        """Active and recent jobs as proto messages."""
        with self._lock:
            return [j.to_proto() for j in self._active.values()], [j.to_proto() for j in self._recent]

    def interrupt_all(self, error: LatentwireError) -> int:
        """Stop every running job with ``error`` (used when the grace period of a shutdown ends: the jobs end
        with a retryable UNAVAILABLE, not CANCELLED); returns how many were running."""
        with self._lock:
            for job in self._active.values():
                job.interrupt(error)
            return len(self._active)


def _refuse_if_too_long(estimate: float | None, remaining: float) -> None:
    """DEADLINE_TOO_SHORT when the estimated duration of a job exceeds what its deadline leaves."""
    if estimate is not None and estimate > remaining:
        raise DeadlineExceeded(
            f"this work needs about {estimate:.1f} s (estimated from recent jobs of its size) but the deadline "
            f"leaves {max(0.0, remaining):.1f} s; allow more time or ask for less work (fewer steps, smaller images)",
            reason="DEADLINE_TOO_SHORT",
            metadata={"estimated_seconds": f"{estimate:.1f}", "deadline_seconds": f"{max(0.0, remaining):.1f}"})

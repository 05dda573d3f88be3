"""Job bookkeeping shared by every service: admission, cancellation flags and the status snapshot."""
from __future__ import annotations

import collections
import threading
import time
import uuid
from dataclasses import dataclass, field

from latentwire.common.v1 import status_pb2

from .errors import Cancelled, ResourceExhausted
from .timestamps import to_timestamp

JobState = status_pb2.JobState


@dataclass
class Job:
    """One job on one service. The worker thread reads ``cancel_requested``; the RPC handler sets it."""

    job_id: str
    total_steps: int
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

    def cancel(self) -> None:
        """Ask the worker to stop before its next step; remembers how far it had got."""
        if not self._cancel.is_set():
            self.steps_at_cancel = self.completed_steps
            self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def raise_if_cancelled(self) -> None:
        """Called by the worker between steps: stop here if the caller has gone."""
        if self._cancel.is_set():
            raise Cancelled(f"job {self.job_id} was cancelled after step {self.completed_steps}")

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

    def start(self, job_id: str, total_steps: int = 1) -> Job:
        """Admit a job, or raise RESOURCE_EXHAUSTED when the service is full."""
        job_id = job_id or uuid.uuid4().hex
        with self._lock:
            if len(self._active) >= self.max_active:
                raise ResourceExhausted(
                    f"this service is running {len(self._active)} jobs, its limit; retry later",
                    reason="SERVICE_BUSY",
                    metadata={"max_concurrent_jobs": str(self.max_active)},
                )
            # Two calls with one job id (a retry racing its original) get distinct entries.
            key = job_id if job_id not in self._active else f"{job_id}#{uuid.uuid4().hex[:6]}"
            job = Job(job_id=job_id, total_steps=total_steps)
            self._active[key] = job
            job._key = key  # type: ignore[attr-defined]
            return job

    def finish(self, job: Job, state: int) -> None:
        """Move a job to the history with its final state."""
        with self._lock:
            job.state = state
            job.finished = time.monotonic()
            job.end_time = time.time()
            self._active.pop(getattr(job, "_key", job.job_id), None)
            self._recent.appendleft(job)

    def snapshot(self) -> tuple[list[status_pb2.JobStatus], list[status_pb2.JobStatus]]:
        """Active and recent jobs as proto messages."""
        with self._lock:
            return [j.to_proto() for j in self._active.values()], [j.to_proto() for j in self._recent]

    def cancel_all(self) -> None:
        """Ask every running job to stop (used when the grace period of a shutdown ends)."""
        with self._lock:
            for job in self._active.values():
                job.cancel()

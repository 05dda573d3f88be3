"""What the servicer needs of a job store and queue (``JobBackend``), and the two that provide it.

- SQLite (the embedded default, ``--jobs-db FILE`` or in memory): one orchestrator owns the store; its queue is an
  in-process heap (jobs.py ``JobQueue``), wrapped here by ``LocalJobs``.
- PostgreSQL (``--jobs-db postgresql://...``): several orchestrator replicas share one queue and one job history
  (jobs_postgres.py ``SharedJobQueue``): any replica accepts a job, exactly one claims and runs it, and a job whose
  replica dies is taken over by another.

The seam is the queue, not only the store: with SQLite the queue lives in this process, with PostgreSQL the
queue is the table, so both implement this one small async interface and the servicer calls nothing else.
"""
from __future__ import annotations

from typing import AsyncIterator, Callable, Protocol

from latentwire.orchestrator.v1 import orchestrator_pb2

from .deadline import Deadline
from .jobs import LEGACY_OWNER, FinishAnswer, FinishHook, JobQueue, JobStore, LiveJob, Rebuild, Runner
from .request import GenerateParams

#: --jobs-db values that name a PostgreSQL database (a libpq connection URI) rather than a SQLite file.
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(jobs_db: str | None) -> bool:
    """Whether ``--jobs-db`` names a PostgreSQL database."""
    return bool(jobs_db) and jobs_db.startswith(POSTGRES_SCHEMES)


class JobBackend(Protocol):
    """Accepts jobs, runs them with the servicer's runner, and answers the job RPCs."""

    async def start(self, rebuild: Rebuild) -> int:
        """Start working; ``rebuild`` resolves a stored request again. Returns the jobs recovered from before."""

    async def shutdown(self, grace: float) -> None:
        """Start no more jobs; give running ones ``grace`` seconds; leave the rest queued for a later start (or,
        shared, another replica)."""

    async def submit(self, params: GenerateParams, deadline: Deadline, *, owner: str = LEGACY_OWNER) -> LiveJob:
        """Store and queue a resolved request as a job of ``owner``; RESOURCE_EXHAUSTED when the queue is full."""

    def watch(self, job_id: str, *, owner: str | None = None) -> AsyncIterator[orchestrator_pb2.GenerateResponse]:
        """The job's events: JobAccepted, then progress, then its result (or its error raised)."""

    def live(self, job_id: str, owner: str | None = None) -> LiveJob | None:
        """The job when this process is working on it (queued here or running here) and ``owner`` may see it."""

    def cancel_soon(self, job_id: str) -> None:
        """Ask for a job to be cancelled without waiting (a Generate caller that left with cancel_on_disconnect)."""

    async def cancel_and_wait(self, job_id: str, *, wait_s: float = 2.0, owner: str | None = None
                              ) -> orchestrator_pb2.Job:
        """Cancel a queued or running job; give a running one up to ``wait_s`` seconds to stop; return it."""

    async def request_finish(self, job_id: str, mode: int, at_step: int, *, wait_s: float = 2.0,
                             owner: str | None = None) -> FinishAnswer:
        """Finish a running job early (CancelJob INTERRUPT / SKIP): store the request on the job and have the
        orchestrator running it apply it (the backend's ``on_finish``); give an INTERRUPTed job up to ``wait_s``
        seconds to end. NOT_RUNNING (nothing done) for a job that is not running, GRID for a grid job."""

    #: Jobs run (claimed) at once.
    max_running: int

    def set_max_running(self, count: int) -> None:
        """Run (claim) up to ``count`` jobs at once from now on."""

    async def get(self, job_id: str, *, with_result: bool = True, owner: str | None = None) -> orchestrator_pb2.Job:
        """The job (with its result once it succeeded); NOT_FOUND when ``owner`` may not see it."""

    async def list(self, page_size: int, page_token: str, state: int, *, owner: str | None = None
                   ) -> orchestrator_pb2.ListJobsResponse:
        """A page of jobs, newest first."""

    async def close(self) -> None:
        """Close the store."""


class LocalJobs:
    """``JobBackend`` over the in-process queue and its SQLite store (jobs.py), unchanged."""

    def __init__(self, queue: JobQueue):
        self.queue = queue

    async def start(self, rebuild: Rebuild) -> int:
        return await self.queue.start(rebuild)

    async def shutdown(self, grace: float) -> None:
        await self.queue.shutdown(grace)

    async def submit(self, params: GenerateParams, deadline: Deadline, *, owner: str = LEGACY_OWNER) -> LiveJob:
        return self.queue.submit(params, deadline, owner=owner)

    def watch(self, job_id: str, *, owner: str | None = None) -> AsyncIterator[orchestrator_pb2.GenerateResponse]:
        return self.queue.watch(job_id, owner=owner)

    def live(self, job_id: str, owner: str | None = None) -> LiveJob | None:
        return self.queue._visible(job_id, owner)

    def cancel_soon(self, job_id: str) -> None:
        self.queue.cancel(job_id)

    async def cancel_and_wait(self, job_id: str, *, wait_s: float = 2.0, owner: str | None = None
                              ) -> orchestrator_pb2.Job:
        return await self.queue.cancel_and_wait(job_id, wait_s=wait_s, owner=owner)

    async def request_finish(self, job_id: str, mode: int, at_step: int, *, wait_s: float = 2.0,
                             owner: str | None = None) -> FinishAnswer:
        return await self.queue.request_finish(job_id, mode, at_step, wait_s=wait_s, owner=owner)

    @property
    def max_running(self) -> int:
        return self.queue.max_running

    def set_max_running(self, count: int) -> None:
        self.queue.set_max_running(count)

    async def get(self, job_id: str, *, with_result: bool = True, owner: str | None = None) -> orchestrator_pb2.Job:
        return self.queue.get(job_id, with_result=with_result, owner=owner)

    async def list(self, page_size: int, page_token: str, state: int, *, owner: str | None = None
                   ) -> orchestrator_pb2.ListJobsResponse:
        return self.queue.list(page_size, page_token, state, owner=owner)

    async def close(self) -> None:
        self.queue.store.close()

    @property
    def queue_length(self) -> int:
        return self.queue.queue_length

    @property
    def running(self) -> int:
        return self.queue.running


async def open_job_backend(jobs_db: str | None, run: Runner, *, max_running: int, max_queued: int, keep_jobs: int,
                           lease_s: float, on_change: Callable[[int, int], None] | None = None,
                           on_finish: FinishHook | None = None) -> JobBackend:
    """The backend ``--jobs-db`` names: PostgreSQL for a postgresql:// URI (schema created or migrated here), else
    SQLite (a file, or memory when None). ``on_finish`` applies a finish-early request to a job running here."""
    if is_postgres(jobs_db):
        from .jobs_postgres import PostgresJobStore, SharedJobQueue

        store = await PostgresJobStore.open(jobs_db)
        return SharedJobQueue(store, run, max_running=max_running, max_queued=max_queued, keep_jobs=keep_jobs,
                              lease_s=lease_s, on_change=on_change, on_finish=on_finish)
    return LocalJobs(JobQueue(JobStore(jobs_db), run, max_running=max_running, max_queued=max_queued,
                              keep_jobs=keep_jobs, on_change=on_change, on_finish=on_finish))

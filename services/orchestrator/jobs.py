"""Generation jobs: a SQLite job store, a bounded priority queue and the runner that works it off.

A Generate request becomes a job as soon as it is resolved (request.py): the job holds the
resolved `GenerateParams` and the caller's `Deadline`, gets an id, is written to SQLite (the
resolved request: defaults filled, seed drawn, models pinned, so a re-run is identical), and waits
in the queue until one of ``--max-concurrent-jobs`` slots is free; higher priorities first, then
arrival order. Callers follow a job with Generate's own stream or, after a disconnect, WatchJob.

Jobs survive the orchestrator: on start, each stored unfinished request is resolved once more (its
images decoded again, against the limits of this start), queued jobs are queued again, and jobs
that were running when the orchestrator stopped (or was killed) run again from the start, with the
same seed, so they produce the result they would have. A graceful shutdown stops starting jobs,
gives the running ones the grace period, and leaves the rest to the next start.

Each job belongs to the principal that created it (``owner``: the caller's token or certificate
principal, services/runtime/security.py ``Caller``). Reading, watching and cancelling take the
principal to filter by (``owner``; None for an admin, who sees every job): another principal's job
is answered exactly as a job that does not exist, so its existence is not revealed either.

The queue knows nothing of stages: its runner (the servicer's) turns a job into progress events.
"""
from __future__ import annotations

import asyncio
import base64
import contextvars
import enum
import heapq
import json
import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

from latentwire.common.v1 import status_pb2
from latentwire.orchestrator.v1 import orchestrator_pb2
from services.runtime import telemetry
from services.runtime.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    LatentwireError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    quote,
)
from services.runtime.timestamps import to_timestamp

from .deadline import Deadline
from .request import GenerateParams

log = logging.getLogger(__name__)

State = status_pb2.JobState
_STATE_NAMES = {value: name for name, value in State.items()}

#: Runs one job: yields its progress events and, last, its result (execution.run_generation for the job).
Runner = Callable[["LiveJob"], AsyncIterator[orchestrator_pb2.GenerateResponse]]
#: Turns a stored request back into the params a job runs with (request.resolve_request), refusing what no
#: longer passes.
Rebuild = Callable[[orchestrator_pb2.GenerateRequest], GenerateParams]
#: Applies a finish-early request (CancelJob INTERRUPT / SKIP: mode, at_step) to a job running in this process (the
#: servicer's; interrupts.py). A job whose run has not set up its finish-early state yet takes the request from
#: ``LiveJob.finish_mode`` / ``finish_at_step`` when it does.
FinishHook = Callable[["LiveJob", int, int], None]

#: CancelMode INTERRUPT (orchestrator.proto): a later SKIP does not turn a stored INTERRUPT into a SKIP.
_INTERRUPT = orchestrator_pb2.CANCEL_MODE_INTERRUPT


class FinishAnswer(enum.Enum):
    """What a job store did with a finish-early request (``request_finish``)."""

    #: Stored on the running job; the orchestrator running it applies it.
    ASKED = "asked"
    #: The job is not running (queued, finished, or not the caller's): nothing stored; the caller cancels instead.
    NOT_RUNNING = "not running"
    #: A grid job (its cells are separate runs): nothing stored; the caller refuses the request.
    GRID = "grid"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    request BLOB NOT NULL,
    seed TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    create_time REAL NOT NULL,
    start_time REAL,
    end_time REAL,
    deadline REAL,
    completed_steps INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    result BLOB,
    error_code INTEGER,
    error_message TEXT,
    error_reason TEXT,
    owner TEXT NOT NULL DEFAULT 'anonymous',
    finish_mode INTEGER NOT NULL DEFAULT 0,
    finish_at_step INTEGER NOT NULL DEFAULT 0
);
"""

#: Owner of the rows a store written before jobs had owners holds. "anonymous" is the principal of a caller with
#: neither token nor certificate, so on an open deployment (where every caller is anonymous) nothing changes, and
#: once tokens or certificates identify callers, only admins see those older jobs.
LEGACY_OWNER = "anonymous"


def error_for(code: int, message: str, reason: str) -> LatentwireError:
    """The domain error a stored (code, message, reason) stands for."""
    from services.runtime.errors import _BY_CODE

    for status_code, cls in _BY_CODE.items():
        if status_code.value[0] == code:
            return cls(message, reason=reason or None)
    return Internal(message or "the job failed", reason=reason or None)


@dataclass
class LiveJob:
    """A job the orchestrator is working on (queued or running), with its watchers."""

    job_id: str
    seq: int
    #: The resolved request, as accepted: what the job runs with.
    params: GenerateParams
    create_time: float
    deadline: Deadline
    state: int = State.JOB_STATE_QUEUED
    attempts: int = 0
    start_time: float | None = None
    completed_steps: int = 0
    total_steps: int = 0
    queue_position: int = 0
    #: Events a watcher that attaches late is sent first (stage progress so far; the last step only).
    history: list[orchestrator_pb2.GenerateResponse] = field(default_factory=list)
    watchers: set[asyncio.Queue] = field(default_factory=set)
    task: asyncio.Task | None = None
    #: The submitting call's context (its trace): the run continues it, so the stages' spans join that trace.
    context: contextvars.Context | None = None
    #: The principal that created the job: only it (and admins) may read, watch or cancel it.
    owner: str = LEGACY_OWNER
    #: The job's finish-early request (CancelJob INTERRUPT / SKIP), as stored on its row; 0: none.
    finish_mode: int = 0
    finish_at_step: int = 0

    @property
    def priority(self) -> int:
        return self.params.priority

    @property
    def seed(self) -> int:
        return self.params.seed

    @property
    def model(self) -> str:
        """The model reference, pinned to a version at acceptance when a registry is configured."""
        return self.params.model

    def accepted(self) -> orchestrator_pb2.GenerateResponse:
        return orchestrator_pb2.GenerateResponse(
            accepted=orchestrator_pb2.JobAccepted(job_id=self.job_id, seed=self.seed, model=self.model))

    def publish(self, event: orchestrator_pb2.GenerateResponse | BaseException) -> None:
        for queue in self.watchers:
            queue.put_nowait(event)


#: The columns of a ListJobs page (no result), in the order _job_proto reads a row; both job stores select them.
PAGE_COLUMNS = ("job_id, state, priority, seed, model, prompt, create_time, start_time, end_time, completed_steps, "
                "total_steps, attempts, error_code, error_message, error_reason, NULL, seq, finish_mode, "
                "finish_at_step, owner")


def page_filter(after_seq: int | None, state: int, owner: str | None, *, placeholder: str) -> tuple[str, list]:
    """The WHERE clause (possibly empty) and its arguments for a page of jobs before ``after_seq``, in ``state``
    (UNSPECIFIED: any), of ``owner`` (None: anyone's); ``placeholder`` is the driver's ("?" SQLite, "%s" psycopg)."""
    clauses, args = [], []
    if owner is not None:
        clauses.append(f"owner = {placeholder}")
        args.append(owner)
    if after_seq is not None:
        clauses.append(f"seq < {placeholder}")
        args.append(after_seq)
    if state != State.JOB_STATE_UNSPECIFIED:
        clauses.append(f"state = {placeholder}")
        args.append(_STATE_NAMES[state])
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), args


class JobStore:
    """Jobs in SQLite (WAL): one row per job, its request, state, timestamps and result."""

    def __init__(self, path: str | Path | None):
        self.path = str(path) if path else ":memory:"
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        if path:
            self._db.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL keeps every committed transaction across a process crash (kill -9).
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a store an older orchestrator wrote up to this schema (each step is idempotent)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "owner" not in columns:
            # Rows from before jobs had owners get LEGACY_OWNER (the column default).
            self._db.execute(f"ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '{LEGACY_OWNER}'")
            log.info("job store %s: added the owner column; older jobs belong to %r", self.path, LEGACY_OWNER)
        if "finish_mode" not in columns:
            # CancelJob's finish-early request (INTERRUPT / SKIP), for GetJob; older rows had none.
            self._db.execute("ALTER TABLE jobs ADD COLUMN finish_mode INTEGER NOT NULL DEFAULT 0")
            self._db.execute("ALTER TABLE jobs ADD COLUMN finish_at_step INTEGER NOT NULL DEFAULT 0")
            log.info("job store %s: added the finish_mode and finish_at_step columns", self.path)
        # ListJobs of one principal walks this index newest first.
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, seq)")

    def next_seq(self) -> int:
        (value,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()
        return value

    def insert(self, job: LiveJob) -> None:
        self._db.execute(
            "INSERT INTO jobs (job_id, seq, state, priority, request, seed, model, prompt, create_time, deadline, "
            "owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job.job_id, job.seq, _STATE_NAMES[job.state], job.priority, job.params.to_request().SerializeToString(),
             str(job.seed), job.model, job.params.prompt[:200], job.create_time, job.deadline.at, job.owner))

    def mark_running(self, job: LiveJob) -> None:
        self._db.execute("UPDATE jobs SET state = ?, start_time = ?, attempts = ? WHERE job_id = ?",
                         (_STATE_NAMES[State.JOB_STATE_RUNNING], job.start_time, job.attempts, job.job_id))

    def mark_queued(self, job_id: str) -> None:
        self._db.execute("UPDATE jobs SET state = ?, start_time = NULL WHERE job_id = ?",
                         (_STATE_NAMES[State.JOB_STATE_QUEUED], job_id))

    def finish(self, job: LiveJob, state: int, *, result: orchestrator_pb2.GenerateResult | None = None,
               error: LatentwireError | None = None) -> None:
        self._db.execute(
            "UPDATE jobs SET state = ?, end_time = ?, completed_steps = ?, total_steps = ?, result = ?, "
            "error_code = ?, error_message = ?, error_reason = ? WHERE job_id = ?",
            (_STATE_NAMES[state], time.time(), job.completed_steps, job.total_steps,
             result.SerializeToString() if result is not None else None,
             error.code.value[0] if error is not None else None, error.message if error is not None else None,
             error.reason if error is not None else None, job.job_id))

    def record_finish(self, job_id: str, mode: int, at_step: int) -> None:
        """Store a running job's finish-early request (GetJob reports it; a restart's rerun applies it again). A
        stored INTERRUPT stays one when a SKIP follows, as interrupts.EarlyFinish keeps it."""
        self._db.execute("UPDATE jobs SET finish_mode = CASE WHEN finish_mode = ? THEN finish_mode ELSE ? END, "
                         "finish_at_step = ? WHERE job_id = ?", (_INTERRUPT, mode, at_step, job_id))

    def fail_unresolved(self, job_id: str, error: LatentwireError) -> None:
        """Fail a stored job whose request no longer resolves (the limits or the placement changed since)."""
        self._db.execute(
            "UPDATE jobs SET state = ?, end_time = ?, error_code = ?, error_message = ?, error_reason = ? "
            "WHERE job_id = ?",
            (_STATE_NAMES[State.JOB_STATE_FAILED], time.time(), error.code.value[0], error.message, error.reason,
             job_id))

    def unfinished(self) -> list[sqlite3.Row]:
        """Jobs that were queued or running when the orchestrator last stopped, oldest first."""
        return self._db.execute(
            "SELECT job_id, seq, state, priority, request, seed, model, create_time, deadline, attempts, owner, "
            "finish_mode, finish_at_step FROM jobs WHERE state IN (?, ?) ORDER BY seq",
            (_STATE_NAMES[State.JOB_STATE_QUEUED], _STATE_NAMES[State.JOB_STATE_RUNNING])).fetchall()

    def row(self, job_id: str, *, with_result: bool, owner: str | None = None) -> tuple | None:
        """The job's row, or None when there is none (or, with ``owner``, when another principal owns it)."""
        columns = "job_id, state, priority, seed, model, prompt, create_time, start_time, end_time, " \
                  "completed_steps, total_steps, attempts, error_code, error_message, error_reason, " \
                  + ("result" if with_result else "NULL") + ", finish_mode, finish_at_step, owner"
        where, args = "job_id = ?", [job_id]
        if owner is not None:
            where += " AND owner = ?"
            args.append(owner)
        return self._db.execute(f"SELECT {columns} FROM jobs WHERE {where}", args).fetchone()

    def page(self, after_seq: int | None, size: int, state: int, owner: str | None = None) -> list[tuple]:
        """Up to ``size`` rows before ``after_seq``, newest first; with ``owner``, only that principal's jobs (the
        filter is in the query, so pages are pages of the filtered set)."""
        where, args = page_filter(after_seq, state, owner, placeholder="?")
        return self._db.execute(f"SELECT {PAGE_COLUMNS} FROM jobs {where} ORDER BY seq DESC LIMIT ?",
                                (*args, size)).fetchall()

    def prune(self, keep: int) -> None:
        """Delete the oldest finished jobs beyond ``keep`` rows."""
        self._db.execute(
            "DELETE FROM jobs WHERE state NOT IN (?, ?) AND seq <= "
            "(SELECT seq FROM jobs ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (_STATE_NAMES[State.JOB_STATE_QUEUED], _STATE_NAMES[State.JOB_STATE_RUNNING], keep))

    def close(self) -> None:
        self._db.close()


def _job_proto(row: tuple, live: LiveJob | None) -> orchestrator_pb2.Job:
    (job_id, state, priority, seed, model, prompt, create_time, start_time, end_time, completed, total, attempts,
     error_code, error_message, error_reason, result) = row[:16]
    # Then (a page's seq,) finish_mode, finish_at_step, owner: the row's last columns (ROW / PAGE_COLUMNS).
    owner = row[-1] if len(row) > 16 else ""
    job = orchestrator_pb2.Job(
        name=f"jobs/{job_id}", job_id=job_id, state=State.Value(state), priority=priority, seed=int(seed),
        model=model, prompt=prompt, completed_steps=completed, total_steps=total, attempts=attempts, owner=owner,
        create_time=to_timestamp(create_time), start_time=to_timestamp(start_time), end_time=to_timestamp(end_time))
    if len(row) > 18:
        job.finish_mode, job.finish_at_step = row[-3], row[-2]
    if live is not None:
        job.state = live.state
        job.completed_steps, job.total_steps = live.completed_steps, live.total_steps
        job.queue_position = live.queue_position
        job.attempts = live.attempts
        if live.start_time is not None:
            job.start_time.CopyFrom(to_timestamp(live.start_time))
    if error_code is not None:
        job.error.code, job.error.message, job.error.reason = error_code, error_message or "", error_reason or ""
    if result:
        job.result.ParseFromString(result)
    return job


def job_id_from_name(name: str) -> str:
    """"jobs/{id}" -> id, refusing anything else."""
    prefix = "jobs/"
    if not name.startswith(prefix) or len(name) == len(prefix) or "/" in name[len(prefix):]:
        raise InvalidArgument(f"job name {quote(name)} is not of the form jobs/{{job_id}}", reason="INVALID_JOB_NAME")
    return name[len(prefix):]


class JobQueue:
    """The bounded priority queue and the runner: ``max_running`` jobs at once, ``max_queued`` waiting."""

    def __init__(self, store: JobStore, run: Runner, *, max_running: int, max_queued: int, keep_jobs: int = 10_000,
                 on_change: Callable[[int, int], None] | None = None, on_finish: FinishHook | None = None):
        self.store = store
        self._run = run
        self._on_finish = on_finish
        self.max_running = max_running
        self.max_queued = max_queued
        self.keep_jobs = keep_jobs
        self._on_change = on_change
        self._heap: list[tuple[int, int, str]] = []
        self._live: dict[str, LiveJob] = {}
        self._running: set[str] = set()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._dispatcher: asyncio.Task | None = None
        self._durations: list[float] = []

    # -- life cycle -------------------------------------------------------------------------------

    async def start(self, rebuild: Rebuild) -> int:
        """Queue again what an earlier run left unfinished (``rebuild`` resolves each stored request once more);
        start working."""
        recovered = 0
        for (job_id, seq, state, _, blob, _, _, create_time, deadline, attempts, owner, finish_mode,
             finish_at_step) in self.store.unfinished():
            try:
                params = rebuild(orchestrator_pb2.GenerateRequest.FromString(blob))
            except LatentwireError as error:  # the limits changed since: say so on the job
                self.store.fail_unresolved(job_id, error)
                continue
            # A finish-early request stands for the rerun (its run applies it when it sets up: FinishHook).
            job = LiveJob(job_id=job_id, seq=seq, params=params, create_time=create_time, deadline=Deadline(deadline),
                          attempts=attempts, owner=owner, finish_mode=finish_mode, finish_at_step=finish_at_step)
            if state == _STATE_NAMES[State.JOB_STATE_RUNNING]:
                log.info("job %s was running when the orchestrator stopped; running it again from the start", job_id)
                self.store.mark_queued(job_id)
            self._enqueue(job)
            recovered += 1
        self._dispatcher = asyncio.create_task(self._dispatch())
        self._changed()
        return recovered

    async def shutdown(self, grace: float) -> None:
        """Start no more jobs; give running ones ``grace`` seconds, then stop them and leave them to the next start."""
        self._stopping = True
        self._wakeup.set()
        running = [self._live[j].task for j in self._running if self._live[j].task is not None]
        if running:
            await asyncio.wait(running, timeout=grace)
        for job_id in list(self._running):
            task = self._live[job_id].task
            if task is not None and not task.done():
                task.cancel()
        running = [t for t in running if not t.done()]
        if running:
            await asyncio.wait(running, timeout=5)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        # Whoever still watches a job learns it will go on after the restart.
        for job in self._live.values():
            job.publish(Unavailable(f"the orchestrator is shutting down; job {job.job_id} stays queued and runs "
                                    "when it is back: WatchJob re-attaches", reason="SHUTTING_DOWN"))

    # -- submitting -------------------------------------------------------------------------------

    def submit(self, params: GenerateParams, deadline: Deadline, *, owner: str = LEGACY_OWNER) -> LiveJob:
        """Store and queue a resolved request as a job of ``owner`` (the caller's principal), or refuse it with
        RESOURCE_EXHAUSTED (and a retry hint) when the queue is full."""
        if self._stopping:
            raise Unavailable("the orchestrator is shutting down; retry on another replica or after it restarts",
                              reason="SHUTTING_DOWN")
        waiting = self._queue_length()
        if waiting >= self.max_queued:
            retry = self._retry_estimate(waiting)
            raise ResourceExhausted(
                f"the job queue is full ({waiting} jobs waiting, the limit); retry in about {retry:.0f} s",
                reason="QUEUE_FULL", metadata={"queue_length": waiting, "retry_after_s": f"{retry:.1f}"},
                retry_after_s=retry)
        job = LiveJob(job_id=uuid.uuid4().hex, seq=self.store.next_seq(), params=params, create_time=time.time(),
                      deadline=deadline, owner=owner)
        job.context = contextvars.copy_context()
        self.store.insert(job)
        self._enqueue(job)
        self._changed()
        if job.seq % 100 == 0:
            self.store.prune(self.keep_jobs)
        return job

    def _enqueue(self, job: LiveJob) -> None:
        job.state = State.JOB_STATE_QUEUED
        self._live[job.job_id] = job
        heapq.heappush(self._heap, (-job.priority, job.seq, job.job_id))
        self._wakeup.set()

    def _retry_estimate(self, waiting: int) -> float:
        recent = self._durations[-20:]
        mean = sum(recent) / len(recent) if recent else 5.0
        return max(1.0, mean * (waiting + 1) / self.max_running)

    # -- running ----------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while not self._stopping and self._heap and len(self._running) < self.max_running:
                _, _, job_id = heapq.heappop(self._heap)
                job = self._live.get(job_id)
                if job is None or job.state != State.JOB_STATE_QUEUED:
                    continue  # cancelled while queued
                self._running.add(job_id)
                job.task = (job.context or contextvars.Context()).run(asyncio.create_task, self._work(job))
            self._changed()

    async def _work(self, job: LiveJob) -> None:
        if job.state != State.JOB_STATE_QUEUED:
            return  # cancelled (and finished) between being dispatched and this task's first step
        job.state = State.JOB_STATE_RUNNING
        job.start_time = time.time()
        job.attempts += 1
        job.queue_position = 0
        self.store.mark_running(job)
        outcome: tuple[int, orchestrator_pb2.GenerateResult | None, LatentwireError | None]
        try:
            if job.deadline.passed:
                raise DeadlineExceeded("the job's deadline passed while it waited in the queue",
                                       reason="DEADLINE_EXCEEDED_IN_QUEUE")
            result = None
            async for event in self._run(job):
                kind = event.WhichOneof("event")
                if kind == "step":
                    job.completed_steps, job.total_steps = event.step.step, event.step.total_steps
                    job.history = [e for e in job.history if e.WhichOneof("event") != "step"]
                if kind == "result":
                    result = event.result
                else:
                    job.history.append(event)
                job.publish(event)
            if result is None:
                raise Internal("the job ended without a result", reason="NO_RESULT")
            outcome = (State.JOB_STATE_SUCCEEDED, result, None)
            job.publish(orchestrator_pb2.GenerateResponse(result=result))
        except asyncio.CancelledError:
            if self._stopping and job.state == State.JOB_STATE_RUNNING:
                # Handed over: the next start runs it again from the beginning.
                self.store.mark_queued(job.job_id)
                self._running.discard(job.job_id)
                return
            error = Cancelled(f"job {job.job_id} was cancelled", reason="JOB_CANCELLED")
            outcome = (State.JOB_STATE_CANCELLED, None, error)
            job.publish(error)
        except LatentwireError as error:
            state = State.JOB_STATE_CANCELLED if isinstance(error, (Cancelled,)) else State.JOB_STATE_FAILED
            outcome = (state, None, error)
            job.publish(error)
        except Exception:  # noqa: BLE001 - recorded on the job; details to the log
            log.exception("job %s failed", job.job_id)
            error = Internal("internal error; see the orchestrator log")
            outcome = (State.JOB_STATE_FAILED, None, error)
            job.publish(error)
        state, result, error = outcome
        telemetry.observe_job(State.Name(state).removeprefix("JOB_STATE_").lower(), time.time() - job.create_time)
        self._durations.append(time.time() - job.start_time)
        self._finish(job, state, result=result, error=error)

    def _finish(self, job: LiveJob, state: int, *, result=None, error=None) -> None:
        job.state = state
        self.store.finish(job, state, result=result, error=error)
        self._running.discard(job.job_id)
        self._live.pop(job.job_id, None)
        self._wakeup.set()
        self._changed()

    def _changed(self) -> None:
        """Recompute queue positions, tell queued jobs' watchers, report the depth."""
        order = sorted(self._heap)
        # Jobs that fit in a free slot start on the next turn of the loop: they do not wait, position 0.
        free = 0 if self._stopping else max(0, self.max_running - len(self._running))
        position = 0
        for _, _, job_id in order:
            job = self._live.get(job_id)
            if job is None or job.state != State.JOB_STATE_QUEUED:
                continue
            position += 1
            waiting = max(0, position - free)
            if job.queue_position != waiting:
                job.queue_position = waiting
                if waiting:
                    job.publish(self._queued_event(job))
        if self._on_change is not None:
            self._on_change(position, len(self._running))

    def _queue_length(self) -> int:
        """Jobs waiting for a slot (queued beyond the free slots)."""
        queued = sum(1 for _, _, j in self._heap if j in self._live and self._live[j].state == State.JOB_STATE_QUEUED)
        free = 0 if self._stopping else max(0, self.max_running - len(self._running))
        return max(0, queued - free)

    def _queued_event(self, job: LiveJob) -> orchestrator_pb2.GenerateResponse:
        return orchestrator_pb2.GenerateResponse(
            queued=orchestrator_pb2.Queued(position=job.queue_position, queue_length=self._queue_length()))

    # -- reading and cancelling -------------------------------------------------------------------

    def _visible(self, job_id: str, owner: str | None) -> LiveJob | None:
        """The live job ``owner`` may see (None: not live, or another principal's, which must look the same)."""
        job = self._live.get(job_id)
        if job is None or (owner is not None and job.owner != owner):
            return None
        return job

    async def watch(self, job_id: str, *, owner: str | None = None) -> AsyncIterator[orchestrator_pb2.GenerateResponse]:
        """The job's events: JobAccepted, what happened so far, then live events to the result or the error.

        With ``owner``, only that principal's job: another's is NOT_FOUND as a missing one."""
        job = self._visible(job_id, owner)
        if job is None:
            row = self.store.row(job_id, with_result=True, owner=owner)
            if row is None:
                raise _not_found(job_id)
            finished = _job_proto(row, None)
            yield orchestrator_pb2.GenerateResponse(accepted=orchestrator_pb2.JobAccepted(
                job_id=job_id, seed=finished.seed, model=finished.model))
            if finished.state == State.JOB_STATE_SUCCEEDED:
                yield orchestrator_pb2.GenerateResponse(result=finished.result)
                return
            raise error_for(finished.error.code, finished.error.message, finished.error.reason)
        queue: asyncio.Queue = asyncio.Queue()
        # No await between the snapshot and subscribing: nothing can slip in between.
        snapshot = [job.accepted(), *job.history]
        if job.state == State.JOB_STATE_QUEUED and job.queue_position:
            snapshot.append(self._queued_event(job))
        job.watchers.add(queue)
        try:
            for event in snapshot:
                yield event
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.WhichOneof("event") == "result":
                    return
        finally:
            job.watchers.discard(queue)

    def cancel(self, job_id: str, *, owner: str | None = None) -> orchestrator_pb2.Job:
        """Cancel a queued or running job; a finished one is returned as it is. With ``owner``, only that
        principal's job: another's is NOT_FOUND (and left alone)."""
        job = self._visible(job_id, owner)
        if job is not None:
            if job.state == State.JOB_STATE_QUEUED:
                error = Cancelled(f"job {job_id} was cancelled while queued", reason="JOB_CANCELLED")
                job.publish(error)
                self._finish(job, State.JOB_STATE_CANCELLED, error=error)
            elif job.task is not None and not job.task.done():
                job.task.cancel()
        return self.get(job_id, with_result=False, owner=owner)

    async def cancel_and_wait(self, job_id: str, *, wait_s: float = 2.0, owner: str | None = None
                              ) -> orchestrator_pb2.Job:
        """Cancel a job as ``cancel`` does, and give a running one up to ``wait_s`` seconds to stop (it stops at
        the stages' next step) before returning it."""
        job = self._visible(job_id, owner)
        task = job.task if job is not None else None
        self.cancel(job_id, owner=owner)
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=wait_s)
        return self.get(job_id, with_result=False, owner=owner)

    async def request_finish(self, job_id: str, mode: int, at_step: int, *, wait_s: float = 2.0,
                             owner: str | None = None) -> FinishAnswer:
        """Finish a running job early (CancelJob INTERRUPT / SKIP, interrupts.py): store the request on its row and
        apply it (``on_finish``); give an INTERRUPTed job up to ``wait_s`` seconds to end. With ``owner``, only that
        principal's job."""
        job = self._visible(job_id, owner)
        if job is None or job.state != State.JOB_STATE_RUNNING:
            return FinishAnswer.NOT_RUNNING
        if job.params.grid is not None:
            return FinishAnswer.GRID
        self.store.record_finish(job_id, mode, at_step)
        if job.finish_mode != _INTERRUPT:
            job.finish_mode = mode
        job.finish_at_step = at_step
        if self._on_finish is not None:
            self._on_finish(job, job.finish_mode, job.finish_at_step)
        if mode == _INTERRUPT and job.task is not None and not job.task.done():
            await asyncio.wait({job.task}, timeout=wait_s)
        return FinishAnswer.ASKED

    def get(self, job_id: str, *, with_result: bool = True, owner: str | None = None) -> orchestrator_pb2.Job:
        """The job (with its result once it succeeded); with ``owner``, only that principal's job."""
        row = self.store.row(job_id, with_result=with_result, owner=owner)
        if row is None:
            raise _not_found(job_id)
        return _job_proto(row, self._live.get(job_id))

    def list(self, page_size: int, page_token: str, state: int, *, owner: str | None = None
             ) -> orchestrator_pb2.ListJobsResponse:
        """A page of jobs, newest first; with ``owner``, of that principal's jobs only."""
        if page_size < 0 or page_size > 1000:
            raise InvalidArgument(f"page_size is {page_size}; use 1 to 1000 (0 for 100)", reason="INVALID_PAGE_SIZE")
        size = page_size or 100
        after = _decode_token(page_token) if page_token else None
        rows = self.store.page(after, size + 1, state, owner)
        jobs = [_job_proto(row, self._live.get(row[0])) for row in rows[:size]]
        token = _encode_token(rows[size - 1][16]) if len(rows) > size else ""
        return orchestrator_pb2.ListJobsResponse(jobs=jobs, next_page_token=token)

    def set_max_running(self, count: int) -> None:
        """Run up to ``count`` jobs at once from now on (--admission stages: the stages' capacity changed); running
        jobs beyond a lowered count finish as they are."""
        self.max_running = max(1, count)
        self._wakeup.set()

    @property
    def queue_length(self) -> int:
        return self._queue_length()

    @property
    def running(self) -> int:
        return len(self._running)


def _not_found(job_id: str) -> NotFound:
    """The one answer for a job that does not exist, was pruned, or belongs to another principal."""
    return NotFound(f"job {quote(job_id)} does not exist (or was pruned)", reason="JOB_NOT_FOUND")


def _encode_token(seq: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"jobs_before": seq}).encode()).decode()


def _decode_token(token: str) -> int:
    try:
        value = json.loads(base64.urlsafe_b64decode(token.encode()))["jobs_before"]
        if not isinstance(value, int):
            raise TypeError
        return value
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument("page_token is not one this service issued; pass next_page_token unchanged",
                              reason="INVALID_PAGE_TOKEN") from None

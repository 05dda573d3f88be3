"""Jobs in PostgreSQL: one queue and one job history shared by several orchestrator replicas (``--jobs-db
postgresql://...``).

Any replica accepts a job (a QUEUED row). Each replica's dispatcher claims jobs for its free slots with one
statement (``SELECT ... FOR UPDATE SKIP LOCKED`` inside an UPDATE), so a job is claimed by exactly one replica.
A claim is a lease: the row names the replica (``lease_owner``), the lease's end by the database's clock
(``lease_expires``) and an epoch (``lease_epoch``, raised by every claim: the fencing token). The owner renews
its leases every ``lease_s / 5`` seconds (the heartbeat). A replica that dies stops renewing; once its lease has
ended, another replica's dispatcher (it looks at least every second) claims the job again, with a new epoch, and
runs it from the start: the request is stored resolved (seed drawn, models pinned), so the rerun makes the image
the first run would have made. Every write of a running job (progress, finish, hand-back) names the epoch it
was claimed with; a replica whose lease was taken over (a zombie: stopped, partitioned, too slow) finds its
write matching no row, so its late result is dropped and the job finishes once.

Cancel and watch work from any replica: cancelling a running job sets ``cancel_requested`` on the row and
sends a NOTIFY that the owner (LISTENing) acts on at once; its heartbeat reads the flag too, should a
notification be lost. Finishing early (CancelJob INTERRUPT / SKIP, interrupts.py) takes the same path: the request
is stored on the row (``finish_mode``, ``finish_at_step``, and ``finish_requests``, counting requests so each is
applied once), a NOTIFY wakes the owner, which applies it as a CancelJob sent to itself would; its heartbeat reads
the count too. A replica that takes the job over applies the stored request to its rerun.

A watcher on the owning replica gets every event as it happens (previews included); a watcher elsewhere follows
the row: queue position, step progress (written at most every 0.5 s, and with every heartbeat), a finish-early
request, then the stored result or error. Previews, stage timings and the other per-event details are not relayed
between replicas: shipping every preview through the database would cost more than it is worth.

The store (``PostgresJobStore``) is async (psycopg 3), so the event loop never waits on the database.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import psycopg

from latentwire.orchestrator.v1 import orchestrator_pb2
from services.runtime import telemetry
from services.runtime.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    LatentwireError,
    ResourceExhausted,
    Unavailable,
)

from .deadline import Deadline
from .jobs import (
    _INTERRUPT,
    _STATE_NAMES,
    LEGACY_OWNER,
    PAGE_COLUMNS,
    FinishAnswer,
    FinishHook,
    LiveJob,
    Rebuild,
    Runner,
    State,
    _decode_token,
    _encode_token,
    _job_proto,
    _not_found,
    error_for,
    page_filter,
)
from .request import GenerateParams

log = logging.getLogger(__name__)

#: The job database cannot be reached (down, or the network to it); the call may be retried.
JOB_DB_UNAVAILABLE = "JOB_DB_UNAVAILABLE"

#: Channel of the NOTIFY messages between replicas; payload "<kind>:<job_id>" (kinds in SharedJobQueue._notified).
CHANNEL = "latentwire_jobs"
#: Key of the advisory lock that serialises schema migrations of replicas starting at once.
MIGRATION_LOCK = 0x6C775F6A6F6273  # "lw_jobs"
#: Seconds between step-progress writes of one running job (watchers on other replicas see progress this often).
PROGRESS_INTERVAL_S = 0.5
#: Most seconds a dispatcher waits before looking for work again (expired leases, missed notifications).
POLL_S = 1.0

_QUEUED = _STATE_NAMES[State.JOB_STATE_QUEUED]
_TERMINAL = (State.JOB_STATE_SUCCEEDED, State.JOB_STATE_FAILED, State.JOB_STATE_CANCELLED)

#: Schema versions, each a list of idempotent statements; a start applies those above the stored version.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE IF NOT EXISTS latentwire_jobs (
            job_id TEXT PRIMARY KEY,
            seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
            state TEXT NOT NULL,
            priority INTEGER NOT NULL,
            request BYTEA NOT NULL,
            seed TEXT NOT NULL,
            model TEXT NOT NULL,
            prompt TEXT NOT NULL,
            create_time DOUBLE PRECISION NOT NULL,
            start_time DOUBLE PRECISION,
            end_time DOUBLE PRECISION,
            deadline DOUBLE PRECISION,
            completed_steps INTEGER NOT NULL DEFAULT 0,
            total_steps INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            result BYTEA,
            error_code INTEGER,
            error_message TEXT,
            error_reason TEXT,
            owner TEXT NOT NULL DEFAULT 'anonymous',
            lease_owner TEXT,
            lease_epoch BIGINT NOT NULL DEFAULT 0,
            lease_expires TIMESTAMPTZ,
            cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
            finished_by TEXT
        )""",
        "CREATE INDEX IF NOT EXISTS latentwire_jobs_by_owner ON latentwire_jobs (owner, seq)",
        "CREATE INDEX IF NOT EXISTS latentwire_jobs_waiting ON latentwire_jobs (priority DESC, seq) "
        "WHERE state = 'JOB_STATE_QUEUED'",
        "CREATE INDEX IF NOT EXISTS latentwire_jobs_leased ON latentwire_jobs (lease_expires) "
        "WHERE state = 'JOB_STATE_RUNNING'",
    ]),
    # CancelJob's finish-early request (INTERRUPT / SKIP) on the row, for the replica running the job and GetJob.
    (2, [
        "ALTER TABLE latentwire_jobs ADD COLUMN IF NOT EXISTS finish_mode INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE latentwire_jobs ADD COLUMN IF NOT EXISTS finish_at_step INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE latentwire_jobs ADD COLUMN IF NOT EXISTS finish_requests INTEGER NOT NULL DEFAULT 0",
    ]),
]

_ROW_COLUMNS = ("job_id, state, priority, seed, model, prompt, create_time, start_time, end_time, completed_steps, "
                "total_steps, attempts, error_code, error_message, error_reason, {result}, finish_mode, "
                "finish_at_step, owner")
#: The fence of every write a running job's replica makes: its claim (epoch) still holds.
_FENCE = "job_id = %(job_id)s AND lease_epoch = %(epoch)s AND lease_owner = %(replica)s AND state = 'JOB_STATE_RUNNING'"


def _unavailable(error: BaseException) -> Unavailable:
    log.warning("job database error: %s", error)
    return Unavailable("the job database (--jobs-db) cannot be reached; retry shortly", reason=JOB_DB_UNAVAILABLE)


@dataclass
class Claim:
    """A job this replica claimed: its row's request and the lease it holds."""

    job_id: str
    seq: int
    request: bytes
    create_time: float
    deadline: float | None
    attempts: int
    owner: str
    epoch: int
    cancel_requested: bool
    #: The replica whose lease ended (None: the job was queued).
    previous_owner: str | None
    #: The finish-early request stored on the row (a job taken over: asked of its previous run), and their count.
    finish_requests: int = 0
    finish_mode: int = 0
    finish_at_step: int = 0


@dataclass
class FinishRequest:
    """A running job's finish-early request as its row holds it (CancelJob INTERRUPT / SKIP)."""

    #: How many were made (the row's counter): a replica applies each count once.
    count: int
    mode: int
    at_step: int


class PostgresJobStore:
    """The job table in PostgreSQL: a few autocommit connections, each statement its own transaction."""

    def __init__(self, dsn: str, connections: list[psycopg.AsyncConnection]):
        self.dsn = dsn
        self._idle: asyncio.Queue[psycopg.AsyncConnection] = asyncio.Queue()
        for connection in connections:
            self._idle.put_nowait(connection)
        self._all = list(connections)

    @classmethod
    async def open(cls, dsn: str, *, connections: int = 4) -> PostgresJobStore:
        """Connect, create or migrate the schema (under an advisory lock, so replicas may start together)."""
        try:
            opened = [await cls.connect(dsn) for _ in range(connections)]
        except psycopg.Error as error:
            raise Unavailable(f"cannot connect to the job database (--jobs-db): {_brief(error)}",
                              reason=JOB_DB_UNAVAILABLE) from None
        store = cls(dsn, opened)
        await store.migrate()
        return store

    @staticmethod
    async def connect(dsn: str) -> psycopg.AsyncConnection:
        return await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=10,
                                                     application_name="latentwire-orchestrator")

    async def migrate(self) -> int:
        """Apply the migrations above the stored schema version; return the version now."""
        async with self._connection() as connection:
            async with connection.transaction():
                await connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                await connection.execute("CREATE TABLE IF NOT EXISTS latentwire_schema "
                                         "(component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
                row = await (await connection.execute(
                    "SELECT version FROM latentwire_schema WHERE component = 'jobs'")).fetchone()
                version = row[0] if row else 0
                newest = MIGRATIONS[-1][0]
                if version > newest:
                    raise Unavailable(f"the job database has schema version {version}, newer than this orchestrator's "
                                      f"{newest}; upgrade the orchestrator", reason=JOB_DB_UNAVAILABLE)
                for number, statements in MIGRATIONS:
                    if number > version:
                        for statement in statements:
                            await connection.execute(statement)
                        log.info("job database: schema version %d applied", number)
                await connection.execute(
                    "INSERT INTO latentwire_schema (component, version) VALUES ('jobs', %s) "
                    "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version", (newest,))
                return newest

    @contextlib.asynccontextmanager
    async def _connection(self):
        """One connection of the pool, reconnected when it broke; database failures become UNAVAILABLE."""
        connection = await self._idle.get()
        try:
            if connection.closed or connection.broken:
                with contextlib.suppress(Exception):
                    await connection.close()
                connection = await self.connect(self.dsn)
            yield connection
        except psycopg.OperationalError as error:
            raise _unavailable(error) from None
        finally:
            self._idle.put_nowait(connection)

    async def _fetch(self, sql: str, args=None) -> list[tuple]:
        async with self._connection() as connection:
            cursor = await connection.execute(sql, args)
            return await cursor.fetchall() if cursor.description is not None else []

    async def _count(self, sql: str, args=None) -> int:
        async with self._connection() as connection:
            cursor = await connection.execute(sql, args)
            return cursor.rowcount

    # -- writes ---------------------------------------------------------------------------------------

    async def insert(self, job: LiveJob) -> int:
        """Store a new QUEUED job; tell the replicas; return its seq."""
        ((seq,),) = await self._fetch(
            "WITH new AS (INSERT INTO latentwire_jobs (job_id, state, priority, request, seed, model, prompt, "
            "create_time, deadline, owner) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING seq) "
            "SELECT seq FROM new, pg_notify(%s, %s)",
            (job.job_id, _QUEUED, job.priority, job.params.to_request().SerializeToString(), str(job.seed), job.model,
             job.params.prompt[:200], job.create_time, job.deadline.at, job.owner, CHANNEL, f"q:{job.job_id}"))
        return seq

    async def claim(self, replica: str, limit: int, lease_s: float, running: list[str] = ()) -> list[Claim]:
        """Claim up to ``limit`` jobs for ``replica``: jobs whose lease ended first (their replica is gone), then the
        queue by priority and age. Rows another replica is claiming right now are skipped, not waited for; so are
        ``running``, the jobs the replica runs already (a lease of its own that ran out is renewed, not re-claimed)."""
        rows = await self._fetch(
            "WITH picked AS (SELECT job_id, lease_owner AS previous FROM latentwire_jobs "
            "  WHERE (state = 'JOB_STATE_QUEUED' "
            "         OR (state = 'JOB_STATE_RUNNING' AND lease_expires < clock_timestamp())) "
            "    AND job_id <> ALL(%(running)s::text[]) "
            "  ORDER BY (state = 'JOB_STATE_RUNNING') DESC, priority DESC, seq "
            "  LIMIT %(limit)s FOR UPDATE SKIP LOCKED), "
            "claimed AS (UPDATE latentwire_jobs j SET state = 'JOB_STATE_RUNNING', lease_owner = %(replica)s, "
            "  lease_epoch = j.lease_epoch + 1, lease_expires = clock_timestamp() + make_interval(secs => %(lease)s), "
            "  start_time = %(now)s, attempts = j.attempts + 1, completed_steps = 0, total_steps = 0 "
            "  FROM picked WHERE j.job_id = picked.job_id "
            "  RETURNING j.job_id, j.seq, j.request, j.create_time, j.deadline, j.attempts, j.owner, j.lease_epoch, "
            "  j.cancel_requested, picked.previous, j.finish_requests, j.finish_mode, j.finish_at_step) "
            "SELECT claimed.*, pg_notify(%(channel)s, 's:' || claimed.job_id) FROM claimed ORDER BY seq",
            {"limit": limit, "replica": replica, "lease": float(lease_s), "now": time.time(), "channel": CHANNEL,
             "running": list(running)})
        return [Claim(*row[:13]) for row in rows]

    async def heartbeat(self, replica: str, jobs: list[tuple[str, int, int, int]], lease_s: float
                        ) -> dict[str, tuple[bool, FinishRequest]]:
        """Renew the leases of (job_id, epoch, completed_steps, total_steps) and record their progress; return
        {job_id: (cancel_requested, finish-early request)} for the leases still held (a job missing from it was
        taken over)."""
        rows = await self._fetch(
            "UPDATE latentwire_jobs j SET lease_expires = clock_timestamp() + make_interval(secs => %s), "
            "completed_steps = v.completed, total_steps = v.total "
            "FROM unnest(%s::text[], %s::bigint[], %s::int[], %s::int[]) AS v(job_id, epoch, completed, total) "
            "WHERE j.job_id = v.job_id AND j.lease_epoch = v.epoch AND j.lease_owner = %s "
            "AND j.state = 'JOB_STATE_RUNNING' RETURNING j.job_id, j.cancel_requested, j.finish_requests, "
            "j.finish_mode, j.finish_at_step",
            (float(lease_s), [j[0] for j in jobs], [j[1] for j in jobs], [j[2] for j in jobs], [j[3] for j in jobs],
             replica))
        return {job_id: (cancel, FinishRequest(*finish)) for job_id, cancel, *finish in rows}

    async def progress(self, job_id: str, epoch: int, replica: str, completed: int, total: int) -> bool:
        """Record a running job's step progress (fenced); False when the lease is no longer held."""
        rows = await self._fetch(
            f"WITH u AS (UPDATE latentwire_jobs SET completed_steps = %(completed)s, total_steps = %(total)s "
            f"WHERE {_FENCE} RETURNING job_id) SELECT 1 FROM u, pg_notify(%(channel)s, 'p:' || u.job_id)",
            {"job_id": job_id, "epoch": epoch, "replica": replica, "completed": completed, "total": total,
             "channel": CHANNEL})
        return bool(rows)

    async def finish(self, job_id: str, epoch: int, replica: str, state: int, *, completed: int = 0, total: int = 0,
                     result: orchestrator_pb2.GenerateResult | None = None,
                     error: LatentwireError | None = None) -> bool:
        """End a running job (fenced by its lease): False when the lease was taken over, and nothing is written."""
        rows = await self._fetch(
            "WITH u AS (UPDATE latentwire_jobs SET state = %(state)s, end_time = %(now)s, completed_steps = "
            "%(completed)s, total_steps = %(total)s, result = %(result)s, error_code = %(code)s, error_message = "
            "%(message)s, error_reason = %(reason)s, lease_expires = NULL, finished_by = %(replica)s "
            f"WHERE {_FENCE} RETURNING job_id) SELECT 1 FROM u, pg_notify(%(channel)s, 'f:' || u.job_id)",
            {"job_id": job_id, "epoch": epoch, "replica": replica, "state": _STATE_NAMES[state], "now": time.time(),
             "completed": completed, "total": total,
             "result": result.SerializeToString() if result is not None else None,
             "code": error.code.value[0] if error is not None else None,
             "message": error.message if error is not None else None,
             "reason": error.reason if error is not None else None, "channel": CHANNEL})
        return bool(rows)

    async def release(self, job_id: str, epoch: int, replica: str) -> bool:
        """Hand a running job back to the queue (a graceful shutdown): another replica runs it from the start."""
        rows = await self._fetch(
            "WITH u AS (UPDATE latentwire_jobs SET state = 'JOB_STATE_QUEUED', start_time = NULL, lease_owner = NULL, "
            f"lease_expires = NULL WHERE {_FENCE} RETURNING job_id) SELECT 1 FROM u, pg_notify(%(channel)s, "
            "'q:' || u.job_id)", {"job_id": job_id, "epoch": epoch, "replica": replica, "channel": CHANNEL})
        return bool(rows)

    async def cancel(self, job_id: str, owner: str | None) -> int | None:
        """Cancel a job: a queued one ends CANCELLED here; a running one gets ``cancel_requested`` and its replica is
        told. Returns the job's state before (None: no such job for ``owner``)."""
        where, args = "job_id = %(job_id)s", {"job_id": job_id, "channel": CHANNEL, "now": time.time()}
        if owner is not None:
            where += " AND owner = %(owner)s"
            args["owner"] = owner
        error = Cancelled(f"job {job_id} was cancelled while queued", reason="JOB_CANCELLED")
        args.update(code=error.code.value[0], message=error.message, reason=error.reason)
        async with self._connection() as connection:
            async with connection.transaction():
                row = await (await connection.execute(
                    f"SELECT state FROM latentwire_jobs WHERE {where} FOR UPDATE", args)).fetchone()
                if row is None:
                    return None
                state = State.Value(row[0])
                if state == State.JOB_STATE_QUEUED:
                    await connection.execute(
                        "UPDATE latentwire_jobs SET state = 'JOB_STATE_CANCELLED', end_time = %(now)s, "
                        "error_code = %(code)s, error_message = %(message)s, error_reason = %(reason)s "
                        "WHERE job_id = %(job_id)s", args)
                    await connection.execute("SELECT pg_notify(%(channel)s, 'f:' || %(job_id)s)", args)
                elif state == State.JOB_STATE_RUNNING:
                    await connection.execute(
                        "UPDATE latentwire_jobs SET cancel_requested = TRUE WHERE job_id = %(job_id)s", args)
                    await connection.execute("SELECT pg_notify(%(channel)s, 'c:' || %(job_id)s)", args)
                return state

    async def request_finish(self, job_id: str, owner: str | None, mode: int, at_step: int
                             ) -> tuple[FinishAnswer, FinishRequest | None]:
        """Store a finish-early request on a running job's row and tell its replica (NOTIFY "i:"). Returns what was
        done and the row's request after it (its count identifies it); a queued, finished or missing job and a grid
        job get nothing written. A stored INTERRUPT stays one when a SKIP follows (as interrupts.EarlyFinish keeps
        it)."""
        where, args = "job_id = %(job_id)s", {"job_id": job_id, "channel": CHANNEL, "mode": mode,
                                              "at_step": at_step, "interrupt": _INTERRUPT}
        if owner is not None:
            where += " AND owner = %(owner)s"
            args["owner"] = owner
        async with self._connection() as connection:
            async with connection.transaction():
                row = await (await connection.execute(
                    f"SELECT state, request FROM latentwire_jobs WHERE {where} FOR UPDATE", args)).fetchone()
                if row is None or State.Value(row[0]) != State.JOB_STATE_RUNNING:
                    return FinishAnswer.NOT_RUNNING, None
                if orchestrator_pb2.GenerateRequest.FromString(row[1]).HasField("grid"):
                    return FinishAnswer.GRID, None
                stored = await (await connection.execute(
                    "UPDATE latentwire_jobs SET finish_requests = finish_requests + 1, finish_mode = CASE WHEN "
                    "finish_mode = %(interrupt)s THEN finish_mode ELSE %(mode)s END, finish_at_step = %(at_step)s "
                    "WHERE job_id = %(job_id)s RETURNING finish_requests, finish_mode, finish_at_step",
                    args)).fetchone()
                await connection.execute("SELECT pg_notify(%(channel)s, 'i:' || %(job_id)s)", args)
                return FinishAnswer.ASKED, FinishRequest(*stored)

    async def finish_request(self, job_id: str) -> FinishRequest | None:
        """The finish-early request stored on a job's row (None: no such job)."""
        rows = await self._fetch("SELECT finish_requests, finish_mode, finish_at_step FROM latentwire_jobs "
                                 "WHERE job_id = %s", (job_id,))
        return FinishRequest(*rows[0]) if rows else None

    async def prune(self, keep: int) -> None:
        """Delete the oldest finished jobs beyond ``keep`` rows."""
        await self._count(
            "DELETE FROM latentwire_jobs WHERE state NOT IN ('JOB_STATE_QUEUED', 'JOB_STATE_RUNNING') AND seq <= "
            "(SELECT seq FROM latentwire_jobs ORDER BY seq DESC LIMIT 1 OFFSET %s)", (keep,))

    # -- reads ----------------------------------------------------------------------------------------

    async def row(self, job_id: str, *, with_result: bool, owner: str | None = None) -> tuple | None:
        """The job's row in jobs.py's column order (``_job_proto``), or None (missing, or another principal's)."""
        where, args = "job_id = %s", [job_id]
        if owner is not None:
            where += " AND owner = %s"
            args.append(owner)
        columns = _ROW_COLUMNS.format(result="result" if with_result else "NULL")
        rows = await self._fetch(f"SELECT {columns} FROM latentwire_jobs WHERE {where}", args)
        return rows[0] if rows else None

    async def page(self, after_seq: int | None, size: int, state: int, owner: str | None = None) -> list[tuple]:
        """Up to ``size`` rows before ``after_seq``, newest first, as jobs.py JobStore.page."""
        where, args = page_filter(after_seq, state, owner, placeholder="%s")
        return await self._fetch(f"SELECT {PAGE_COLUMNS} FROM latentwire_jobs {where} ORDER BY seq DESC LIMIT %s",
                                 (*args, size))

    async def queued(self) -> int:
        """Jobs waiting in the shared queue."""
        ((count,),) = await self._fetch("SELECT count(*) FROM latentwire_jobs WHERE state = 'JOB_STATE_QUEUED'")
        return count

    async def position(self, job_id: str) -> tuple[int, int]:
        """(1-based position of a queued job in the shared queue, jobs queued); (0, n) when it is not queued."""
        ((position, length),) = await self._fetch(
            "SELECT count(*) FILTER (WHERE q.priority > j.priority OR (q.priority = j.priority AND q.seq <= j.seq)), "
            "count(*) FROM latentwire_jobs q LEFT JOIN latentwire_jobs j ON j.job_id = %s AND j.state = "
            "'JOB_STATE_QUEUED' WHERE q.state = 'JOB_STATE_QUEUED'", (job_id,))
        return position, length

    async def close(self) -> None:
        for connection in self._all:
            with contextlib.suppress(Exception):
                await connection.close()


def _brief(error: BaseException) -> str:
    """The first line of a driver error (no connection string: it may hold a password)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


#: Sent to a job's local watchers when this replica stops running it without finishing it (its lease ended, or the
#: finish was refused): they follow the row from then on.
_LEASE_LOST = object()


@dataclass(eq=False)
class ClaimedJob(LiveJob):
    """A job this replica runs under a lease."""

    epoch: int = 0
    #: Monotonic time the last renewal was sent (a lease lasts ``lease_s`` from then, at least).
    renewed_at: float = 0.0
    progress_at: float = 0.0
    cancel_requested: bool = False
    #: The lease ended (taken over, or the database was out of reach for longer than the lease).
    lost: bool = False
    #: Its result or error went out to the watchers.
    ended: bool = False
    #: The count of the last finish-early request applied here (the row's finish_requests).
    finish_seen: int = 0
    #: Its task took its first step. A task cancelled before that never runs its body (no finish is written, the
    #: heartbeat would renew the lease of a job nobody runs), so until then a cancel or a lost lease only flags it.
    started: bool = False


class SharedJobQueue:
    """The job queue of several orchestrator replicas on one PostgreSQL database (see the module docstring)."""

    def __init__(self, store: PostgresJobStore, run: Runner, *, max_running: int, max_queued: int,
                 keep_jobs: int = 10_000, lease_s: float = 10.0, on_change: Callable[[int, int], None] | None = None,
                 replica: str | None = None, on_finish: FinishHook | None = None):
        if lease_s <= 0:
            raise ValueError("the job lease must be positive")
        self.store = store
        self._run = run
        self.max_running = max_running
        self.max_queued = max_queued
        self.keep_jobs = keep_jobs
        self.lease_s = lease_s
        self.heartbeat_s = lease_s / 5
        self.poll_s = min(POLL_S, self.heartbeat_s)
        self._on_change = on_change
        self._on_finish = on_finish
        #: This replica's name in the rows it claims (host, process, and a random part: a restarted process on the
        #: same pid is another replica).
        self.replica = replica or f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"
        self._live: dict[str, ClaimedJob] = {}
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._contexts: OrderedDict[str, contextvars.Context] = OrderedDict()
        self._wakeup = asyncio.Event()
        self._listening = asyncio.Event()
        self._stopping = False
        self._closed = False
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._rebuild: Rebuild | None = None
        self._durations: list[float] = []
        self._queued = 0
        self._counted_at = 0.0

    # -- life cycle -------------------------------------------------------------------------------

    async def start(self, rebuild: Rebuild) -> int:
        """Listen for the other replicas, start claiming and renewing. Returns 0: unfinished jobs stay in the shared
        queue, for whichever replica claims them."""
        self._rebuild = rebuild
        self._tasks = [asyncio.create_task(self._listen(), name="jobs-listen"),
                       asyncio.create_task(self._dispatch(), name="jobs-dispatch"),
                       asyncio.create_task(self._heartbeat(), name="jobs-heartbeat")]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._listening.wait(), 10)
        log.info("shared job queue: replica %s, lease %.1f s (renewed every %.1f s)", self.replica, self.lease_s,
                 self.heartbeat_s)
        return 0

    async def shutdown(self, grace: float) -> None:
        """Claim no more jobs; give running ones ``grace`` seconds, then hand the rest back to the shared queue,
        where another replica claims them at once."""
        self._stopping = True
        self._wakeup.set()
        running = [job.task for job in self._live.values() if job.task is not None]
        if running:
            await asyncio.wait(running, timeout=grace)
        for job in self._live.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()
        running = [task for task in running if not task.done()]
        if running:
            await asyncio.wait(running, timeout=5)
        for task in self._tasks:
            task.cancel()
        self._closed = True
        for job_id in list(self._waiters):
            self._poke(job_id)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.store.close()

    # -- submitting -------------------------------------------------------------------------------

    async def submit(self, params: GenerateParams, deadline: Deadline, *, owner: str = LEGACY_OWNER) -> LiveJob:
        """Store a resolved request as a QUEUED job of ``owner`` (any replica may claim it), or refuse it with
        RESOURCE_EXHAUSTED when the shared queue is full."""
        if self._stopping:
            raise Unavailable("the orchestrator is shutting down; retry on another replica", reason="SHUTTING_DOWN")
        waiting = max(0, await self.store.queued() - self._free())
        if waiting >= self.max_queued:
            retry = self._retry_estimate(waiting)
            raise ResourceExhausted(
                f"the job queue is full ({waiting} jobs waiting, the limit); retry in about {retry:.0f} s",
                reason="QUEUE_FULL", metadata={"queue_length": waiting, "retry_after_s": f"{retry:.1f}"},
                retry_after_s=retry)
        job = LiveJob(job_id=uuid.uuid4().hex, seq=0, params=params, create_time=time.time(), deadline=deadline,
                      owner=owner)
        # The run continues the submitting call's trace when this replica claims the job.
        self._contexts[job.job_id] = contextvars.copy_context()
        while len(self._contexts) > 1000:
            self._contexts.popitem(last=False)
        job.seq = await self.store.insert(job)
        self._wakeup.set()
        if job.seq % 100 == 0:
            await self.store.prune(self.keep_jobs)
        return job

    def set_max_running(self, count: int) -> None:
        """Claim up to ``count`` jobs at once from now on (--admission stages: the stages' capacity changed)."""
        self.max_running = max(1, count)
        self._wakeup.set()

    def _free(self) -> int:
        return 0 if self._stopping else max(0, self.max_running - len(self._live))

    def _retry_estimate(self, waiting: int) -> float:
        recent = self._durations[-20:]
        mean = sum(recent) / len(recent) if recent else 5.0
        return max(1.0, mean * (waiting + 1) / self.max_running)

    # -- claiming and running ---------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            free = self._free()
            claimed: list[Claim] = []
            if free:
                sent = time.monotonic()
                try:
                    claimed = await self.store.claim(self.replica, free, self.lease_s, list(self._live))
                except LatentwireError:
                    pass  # logged by the store; the next turn tries again
                for claim in claimed:
                    self._start(claim, sent)
            await self._count_queue()
            if claimed and len(claimed) == free:
                continue  # there may be more for slots freed meanwhile
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.poll_s)

    async def _count_queue(self) -> None:
        if time.monotonic() - self._counted_at < 1.0:
            return
        self._counted_at = time.monotonic()
        with contextlib.suppress(LatentwireError):
            self._queued = await self.store.queued()
        if self._on_change is not None:
            self._on_change(self._queued, len(self._live))

    def _start(self, claim: Claim, sent: float) -> None:
        if claim.previous_owner and claim.previous_owner != self.replica:
            log.warning("job %s: the lease of replica %s ended; taking it over (attempt %d, epoch %d)",
                        claim.job_id, claim.previous_owner, claim.attempts, claim.epoch)
        # params: rebuilt from the stored request first thing in _work (a request that no longer resolves fails
        # the job there, under the lease).
        job = ClaimedJob(job_id=claim.job_id, seq=claim.seq, params=None,  # type: ignore[arg-type]
                         create_time=claim.create_time,
                         deadline=Deadline(claim.deadline), state=State.JOB_STATE_RUNNING, attempts=claim.attempts,
                         owner=claim.owner, epoch=claim.epoch, renewed_at=sent, cancel_requested=claim.cancel_requested,
                         # Asked of a previous run (taken over): the rerun applies it when it sets up (FinishHook).
                         finish_mode=claim.finish_mode, finish_at_step=claim.finish_at_step,
                         finish_seen=claim.finish_requests)
        job.start_time = time.time()
        job.context = self._contexts.pop(claim.job_id, None)
        self._live[job.job_id] = job
        job.task = (job.context or contextvars.Context()).run(asyncio.create_task, self._work(job, claim.request))
        self._poke(job.job_id)

    async def _work(self, job: ClaimedJob, request: bytes) -> None:
        outcome: tuple[int, orchestrator_pb2.GenerateResult | None, LatentwireError | None] | None = None
        job.started = True
        try:
            try:
                if job.lost:
                    return  # the lease went between the claim and this first step: nothing to write
                job.params = self._rebuild(orchestrator_pb2.GenerateRequest.FromString(request))
                if job.cancel_requested:
                    raise Cancelled(f"job {job.job_id} was cancelled", reason="JOB_CANCELLED")
                if job.deadline.passed:
                    raise DeadlineExceeded("the job's deadline passed while it waited in the queue",
                                           reason="DEADLINE_EXCEEDED_IN_QUEUE")
                result = None
                async for event in self._run(job):
                    kind = event.WhichOneof("event")
                    if kind == "step":
                        job.completed_steps, job.total_steps = event.step.step, event.step.total_steps
                        job.history = [e for e in job.history if e.WhichOneof("event") != "step"]
                        await self._write_progress(job)
                    if kind == "result":
                        result = event.result  # sent once the finish is recorded
                    else:
                        job.history.append(event)
                        job.publish(event)
                if result is None:
                    raise Internal("the job ended without a result", reason="NO_RESULT")
                outcome = (State.JOB_STATE_SUCCEEDED, result, None)
            except asyncio.CancelledError:
                if job.lost:
                    return
                if self._stopping and not job.cancel_requested:
                    # Handed back: another replica claims it at once and runs it from the start.
                    with contextlib.suppress(LatentwireError):
                        await self.store.release(job.job_id, job.epoch, self.replica)
                    job.publish(Unavailable(
                        f"the orchestrator is shutting down; job {job.job_id} goes back to the shared queue and runs "
                        "on another replica: WatchJob re-attaches on any replica", reason="SHUTTING_DOWN"))
                    job.ended = True
                    return
                outcome = (State.JOB_STATE_CANCELLED, None,
                           Cancelled(f"job {job.job_id} was cancelled", reason="JOB_CANCELLED"))
            except LatentwireError as error:
                state = State.JOB_STATE_CANCELLED if isinstance(error, Cancelled) else State.JOB_STATE_FAILED
                outcome = (state, None, error)
            except Exception:  # noqa: BLE001 - recorded on the job; details to the log
                log.exception("job %s failed", job.job_id)
                outcome = (State.JOB_STATE_FAILED, None, Internal("internal error; see the orchestrator log"))
            state, result, error = outcome
            try:
                finished = await self.store.finish(job.job_id, job.epoch, self.replica, state,
                                                   completed=job.completed_steps, total=job.total_steps,
                                                   result=result, error=error)
            except LatentwireError:
                finished = False  # the lease runs out and another replica runs the job again
            if not finished:
                log.warning("job %s: its finish (%s) was refused: the lease (epoch %d) is no longer this replica's",
                            job.job_id, State.Name(state), job.epoch)
                return
            job.state = state
            telemetry.observe_job(State.Name(state).removeprefix("JOB_STATE_").lower(), time.time() - job.create_time)
            if job.start_time is not None:
                self._durations.append(time.time() - job.start_time)
            job.ended = True
            job.publish(orchestrator_pb2.GenerateResponse(result=result) if result is not None else error)
        finally:
            if not job.ended:
                job.publish(_LEASE_LOST)
            if self._live.get(job.job_id) is job:
                del self._live[job.job_id]
            self._wakeup.set()
            self._poke(job.job_id)

    async def _write_progress(self, job: ClaimedJob) -> None:
        now = time.monotonic()
        if now - job.progress_at < PROGRESS_INTERVAL_S:
            return
        job.progress_at = now
        try:
            held = await self.store.progress(job.job_id, job.epoch, self.replica, job.completed_steps, job.total_steps)
        except LatentwireError:
            return  # the heartbeat decides whether the lease is lost
        if not held:
            self._lose(job, "its lease was taken over")

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            jobs = [job for job in self._live.values() if not job.lost and not job.ended]
            if not jobs:
                continue
            sent = time.monotonic()
            try:
                held = await self.store.heartbeat(
                    self.replica, [(j.job_id, j.epoch, j.completed_steps, j.total_steps) for j in jobs], self.lease_s)
            except LatentwireError:
                for job in jobs:
                    if sent - job.renewed_at > self.lease_s:
                        self._lose(job, "the job database was out of reach for longer than the lease")
                continue
            for job in jobs:
                if job.job_id not in held:
                    if job.task is not None and not job.task.done() and not job.ended:
                        self._lose(job, "its lease was taken over")
                    continue
                job.renewed_at = sent
                cancel, finish = held[job.job_id]
                if cancel:
                    self._cancel_local(job)
                else:
                    self._apply_finish(job, finish)  # its notification may have been lost

    def _lose(self, job: ClaimedJob, why: str) -> None:
        """Stop running a job whose lease this replica no longer holds, writing nothing."""
        if job.lost:
            return
        log.warning("job %s: stopped here, %s (epoch %d); another replica runs it", job.job_id, why, job.epoch)
        job.lost = True
        if job.started and job.task is not None and not job.task.done():
            job.task.cancel()

    def _apply_finish(self, job: ClaimedJob, finish: FinishRequest | None) -> None:
        """Apply a finish-early request to a job running here, once per request (its count)."""
        if finish is None or finish.count <= job.finish_seen or job.lost or job.ended or job.cancel_requested:
            return
        job.finish_seen = finish.count
        job.finish_mode, job.finish_at_step = finish.mode, finish.at_step
        if self._on_finish is not None:
            self._on_finish(job, finish.mode, finish.at_step)

    async def _read_finish(self, job_id: str) -> None:
        """A finish-early request was stored for a job running here (NOTIFY "i:"): read and apply it."""
        try:
            finish = await self.store.finish_request(job_id)
        except LatentwireError:
            return  # the heartbeat reads it
        job = self._live.get(job_id)
        if job is not None:
            self._apply_finish(job, finish)

    def _cancel_local(self, job: ClaimedJob) -> None:
        """Stop a job running here because it was cancelled (once: a second cancel would cut its finish short)."""
        if job.cancel_requested:
            return
        job.cancel_requested = True
        if job.started and job.task is not None and not job.task.done():
            job.task.cancel()  # not started: its first step sees cancel_requested and ends the job CANCELLED

    # -- notifications ----------------------------------------------------------------------------

    async def _listen(self) -> None:
        """LISTEN for the other replicas (new jobs, claims, progress, ends, cancel requests); reconnect when the
        connection drops."""
        while True:
            try:
                connection = await PostgresJobStore.connect(self.store.dsn)
                async with connection:
                    await connection.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    # Whatever was sent while not listening: look again.
                    self._wakeup.set()
                    for job_id in list(self._waiters):
                        self._poke(job_id)
                    async for notification in connection.notifies():
                        self._notified(notification.payload)
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as error:
                log.warning("job database notifications lost (%s); reconnecting", _brief(error))
                await asyncio.sleep(1.0)

    def _notified(self, payload: str) -> None:
        """q: a job was queued; s: claimed; p: progress; f: finished; c: cancel requested; i: finish early
        requested (INTERRUPT / SKIP)."""
        kind, _, job_id = payload.partition(":")
        if kind == "q":
            self._wakeup.set()
        # Only the job's own watchers look again: the others' queue positions are refreshed by their next poll
        # (within a second), rather than every watcher reading the table on every claim.
        if kind == "c":
            job = self._live.get(job_id)
            if job is not None:
                self._cancel_local(job)
        if kind == "i" and job_id in self._live:
            self._in_background(self._read_finish(job_id))
        self._poke(job_id)

    def _unwait(self, job_id: str, waiter: asyncio.Event) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[job_id]

    def _poke(self, job_id: str) -> None:
        for event in self._waiters.get(job_id, ()):
            event.set()

    # -- reading, watching and cancelling ---------------------------------------------------------

    async def watch(self, job_id: str, *, owner: str | None = None) -> AsyncIterator[orchestrator_pb2.GenerateResponse]:
        """The job's events, on any replica: every event while this replica runs it; otherwise its queue position,
        step progress and, last, its result (or its error raised) from the shared row."""
        row = await self.store.row(job_id, with_result=False, owner=owner)
        if row is None:
            raise _not_found(job_id)
        first = _job_proto(row, None)
        yield orchestrator_pb2.GenerateResponse(accepted=orchestrator_pb2.JobAccepted(
            job_id=job_id, seed=first.seed, model=first.model))
        seen_queued: tuple[int, int] | None = None
        seen_step: tuple[int, int] | None = None
        seen_finish: tuple[int, int] = (0, 0)
        while True:
            job = self._live.get(job_id)
            if job is not None and not job.lost and not job.ended:
                queue: asyncio.Queue = asyncio.Queue()
                snapshot = list(job.history)  # no await between this and subscribing
                job.watchers.add(queue)
                try:
                    for event in snapshot:
                        yield event
                    while True:
                        item = await queue.get()
                        if item is _LEASE_LOST:
                            break
                        if isinstance(item, BaseException):
                            raise item
                        yield item
                        if item.WhichOneof("event") == "result":
                            return
                finally:
                    job.watchers.discard(queue)
                continue  # this replica stopped running it: follow the row
            waiter = asyncio.Event()
            self._waiters.setdefault(job_id, set()).add(waiter)
            try:
                row = await self.store.row(job_id, with_result=False)
                if row is None:
                    raise _not_found(job_id)  # pruned meanwhile
                state = State.Value(row[1])
                if state == State.JOB_STATE_SUCCEEDED:
                    row = await self.store.row(job_id, with_result=True)
                    yield orchestrator_pb2.GenerateResponse(result=_job_proto(row, None).result)
                    return
                if state in _TERMINAL:
                    ended = _job_proto(row, None)
                    raise error_for(ended.error.code, ended.error.message, ended.error.reason)
                if job_id in self._live:
                    continue  # claimed here meanwhile
                if self._closed:
                    raise Unavailable(f"the orchestrator is shutting down; job {job_id} goes on on another replica: "
                                      "WatchJob re-attaches on any replica", reason="SHUTTING_DOWN")
                if state == State.JOB_STATE_QUEUED:
                    queued = await self.store.position(job_id)
                    if queued != seen_queued and queued[0]:
                        seen_queued = queued
                        yield orchestrator_pb2.GenerateResponse(
                            queued=orchestrator_pb2.Queued(position=queued[0], queue_length=queued[1]))
                elif state == State.JOB_STATE_RUNNING:
                    finish = (row[16], row[17])  # finish_mode, finish_at_step
                    if finish[0] and finish != seen_finish:
                        seen_finish = finish
                        yield orchestrator_pb2.GenerateResponse(finish_requested=orchestrator_pb2.FinishRequested(
                            mode=finish[0], at_step=finish[1]))
                    step = (row[9], row[10])
                    if step[0] and step != seen_step:
                        seen_step = step
                        yield orchestrator_pb2.GenerateResponse(
                            step=orchestrator_pb2.DenoisingStep(step=step[0], total_steps=step[1]))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(waiter.wait(), self.poll_s)
            finally:
                self._unwait(job_id, waiter)

    def live(self, job_id: str, owner: str | None = None) -> LiveJob | None:
        """The job when it runs on this replica (and ``owner`` may see it)."""
        job = self._live.get(job_id)
        if job is None or job.lost or job.ended or (owner is not None and job.owner != owner):
            return None
        return job

    def cancel_soon(self, job_id: str) -> None:
        """Cancel without waiting (Generate's caller left with cancel_on_disconnect)."""
        self._in_background(self._cancel_quietly(job_id))

    def _in_background(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel_quietly(self, job_id: str) -> None:
        try:
            await self._cancel(job_id, None)
        except LatentwireError as error:
            log.warning("job %s: could not cancel after the caller left: %s", job_id, error.message)

    async def _cancel(self, job_id: str, owner: str | None) -> int | None:
        before = await self.store.cancel(job_id, owner)
        job = self._live.get(job_id)
        if job is not None and before == State.JOB_STATE_RUNNING:
            self._cancel_local(job)
        return before

    async def cancel_and_wait(self, job_id: str, *, wait_s: float = 2.0, owner: str | None = None
                              ) -> orchestrator_pb2.Job:
        """Cancel a queued job (at once) or a running one, wherever it runs, giving it up to ``wait_s`` seconds to
        stop (its replica hears of it at once and it stops at the stages' next step); return the job."""
        before = await self._cancel(job_id, owner)
        if before is None:
            raise _not_found(job_id)
        if before == State.JOB_STATE_RUNNING:
            await self._wait_ended(job_id, wait_s)
        return await self.get(job_id, with_result=False, owner=owner)

    async def _wait_ended(self, job_id: str, wait_s: float) -> None:
        """Until the job's row is in a final state (or gone), at most ``wait_s`` seconds."""
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            waiter = asyncio.Event()
            self._waiters.setdefault(job_id, set()).add(waiter)
            try:
                row = await self.store.row(job_id, with_result=False)
                if row is None or State.Value(row[1]) in _TERMINAL:
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(waiter.wait(), max(0.01, min(self.poll_s, end - time.monotonic())))
            finally:
                self._unwait(job_id, waiter)

    async def request_finish(self, job_id: str, mode: int, at_step: int, *, wait_s: float = 2.0,
                             owner: str | None = None) -> FinishAnswer:
        """Finish a running job early (CancelJob INTERRUPT / SKIP), wherever it runs: the request is stored on its
        row and its replica applies it (at once when that is this one, else on the NOTIFY or, should that be lost,
        its next heartbeat); an INTERRUPTed job gets up to ``wait_s`` seconds to end."""
        answer, finish = await self.store.request_finish(job_id, owner, mode, at_step)
        if answer is not FinishAnswer.ASKED:
            return answer
        job = self._live.get(job_id)
        if job is not None:
            self._apply_finish(job, finish)
        if mode == _INTERRUPT:
            await self._wait_ended(job_id, wait_s)
        return answer

    async def get(self, job_id: str, *, with_result: bool = True, owner: str | None = None) -> orchestrator_pb2.Job:
        """The job from the shared row (with this replica's live progress when it runs here)."""
        row = await self.store.row(job_id, with_result=with_result, owner=owner)
        if row is None:
            raise _not_found(job_id)
        job = _job_proto(row, self._live.get(job_id))
        if job.state == State.JOB_STATE_QUEUED:
            job.queue_position = (await self.store.position(job_id))[0]
        return job

    async def list(self, page_size: int, page_token: str, state: int, *, owner: str | None = None
                   ) -> orchestrator_pb2.ListJobsResponse:
        """A page of the shared job history, newest first; with ``owner``, of that principal's jobs only."""
        if page_size < 0 or page_size > 1000:
            raise InvalidArgument(f"page_size is {page_size}; use 1 to 1000 (0 for 100)", reason="INVALID_PAGE_SIZE")
        size = page_size or 100
        after = _decode_token(page_token) if page_token else None
        rows = await self.store.page(after, size + 1, state, owner)
        jobs = [_job_proto(row, self._live.get(row[0])) for row in rows[:size]]
        token = _encode_token(rows[size - 1][16]) if len(rows) > size else ""
        return orchestrator_pb2.ListJobsResponse(jobs=jobs, next_page_token=token)

    @property
    def queue_length(self) -> int:
        return self._queued

    @property
    def running(self) -> int:
        return len(self._live)

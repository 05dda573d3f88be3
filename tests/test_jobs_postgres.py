"""The PostgreSQL job store (--jobs-db postgresql://...): several orchestrators share one queue and one job history.

A real PostgreSQL server (tests/postgres_server.py) throughout. The first half drives the shared queue in-process,
two replicas in one event loop on one database: a migration run by several replicas at once, every job claimed
once, a lease taken over once its replica stops renewing it, and that replica's late finish refused (fencing).
The second half runs two real orchestrator processes over the session suite's stages: GetJob, WatchJob and
CancelJob from the replica that does not run the job (CANCEL, and INTERRUPT at a step, which must give the image
diffusers gives when interrupted there), and the acceptance run: 16 clients for 2 minutes over
both, one orchestrator killed (-9) mid-run, every accepted job finished exactly once with the image it would
have had.
"""
from __future__ import annotations

import asyncio
import io
import os
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict

import grpc
import numpy as np
import psycopg
import pytest
from PIL import Image

from latentwire.client import Client
from latentwire.common.v1 import status_pb2
from latentwire.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from services.orchestrator.config import build_parser, settings_from_flags
from services.orchestrator.deadline import NO_DEADLINE
from services.orchestrator.jobs import FinishAnswer, LiveJob
from services.orchestrator.jobs_postgres import MIGRATIONS, PostgresJobStore, SharedJobQueue
from services.orchestrator.request import resolve_request
from services.runtime.errors import Cancelled, NotFound
from services.suite.launcher import ORCHESTRATOR_MODULE, start_service, wait_serving

State = status_pb2.JobState
SETTINGS = settings_from_flags(build_parser().parse_args(
    ["--text-encoder-address", "te:1", "--denoiser-address", "dn:2", "--vae-address", "vae:3"]))


def params(prompt: str = "p", seed: int = 1):
    return resolve_request(orchestrator_pb2.GenerateRequest(prompt=prompt, seed=seed), SETTINGS)


def rebuild(request):
    return resolve_request(request, SETTINGS)


class HeldRunner:
    """The queue's runner (the servicer's stands in the suite tests below): a step, then it waits until the test
    releases the job, then its result, marked with the replica that made it (``model``)."""

    def __init__(self, name: str):
        self.name = name
        self.started: list[str] = []
        self._release: dict[str, asyncio.Event] = {}

    def release(self, job_id: str) -> None:
        self._release.setdefault(job_id, asyncio.Event()).set()

    async def __call__(self, job: LiveJob):
        self.started.append(job.job_id)
        yield orchestrator_pb2.GenerateResponse(step=orchestrator_pb2.DenoisingStep(step=1, total_steps=2))
        await self._release.setdefault(job.job_id, asyncio.Event()).wait()
        yield orchestrator_pb2.GenerateResponse(step=orchestrator_pb2.DenoisingStep(step=2, total_steps=2))
        yield orchestrator_pb2.GenerateResponse(result=orchestrator_pb2.GenerateResult(seed=job.seed, model=self.name))


async def replica(dsn: str, name: str, runner, *, lease_s: float = 10.0, max_running: int = 2,
                  on_finish=None) -> SharedJobQueue:
    queue = SharedJobQueue(await PostgresJobStore.open(dsn, connections=2), runner, max_running=max_running,
                           max_queued=100, lease_s=lease_s, replica=name, on_finish=on_finish)
    await queue.start(rebuild)
    return queue


async def until(predicate, timeout: float = 20.0):
    """Until ``await predicate()`` is truthy; returns it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


def row(dsn: str, job_id: str) -> dict:
    with psycopg.connect(dsn) as connection:
        cursor = connection.execute("SELECT * FROM latentwire_jobs WHERE job_id = %s", (job_id,))
        return dict(zip([c.name for c in cursor.description], cursor.fetchone()))


def database(postgres) -> str:
    return postgres.create_database(f"jobs_{uuid.uuid4().hex[:8]}")


# ---- the shared queue in-process --------------------------------------------------------------------------------


def test_replicas_starting_together_migrate_once(postgres):
    dsn = database(postgres)

    async def scenario():
        stores = await asyncio.gather(*[PostgresJobStore.open(dsn, connections=1) for _ in range(4)])
        versions = await asyncio.gather(*[store.migrate() for store in stores])  # and again: idempotent
        for store in stores:
            await store.close()
        return versions

    assert asyncio.run(scenario()) == [MIGRATIONS[-1][0]] * 4
    with psycopg.connect(dsn) as connection:
        assert connection.execute("SELECT version FROM latentwire_schema WHERE component = 'jobs'").fetchone() == (
            MIGRATIONS[-1][0],)


def test_a_version_1_database_gets_the_finish_columns_and_keeps_its_jobs(postgres):
    dsn = database(postgres)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("CREATE TABLE latentwire_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        for statement in dict(MIGRATIONS)[1]:
            connection.execute(statement)
        connection.execute("INSERT INTO latentwire_schema VALUES ('jobs', 1)")
        connection.execute("INSERT INTO latentwire_jobs (job_id, state, priority, request, seed, model, prompt, "
                           "create_time) VALUES ('old', 'JOB_STATE_SUCCEEDED', 0, '', '7', 'm', 'p', 0)")

    async def scenario():
        store = await PostgresJobStore.open(dsn, connections=1)
        try:
            return await store.row("old", with_result=False)
        finally:
            await store.close()

    from services.orchestrator.jobs import _job_proto

    job = _job_proto(asyncio.run(scenario()), None)
    assert (job.job_id, job.seed, job.finish_mode, job.finish_at_step) == ("old", 7, 0, 0)
    assert row(dsn, "old")["finish_requests"] == 0


def test_each_job_is_claimed_by_one_replica_and_cancel_and_watch_work_from_the_other(postgres):
    dsn = database(postgres)

    async def scenario():
        runners = {name: HeldRunner(name) for name in ("a", "b")}
        a = await replica(dsn, "a", runners["a"])
        b = await replica(dsn, "b", runners["b"])
        jobs = [await (a if i % 2 else b).submit(params(f"job {i}", seed=i), NO_DEADLINE, owner="alice")
                for i in range(6)]
        # Two slots each: four run, two wait in the shared queue.
        await until(lambda: _running(dsn, 4))
        started = runners["a"].started + runners["b"].started
        assert len(started) == len(set(started)) == 4 and len(runners["a"].started) == 2
        waiting = next(job for job in jobs if job.job_id not in started)
        assert (await b.get(waiting.job_id)).queue_position in (1, 2)

        # Ownership holds across replicas: another principal's job is NOT_FOUND, and untouched.
        on_a = runners["a"].started[0]
        for action in (lambda: b.get(on_a, owner="bob"), lambda: b.cancel_and_wait(on_a, owner="bob"),
                       lambda: _collect_raising(b.watch(on_a, owner="bob"))):
            with pytest.raises(NotFound):
                await action()
        assert (await b.list(10, "", State.JOB_STATE_UNSPECIFIED, owner="bob")).jobs == []
        assert len((await a.list(10, "", State.JOB_STATE_UNSPECIFIED, owner="alice")).jobs) == 6
        assert (await a.get(on_a, owner="alice")).state == State.JOB_STATE_RUNNING

        # Cancel a job running on a, from b: a hears of it (NOTIFY) and stops it.
        watcher = asyncio.create_task(_collect(b.watch(on_a, owner="alice")))
        began = time.monotonic()
        cancelled = await b.cancel_and_wait(on_a, owner="alice")
        assert cancelled.state == State.JOB_STATE_CANCELLED and time.monotonic() - began < 1.5
        events, error = await watcher
        assert isinstance(error, Cancelled) and error.reason == "JOB_CANCELLED"
        assert events[0].WhichOneof("event") == "accepted"

        # Watch a job running on b from a: progress from the row, then b's result, once.
        on_b = runners["b"].started[0]
        watcher = asyncio.create_task(_collect(a.watch(on_b)))
        await asyncio.sleep(0.3)
        runners["b"].release(on_b)
        events, error = await watcher
        assert error is None
        kinds = [event.WhichOneof("event") for event in events]
        assert kinds[0] == "accepted" and kinds.count("result") == 1 and kinds[-1] == "result"
        assert events[-1].result.model == "b"
        # Release the rest wherever they run; each finishes once, on the replica that claimed it.
        for job in jobs:
            for runner in runners.values():
                runner.release(job.job_id)
        await until(lambda: _finished(dsn, 6))
        for job in jobs:
            stored = row(dsn, job.job_id)
            assert stored["attempts"] == 1
            if stored["state"] == "JOB_STATE_SUCCEEDED":
                assert orchestrator_pb2.GenerateResult.FromString(stored["result"]).model == stored["finished_by"]
        assert Counter(runners["a"].started + runners["b"].started).most_common(1)[0][1] == 1
        for queue in (a, b):
            await queue.shutdown(0)
            await queue.close()

    asyncio.run(scenario())


def test_an_expired_lease_is_taken_over_and_the_zombies_late_finish_is_refused(postgres):
    dsn = database(postgres)

    async def scenario():
        runners = {name: HeldRunner(name) for name in ("a", "b")}
        a = await replica(dsn, "a", runners["a"], lease_s=1.0)
        job = await a.submit(params("zombie"), NO_DEADLINE)
        await until(lambda: _running(dsn, 1))
        watcher = asyncio.create_task(_collect(a.watch(job.job_id)))
        # a stalls: it stops renewing (as a stopped or partitioned process would), but its run goes on.
        heartbeat = next(task for task in a._tasks if task.get_name() == "jobs-heartbeat")
        heartbeat.cancel()
        b = await replica(dsn, "b", runners["b"], lease_s=1.0)
        began = time.monotonic()
        await until(lambda: _async(lambda: runners["b"].started == [job.job_id]), timeout=10)
        taken_over = time.monotonic() - began
        assert row(dsn, job.job_id)["lease_owner"] == "b" and row(dsn, job.job_id)["lease_epoch"] == 2
        runners["b"].release(job.job_id)
        await until(lambda: _finished(dsn, 1))
        # The zombie finishes too, late: refused, and its watcher gets b's result (once).
        runners["a"].release(job.job_id)
        events, error = await watcher
        assert error is None and [e.WhichOneof("event") for e in events].count("result") == 1
        assert events[-1].result.model == "b"
        stored = row(dsn, job.job_id)
        assert (stored["state"], stored["finished_by"], stored["attempts"]) == ("JOB_STATE_SUCCEEDED", "b", 2)
        assert orchestrator_pb2.GenerateResult.FromString(stored["result"]).model == "b"
        # The fence itself: a write with the old epoch matches no row.
        assert not await a.store.finish(job.job_id, 1, "a", State.JOB_STATE_FAILED)
        assert row(dsn, job.job_id)["state"] == "JOB_STATE_SUCCEEDED"
        for queue in (a, b):
            await queue.shutdown(0)
            await queue.close()
        return taken_over

    taken_over = asyncio.run(scenario())
    assert taken_over < 1.0 + 1.0 + 1.0  # the lease, the dispatcher's look, slack


def test_a_job_cancelled_between_its_claim_and_its_first_step_ends_cancelled(postgres):
    """A cancel (CancelJob's notification, or the heartbeat's look) that lands after the replica claimed a job but
    before the job's task took its first step: the job must end CANCELLED on its row, not stay RUNNING under a lease
    the heartbeat keeps renewing (a task cancelled before it starts never runs its body)."""
    dsn = database(postgres)

    async def scenario():
        runner = HeldRunner("a")
        a = await replica(dsn, "a", runner)
        start = a._start

        def start_then_cancel(claim, sent):  # the cancel comes in the same turn of the loop as the dispatch
            start(claim, sent)
            a._cancel_local(a._live[claim.job_id])

        a._start = start_then_cancel
        job = await a.submit(params("cancelled at dispatch"), NO_DEADLINE)
        await until(lambda: _async(lambda: row(dsn, job.job_id)["state"] == "JOB_STATE_CANCELLED"))
        assert runner.started == []  # it never ran
        assert job.job_id not in a._live
        await a.shutdown(0)
        await a.close()

    asyncio.run(scenario())


def test_finish_early_requests_reach_the_replica_running_the_job_once_each(postgres):
    """INTERRUPT / SKIP asked of the replica that does not run the job: stored on the row and applied by the one that
    does (its on_finish hook: the servicer's in an orchestrator), by NOTIFY, or by its heartbeat when the notification
    is lost; asked of the owner itself, applied once (its own NOTIFY coming back changes nothing); a rerun on
    another replica starts with the request; a queued job gets nothing stored (CancelJob cancels it instead)."""
    dsn = database(postgres)
    interrupt, skip = orchestrator_pb2.CANCEL_MODE_INTERRUPT, orchestrator_pb2.CANCEL_MODE_SKIP

    async def scenario():
        runners = {name: HeldRunner(name) for name in ("a", "b")}
        applied: dict[str, list[tuple[str, int, int]]] = {"a": [], "b": []}

        def hook(name):
            return lambda job, mode, at_step: applied[name].append((job.job_id, mode, at_step))

        # a: one slot, a slow heartbeat (every 2 s), so that what arrives sooner came by NOTIFY.
        a = await replica(dsn, "a", runners["a"], max_running=1, on_finish=hook("a"))
        first = await a.submit(params("first"), NO_DEADLINE)
        await until(lambda: _async(lambda: runners["a"].started == [first.job_id]))
        queued = await a.submit(params("queued"), NO_DEADLINE)
        assert await a.request_finish(queued.job_id, interrupt, 0, wait_s=0) is FinishAnswer.NOT_RUNNING
        assert row(dsn, queued.job_id)["finish_requests"] == 0 and applied["a"] == []
        b = await replica(dsn, "b", runners["b"], max_running=1, on_finish=hook("b"))
        await until(lambda: _async(lambda: runners["b"].started == [queued.job_id]))

        began = time.monotonic()
        assert await b.request_finish(first.job_id, interrupt, 7, wait_s=0) is FinishAnswer.ASKED
        await until(lambda: _async(lambda: applied["a"]), timeout=5)
        assert time.monotonic() - began < 1.0 and applied == {"a": [(first.job_id, interrupt, 7)], "b": []}
        # Asked of a itself: applied at once, and once. A SKIP does not turn the INTERRUPT into a SKIP.
        assert await a.request_finish(first.job_id, skip, 0, wait_s=0) is FinishAnswer.ASKED
        assert applied["a"][1:] == [(first.job_id, interrupt, 0)]
        await asyncio.sleep(0.5)
        assert len(applied["a"]) == 2
        # a stops hearing notifications: its heartbeat still finds the next request.
        listen = next(task for task in a._tasks if task.get_name() == "jobs-listen")
        listen.cancel()
        await asyncio.sleep(0.1)
        began = time.monotonic()
        assert await b.request_finish(first.job_id, skip, 9, wait_s=0) is FinishAnswer.ASKED
        await until(lambda: _async(lambda: len(applied["a"]) == 3), timeout=5)
        assert time.monotonic() - began < a.heartbeat_s + 1.0
        assert applied["a"][2] == (first.job_id, interrupt, 9) and applied["b"] == []
        job = await b.get(first.job_id)
        assert (job.finish_mode, job.finish_at_step) == (interrupt, 9)
        stored = row(dsn, first.job_id)
        assert (stored["finish_mode"], stored["finish_at_step"], stored["finish_requests"]) == (interrupt, 9, 3)

        # a hands the job back (shutdown): b reruns it, with the request (the servicer applies it as the run sets up).
        await a.shutdown(0)
        runners["b"].release(queued.job_id)
        await until(lambda: _async(lambda: runners["b"].started == [queued.job_id, first.job_id]))
        rerun = b.live(first.job_id)
        assert (rerun.finish_mode, rerun.finish_at_step, rerun.finish_seen) == (interrupt, 9, 3)
        runners["b"].release(first.job_id)
        await until(lambda: _finished(dsn, 2))
        for queue in (a, b):
            await queue.shutdown(0)
            await queue.close()

    asyncio.run(scenario())


async def _collect(events):
    """(events, the error that ended them or None)."""
    seen = []
    try:
        async for event in events:
            seen.append(event)
    except Exception as error:  # noqa: BLE001 - the test looks at it
        return seen, error
    return seen, None


async def _collect_raising(events):
    return [event async for event in events]


async def _async(function):
    return function()


def _count(dsn: str, where: str) -> int:
    with psycopg.connect(dsn) as connection:
        return connection.execute(f"SELECT count(*) FROM latentwire_jobs WHERE {where}").fetchone()[0]


def _job_ids(dsn: str, where: str) -> set[str]:
    with psycopg.connect(dsn) as connection:
        return {row[0] for row in connection.execute(f"SELECT job_id FROM latentwire_jobs WHERE {where}")}


async def _running(dsn: str, n: int) -> bool:
    return _count(dsn, "state = 'JOB_STATE_RUNNING'") == n


async def _finished(dsn: str, n: int) -> bool:
    return _count(dsn, "state NOT IN ('JOB_STATE_QUEUED', 'JOB_STATE_RUNNING')") == n


# ---- two orchestrator processes on one database, over the session suite's stages -----------------------------

#: The orchestrators' --job-lease-s: a killed replica's jobs are taken over about this long after its last renewal.
LEASE_S = 3.0
PROMPT = "a lighthouse on a cliff at dusk"
#: Few steps, so that many jobs run in the two minutes.
STEPS = 4
SEEDS = range(8)


class Replicas:
    """Two orchestrator processes ("a", "b") on one PostgreSQL database and the suite's stages."""

    def __init__(self, dsn: str, services: dict, log_dir):
        self.dsn, self.services, self.log_dir = dsn, services, log_dir
        #: Replicas a test killed (-9): the others must exit cleanly on SIGTERM.
        self.killed: set[str] = set()
        self.channels = {name: grpc.insecure_channel(service.address) for name, service in services.items()}
        self.stubs = {name: orchestrator_pb2_grpc.OrchestratorServiceStub(c) for name, c in self.channels.items()}

    def runner_of(self, job_id: str) -> str | None:
        """Which replica holds the job's lease (its replica name carries the process id)."""
        owner = row(self.dsn, job_id)["lease_owner"] or ""
        return next((name for name, service in self.services.items()
                     if f"/{service.process.pid}/" in owner), None)

    def stop(self) -> dict[str, int]:
        for channel in self.channels.values():
            channel.close()
        codes = {}
        for name, service in self.services.items():
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        for name, service in self.services.items():
            codes[name] = service.process.wait(30)
        return codes


def start_orchestrator(suite, dsn: str, name: str, log_dir, denoiser: str):
    args = ["--port", "0", "--max-steps", "1000", "--jobs-db", dsn, "--job-lease-s", str(LEASE_S),
            "--max-concurrent-jobs", "2", "--grace-period-s", "2",
            "--text-encoder-address", suite.services["text_encoder"].address,
            "--denoiser-address", denoiser,
            "--vae-address", suite.services["vae"].address]
    return start_service(name, ORCHESTRATOR_MODULE, args, log_dir=log_dir)


@pytest.fixture(scope="module")
def replicas(suite, postgres, tiny_model, tmp_path_factory):
    dsn = database(postgres)
    log_dir = tmp_path_factory.mktemp("pg-orchestrators")
    # A denoiser without step-level batching: a job's image must equal its run alone to 1e-5, whichever jobs run
    # beside it and however often it is re-run after a takeover (batched forwards round differently: 1e-4).
    denoiser = start_service("denoiser-unbatched", "services.denoiser",
                             ["--port", "0", "--model", str(tiny_model), "--step-batch-max", "1"], log_dir=log_dir)
    wait_serving(denoiser.address, 120, "denoiser", denoiser.process)
    services = {name: start_orchestrator(suite, dsn, f"orchestrator-{name}", log_dir, denoiser.address)
                for name in ("a", "b")}
    for name, service in services.items():
        wait_serving(service.address, 60, name, service.process)
    running = Replicas(dsn, services, log_dir)
    yield running
    codes = running.stop()
    denoiser.process.terminate()
    assert denoiser.process.wait(30) == 0, f"the denoiser exited uncleanly; logs in {log_dir}"
    assert all(code == 0 for name, code in codes.items() if name not in running.killed), \
        f"unclean exit codes {codes}; logs in {log_dir}"


def build(seed: int, steps: int = STEPS, prompt: str = PROMPT):
    return Client.build_request(prompt, seed=seed, steps=steps, guidance_scale=3.0, cancel_on_disconnect=False)


def pixels(result: orchestrator_pb2.GenerateResult) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].png)).convert("RGB"), dtype=np.float32) / 255.0


@pytest.mark.slow
def test_get_watch_and_cancel_work_from_the_replica_not_running_the_job(replicas):
    stubs = replicas.stubs
    call = stubs["a"].Generate(build(3, steps=600, prompt="long"), timeout=120)
    job_id = next(call).accepted.job_id
    name = f"jobs/{job_id}"
    runner = _wait(lambda: replicas.runner_of(job_id))
    other = stubs["b" if runner == "a" else "a"]
    job = _wait(lambda: (j := other.GetJob(orchestrator_pb2.GetJobRequest(name=name), timeout=10).job).completed_steps
                >= 2 and j)
    assert job.state == State.JOB_STATE_RUNNING and job.total_steps == 600
    watched, watch_error = [], []

    def watch():
        try:
            for response in other.WatchJob(orchestrator_pb2.WatchJobRequest(name=name), timeout=60):
                watched.append(response.event)
        except grpc.RpcError as error:
            watch_error.append(error)

    watcher = threading.Thread(target=watch)
    watcher.start()
    _wait(lambda: sum(e.WhichOneof("event") == "step" for e in watched) >= 2)
    began = time.monotonic()
    cancelled = other.CancelJob(orchestrator_pb2.CancelJobRequest(name=name), timeout=10).job
    assert cancelled.state == State.JOB_STATE_CANCELLED and time.monotonic() - began < 2.0
    watcher.join(30)
    assert watched[0].accepted.job_id == job_id and watch_error[0].code() == grpc.StatusCode.CANCELLED
    with pytest.raises(grpc.RpcError) as ended:
        list(call)
    assert ended.value.code() == grpc.StatusCode.CANCELLED

    # A short job: its result through Generate on one replica and WatchJob on the other is the same image.
    events = list(stubs["a"].Generate(build(5, prompt="short"), timeout=120))
    job_id = events[0].accepted.job_id
    replayed = [r.event for r in stubs["b"].WatchJob(orchestrator_pb2.WatchJobRequest(name=f"jobs/{job_id}"),
                                                      timeout=60)]
    assert [e.WhichOneof("event") for e in replayed] == ["accepted", "result"]
    assert np.array_equal(pixels(replayed[-1].result), pixels(events[-1].result))
    listed = stubs["b"].ListJobs(orchestrator_pb2.ListJobsRequest(page_size=2), timeout=10).jobs
    assert [j.job_id for j in listed] == [job_id, name.removeprefix("jobs/")]


#: INTERRUPT across replicas: the job's steps and the step it is interrupted after. The request lands on the owner
#: within a few tens of milliseconds; the margin to AT_STEP covers a slow machine.
INTERRUPT_STEPS, AT_STEP = 60, 24


@pytest.mark.slow
def test_interrupt_sent_to_the_replica_not_running_the_job_stops_it_at_that_step(replicas, tiny_model):
    from test_interrupt import PROMPT as INTERRUPT_PROMPT, _reference_interrupted

    from latentwire.client.client import pixels_from_tensor

    stubs = replicas.stubs
    request = orchestrator_pb2.GenerateRequest(prompt=INTERRUPT_PROMPT, seed=21, num_inference_steps=INTERRUPT_STEPS,
                                               width=64, height=64, guidance_scale=7.5, include_pixels=True)
    call = stubs["a"].Generate(request, timeout=120)
    job_id = next(call).accepted.job_id
    name = f"jobs/{job_id}"
    runner = _wait(lambda: replicas.runner_of(job_id), timeout=30)
    other = "b" if runner == "a" else "a"
    steps_when_asked = row(replicas.dsn, job_id)["completed_steps"]
    answer = stubs[other].CancelJob(orchestrator_pb2.CancelJobRequest(
        name=name, mode=orchestrator_pb2.CANCEL_MODE_INTERRUPT, at_step=AT_STEP), timeout=30).job
    # The answer says what will happen (the job had up to 2 s to end): INTERRUPT after AT_STEP.
    assert (answer.finish_mode, answer.finish_at_step) == (orchestrator_pb2.CANCEL_MODE_INTERRUPT, AT_STEP)
    assert answer.state in (State.JOB_STATE_RUNNING, State.JOB_STATE_SUCCEEDED)
    events = list(call)
    result = events[-1].result
    assert result.finished_early and result.steps_run == AT_STEP, (result.steps_run, steps_when_asked)
    if runner == "a":  # Generate's stream on the owner has every event
        assert any(e.finish_requested.at_step == AT_STEP for e in events if e.HasField("finish_requested"))
        assert [e.step.step for e in events if e.HasField("step")][-1] == AT_STEP
    expected = _reference_interrupted(tiny_model, seed=21, steps=INTERRUPT_STEPS, after=AT_STEP)
    assert float(np.abs(pixels_from_tensor(result.pixels) - expected).max()) <= 1e-5
    # Both replicas report it: SUCCEEDED, asked to finish after AT_STEP, AT_STEP steps run.
    for stub in stubs.values():
        job = stub.GetJob(orchestrator_pb2.GetJobRequest(name=name), timeout=10).job
        assert job.state == State.JOB_STATE_SUCCEEDED
        assert (job.finish_mode, job.finish_at_step) == (orchestrator_pb2.CANCEL_MODE_INTERRUPT, AT_STEP)
        assert job.result.finished_early and job.result.steps_run == AT_STEP


@pytest.mark.slow
def test_two_orchestrators_16_clients_kill_one_every_job_finishes_once_with_its_image(replicas, suite):
    # The image each seed makes, from the suite's own orchestrator (SQLite, no replicas).
    with grpc.insecure_channel(suite.address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        references = {seed: pixels(list(stub.Generate(build(seed), timeout=120))[-1].result) for seed in SEEDS}
    stubs = replicas.stubs
    run_s, kill_after_s = 120.0, 40.0
    results: dict[str, list[np.ndarray]] = defaultdict(list)
    accepted: dict[str, int] = {}
    problems: list[str] = []
    killed = threading.Event()
    lock = threading.Lock()
    began = time.monotonic()

    def reattach(job_id: str) -> None:
        """After "a" died: follow the job on "b" to its result."""
        end = time.monotonic() + 90
        while time.monotonic() < end:
            try:
                for response in stubs["b"].WatchJob(orchestrator_pb2.WatchJobRequest(name=f"jobs/{job_id}"),
                                                     timeout=90):
                    if response.event.WhichOneof("event") == "result":
                        with lock:
                            results[job_id].append(pixels(response.event.result))
                return
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    with lock:
                        problems.append(f"WatchJob {job_id} on b: {error.code().name} {error.details()}")
                    return
                time.sleep(0.5)
        problems.append(f"job {job_id} never finished")

    def client(index: int) -> None:
        n = 0
        while time.monotonic() - began < run_s:
            seed = SEEDS[(index + n) % len(SEEDS)]
            n += 1
            target = "b" if killed.is_set() or index % 2 else "a"
            job_id = None
            try:
                for event in stubs[target].Generate(build(seed), timeout=300):
                    kind = event.WhichOneof("event")
                    if kind == "accepted":
                        job_id = event.accepted.job_id
                        with lock:
                            accepted[job_id] = seed
                    elif kind == "result":
                        with lock:
                            results[job_id].append(pixels(event.result))
            except grpc.RpcError as error:
                if target == "b" or not killed.is_set() or error.code() != grpc.StatusCode.UNAVAILABLE:
                    with lock:
                        problems.append(f"Generate on {target}: {error.code().name} {error.details()}")
                elif job_id is not None:
                    reattach(job_id)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(16)]
    for thread in threads:
        thread.start()
    time.sleep(kill_after_s)
    # Kill "a" while it runs jobs (so that some are taken over), not between two: stopped first, so that the jobs
    # found running under its lease are still its when it dies (a job could end between a look and the kill).
    a = replicas.services["a"]
    running_on_a = f"state = 'JOB_STATE_RUNNING' AND lease_owner LIKE '%/{a.process.pid}/%'"
    held: set[str] = set()
    for _ in range(20):
        _wait(lambda: _count(replicas.dsn, running_on_a))
        os.kill(a.process.pid, signal.SIGSTOP)
        time.sleep(0.2)  # a finish it sent just before it stopped lands first
        held = _job_ids(replicas.dsn, running_on_a)
        if held:
            break
        os.kill(a.process.pid, signal.SIGCONT)
    assert held, "replica a never held a running job when stopped"
    killed.set()
    replicas.killed.add("a")
    killed_at = time.time()
    os.kill(a.process.pid, signal.SIGKILL)
    a.process.wait(10)
    for thread in threads:
        thread.join(run_s + 120 - (time.monotonic() - began))
    assert not any(thread.is_alive() for thread in threads)
    assert not problems, problems[:5]

    # Every accepted job reached its client once, with the image its seed makes.
    assert len(accepted) >= 40, f"only {len(accepted)} jobs in {run_s:.0f} s"
    for job_id, seed in accepted.items():
        assert len(results[job_id]) == 1, f"job {job_id}: {len(results[job_id])} results"
        assert np.abs(results[job_id][0] - references[seed]).max() <= 1e-5
    # The database agrees: every job of the run (those a client never heard of included) succeeded once, with
    # that image; the jobs "a" ran when it died were taken over by "b".
    with psycopg.connect(replicas.dsn) as connection:
        rows = connection.execute(
            "SELECT job_id, state, seed, result, attempts, finished_by, start_time FROM latentwire_jobs "
            "WHERE prompt = %s",
            (PROMPT,)).fetchall()
    assert set(accepted) <= {r[0] for r in rows}
    assert Counter(r[1] for r in rows) == {"JOB_STATE_SUCCEEDED": len(rows)}
    for job_id, _, seed, result, _, _, _ in rows:
        assert np.abs(pixels(orchestrator_pb2.GenerateResult.FromString(result)) - references[int(seed)]).max() <= 1e-5
    # A job last claimed after the kill was a's, taken over by b. Before the kill, a replica whose renewals ran
    # late on a loaded machine (the lease is 3 s here) may lose a job to the other one: legitimate, and fenced
    # (it still finished once, with its image, as checked above), so counted, not failed.
    b_pid = replicas.services["b"].process.pid
    taken_over = [r for r in rows if r[4] > 1 and r[6] >= killed_at]
    earlier = [r for r in rows if r[4] > 1 and r[6] < killed_at]
    assert taken_over, "no job of a's was taken over after it was killed"
    missed = held - {r[0] for r in taken_over}
    assert not missed, f"jobs a held when it was killed, not taken over after it: {missed}"
    assert all(f"/{b_pid}/" in r[5] for r in taken_over), [(r[0], r[4], r[5]) for r in taken_over]
    # Taken over once the lease ran out: LEASE_S after a's last renewal, plus the dispatcher's look (<= 1 s).
    takeover_s = max(r[6] for r in taken_over) - killed_at
    assert takeover_s <= LEASE_S + 2.0
    print(f"\n{len(rows)} jobs in {run_s:.0f} s ({len(accepted)} acknowledged to clients), "
          f"{len(taken_over)} taken over by b {takeover_s:.1f} s after a was killed, "
          f"{len(earlier)} changed replica before the kill (a lease renewed late)")


def _wait(predicate, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")

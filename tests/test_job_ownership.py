"""Job ownership: a job belongs to the principal that created it (issue 11, finding 2).

GetJob, ListJobs, WatchJob and CancelJob see only the caller's own jobs unless the caller is an
admin; another principal's job answers NOT_FOUND word for word as a job that does not exist. The
first half drives the job queue in-process on a real SQLite store (ownership filters, pagination
over the filtered set, migration of a store written before jobs had owners, recovery keeping the
owner); the second half runs a real suite on the tiny model with a tokens file naming principals.
"""
from __future__ import annotations

import asyncio
import sqlite3
import uuid

import grpc
import pytest

from latentwire.client import Client, LatentwireError
from latentwire.common.v1 import status_pb2
from latentwire.orchestrator.v1 import orchestrator_pb2
from services.orchestrator.config import build_parser, settings_from_flags
from services.orchestrator.deadline import NO_DEADLINE
from services.orchestrator.jobs import LEGACY_OWNER, JobQueue, JobStore, LiveJob
from services.orchestrator.request import resolve_request
from services.runtime.errors import Cancelled, NotFound

State = status_pb2.JobState
SETTINGS = settings_from_flags(build_parser().parse_args(
    ["--text-encoder-address", "te:1", "--denoiser-address", "dn:2", "--vae-address", "vae:3"]))


def params(prompt: str = "p"):
    return resolve_request(orchestrator_pb2.GenerateRequest(prompt=prompt), SETTINGS)


class HeldRunner:
    """The queue's runner: each job runs until the test releases it (then succeeds) or it is cancelled."""

    def __init__(self):
        self._release: dict[str, asyncio.Event] = {}

    def release(self, job_id: str) -> None:
        self._release.setdefault(job_id, asyncio.Event()).set()

    async def __call__(self, job: LiveJob):
        await self._release.setdefault(job.job_id, asyncio.Event()).wait()
        yield orchestrator_pb2.GenerateResponse(result=orchestrator_pb2.GenerateResult(seed=job.seed))


async def collect(events) -> list:
    return [event async for event in events]


async def running(queue: JobQueue, job_id: str) -> None:
    """Until the dispatcher has started the job (a few turns of the event loop)."""
    async with asyncio.timeout(10):
        while queue.get(job_id).state != State.JOB_STATE_RUNNING:
            await asyncio.sleep(0)


def not_found_message(action) -> str:
    with pytest.raises(NotFound) as raised:
        action()
    assert raised.value.reason == "JOB_NOT_FOUND"
    return raised.value.message


# ---- the queue and the store, in-process ---------------------------------------------------------------------


def test_each_principal_reads_and_cancels_only_its_own_jobs():
    async def scenario():
        runner = HeldRunner()
        queue = JobQueue(JobStore(None), runner, max_running=1, max_queued=20)
        await queue.start(lambda request: resolve_request(request, SETTINGS))
        running_job = queue.submit(params("alice running"), NO_DEADLINE, owner="alice")
        queued = queue.submit(params("alice queued"), NO_DEADLINE, owner="alice")
        bobs = queue.submit(params("bob's"), NO_DEADLINE, owner="bob")
        await running(queue, running_job.job_id)

        for job in (running_job, queued):
            missing = "f" * len(job.job_id)  # an id of the same length that no job has
            # Bob gets exactly what a job that does not exist gets.
            for action in (lambda j: queue.get(j, owner="bob"), lambda j: queue.cancel(j, owner="bob")):
                assert not_found_message(lambda: action(job.job_id)).replace(job.job_id, missing) \
                    == not_found_message(lambda: action(missing))
            with pytest.raises(NotFound):
                await collect(queue.watch(job.job_id, owner="bob"))
            with pytest.raises(NotFound):
                await queue.cancel_and_wait(job.job_id, owner="bob")
        # ... and his attempts changed nothing.
        assert queue.get(running_job.job_id, owner="alice").state == State.JOB_STATE_RUNNING
        assert queue.get(queued.job_id, owner="alice").state == State.JOB_STATE_QUEUED

        # Alice sees and cancels her own; an admin (owner None) sees and cancels anyone's.
        assert queue.cancel(queued.job_id, owner="alice").state == State.JOB_STATE_CANCELLED
        assert queue.get(bobs.job_id).prompt == "bob's"
        cancelled = await queue.cancel_and_wait(running_job.job_id)
        assert cancelled.state == State.JOB_STATE_CANCELLED
        # A finished job is just as hidden: bob cannot watch alice's stored outcome.
        with pytest.raises(NotFound):
            await collect(queue.watch(running_job.job_id, owner="bob"))
        with pytest.raises(Cancelled):
            await collect(queue.watch(running_job.job_id, owner="alice"))
        runner.release(bobs.job_id)
        events = await collect(queue.watch(bobs.job_id, owner="bob"))
        assert events[-1].WhichOneof("event") == "result"
        await queue.shutdown(0)

    asyncio.run(scenario())


def test_list_jobs_pages_through_the_callers_jobs_only():
    async def scenario():
        queue = JobQueue(JobStore(None), HeldRunner(), max_running=1, max_queued=50)
        await queue.start(lambda request: resolve_request(request, SETTINGS))
        owners = ["alice", "bob", "bob", "carol", "alice", "bob", "alice", "alice", "bob", "alice"]
        jobs = [queue.submit(params(f"{owner} {i}"), NO_DEADLINE, owner=owner) for i, owner in enumerate(owners)]
        await running(queue, jobs[0].job_id)

        def pages(owner, size):
            seen, token = [], ""
            while True:
                page = queue.list(size, token, State.JOB_STATE_UNSPECIFIED, owner=owner)
                assert len(page.jobs) <= size
                seen += [job.job_id for job in page.jobs]
                if not page.next_page_token:
                    return seen
                token = page.next_page_token

        newest_first = [job.job_id for job in reversed(jobs)]
        for owner in ("alice", "bob", "carol"):
            own = [job_id for job_id, o in zip(newest_first, reversed(owners)) if o == owner]
            for size in (1, 2, 3, 100):
                assert pages(owner, size) == own, (owner, size)
        assert pages("dave", 2) == []
        assert pages(None, 4) == newest_first  # an admin sees every job
        # No prompt of another principal's job on any page of bob's.
        listed = queue.list(100, "", State.JOB_STATE_UNSPECIFIED, owner="bob").jobs
        assert {job.prompt.split()[0] for job in listed} == {"bob"}
        # The state filter combines with the owner filter.
        queued = queue.list(100, "", State.JOB_STATE_QUEUED, owner="alice").jobs
        assert [job.job_id for job in queued] == [j for j in pages("alice", 100) if j != jobs[0].job_id]
        await queue.shutdown(0)

    asyncio.run(scenario())


# The job table as orchestrators wrote it before jobs had owners.
_OLD_SCHEMA = """
CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, state TEXT NOT NULL, priority INTEGER NOT NULL,
    request BLOB NOT NULL, seed TEXT NOT NULL, model TEXT NOT NULL, prompt TEXT NOT NULL, create_time REAL NOT NULL,
    start_time REAL, end_time REAL, deadline REAL, completed_steps INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, result BLOB, error_code INTEGER,
    error_message TEXT, error_reason TEXT
);
"""


def test_an_older_store_migrates_and_its_jobs_belong_to_the_legacy_owner(tmp_path):
    database = tmp_path / "jobs.db"
    old = sqlite3.connect(database)
    old.executescript(_OLD_SCHEMA)
    request = orchestrator_pb2.GenerateRequest(prompt="old queued").SerializeToString()
    old.execute("INSERT INTO jobs (job_id, seq, state, priority, request, seed, model, prompt, create_time) "
                "VALUES ('old-queued', 1, 'JOB_STATE_QUEUED', 0, ?, '7', '', 'old queued', 0)", (request,))
    old.execute("INSERT INTO jobs (job_id, seq, state, priority, request, seed, model, prompt, create_time) "
                "VALUES ('old-done', 2, 'JOB_STATE_SUCCEEDED', 0, ?, '7', '', 'old done', 0)", (request,))
    old.commit()
    old.close()

    async def run(owner_of_new: str):
        runner = HeldRunner()
        queue = JobQueue(JobStore(database), runner, max_running=1, max_queued=10)
        recovered = await queue.start(lambda r: resolve_request(r, SETTINGS))
        new = queue.submit(params("new"), NO_DEADLINE, owner=owner_of_new)
        listed = {owner: [job.job_id for job in queue.list(0, "", 0, owner=owner).jobs]
                  for owner in (LEGACY_OWNER, "alice")}
        for job_id in ("old-queued", new.job_id):
            runner.release(job_id)
        with pytest.raises(NotFound):
            queue.get("old-done", owner="alice")
        await collect(queue.watch("old-queued", owner=LEGACY_OWNER))  # recovered as the legacy owner's job
        await queue.shutdown(0)
        queue.store.close()
        return recovered, listed, new.job_id

    recovered, listed, new_id = asyncio.run(run("alice"))
    assert recovered == 1
    assert listed == {LEGACY_OWNER: ["old-done", "old-queued"], "alice": [new_id]}
    # Opening the migrated store again changes nothing (the migration runs once).
    store = JobStore(database)
    assert store.row(new_id, with_result=False, owner="alice") is not None
    assert store.row("old-done", with_result=False, owner=LEGACY_OWNER) is not None
    store.close()


def test_a_restart_keeps_each_jobs_owner(tmp_path):
    database = tmp_path / "jobs.db"

    async def first():
        queue = JobQueue(JobStore(database), HeldRunner(), max_running=1, max_queued=10)
        await queue.start(lambda r: resolve_request(r, SETTINGS))
        ids = [queue.submit(params(owner), NO_DEADLINE, owner=owner).job_id for owner in ("alice", "bob")]
        await running(queue, ids[0])
        await queue.shutdown(0)  # alice's was running, bob's queued: both left for the next start
        queue.store.close()
        return ids

    alice, bob = asyncio.run(first())

    async def second():
        runner = HeldRunner()
        queue = JobQueue(JobStore(database), runner, max_running=1, max_queued=10)
        assert await queue.start(lambda r: resolve_request(r, SETTINGS)) == 2
        with pytest.raises(NotFound):
            queue.cancel(alice, owner="bob")
        with pytest.raises(NotFound):
            await collect(queue.watch(bob, owner="alice"))
        assert queue.cancel(bob, owner="bob").state == State.JOB_STATE_CANCELLED
        runner.release(alice)
        assert (await collect(queue.watch(alice, owner="alice")))[-1].WhichOneof("event") == "result"
        await queue.shutdown(0)
        queue.store.close()

    asyncio.run(second())


# ---- a real suite: tokens that name principals ----------------------------------------------------------------

TOKENS = {"alice": "tok-alice-3c1d", "bob": "tok-bob-8e2a", "admin": "tok-admin-5b7f", "plain": "tok-plain-06d4"}


@pytest.fixture(scope="module")
def owned_suite(tiny_model, tmp_path_factory):
    """Text encoder, denoiser, VAE and an orchestrator running one job at a time, whose tokens file names alice,
    bob and an admin, plus one line without a principal. Plaintext: tokens need no TLS to name principals."""
    from services.suite.launcher import start_suite

    root = tmp_path_factory.mktemp("owned")
    tokens = root / "tokens.txt"
    tokens.write_text(f"{TOKENS['alice']} generate principal=alice\n{TOKENS['bob']} generate principal=bob\n"
                      f"{TOKENS['admin']} admin principal=ops\n{TOKENS['plain']} generate  # no principal\n")
    running = start_suite(
        tiny_model, ports=dict.fromkeys(("orchestrator", "text_encoder", "denoiser", "vae"), 0), log_dir=root / "logs",
        auth_tokens_file=tokens, extra_args={"orchestrator": ["--max-concurrent-jobs", "1"]})
    yield running
    codes = running.stop()
    assert all(code == 0 for code in codes.values()), f"unclean exit codes {codes}; logs in {root / 'logs'}"


@pytest.fixture(scope="module")
def clients(owned_suite):
    opened = {who: Client(owned_suite.address, timeout=60, token=token) for who, token in TOKENS.items()}
    yield opened
    for client in opened.values():
        client.close()


def refused(call) -> LatentwireError:
    with pytest.raises(LatentwireError) as raised:
        result = call()
        if not isinstance(result, orchestrator_pb2.Job):
            list(result)  # a stream fails on its first read
    return raised.value


def test_another_principals_job_answers_not_found_and_is_not_listed(clients):
    alice, bob, admin, plain = (clients[who] for who in ("alice", "bob", "admin", "plain"))
    job_id = alice.generate("alice's secret lighthouse", steps=2, seed=1).job_id
    missing = uuid.uuid4().hex
    for action in (bob.get_job, bob.watch_job, bob.cancel_job):
        error, nothing = refused(lambda: action(job_id)), refused(lambda: action(missing))
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")
        # Word for word what a job that does not exist gets: nothing tells bob that it exists.
        assert (error.code, error.reason, error.message.replace(job_id, missing)) \
            == (nothing.code, nothing.reason, nothing.message)
    bobs = bob.list_jobs(page_size=1000).jobs
    assert job_id not in {job.job_id for job in bobs}
    assert not any("secret" in job.prompt for job in bobs)

    assert alice.get_job(job_id).state == State.JOB_STATE_SUCCEEDED
    assert [e.WhichOneof("event") for e in alice.watch_job(job_id)][-1] == "result"
    assert job_id in {job.job_id for job in alice.list_jobs().jobs}
    # The admin sees every job.
    assert admin.get_job(job_id).prompt == "alice's secret lighthouse"
    assert admin.get_job(job_id).owner == "alice"  # the admin sees whose job it is
    assert job_id in {job.job_id for job in admin.list_jobs(page_size=1000).jobs}

    # A token line without principal= works and owns its jobs (as token:<digest>).
    own = plain.generate("an unnamed token's cat", steps=2, seed=2).job_id
    assert plain.get_job(own).state == State.JOB_STATE_SUCCEEDED
    assert [job.job_id for job in plain.list_jobs().jobs] == [own]
    assert refused(lambda: alice.get_job(own)).code == grpc.StatusCode.NOT_FOUND
    assert refused(lambda: plain.get_job(job_id)).code == grpc.StatusCode.NOT_FOUND


def test_only_the_owner_or_an_admin_cancels_a_job(clients):
    alice, bob, admin = clients["alice"], clients["bob"], clients["admin"]
    # Alice's long job runs (one slot) and her second waits behind it; both outlive her calls.
    ids = []
    for steps in (150, 2):
        call = alice.stream(Client.build_request("alice's long job", steps=steps, cancel_on_disconnect=False))
        ids.append(next(call).accepted.job_id)
        call.cancel()
    long_job, waiting = ids
    for job_id in ids:
        error = refused(lambda: bob.cancel_job(job_id))
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")
    assert alice.get_job(waiting).state == State.JOB_STATE_QUEUED  # bob's attempts changed nothing
    assert alice.get_job(long_job).state == State.JOB_STATE_RUNNING

    assert admin.cancel_job(waiting).state == State.JOB_STATE_CANCELLED
    admin.cancel_job(long_job)
    with pytest.raises(LatentwireError) as raised:
        list(alice.watch_job(long_job))  # to its end
    assert raised.value.code == grpc.StatusCode.CANCELLED
    assert alice.get_job(long_job).state == State.JOB_STATE_CANCELLED

"""Generate requests are jobs: ids, priorities, a bounded queue, GetJob/ListJobs/CancelJob/WatchJob, and a
SQLite job store that survives kill -9 of the orchestrator."""
from __future__ import annotations

import os
import signal
import threading

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from latentwire.client import Client, LatentwireError
from latentwire.common.v1 import status_pb2
from latentwire.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from services.suite.launcher import ORCHESTRATOR_MODULE, start_service, wait_serving

from job_helpers import get, log_tail, stop, wait_for

#: Starts service processes: left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow

State = status_pb2.JobState


def start_orchestrator(suite, tmp_path, *extra: str, name: str = "orchestrator-jobs"):
    args = ["--port", "0", "--max-steps", "1000",
            "--text-encoder-address", suite.services["text_encoder"].address,
            "--denoiser-address", suite.services["denoiser"].address,
            "--vae-address", suite.services["vae"].address, *extra]
    service = start_service(name, ORCHESTRATOR_MODULE, args, log_dir=tmp_path / "logs")
    wait_serving(service.address, 60, name, service.process)
    return service



def submit(stub, prompt: str, *, steps: int, priority: int = 0, seed: int = 1, **settings):
    """Start a Generate that keeps running when this caller leaves; return (call, job_id, first events)."""
    request = Client.build_request(prompt, seed=seed, steps=steps, priority=priority, cancel_on_disconnect=False,
                                   **settings)
    call = stub.Generate(request, timeout=300)
    first = next(call)
    assert first.WhichOneof("event") == "accepted"
    return call, first.accepted.job_id




def test_queue_priorities_positions_and_limits(suite, tmp_path):
    orchestrator = start_orchestrator(suite, tmp_path, "--max-concurrent-jobs", "1", "--max-queued-jobs", "2")
    try:
        with grpc.insecure_channel(orchestrator.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            long_call, long_id = submit(stub, "long", steps=600)
            wait_for(lambda: get(stub, long_id).completed_steps >= 2)
            low_call, low_id = submit(stub, "low", steps=3, priority=0)
            low_events = []
            reader = threading.Thread(target=lambda: low_events.extend(low_call), daemon=True)
            reader.start()
            high_call, high_id = submit(stub, "high", steps=3, priority=10)
            # The high-priority job overtakes: it waits first, the low one second.
            wait_for(lambda: get(stub, high_id).queue_position == 1 and get(stub, low_id).queue_position == 2)
            # Queue positions reach the waiting caller as progress events.
            wait_for(lambda: [e.queued.position for e in low_events if e.WhichOneof("event") == "queued"][-1:] == [2])

            # A full queue refuses with RESOURCE_EXHAUSTED and a retry hint.
            with pytest.raises(grpc.RpcError) as raised:
                next(stub.Generate(Client.build_request("one too many", steps=3), timeout=30))
            error = raised.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry in about" in error.details()
            details = rpc_status.from_call(error).details
            retry = [d for d in details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
            assert retry, "no RetryInfo detail"
            info = error_details_pb2.RetryInfo()
            retry[0].Unpack(info)
            assert info.retry_delay.ToTimedelta().total_seconds() >= 1

            # Cancelling the running job lets the queue move, highest priority first.
            # CancelJob waits up to 2 s for the running job to stop at its next step; on a loaded machine the step
            # may outlast that, and the answer is still RUNNING: the job is CANCELLED soon after either way.
            cancelled = stub.CancelJob(orchestrator_pb2.CancelJobRequest(name=f"jobs/{long_id}"), timeout=30).job
            assert cancelled.state in (State.JOB_STATE_CANCELLED, State.JOB_STATE_RUNNING)
            wait_for(lambda: get(stub, long_id).state == State.JOB_STATE_CANCELLED)
            assert 0 < get(stub, long_id).completed_steps < 600
            with pytest.raises(grpc.RpcError) as raised:
                list(long_call)
            assert raised.value.code() == grpc.StatusCode.CANCELLED
            assert list(high_call)[-1].WhichOneof("event") == "result"
            reader.join(120)
            assert low_events[-1].WhichOneof("event") == "result"
            high, low = get(stub, high_id), get(stub, low_id)
            assert high.state == low.state == State.JOB_STATE_SUCCEEDED
            assert high.start_time.ToNanoseconds() < low.start_time.ToNanoseconds()
            assert len(high.result.images) == 1 and high.result.images[0].png.startswith(b"\x89PNG")

            # ListJobs pages newest first.
            first = stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=2), timeout=10)
            assert [j.job_id for j in first.jobs] == [high_id, low_id] and first.next_page_token
            second = stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=2, page_token=first.next_page_token),
                                   timeout=10)
            assert [j.job_id for j in second.jobs] == [long_id] and not second.next_page_token
            only_cancelled = stub.ListJobs(orchestrator_pb2.ListJobsRequest(state=State.JOB_STATE_CANCELLED), timeout=10)
            assert [j.job_id for j in only_cancelled.jobs] == [long_id]

            # Bad names and tokens are refused clearly.
            for call, code in (
                (lambda: stub.GetJob(orchestrator_pb2.GetJobRequest(name="jobs/nope"), timeout=10), grpc.StatusCode.NOT_FOUND),
                (lambda: stub.GetJob(orchestrator_pb2.GetJobRequest(name="nope"), timeout=10), grpc.StatusCode.INVALID_ARGUMENT),
                (lambda: stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_token="xyz"), timeout=10), grpc.StatusCode.INVALID_ARGUMENT),
                (lambda: next(stub.Generate(Client.build_request("p", priority=1000), timeout=10)), grpc.StatusCode.INVALID_ARGUMENT),
            ):
                with pytest.raises(grpc.RpcError) as raised:
                    call()
                assert raised.value.code() == code
    finally:
        stop(orchestrator)


def test_watch_job_reattaches_after_a_disconnect(suite, tmp_path):
    orchestrator = start_orchestrator(suite, tmp_path, name="orchestrator-watch")
    try:
        with Client(orchestrator.address, timeout=120) as client:
            reference = client.generate("watched", seed=12, steps=40, include_pixels=True)
            request = client.build_request("watched", seed=12, steps=40, include_pixels=True,
                                           cancel_on_disconnect=False)
            call = client.stream(request)
            job_id = ""
            for event in call:
                if event.WhichOneof("event") == "accepted":
                    job_id = event.accepted.job_id
                if event.WhichOneof("event") == "step" and event.step.step >= 3:
                    break
            call.cancel()  # the caller goes away; the job does not
            events = list(client.watch_job(job_id))
            kinds = [e.WhichOneof("event") for e in events]
            assert kinds[0] == "accepted" and events[0].accepted.job_id == job_id and kinds[-1] == "result"
            steps = [e.step.step for e in events if e.WhichOneof("event") == "step"]
            assert steps and steps[-1] == 40
            pixels = np.frombuffer(events[-1].result.pixels.raw_contents, np.float32)
            assert np.array_equal(pixels, reference.pixels.ravel())
            # A finished job can be watched too: accepted, then its stored result.
            again = list(client.watch_job(job_id))
            assert [e.WhichOneof("event") for e in again] == ["accepted", "result"]
            with pytest.raises(LatentwireError) as raised:
                list(client.watch_job("unknown"))
            assert raised.value.code == grpc.StatusCode.NOT_FOUND
        # The CLI reads the same jobs.
        import subprocess
        import sys

        cli = [sys.executable, "-m", "latentwire.cli.main", "jobs"]
        listed = subprocess.run([*cli, "list", "--server", orchestrator.address], capture_output=True, text=True,
                                timeout=60)
        assert listed.returncode == 0 and job_id in listed.stdout and "succeeded" in listed.stdout
        shown = subprocess.run([*cli, "show", job_id, "-o", str(tmp_path / "job.png"), "--server",
                                orchestrator.address], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and (tmp_path / "job.png").read_bytes().startswith(b"\x89PNG")
    finally:
        stop(orchestrator)


def test_kill_9_orchestrator_loses_no_accepted_job(suite, tmp_path):
    """kill -9 with one job running and two queued: after the restart all three complete, each with the
    image an uninterrupted run makes."""
    database = tmp_path / "jobs.db"
    flags = ("--jobs-db", str(database), "--max-concurrent-jobs", "1")
    orchestrator = start_orchestrator(suite, tmp_path, *flags, name="orchestrator-doomed")
    settings = [dict(seed=31, steps=200), dict(seed=32, steps=4), dict(seed=33, steps=5)]
    with grpc.insecure_channel(orchestrator.address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        ids = [submit(stub, "survivor", include_pixels=True, **s)[1] for s in settings]
        wait_for(lambda: get(stub, ids[0]).completed_steps >= 3)
        assert get(stub, ids[2]).state == State.JOB_STATE_QUEUED
    os.kill(orchestrator.process.pid, signal.SIGKILL)
    orchestrator.process.wait(10)

    restarted = start_orchestrator(suite, tmp_path, *flags, name="orchestrator-restarted")
    try:
        with Client(restarted.address, timeout=300) as client:
            for job_id, s in zip(ids, settings):
                events = list(client.watch_job(job_id))
                assert events[-1].WhichOneof("event") == "result", job_id
                job = client.get_job(job_id)
                assert job.state == State.JOB_STATE_SUCCEEDED
                expected = client.generate("survivor", include_pixels=True, **s)
                got = np.frombuffer(job.result.pixels.raw_contents, np.float32)
                assert np.array_equal(got, expected.pixels.ravel()), job_id
            assert client.get_job(ids[0]).attempts == 2  # it was running: it ran again
            assert client.get_job(ids[1]).attempts == 1
    finally:
        stop(restarted)


def test_sigterm_hands_queued_jobs_to_the_next_start(suite, tmp_path):
    database = tmp_path / "jobs.db"
    flags = ("--jobs-db", str(database), "--max-concurrent-jobs", "1", "--grace-period-s", "2")
    orchestrator = start_orchestrator(suite, tmp_path, *flags, name="orchestrator-term")
    with grpc.insecure_channel(orchestrator.address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        running = submit(stub, "running", steps=900)[1]
        queued = submit(stub, "queued", steps=3)[1]
        wait_for(lambda: get(stub, running).completed_steps >= 1)
    orchestrator.process.send_signal(signal.SIGTERM)
    assert orchestrator.process.wait(60) == 0
    restarted = start_orchestrator(suite, tmp_path, *flags, name="orchestrator-term-2")
    try:
        with Client(restarted.address, timeout=300) as client:
            # The job that was running was handed over: it runs again (first, it is older).
            assert client.get_job(running).state in (State.JOB_STATE_QUEUED, State.JOB_STATE_RUNNING)
            # CANCELLED, or still RUNNING when the job did not stop within CancelJob's 2 s (a loaded machine).
            assert client.cancel_job(running).state in (State.JOB_STATE_CANCELLED, State.JOB_STATE_RUNNING)
            wait_for(lambda: client.get_job(running).state == State.JOB_STATE_CANCELLED,
                     describe=lambda: f"{client.get_job(running)}\n{log_tail(restarted)}")
            assert [e.WhichOneof("event") for e in client.watch_job(queued)][-1] == "result"
    finally:
        stop(restarted)

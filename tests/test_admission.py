"""The orchestrator admits as many jobs as its stage replicas run together (--admission stages, the default): each
replica reports its --max-concurrent-jobs in GetStatus, the orchestrator runs up to the smallest stage's total (at most
its own --max-concurrent-jobs) and queues the rest, instead of a fixed slot count.

The session suite's text encoder and VAE (4 jobs each) with a denoiser of this module's own that runs 2 at once: the
orchestrator runs 2 jobs and queues the third."""
from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest

from latentwire.common.v1 import status_pb2, status_pb2_grpc
from latentwire.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from latentwire.client import Client
from services.suite.launcher import ORCHESTRATOR_MODULE, start_service, wait_serving

from job_helpers import get, stop, wait_for

State = status_pb2.JobState



def submit(stub, prompt: str, *, steps: int, seed: int) -> str:
    """Start a Generate that keeps running when this caller leaves; its job id."""
    call = stub.Generate(Client.build_request(prompt, seed=seed, steps=steps, cancel_on_disconnect=False), timeout=300)
    first = next(call)
    assert first.WhichOneof("event") == "accepted"
    call.cancel()
    return first.accepted.job_id




def _capacity(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        status = status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest(), timeout=30)
    return status.max_concurrent_jobs


def test_stages_report_their_capacity(suite):
    assert {name: _capacity(suite.services[name].address) for name in ("text_encoder", "denoiser", "vae")} == \
        {"text_encoder": 4, "denoiser": 4, "vae": 4}


def test_the_orchestrator_runs_as_many_jobs_as_the_smallest_stage(suite, tiny_model, tmp_path):
    logs = tmp_path / "logs"
    denoiser = start_service("denoiser-two", "services.denoiser",
                             ["--port", "0", "--model", str(tiny_model), "--max-concurrent-jobs", "2"], log_dir=logs)
    orchestrator = None
    try:
        wait_serving(denoiser.address, 120, "denoiser", denoiser.process)
        assert _capacity(denoiser.address) == 2
        orchestrator = start_service("orchestrator-admission", ORCHESTRATOR_MODULE, [
            "--port", "0", "--max-steps", "1000",
            "--text-encoder-address", suite.services["text_encoder"].address,
            "--denoiser-address", denoiser.address, "--vae-address", suite.services["vae"].address], log_dir=logs)
        wait_serving(orchestrator.address, 60, "orchestrator", orchestrator.process)
        log = logs / "orchestrator-admission.log"
        # The orchestrator's own --max-concurrent-jobs is 64 by default: the stages decide.
        wait_for(lambda: "running up to 2 jobs at once" in log.read_text(), timeout=30)
        with grpc.insecure_channel(orchestrator.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            jobs = [submit(stub, f"job {n}", steps=600, seed=n) for n in range(3)]
            wait_for(lambda: sorted(get(stub, job).state for job in jobs) ==
                     [State.JOB_STATE_QUEUED, State.JOB_STATE_RUNNING, State.JOB_STATE_RUNNING])
            time.sleep(1.0)  # and it stays so: the third waits for a free denoiser slot instead of being refused
            states = [get(stub, job) for job in jobs]
            assert sorted(job.state for job in states) == \
                [State.JOB_STATE_QUEUED, State.JOB_STATE_RUNNING, State.JOB_STATE_RUNNING]
            assert [job.queue_position for job in states if job.state == State.JOB_STATE_QUEUED] == [1]
            assert all(job.attempts <= 1 and not job.HasField("error") for job in states)
            for job in jobs:
                stub.CancelJob(orchestrator_pb2.CancelJobRequest(name=f"jobs/{job}"), timeout=30)
            wait_for(lambda: all(get(stub, job).state == State.JOB_STATE_CANCELLED for job in jobs))
    finally:
        if orchestrator is not None:
            stop(orchestrator)
        stop(denoiser)


@pytest.mark.parametrize("flags,word", [(["--admission", "sometimes"], "--admission"),
                                        (["--max-concurrent-jobs", "0"], "--max-concurrent-jobs")])
def test_bad_admission_flags_are_refused(flags, word):
    done = subprocess.run([sys.executable, "-m", ORCHESTRATOR_MODULE, "--text-encoder-address", "127.0.0.1:1",
                           "--denoiser-address", "127.0.0.1:1", "--vae-address", "127.0.0.1:1", *flags],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and word in done.stderr, done.stderr

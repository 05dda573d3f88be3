"""Helpers of the job-queue tests (test_jobs.py, test_admission.py, test_progress_cancel.py): wait for a condition, read a job, stop a
service process."""
from __future__ import annotations

import time

from latentwire.orchestrator.v1 import orchestrator_pb2


def wait_for(predicate, timeout: float = 120, describe=None):
    """``predicate()`` once it is truthy; on timeout fail, with ``describe()`` (what the state was) when given."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time" + (f": {describe()}" if describe is not None else ""))


def log_tail(service, lines: int = 40) -> str:
    """The last lines of a started service's log (for a failing assertion's message)."""
    try:
        return "\n".join(service.log_file.read_text(errors="replace").splitlines()[-lines:])
    except (OSError, AttributeError) as error:  # no log file (None): it shares the launcher's stderr
        return f"(no log: {error})"


def get(stub, job_id: str) -> orchestrator_pb2.Job:
    return stub.GetJob(orchestrator_pb2.GetJobRequest(name=f"jobs/{job_id}"), timeout=10).job


def stop(service) -> None:
    if service.process.poll() is None:
        service.process.terminate()
        service.process.wait(30)

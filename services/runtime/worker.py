"""Runs model work on a thread pool so the asyncio event loop keeps serving (health, status, other calls)."""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterator

from latentwire.common.v1 import status_pb2

from . import interrupt
from .errors import Cancelled, DeadlineExceeded
from .jobs import Job, JobTracker

JobState = status_pb2.JobState

_EVENT, _DONE, _ERROR = range(3)


class Worker:
    """A bounded thread pool for compute plus the glue to stream a thread's events to a gRPC handler."""

    def __init__(self, max_workers: int):
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="compute")

    async def run(self, fn: Callable[..., Any], *args: Any, job: Job | None = None) -> Any:
        """Run ``fn(*args)`` on the pool and await its result (in a copy of the caller's context, as
        asyncio.to_thread does, so the trace of the call goes on in the thread).

        With ``job``, it is the thread's running job (interrupt.py: the model's hooks check it), and it is
        cancelled when the awaiting call is (the caller went away or its deadline passed).
        """
        context = contextvars.copy_context()
        if job is not None:
            fn = _running(job, fn)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, context.run, fn, *args)
        except asyncio.CancelledError:
            if job is not None:
                job.cancel()
            raise

    async def stream(self, job: Job, fn: Callable[[Callable[[Any], None]], Any]) -> AsyncIterator[Any]:
        """Run ``fn(emit)`` on the pool, yielding each ``emit(event)`` as it happens and ``fn``'s return last.

        The thread never waits for the network: ``emit`` only queues. If the consumer goes away
        (the RPC is cancelled or its deadline passes), the job is flagged cancelled and the thread
        stops at its next check: between steps, and inside one at the model's hooks (interrupt.py).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        def put(item: tuple[int, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closing: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def target() -> None:
            try:
                with interrupt.running(job):
                    put((_DONE, fn(lambda event: put((_EVENT, event)))))
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                put((_ERROR, exc))

        loop.run_in_executor(self._executor, contextvars.copy_context().run, target)  # keeps the trace context
        try:
            while True:
                kind, value = await queue.get()
                if kind == _ERROR:
                    raise value
                yield value
                if kind == _DONE:
                    return
        finally:
            # Reached on success, on error and when the caller cancelled; only the last one matters.
            if job.state == JobState.JOB_STATE_RUNNING:
                job.cancel()

    def shutdown(self) -> None:
        """Stop taking work; running threads stop at their jobs' next check (the shutdown interrupted them)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _running(job: Job, fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        with interrupt.running(job):
            return fn(*args)

    return run


@contextlib.contextmanager
def tracked(tracker: JobTracker, job: Job) -> Iterator[Job]:
    """Record how a job ends (succeeded, cancelled, past its deadline or failed) and make it the thread's
    running job (interrupt.py); use inside the worker thread."""
    try:
        with interrupt.running(job):
            yield job
    except (Cancelled, DeadlineExceeded):  # JobState: cancelled by the caller or by a deadline
        tracker.finish(job, JobState.JOB_STATE_CANCELLED)
        raise
    except BaseException:
        tracker.finish(job, JobState.JOB_STATE_FAILED)
        raise
    else:
        tracker.finish(job, JobState.JOB_STATE_SUCCEEDED)

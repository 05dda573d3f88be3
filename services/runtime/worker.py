"""Runs model work on a thread pool so the asyncio event loop keeps serving (health, status, other calls)."""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterator

from latentwire.common.v1 import status_pb2

from .errors import Cancelled
from .jobs import Job, JobTracker

JobState = status_pb2.JobState

_EVENT, _DONE, _ERROR = range(3)


class Worker:
    """A bounded thread pool for compute plus the glue to stream a thread's events to a gRPC handler."""

    def __init__(self, max_workers: int):
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="compute")

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the pool and await its result (in a copy of the caller's context, as
        asyncio.to_thread does, so the trace of the call goes on in the thread)."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._executor, context.run, fn, *args)

    async def stream(self, job: Job, fn: Callable[[Callable[[Any], None]], Any]) -> AsyncIterator[Any]:
        """Run ``fn(emit)`` on the pool, yielding each ``emit(event)`` as it happens and ``fn``'s return last.

        The thread never waits for the network: ``emit`` only queues. If the consumer goes away
        (the RPC is cancelled or its deadline passes), the job is flagged cancelled and the thread
        stops at its next ``job.raise_if_cancelled()``, that is within one step.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        def put(item: tuple[int, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closing: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def target() -> None:
            try:
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
        """Stop taking work; running threads finish their current step."""
        self._executor.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def tracked(tracker: JobTracker, job: Job) -> Iterator[Job]:
    """Record how a job ends (succeeded, cancelled or failed); use inside the worker thread."""
    try:
        yield job
    except Cancelled:
        tracker.finish(job, JobState.JOB_STATE_CANCELLED)
        raise
    except BaseException:
        tracker.finish(job, JobState.JOB_STATE_FAILED)
        raise
    else:
        tracker.finish(job, JobState.JOB_STATE_SUCCEEDED)

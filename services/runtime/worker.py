"""Runs model work on a thread pool so the asyncio event loop keeps serving (health, status, other calls)."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import queue
import threading
import weakref
from concurrent.futures import Executor, Future
from typing import Any, AsyncIterator, Callable, Iterator

from latentwire.common.v1 import status_pb2

from . import interrupt
from .errors import Cancelled, DeadlineExceeded
from .jobs import Job, JobTracker

JobState = status_pb2.JobState

_EVENT, _DONE, _ERROR = range(3)


class LifoThreadPool(Executor):
    """Up to ``max_workers`` threads; new work goes to the thread that became idle last, a new thread is started
    only when none is idle, and work waits when all are busy.

    ``ThreadPoolExecutor`` starts a new thread whenever no thread has marked itself idle yet when work comes, the
    usual case for back-to-back calls (its thread marks itself idle after the result went out), so one client's
    calls alternate between threads. Each thread that runs torch has its own OpenMP team, and on a machine with few
    cores several teams make libgomp put its workers to sleep between parallel regions: a direct VAE Decode at
    64x64 took 10.3-14.1 ms that way against 7.5-8.0 ms here (docs/benchmarks.md, "Text-to-image overhead"). Here
    consecutive calls stay on one thread, while concurrent jobs still get a thread each.

    As ``ThreadPoolExecutor``'s, the threads are not daemons: at interpreter exit (``_stop_pools``, run before the
    interpreter joins its threads) idle ones end and busy ones end after their item, so no thread runs torch code
    while the interpreter is torn down."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "worker"):
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._max = max_workers
        self._prefix = thread_name_prefix
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue] = []  # a stack: the last one idle is used first
        self._backlog: collections.deque = collections.deque()
        self._threads: list[threading.Thread] = []
        self._shutdown = False
        _POOLS.add(self)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        item = (future, fn, args, kwargs)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new work after shutdown")
            if self._idle:
                self._idle.pop().put(item)
            elif len(self._threads) < self._max:
                inbox: queue.SimpleQueue = queue.SimpleQueue()
                inbox.put(item)
                thread = threading.Thread(target=self._serve, args=(inbox,),
                                          name=f"{self._prefix}_{len(self._threads)}")
                thread.start()
                self._threads.append(thread)
            else:
                self._backlog.append(item)
        return future

    def _serve(self, inbox: queue.SimpleQueue) -> None:
        while True:
            item = inbox.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            del item
            ran, result, error = future.set_running_or_notify_cancel(), None, None
            if ran:
                try:
                    result = fn(*args, **kwargs)
                except BaseException as caught:  # noqa: BLE001 - handed to whoever awaits the future
                    error = caught
            del fn, args, kwargs
            # Idle (or on the next waiting item) before the result goes out: the caller's next call, made as soon as
            # it has the result, then comes to this thread rather than starting another.
            with self._lock:
                ending = False
                if self._backlog:  # after a shutdown too: work not cancelled still runs
                    inbox.put(self._backlog.popleft())
                elif self._shutdown:
                    ending = True
                else:
                    self._idle.append(inbox)
            if ran:
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)
            del future, result, error
            if ending:
                return

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more work; idle threads end now, busy ones once no work waits (work still waiting runs first
        unless ``cancel_futures``). ``wait``: return when every thread has ended."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._backlog:
                    self._backlog.popleft()[0].cancel()
            while self._idle:
                self._idle.pop().put(None)
            threads = list(self._threads)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()


_POOLS: "weakref.WeakSet[LifoThreadPool]" = weakref.WeakSet()


def _stop_pools() -> None:
    """At interpreter exit, before its non-daemon threads are joined: every pool's idle threads end."""
    for pool in list(_POOLS):
        pool.shutdown(wait=False, cancel_futures=True)


threading._register_atexit(_stop_pools)  # as concurrent.futures.thread does for ThreadPoolExecutor


class Worker:
    """A bounded thread pool for compute plus the glue to stream a thread's events to a gRPC handler."""

    def __init__(self, max_workers: int):
        self._executor = LifoThreadPool(max_workers, thread_name_prefix="compute")

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

"""The compute thread pool every stage runs its model work on (services/runtime/worker.py, LifoThreadPool):
back-to-back calls stay on one thread (one OpenMP team), concurrent calls get a thread each up to the bound, work
beyond it waits, and a process exits cleanly with the pool's threads idle or busy."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from services.runtime.worker import LifoThreadPool


def test_back_to_back_calls_run_on_one_thread():
    pool = LifoThreadPool(4, thread_name_prefix="t")
    try:
        names = [pool.submit(lambda: threading.current_thread().name).result(timeout=10) for _ in range(50)]
        assert set(names) == {"t_0"}
    finally:
        pool.shutdown()


def test_concurrent_calls_get_a_thread_each_and_work_beyond_the_bound_waits():
    pool = LifoThreadPool(3, thread_name_prefix="t")
    release, started = threading.Event(), threading.Semaphore(0)

    def hold():
        started.release()
        release.wait(10)
        return threading.current_thread().name

    try:
        held = [pool.submit(hold) for _ in range(3)]
        for _ in range(3):
            assert started.acquire(timeout=10)
        waiting = pool.submit(lambda: threading.current_thread().name)
        time.sleep(0.2)
        assert not waiting.done()  # all three threads busy: it waits, no fourth thread
        release.set()
        assert sorted(f.result(timeout=10) for f in held) == ["t_0", "t_1", "t_2"]
        assert waiting.result(timeout=10) in {"t_0", "t_1", "t_2"}
        assert len([t for t in threading.enumerate() if t.name.startswith("t_")]) == 3
    finally:
        release.set()
        pool.shutdown()
    assert not [t for t in threading.enumerate() if t.name.startswith("t_") and t.is_alive()]


def test_errors_reach_the_caller_and_the_thread_goes_on():
    pool = LifoThreadPool(2)
    try:
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result(timeout=10)
        assert pool.submit(lambda: 7).result(timeout=10) == 7
    finally:
        pool.shutdown()


def test_shutdown_runs_waiting_work_unless_cancelled_and_refuses_new_work():
    pool = LifoThreadPool(1)
    gate = threading.Event()
    first = pool.submit(gate.wait, 10)
    second = pool.submit(lambda: "ran")
    pool.shutdown(wait=False)
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)
    gate.set()
    assert first.result(timeout=10) and second.result(timeout=10) == "ran"

    pool = LifoThreadPool(1)
    gate = threading.Event()
    first = pool.submit(gate.wait, 10)
    second = pool.submit(lambda: "ran")
    pool.shutdown(wait=False, cancel_futures=True)
    gate.set()
    assert first.result(timeout=10) and second.cancelled()


def test_a_process_exits_cleanly_with_idle_and_busy_pool_threads():
    script = (
        "import threading, time\n"
        "from services.runtime.worker import LifoThreadPool\n"
        "pool = LifoThreadPool(2)\n"
        "pool.submit(lambda: None).result()\n"  # an idle thread
        "pool.submit(time.sleep, 0.5)\n"  # a busy one when the main thread ends
        "print('done', flush=True)\n")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, "done"), result.stderr
    assert time.monotonic() - started < 30

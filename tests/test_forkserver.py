"""The test session's fork server (services/suite/forkserver.py): a forked child behaves as the launcher's
``subprocess.Popen`` children do (output, exit codes, signals, its own session, environment and working directory),
and a child whose start-up environment differs from the server's is not forked."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from services.suite import forkserver
from services.suite.launcher import service_environment


@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    """A fork server of this module's own, started from this process's environment as it is now (the session's
    may have been started before a test changed a start-up variable, after which the launcher stops forking)."""
    path = str(tmp_path_factory.mktemp("own-fork-server") / "socket")
    process = subprocess.Popen([sys.executable, "-m", "services.suite.forkserver", path], stdout=subprocess.PIPE,
                               env=service_environment())
    assert process.stdout.readline().decode().startswith("fork server ready"), f"exit {process.poll()}"
    yield path
    process.terminate()
    assert process.wait(30) == 0


@pytest.fixture()
def env(own_server, monkeypatch):
    monkeypatch.setenv(forkserver.ENV_VAR, own_server)
    return service_environment()


def test_output_exit_code_environment_session_and_directory(env, tmp_path, monkeypatch):
    (tmp_path / "child.py").write_text(
        "import os, sys\nprint(os.environ['LW_FORK_TEST'], os.getsid(0) == os.getpid(), os.getcwd())\n"
        "sys.exit(int(sys.argv[1]))\n")
    monkeypatch.chdir(tmp_path)  # `python -m child` finds child.py in the working directory
    for code in (0, 3):
        process = forkserver.spawn("child", [str(code)], {**env, "LW_FORK_TEST": f"value-{code}"}, None)
        assert isinstance(process, forkserver.ForkedProcess) and process.pid != os.getpid()
        assert process.wait(60) == code
        assert process.stdout.read().decode().split() == [f"value-{code}", "True", str(tmp_path)]


def test_signals_and_timeouts(env):
    process = forkserver.spawn("timeit", ["-n", "1", "-r", "1", "import time; time.sleep(60)"], env, None)
    assert process is not None and process.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == -signal.SIGTERM and process.poll() == -signal.SIGTERM
    process.kill()  # after the end: nothing happens


def test_what_imports_set_does_not_count(env):
    """torch sets TORCHINDUCTOR_CACHE_DIR when parts of it are imported, cv2 sets LD_LIBRARY_PATH: the server did,
    the caller may have too."""
    import cv2  # noqa: F401 - sets LD_LIBRARY_PATH in this process's environment (a ControlNet test imports it)
    import torch._inductor.config  # noqa: F401 - sets it in this process's environment, as any test's import may

    assert "LD_LIBRARY_PATH" in os.environ

    process = forkserver.spawn("timeit", ["-n", "1", "-r", "1", "pass"], {**env, **os.environ}, None)
    assert isinstance(process, forkserver.ForkedProcess)
    assert process.wait(60) == 0


def test_a_different_start_up_environment_is_not_forked(env):
    assert forkserver.spawn("timeit", ["pass"], {**env, "OMP_NUM_THREADS": "7"}, None) is None
    assert forkserver.spawn("timeit", ["pass"], {**env, "MALLOC_ARENA_MAX": "8"}, None) is None

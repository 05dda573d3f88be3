"""The client commands as a new user meets them, each run as its own `latentwire` process against real servers:
a refused connection says what to do, Ctrl-C on generate cancels the job (exit 130, one line),
`jobs list | head` ends quietly, LATENTWIRE_SERVER / LATENTWIRE_REGISTRY pick the address, and
`models rm NAME@V` refuses while an alias points at that version."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from latentwire.client import Client, LatentwireError
from latentwire.client.registry import RegistryClient
from latentwire.common.v1 import status_pb2
from services.suite.launcher import start_service, wait_serving

CLI = [sys.executable, "-m", "latentwire.cli.main"]


def latentwire(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run one `latentwire` command to its end; stdout and stderr as text."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("LATENTWIRE_SERVER", "LATENTWIRE_REGISTRY")}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**environment, **(env or {})})


def free_address() -> str:
    """host:port where nothing listens (a port the kernel just handed out and that was closed again)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def job_state(client: Client, job_id: str) -> str:
    return status_pb2.JobState.Name(client.get_job(job_id).state)


# ----------------------------------------------------------------------------------------------
# Refused connections and the default addresses


@pytest.mark.parametrize("command", [["jobs", "list"], ["generate", "a cat", "--steps", "2"], ["schedulers"]])
def test_refused_connection_says_nothing_listens_and_how_to_start(command):
    address = free_address()
    result = latentwire(*command, "--server", address)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert f"nothing listens at {address}" in result.stderr
    assert "latentwire up" in result.stderr and "--server" in result.stderr and "LATENTWIRE_SERVER" in result.stderr


def test_refused_registry_names_the_registry_flag():
    address = free_address()
    result = latentwire("models", "list", env={"LATENTWIRE_REGISTRY": address})
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert f"nothing listens at {address}" in result.stderr
    assert "--registry" in result.stderr and "LATENTWIRE_REGISTRY" in result.stderr


@pytest.mark.slow
def test_latentwire_server_sets_the_address(suite, monkeypatch):
    with Client(suite.address, timeout=120) as client:
        job_id = client.generate("an owl", seed=4, steps=2).job_id

    listed = latentwire("jobs", "list", env={"LATENTWIRE_SERVER": suite.address})
    assert listed.returncode == 0, listed.stderr
    assert job_id in listed.stdout

    # The flag wins over the environment; the environment names the address a refusal reports.
    refused = free_address()
    assert latentwire("jobs", "show", job_id, "--server", suite.address,
                      env={"LATENTWIRE_SERVER": refused}).returncode == 0
    unreachable = latentwire("jobs", "show", job_id, env={"LATENTWIRE_SERVER": refused})
    assert unreachable.returncode == 1 and f"nothing listens at {refused}" in unreachable.stderr

    # The Python clients read it too, when no address is passed.
    monkeypatch.setenv("LATENTWIRE_SERVER", suite.address)
    with Client(timeout=30) as client:
        assert client.address == suite.address
        assert job_state(client, job_id) == "JOB_STATE_SUCCEEDED"


@pytest.mark.slow
def test_refusal_prints_code_message_and_reason(suite):
    result = latentwire("generate", "a cat", "--steps", "2", "--scheduler", "NoSuchScheduler",
                        "--server", suite.address, "-q")
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in result.stderr
    assert line.startswith("error: INVALID_ARGUMENT: ") and line.endswith("]"), line  # ... [REASON]

    # The Python client keeps the same: code, message, and the ErrorInfo reason with its metadata.
    with Client(suite.address, timeout=60) as client, pytest.raises(LatentwireError) as raised:
        client.generate("a cat", steps=2, scheduler="NoSuchScheduler")
    error = raised.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.address == suite.address
    assert error.reason and line.endswith(f"[{error.reason}]") and error.message in line
    assert error.metadata and not error.connection_refused


# ----------------------------------------------------------------------------------------------
# Ctrl-C and closed pipes


@pytest.mark.slow
def test_ctrl_c_on_generate_cancels_the_job(suite, tmp_path):
    output = tmp_path / "out.png"
    process = subprocess.Popen(
        [*CLI, "generate", "a very long run", "--steps", "900", "--seed", "2", "--guidance", "7.5",
         "--width", "256", "--height", "256", "--server", suite.address, "-o", str(output)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        job_id, lines = "", []
        for line in process.stderr:  # not a terminal: one line per event, steps now and then
            lines.append(line)
            if " accepted " in line:
                job_id = line.split()[1]
            if line.startswith("denoising ["):
                break
        else:
            raise AssertionError(f"no step line; exit {process.wait()}: {''.join(lines)}")
        assert job_id
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert process.wait(60) == 130
        rest = process.stderr.read()
        assert rest == "cancelled\n", rest  # one line, no traceback
        assert process.stdout.read() == "" and not output.exists()
    finally:
        if process.poll() is None:
            process.kill()

    with Client(suite.address, timeout=30) as client:
        deadline = time.monotonic() + 60
        while (state := job_state(client, job_id)) in ("JOB_STATE_QUEUED", "JOB_STATE_RUNNING"):
            assert time.monotonic() < deadline, f"job {job_id} still {state}"
            time.sleep(0.2)
        assert state == "JOB_STATE_CANCELLED"


@pytest.mark.slow
def test_jobs_list_into_a_closed_pipe_ends_quietly(suite):
    with Client(suite.address, timeout=120) as client:
        client.generate("a fox", seed=1, steps=2)

    # The shell's way: head takes the first line and exits.
    piped = subprocess.run(["bash", "-c", f"{' '.join(CLI)} jobs list --server {suite.address} | head -1"],
                           capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and piped.stdout.count("\n") == 1 and piped.stderr == "", piped.stderr

    # Deterministically: the reader is gone before the command writes a byte.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        closed = subprocess.run([*CLI, "jobs", "list", "--server", suite.address], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert closed.stderr == ""
    assert closed.returncode == 141  # 128 + SIGPIPE, as `yes | head` reports


# ----------------------------------------------------------------------------------------------
# models rm and aliases


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-registry")
    service = start_service("registry", "services.registry", ["--port", "0", "--data-dir", str(root / "data")],
                            log_dir=root / "logs", timeout=60)
    wait_serving(service.address, 60, "registry")
    yield service
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(30) == 0


def controlnet_folder(path: Path, payload: bytes) -> Path:
    """A ControlNet-layout folder (the registry stores files; it does not load them)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", "_diffusers_version": "0.42.1"}))
    from test_registry import safetensors_bytes  # the registry checks every .safetensors header

    (path / "diffusion_pytorch_model.safetensors").write_bytes(safetensors_bytes(payload))
    return path


def test_models_rm_refuses_a_version_an_alias_points_at(registry, tmp_path):
    env = {"LATENTWIRE_REGISTRY": registry.address}  # every models command finds the registry through it
    first = latentwire("models", "import", str(controlnet_folder(tmp_path / "v1", b"one")), "--name", "edges",
                       "--alias", "prod", env=env)
    assert first.returncode == 0 and first.stdout.strip() == "edges@1", first.stderr
    second = latentwire("models", "import", str(controlnet_folder(tmp_path / "v2", b"two")), "--name", "edges",
                        env=env)
    assert second.returncode == 0 and second.stdout.strip() == "edges@2", second.stderr

    refused = latentwire("models", "rm", "edges@1", env=env)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "alias prod" in refused.stderr and "--force" in refused.stderr
    with RegistryClient(registry.address) as client:
        assert [v.version for v in client.iter_model_versions("edges")] == [2, 1]

    assert latentwire("models", "rm", "edges@2", env=env).returncode == 0  # no alias points at it
    forced = latentwire("models", "rm", "edges@1", "--force", env=env)
    assert forced.returncode == 0 and forced.stdout.strip() == "removed edges@1", forced.stderr
    with RegistryClient(registry.address) as client:
        model = client.get_model("edges")
        assert list(client.iter_model_versions("edges")) == [] and dict(model.aliases) == {}

    missing = latentwire("models", "rm", "edges@7", env=env)
    assert missing.returncode == 1 and missing.stderr.startswith("error: NOT_FOUND: "), missing.stderr


# ----------------------------------------------------------------------------------------------
# Progress lines


def test_progress_shows_an_eta_from_the_first_step():
    import io

    from latentwire.cli.progress import ProgressBar
    from latentwire.client import describe
    from latentwire.orchestrator.v1 import orchestrator_pb2 as pb

    def step(done: int, seconds: float) -> pb.GenerateResponse:
        return pb.GenerateResponse(step=pb.DenoisingStep(step=done, total_steps=25, elapsed_seconds=seconds))

    assert describe(step(12, 3.1)) == "step 12/25 3.1 s, ETA 3.4 s"  # 3.1 s / 12 steps x 13 left
    assert describe(step(25, 6.0)) == "step 25/25 6.0 s"
    assert describe(pb.GenerateResponse(accepted=pb.JobAccepted(job_id="j1", seed=3))) == "job j1 accepted (seed 3)"

    log = io.StringIO()  # not a terminal: a line at the first step, about every tenth, and the last
    bar = ProgressBar(log)
    for done in range(1, 26):
        bar(step(done, 0.5 * done))
    lines = log.getvalue().splitlines()
    assert lines[0].endswith("1/25 0.5 s, ETA 12.0 s") and lines[-1].endswith("25/25 12.5 s")
    assert 5 <= len(lines) <= 15

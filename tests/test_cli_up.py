"""`latentwire up` starts the registry (seeded with the model) and every service, prints one table of
services (name, address, pid, log file) and the address, and Ctrl-C stops them all gracefully.
`--port N` moves every service; logs go to files under $LATENTWIRE_HOME/logs/<timestamp>/ by default."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from latentwire.client import Client
from services.suite.ports import PORT_ORDER

#: Starts `latentwire up` (every service): left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow  # a whole suite of its own
def test_up_generate_ctrl_c(tiny_model, tiny_controlnets, tmp_path):
    """`latentwire up` with every service (a ControlNet too), one generate and one classify, then Ctrl-C: every
    service exits 0, and no log (up's own, each service's file) carries a warning."""
    process = subprocess.Popen(
        [sys.executable, "-m", "latentwire.cli.main", "up", "--model", str(tiny_model), "--ephemeral-ports",
         "--controlnet", str(tiny_controlnets[0]), "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "LATENTWIRE_HOME": str(tmp_path / "home")},
    )
    try:
        rows, line = _read_table(process)  # printed only once every service is SERVING
        match = re.search(r"orchestrator at (\S+)", line)
        assert match, line + process.stderr.read()
        pids = [int(row["pid"]) for row in rows.values()]
        # 4 services, the ControlNet service, the classifier, the registry and the REST gateway
        assert len(pids) == 8 and all(_alive(pid) for pid in pids)
        assert rows["orchestrator"]["address"] == match.group(1)
        assert all(row["log"] == str(tmp_path / "logs" / f"{name}.log") for name, row in rows.items()), rows

        with Client(match.group(1), timeout=60) as client:
            result = client.generate("a cabin in the woods", seed=3, steps=4)
        assert result.seed == 3 and result.images[0].startswith(b"\x89PNG")
        from latentwire.client.classifier import ClassifierClient
        from services.tiny_models.mobilevit import synthetic_images

        with ClassifierClient(match.group(1), timeout=60) as classifier:  # routed by the orchestrator
            classified = classifier.classify(synthetic_images(1), top_k=2)
        assert classified.model == "shapes-classifier@1" and len(classified.results[0].classes) == 2

        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert process.wait(60) == 0
        rest = process.stderr.read()
        assert re.search(r"orchestrator exit 0", rest) and rest.count(" exit 0") == 8, rest
        # A normal run warns about nothing (transformers' torchvision fallbacks included: the PIL image
        # processors are chosen explicitly, in `up`'s own process as in each service's).
        assert not [line for line in rest.splitlines() if "warn" in line.lower() or "torchvision" in line], rest
        logs = sorted((tmp_path / "logs").glob("*.log"))
        assert {p.stem for p in logs} == set(rows), [p.name for p in logs]
        warnings = [f"{p.name}: {line}" for p in logs for line in p.read_text().splitlines()
                    if "warn" in line.lower()]
        assert not warnings, "\n".join(warnings)
        assert not any(_alive(pid) for pid in pids)
    finally:
        if process.poll() is None:
            process.kill()


def _read_table(process: subprocess.Popen) -> tuple[dict[str, dict[str, str]], str]:
    """The services table `up` prints on stdout ({name: {address, pid, log}}) and its ready line after it."""
    header = process.stdout.readline()
    assert header.split() == ["SERVICE", "ADDRESS", "PID", "LOG"], header + process.stderr.read()
    rows = {}
    for line in process.stdout:
        if line.startswith("latentwire is up"):
            return rows, line
        name, address, pid, log = line.split(maxsplit=3)
        rows[name] = {"address": address, "pid": pid, "log": log.strip()}
    raise AssertionError(f"no ready line after the table {rows}: {process.stderr.read()}")


def _free_port_range(count: int) -> int:
    """A base port with ``count`` free ports from it (checked by binding each; another process may still race)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise AssertionError("no run of free ports found")


@pytest.mark.slow  # a whole suite of its own
def test_up_port_moves_every_service_and_logs_to_files(tiny_model, tmp_path):
    """`up --base-port` moves every service; with `--auth-tokens-file` the orchestrator checks tokens and the REST
    gateway calls it with a token of its own (principal "gateway"), so its API works."""
    home = tmp_path / "home"
    tokens = tmp_path / "tokens"
    tokens.write_text("user-token-1 generate principal=alice\n")
    base = _free_port_range(len(PORT_ORDER) + 1)  # the last one for the gateway (7860 by default)
    process = subprocess.Popen(
        [sys.executable, "-m", "latentwire.cli.main", "up", "--model", str(tiny_model), "--base-port", str(base),
         "--gateway-port", str(base + len(PORT_ORDER)), "--auth-tokens-file", str(tokens)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "LATENTWIRE_HOME": str(home)},
    )
    try:
        rows, line = _read_table(process)
        assert f"orchestrator at 127.0.0.1:{base}" in line, line
        # The fixed order: orchestrator N, text_encoder N+1, ..., classifier N+5 (no ControlNet with --model).
        expected = {name: f"127.0.0.1:{base + offset}" for offset, name in enumerate(PORT_ORDER)
                    if name != "controlnet"} | {"gateway": f"127.0.0.1:{base + len(PORT_ORDER)}"}
        assert {name: row["address"] for name, row in rows.items()} == expected
        logs = {name: Path(row["log"]) for name, row in rows.items()}
        folders = {log.parent for log in logs.values()}
        assert len(folders) == 1 and folders.pop().parent == home / "logs", logs
        assert all(log.name == f"{name}.log" and log.stat().st_size > 0 for name, log in logs.items()), logs
        _check_gateway_calls_with_its_token(rows["gateway"]["address"], rows["orchestrator"]["address"])
        assert tokens.read_text() == "user-token-1 generate principal=alice\n"  # the user's file is left alone
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
        assert process.stderr.read().count(" exit 0") == 7
    finally:
        if process.poll() is None:
            process.kill()


def _check_gateway_calls_with_its_token(gateway: str, orchestrator: str) -> None:
    """The orchestrator refuses a call without a token, while the gateway's txt2img (which sends its own) works and
    its job belongs to the principal "gateway"; a user token still works on its own."""
    import requests

    from latentwire.client.errors import LatentwireError

    with Client(orchestrator, timeout=60) as anonymous, pytest.raises(LatentwireError) as refused:
        anonymous.generate("a cabin", seed=1, steps=2, width=64, height=64)
    assert refused.value.reason == "MISSING_TOKEN", refused.value
    answer = requests.post(f"http://{gateway}/sdapi/v1/txt2img",
                           json={"prompt": "a cabin", "seed": 4, "steps": 2, "width": 64, "height": 64}, timeout=120)
    assert answer.status_code == 200 and len(answer.json()["images"]) == 1, answer.text
    with Client(orchestrator, timeout=60, token="user-token-1") as alice:
        assert alice.generate("a cabin", seed=1, steps=2, width=64, height=64).seed == 1
        assert all(job.owner == "alice" for job in alice.list_jobs().jobs)  # the gateway's job is not alice's

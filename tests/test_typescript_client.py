"""The TypeScript client (clients/typescript: protoc-gen-es v2 code + Connect's gRPC transport) against the
session suite: its example generates an image the Python client also makes byte for byte, then cancels a
second job by id, which GetJob (from Python) must report CANCELLED.

The example is compiled here with tsc when dist/ is older than its sources (install.sh has usually built it),
so the test never runs a stale build. Without node, or without clients/typescript/node_modules
(`infra/scripts/install.sh` runs `npm ci` there), the test is skipped, except under CI=true, where it fails.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from latentwire.client import Client
from latentwire.common.v1 import status_pb2

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clients" / "typescript"
EXAMPLE = PACKAGE / "dist" / "examples" / "generate.js"
UNDER_CI = os.environ.get("CI", "").lower() == "true"

pytestmark = pytest.mark.slow  # the session suite


def _missing(reason: str):
    if UNDER_CI:
        pytest.fail(f"{reason} (CI=true: the TypeScript client must be tested)")
    pytest.skip(reason)


# Session scope so it is set up before the session `suite`: a skip costs no suite start.
@pytest.fixture(scope="session")
def node() -> str:
    """node, with the example compiled from the current sources (tsc -p clients/typescript)."""
    node = shutil.which("node")
    if node is None:
        _missing("node is not installed")
    tsc = PACKAGE / "node_modules" / ".bin" / "tsc"
    if not tsc.exists():
        _missing("clients/typescript/node_modules is missing: run infra/scripts/install.sh (npm ci there)")
    if _stale():
        built = subprocess.run([str(tsc), "-p", str(PACKAGE / "tsconfig.json")], cwd=PACKAGE,
                               capture_output=True, text=True, timeout=300)
        assert built.returncode == 0, f"tsc failed:\n{built.stdout}{built.stderr}"
        (PACKAGE / "dist" / ".tsbuildinfo").touch()  # dist is current now, even where tsc had nothing to write
    assert EXAMPLE.exists()
    return node


def _stale() -> bool:
    """Whether dist/ is missing or older than a source (install.sh has usually just built it: tsc's own
    up-to-date check costs ~3 s of CPU)."""
    built = PACKAGE / "dist" / ".tsbuildinfo"
    if not built.exists() or not EXAMPLE.exists():
        return True
    sources = [*PACKAGE.glob("src/**/*.ts"), *PACKAGE.glob("examples/**/*.ts"),
               PACKAGE / "tsconfig.json", PACKAGE / "package-lock.json"]
    newest = max(path.stat().st_mtime for path in sources)
    return newest > built.stat().st_mtime


def test_typescript_example_generates_the_python_clients_image_and_cancels(node, suite, tmp_path):
    settings = dict(seed=11, steps=3, width=64, height=48)
    out = tmp_path / "ts.png"
    run = subprocess.run(
        [node, str(EXAMPLE), "a lighthouse at dusk", "--address", suite.address, "--out", str(out),
         "--seed", str(settings["seed"]), "--steps", str(settings["steps"]),
         "--width", str(settings["width"]), "--height", str(settings["height"]),
         # Long enough that the job is still running when CancelJob arrives after its first step.
         "--cancel-steps", "400"],
        # The example keeps gRPC's default 4 MiB receive limit (its --read-max-bytes default): a normal image fits.
        # A wrong $LATENTWIRE_SERVER: --address must win over it.
        capture_output=True, text=True, timeout=120, env={**os.environ, "LATENTWIRE_SERVER": "unused:1"},
    )
    assert run.returncode == 0, f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    lines = run.stdout.splitlines()
    for step in range(1, settings["steps"] + 1):  # progress streamed, one line per step
        assert any(line.startswith(f"step {step}/{settings['steps']} ") for line in lines), run.stdout

    with Client(suite.address, timeout=120) as client:
        reference = client.generate("a lighthouse at dusk", **settings)
        assert out.read_bytes() == reference.images[0]  # the same PNG, byte for byte
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # The second job: cancelled after its first step, far short of its 400 steps, as GetJob says.
        cancelled = re.search(r"^cancelled (\S+) at step (\d+)/400: CANCELLED$", run.stdout, re.MULTILINE)
        assert cancelled, run.stdout
        job = client.get_job(cancelled.group(1))
        assert job.state == status_pb2.JOB_STATE_CANCELLED
        assert 1 <= job.completed_steps < 400 and job.total_steps == 400


def test_typescript_example_fails_with_the_servers_reason(node, suite, tmp_path):
    """A refused request ends the example with status 1 and the server's code, message and ErrorInfo reason."""
    run = subprocess.run(
        [node, str(EXAMPLE), "a fox", "--address", suite.address, "--out", str(tmp_path / "x.png"),
         "--steps", "2", "--scheduler", "NoSuchScheduler"],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stderr.startswith("generate.js: [InvalidArgument] "), run.stderr
    assert "NoSuchScheduler" in run.stderr and re.search(r"\([A-Z_]+\)$", run.stderr.strip()), run.stderr
    assert not (tmp_path / "x.png").exists()


def test_typescript_example_applies_its_receive_limit(node, suite, tmp_path):
    """The 4 MiB default the first test passes under is a real limit: a result over --read-max-bytes is refused."""
    run = subprocess.run(
        [node, str(EXAMPLE), "a fox", "--address", suite.address, "--out", str(tmp_path / "x.png"),
         "--seed", "1", "--steps", "2", "--width", "64", "--height", "64", "--read-max-bytes", "2048",
         "--no-cancel-check"],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stderr.startswith("generate.js: [ResourceExhausted] "), run.stderr
    assert "step 2/2" in run.stdout  # the small progress events fit; only the result (a PNG over 2 KiB) does not
    assert not (tmp_path / "x.png").exists()

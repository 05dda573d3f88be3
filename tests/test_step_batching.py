"""Step-level batching in the denoiser (services/denoiser/step_batching.py): concurrent jobs of one model share each
step's UNet forward, and each job's latents still equal its run alone (within 1e-4 in float32 on CPU; exactly when
a job is alone in its batch); a cancelled job leaves without disturbing the others; bad flag values are refused.

A denoiser of its own on the session's tiny model (8 concurrent jobs: more than the suite's denoiser admits), with
its Prometheus endpoint, where the batch sizes are counted. The transformer loops (SD3, Flux: flow.py) the same way
in process, seven loops on their own threads sharing one batcher (the TRANSFORMER calling convention); through the
running suite: tests/test_families_suite.py.
"""
from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from latentwire.common.v1 import status_pb2, status_pb2_grpc
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from metrics_helpers import batch_counts
from services.denoiser.config import build_parser
from services.denoiser.step_batching import StepBatcher
from services.runtime import interrupt, tensors
from services.runtime.jobs import Job
from services.suite.launcher import start_service, wait_serving

JOBS = 8


@pytest.fixture(scope="module")
def denoiser(tiny_model, tmp_path_factory):
    """The denoiser on the tiny SD model, batching on (the defaults), admitting 8 jobs at once."""
    log_dir = tmp_path_factory.mktemp("step-batching-logs")
    service = start_service("denoiser", "services.denoiser", [
        "--port", "0", "--model", str(tiny_model), "--max-concurrent-jobs", str(JOBS), "--metrics-port", "0"],
        log_dir=log_dir)
    try:
        wait_serving(service.address, 300, "denoiser", service.process)
        with grpc.insecure_channel(service.address) as channel:
            service.channel = channel
            service.stub = denoiser_pb2_grpc.DenoiserServiceStub(channel)
            yield service
    finally:
        service.process.terminate()
        code = service.process.wait(30)
    assert code == 0, f"the denoiser exited with {code}; log in {log_dir}"


def _width(tiny_model) -> int:
    import json

    return json.loads((tiny_model / "unet" / "config.json").read_text())["cross_attention_dim"]


def _request(job_id: str, width: int, *, seed: int, steps: int, scheduler: str, guidance: float, size: int,
             batch: int = 1) -> denoiser_pb2.DenoiseRequest:
    embeds = torch.Generator().manual_seed(1000 + seed)
    prompt = torch.randn(batch, 7, width, generator=embeds)
    negative = torch.randn(batch, 7, width, generator=embeds)
    return denoiser_pb2.DenoiseRequest(
        job_id=job_id, prompt_embeds=tensors.to_proto(prompt, "prompt_embeds"),
        negative_prompt_embeds=tensors.to_proto(negative, "negative_prompt_embeds"), height=size, width=size,
        num_inference_steps=steps, guidance_scale=guidance, seed=seed, scheduler=scheduler)


def _latents(responses) -> torch.Tensor:
    return tensors.from_proto(list(responses)[-1].result.latents, field="latents")


def _job(channel, job_id: str):
    status = status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest(), timeout=10)
    found = [j for j in [*status.active_jobs, *status.recent_jobs] if j.job_id == job_id]
    return found[0] if found else None


def test_concurrent_jobs_batch_and_each_equals_its_solo_run(denoiser, tiny_model):
    width = _width(tiny_model)
    mix = [  # scheduler, steps, size, guidance (1.0: no CFG), images
        ("EulerDiscreteScheduler", 12, 64, 7.5, 1),
        ("DDIMScheduler", 9, 64, 1.0, 1),
        ("DPMSolverMultistepScheduler", 12, 64, 5.0, 1),
        ("EulerAncestralDiscreteScheduler", 7, 64, 7.5, 1),
        ("EulerDiscreteScheduler", 10, 32, 7.5, 1),
        ("DDIMScheduler", 6, 32, 3.0, 2),
        ("DPMSolverMultistepScheduler", 10, 64, 7.5, 2),
    ]
    requests = {f"mix-{i}": _request(f"mix-{i}", width, seed=i, steps=steps, scheduler=scheduler, guidance=guidance,
                                     size=size, batch=images)
                for i, (scheduler, steps, size, guidance, images) in enumerate(mix)}
    # Each request alone: the batcher's solo path, which is the unbatched UNet call.
    solo = {job_id: _latents(denoiser.stub.Denoise(request, timeout=120)) for job_id, request in requests.items()}
    forwards_before, batched_before = batch_counts(denoiser.metrics_address)
    assert batched_before == 0, "requests one after another never share a forward"

    # The eighth job runs long and is cancelled mid-run, while the others are at work.
    cancelled = _request("mix-cancelled", width, seed=99, steps=400, scheduler="EulerDiscreteScheduler", guidance=7.5,
                         size=64)
    results: dict[str, torch.Tensor] = {}
    errors: dict[str, grpc.RpcError] = {}
    start = threading.Barrier(JOBS)

    def run(job_id: str, request) -> None:
        start.wait()
        try:
            results[job_id] = _latents(denoiser.stub.Denoise(request, timeout=120))
        except grpc.RpcError as error:
            errors[job_id] = error

    def run_and_cancel() -> None:
        start.wait()
        # A long deadline: the service refuses up front work its measured step times say cannot end in time,
        # and this job is cancelled at its third step anyway.
        call = denoiser.stub.Denoise(cancelled, timeout=3600)
        try:
            for response in call:
                if response.step.step >= 3:
                    call.cancel()
        except grpc.RpcError as error:
            errors["mix-cancelled"] = error

    threads = [threading.Thread(target=run, args=item) for item in requests.items()]
    threads.append(threading.Thread(target=run_and_cancel))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a job hung"

    assert set(errors) == {"mix-cancelled"} and errors["mix-cancelled"].code() == grpc.StatusCode.CANCELLED, errors
    for job_id, expected in solo.items():
        difference = (results[job_id] - expected).abs().max().item()
        assert results[job_id].shape == expected.shape and difference <= 1e-4, (job_id, difference)
    deadline = time.monotonic() + 15  # the server learns of the cancellation asynchronously
    while (job := _job(denoiser.channel, "mix-cancelled")).state == status_pb2.JOB_STATE_RUNNING:
        assert time.monotonic() < deadline, "the cancelled job is still RUNNING"
        time.sleep(0.05)
    assert job.state == status_pb2.JOB_STATE_CANCELLED and 3 <= job.completed_steps < 400
    assert all(_job(denoiser.channel, job_id).state == status_pb2.JOB_STATE_SUCCEEDED for job_id in requests)

    forwards, batched = batch_counts(denoiser.metrics_address)
    steps_run = sum(r.num_inference_steps for r in requests.values()) + job.completed_steps
    assert batched > 0, "no forward held more than one job: nothing was batched"
    # Fewer forwards than the steps the jobs ran: they shared them.
    assert forwards - forwards_before < steps_run, (forwards - forwards_before, steps_run)


def test_a_job_alone_equals_the_unbatched_loop_exactly(denoiser, tiny_model):
    from services.denoiser.conditioning import TextConditioning
    from services.denoiser.model import DenoiseParams, load_denoiser
    from services.runtime.config import ModelSpec

    width = _width(tiny_model)
    request = _request("alone", width, seed=5, steps=6, scheduler="EulerAncestralDiscreteScheduler", guidance=7.5,
                       size=64)
    served = _latents(denoiser.stub.Denoise(request, timeout=120))
    model = load_denoiser(ModelSpec("tiny-sd", tiny_model), torch.device("cpu"), torch.float32, False)
    text = TextConditioning(tensors.from_proto(request.prompt_embeds, field="prompt_embeds"),
                            tensors.from_proto(request.negative_prompt_embeds, field="negative_prompt_embeds"))
    params = DenoiseParams(64, 64, 6, 7.5, 0.0, 0.0, 5, "EulerAncestralDiscreteScheduler")
    job = Job(job_id="in-process", total_steps=6)
    with interrupt.running(job):
        unbatched = model.denoise(job, text, params, lambda event: None).latents  # the UNet called by the loop
        job = Job(job_id="in-process-batcher", total_steps=6)
        batcher = StepBatcher(model.unet, max_rows=16, wait_s=0.002)
        alone = model.denoise(job, text, params, lambda event: None, step_batcher=batcher).latents
    assert torch.equal(served, unbatched) and torch.equal(alone, unbatched)
    assert (batcher.forwards, batcher.batched_forwards) == (6, 0)


def test_an_error_in_a_batched_forward_fails_every_job_of_the_batch():
    calls = []

    def network(sample, timestep, **kwargs):
        calls.append(sample.shape[0])
        raise RuntimeError("out of memory")

    batcher = StepBatcher(network, max_rows=16, wait_s=5.0)
    jobs = [Job(job_id=f"failing-{i}", total_steps=1) for i in range(3)]
    sessions = [batcher.join(job) for job in jobs]
    _known(batcher, sessions)  # every session is known before any forward: they wait for each other
    raised: dict[int, BaseException] = {}

    def step(i: int) -> None:
        try:
            sessions[i].forward(torch.zeros(2, 4, 8, 8), torch.tensor(10), encoder_hidden_states=torch.zeros(2, 7, 8))
        except BaseException as error:  # noqa: BLE001 - recorded for the assertion
            raised[i] = error

    threads = [threading.Thread(target=step, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert calls == [6], "the three jobs shared one forward"
    assert sorted(raised) == [0, 1, 2] and all(isinstance(e, RuntimeError) for e in raised.values())


def test_a_cancelled_job_stops_waiting_and_the_others_go_on():
    calls = []

    def network(sample, timestep, **kwargs):
        calls.append(sample.shape[0])
        return (sample * 2,)

    batcher = StepBatcher(network, max_rows=16, wait_s=30.0)  # nobody would run before every job arrived
    waiting, other = Job(job_id="waits", total_steps=1), Job(job_id="other", total_steps=1)
    sessions = [batcher.join(waiting), batcher.join(other)]
    _known(batcher, sessions)
    outcome = {}

    def step() -> None:
        try:
            sessions[0].forward(torch.ones(1, 4, 8, 8), torch.tensor(3), encoder_hidden_states=torch.zeros(1, 7, 8))
        except BaseException as error:  # noqa: BLE001
            outcome["error"] = error

    thread = threading.Thread(target=step)
    thread.start()
    time.sleep(0.2)
    assert thread.is_alive() and not calls  # waiting for "other"
    waiting.cancel()
    thread.join(5)
    assert not thread.is_alive() and type(outcome["error"]).__name__ == "Cancelled" and not calls
    sessions[0].leave()
    # Alone now, "other" runs at once, unbatched.
    out = sessions[1].forward(torch.ones(1, 4, 8, 8), torch.tensor(3), encoder_hidden_states=torch.zeros(1, 7, 8))[0]
    assert calls == [1] and torch.equal(out, torch.full((1, 4, 8, 8), 2.0))
    sessions[1].leave()


def _known(batcher: StepBatcher, sessions) -> None:
    """Make the sessions' loops known to the batcher with the key of the tests' step inputs (as their first forward
    would), so that the first forward waits for the others instead of running alone."""
    from services.denoiser.step_batching import UNET

    key = UNET.key(dict(sample=torch.zeros(1, 4, 8, 8), encoder_hidden_states=torch.zeros(1, 7, 8),
                        timestep_cond=None, down_block_additional_residuals=None,
                        mid_block_additional_residual=None, added_cond_kwargs=None))
    with batcher._cond:
        for session in sessions:
            batcher._move(session, key)


@pytest.mark.parametrize("flag, value", [("--step-batch-max", "0"), ("--step-batch-max", "257"),
                                         ("--step-batch-max", "two"), ("--step-batch-wait-ms", "-1"),
                                         ("--step-batch-wait-ms", "nan"), ("--step-batch-wait-ms", "1001")])
def test_bad_flag_values_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--model", "m", flag, value])
    assert exited.value.code == 2 and flag in capsys.readouterr().err


def test_flag_defaults_batch():
    args = build_parser().parse_args(["--model", "m"])
    assert args.step_batch_max == 16 and args.step_batch_wait_ms == 2.0
    assert build_parser().parse_args(["--model", "m", "--step-batch-max", "1"]).step_batch_max == 1


# ---------------------------------------------------------------------------------------------------------------
# The transformer loops (flow.py): SD3 and Flux, in process, several jobs on their own threads sharing one batcher


def _flow_text(model, seed: int, batch: int, cfg: bool):
    from services.denoiser.conditioning import TextConditioning

    config = model.transformer.config
    g = torch.Generator().manual_seed(2000 + seed)

    def embeds():
        return torch.randn(batch, 7, config.joint_attention_dim, generator=g)

    def pooled():
        return torch.randn(batch, config.pooled_projection_dim, generator=g)

    if not cfg:
        return TextConditioning(embeds(), pooled_prompt_embeds=pooled())
    return TextConditioning(embeds(), embeds(), pooled_prompt_embeds=pooled(), negative_pooled_prompt_embeds=pooled())


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_transformer_jobs_batch_and_each_equals_its_solo_run(tiny_family_models, family):
    from services.denoiser.flow import FlowDenoiser
    from services.denoiser.model import DenoiseParams, load_denoiser
    from services.denoiser.step_batching import TRANSFORMER
    from services.runtime.config import ModelSpec
    from services.runtime.errors import Cancelled

    model = load_denoiser(ModelSpec(f"tiny-{family}", tiny_family_models[family]), torch.device("cpu"),
                          torch.float32, False)
    assert isinstance(model, FlowDenoiser)
    # Two forwards a step, where the model offers it (SD3; Flux's timesteps are set with sigmas Heun does not take).
    heun = "FlowMatchHeunDiscreteScheduler" if "FlowMatchHeunDiscreteScheduler" in model.schedulers else ""
    mix = [  # scheduler, steps, size, guidance (SD3: 1.0 is no CFG; Flux: the embedded guidance), images
        ("", 5, 64, 3.5, 1),
        ("", 3, 64, 1.0, 1),
        (heun, 4, 64, 5.0, 1),
        ("", 6, 32, 2.0, 2),
        ("", 4, 32, 1.0, 1),
        (heun, 3, 64, 7.0, 2),
    ]
    jobs = {}
    for i, (scheduler, steps, size, guidance, images) in enumerate(mix):
        params = DenoiseParams(size, size, steps, guidance, 0.0, 0.0, 10 + i, scheduler)
        jobs[f"{family}-{i}"] = (_flow_text(model, i, images, model.do_classifier_free_guidance(guidance)), params)
    batcher = StepBatcher(model.transformer, calling=TRANSFORMER, max_rows=16, wait_s=0.002)

    def run(job_id, text, params, emit=lambda event: None, with_batcher=True):
        job = Job(job_id=job_id, total_steps=params.num_inference_steps)
        with interrupt.running(job):
            kwargs = {"step_batcher": batcher} if with_batcher else {}
            return job, model.denoise(job, text, params, emit, **kwargs).latents

    # Alone, through the batcher: exactly the loop calling the transformer itself.
    solo = {job_id: run(job_id, *inputs)[1] for job_id, inputs in jobs.items()}
    first = next(iter(jobs))
    assert torch.equal(solo[first], run(first, *jobs[first], with_batcher=False)[1])
    assert batcher.batched_forwards == 0 and batcher.forwards > 0
    forwards_before = batcher.forwards

    results, errors, cancelled = {}, {}, {}
    start = threading.Barrier(len(jobs) + 1)

    def worker(job_id, text, params):
        start.wait()
        try:
            results[job_id] = run(job_id, text, params)[1]
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors[job_id] = error

    def cancel_at_third_step(event):
        if event.step >= 3:
            cancelled["job"].cancel()

    def cancelled_worker():
        params = DenoiseParams(64, 64, 400, 3.0, 0.0, 0.0, 99, "")
        text = _flow_text(model, 99, 1, model.do_classifier_free_guidance(3.0))
        job = cancelled["job"] = Job(job_id=f"{family}-cancelled", total_steps=400)
        start.wait()
        try:
            with interrupt.running(job):
                model.denoise(job, text, params, cancel_at_third_step, step_batcher=batcher)
        except Cancelled:
            errors["cancelled"] = "cancelled"

    threads = [threading.Thread(target=worker, args=(job_id, *inputs)) for job_id, inputs in jobs.items()]
    threads.append(threading.Thread(target=cancelled_worker))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not any(thread.is_alive() for thread in threads), "a job hung"
    assert errors == {"cancelled": "cancelled"}, errors
    assert 3 <= cancelled["job"].completed_steps < 400
    for job_id, expected in solo.items():
        difference = (results[job_id] - expected).abs().max().item()
        assert results[job_id].shape == expected.shape and difference <= 1e-4, (job_id, difference)
    forwards_run = sum(p.num_inference_steps * (2 if heun and p.scheduler == heun else 1) for _, p in jobs.values())
    assert batcher.batched_forwards > 0, "no forward held more than one job: nothing was batched"
    assert batcher.forwards - forwards_before < forwards_run + cancelled["job"].completed_steps

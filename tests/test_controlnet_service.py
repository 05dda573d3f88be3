"""The ControlNet service in its own process, against diffusers' StableDiffusionControlNetPipeline.

The reference is the pipeline itself: it runs in this process on the tiny Stable Diffusion model
with two tiny ControlNets (seeds 0 and 1), and a forward hook records what its ControlNet (or
MultiControlNetModel) got and returned at every step. The same run is then replayed over a
ComputeResiduals stream (same setup, the recorded sample and timestep per step) and the
service's residuals must equal the recorded ones.
"""
from __future__ import annotations

import io
import signal
import time

import cv2
import grpc
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from PIL import Image

from latentwire.common.v1 import model_pb2, status_pb2, status_pb2_grpc
from latentwire.controlnet.v1 import controlnet_pb2, controlnet_pb2_grpc
from services.runtime import tensors
from services.suite.launcher import start_service, wait_serving
from services.tiny_models import create_tiny_controlnet, default_controlnet_path, ensure_default_controlnet

WIDTH, HEIGHT = 64, 48  # not square, so a swapped width and height shows
STEPS = 4
TOLERANCE = 1e-5  # the conformance bound (float32); in practice the difference is 0
INVALID = grpc.StatusCode.INVALID_ARGUMENT


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def controlnet_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    return [create_tiny_controlnet(root / f"cn{seed}", seed=seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def service(controlnet_folders, tmp_path_factory):
    """The ControlNet service on a free port, serving cn0 (the default) and cn1."""
    log_dir = tmp_path_factory.mktemp("controlnet-logs")
    running = start_service(
        "controlnet", "services.controlnet",
        ["--port", "0", "--model", f"cn0={controlnet_folders[0]}", "--model", f"cn1={controlnet_folders[1]}",
         "--max-units", "3", "--max-batch", "4", "--max-image-size", "512"],
        log_dir=log_dir, timeout=120)
    try:
        wait_serving(running.address, 120, "controlnet", running.process)
        yield running
    finally:
        running.process.send_signal(signal.SIGTERM)
        code = running.process.wait(30)
    assert code == 0, f"the ControlNet service exited with {code}; log in {log_dir}"


@pytest.fixture(scope="module")
def channel(service):
    with grpc.insecure_channel(service.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return controlnet_pb2_grpc.ControlNetServiceStub(channel)


@pytest.fixture(scope="module")
def base_pipeline(tiny_model):
    return StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False,
                                                   use_safetensors=True)


@pytest.fixture(scope="module")
def nets(controlnet_folders):
    from diffusers import ControlNetModel

    return [ControlNetModel.from_pretrained(path, use_safetensors=True) for path in controlnet_folders]


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, format="PNG")
    return buffer.getvalue()


def _test_image(seed: int, width: int = 80, height: int = 60) -> np.ndarray:
    """An RGB picture with edges (shapes on a gradient), not of the generated size, so it gets resized."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 90)], axis=2).astype(np.uint8)
    for _ in range(4):
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.circle(image, center, int(rng.integers(6, 20)), color, thickness=-1)
    cv2.rectangle(image, (5, 5), (30, 25), (250, 250, 250), thickness=2)
    return image


IMAGES = [_test_image(0), _test_image(1)]
PNGS = [_png(IMAGES[0], "RGBA"), _png(IMAGES[1])]  # the first with alpha: both sides must drop it alike


def _canny_reference(image: Image.Image, low: float, high: float) -> Image.Image:
    # diffusers' ControlNet documentation, verbatim in substance.
    edges = cv2.Canny(np.array(image.convert("RGB")), low, high)[:, :, None]
    return Image.fromarray(np.concatenate([edges, edges, edges], axis=2))


def _error_info(error: grpc.RpcError):
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def _assert_serving(channel) -> None:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def _job(channel, job_id: str):
    status = status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest(), timeout=10)
    found = [j for j in [*status.active_jobs, *status.recent_jobs] if j.job_id == job_id]
    return found[0] if found else None


# --- the tiny ControlNet builder ----------------------------------------------------------


def test_tiny_controlnet_builder_is_seeded_and_atomic(controlnet_folders, tmp_path, monkeypatch):
    weights = "diffusion_pytorch_model.safetensors"
    assert sorted(p.name for p in controlnet_folders[0].iterdir()) == ["config.json", weights]
    again = create_tiny_controlnet(tmp_path / "again", seed=0)
    assert (again / weights).read_bytes() == (controlnet_folders[0] / weights).read_bytes()
    assert (controlnet_folders[1] / weights).read_bytes() != (controlnet_folders[0] / weights).read_bytes()
    with pytest.raises(FileExistsError):
        create_tiny_controlnet(again)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no staging folder left behind

    monkeypatch.setenv("LATENTWIRE_HOME", str(tmp_path / "home"))
    built = ensure_default_controlnet()
    assert built == default_controlnet_path() == tmp_path / "home" / "models" / "tiny-controlnet"
    assert (built / weights).read_bytes() == (controlnet_folders[0] / weights).read_bytes()
    assert ensure_default_controlnet() == built  # present: reused, not rebuilt


# --- conformance --------------------------------------------------------------------------

# Each case: the units (ControlNet index, image index, preprocessor, options, scale, start, end),
# batch size, guidance scale (1.0: no classifier-free guidance) and guess mode.
CASES = {
    "one-unit-canny-cfg": dict(units=[(0, 1, "canny", {"low_threshold": 50, "high_threshold": 150}, 1.0, 0.0, 1.0)],
                               batch=1, guidance=7.5, guess=False),
    # Steps 1 and 3 have no active unit; step 0 only cn0, step 2 only cn1.
    "two-units-ranges-cfg-batch2": dict(units=[(0, 0, "none", {}, 0.8, 0.0, 0.25),
                                               (1, 1, "canny", {}, 1.3, 0.5, 0.75)],
                                        batch=2, guidance=7.5, guess=False),
    "two-units-overlapping": dict(units=[(0, 0, "passthrough", {}, 1.0, 0.0, 1.0), (1, 1, "invert", {}, 0.6, 0.25, 1.0)],
                                  batch=1, guidance=7.5, guess=False),
    "guess-mode-cfg": dict(units=[(0, 0, "none", {}, 1.0, 0.0, 1.0), (1, 1, "canny", {}, 0.7, 0.0, 0.5)],
                           batch=1, guidance=7.5, guess=True),
    "no-cfg": dict(units=[(1, 0, "none", {}, 1.2, 0.0, 1.0)], batch=1, guidance=1.0, guess=False),
}


def _pipeline_image(image_index: int, preprocessor: str, options: dict) -> Image.Image:
    image = Image.open(io.BytesIO(PNGS[image_index]))
    if preprocessor == "canny":
        return _canny_reference(image, options.get("low_threshold", 100), options.get("high_threshold", 200))
    if preprocessor == "invert":
        return Image.fromarray(255 - np.array(image.convert("RGB")))
    return image


def _run_pipeline(base_pipeline, nets, case):
    """Run StableDiffusionControlNetPipeline and record its ControlNet's inputs and outputs per step."""
    units = case["units"]
    controlnet = nets[units[0][0]] if len(units) == 1 else [nets[u[0]] for u in units]
    pipe = StableDiffusionControlNetPipeline(**base_pipeline.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(7)
    positive = torch.randn(case["batch"], 5, 8, generator=generator)
    negative = torch.randn(case["batch"], 5, 8, generator=generator)
    calls = []

    def record(module, args, kwargs, output):
        down, mid = output
        calls.append((args[0].clone(), args[1].clone(), [d.clone() for d in down], mid.clone()))

    handle = pipe.controlnet.register_forward_hook(record, with_kwargs=True)
    try:
        images = [_pipeline_image(u[1], u[2], u[3]) for u in units]
        pipe(prompt_embeds=positive, negative_prompt_embeds=negative,
             image=images[0] if len(units) == 1 else images,
             controlnet_conditioning_scale=units[0][4] if len(units) == 1 else [u[4] for u in units],
             control_guidance_start=units[0][5] if len(units) == 1 else [u[5] for u in units],
             control_guidance_end=units[0][6] if len(units) == 1 else [u[6] for u in units],
             guess_mode=case["guess"], guidance_scale=case["guidance"], num_inference_steps=STEPS,
             width=WIDTH, height=HEIGHT, generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        handle.remove()
    cfg = case["guidance"] > 1
    prompt_embeds = torch.cat([negative, positive]) if cfg else positive
    return calls, prompt_embeds, cfg


def _setup(case, prompt_embeds, cfg, job_id="") -> controlnet_pb2.ControlNetSetup:
    units = [
        controlnet_pb2.ControlNetUnit(
            model=model_pb2.ModelReference(name=f"cn{net}") if net else None,  # cn0 through the default
            image=PNGS[image], preprocessor=preprocessor, preprocessor_options=options,
            conditioning_scale=scale, guidance_start=start, guidance_end=end)
        for net, image, preprocessor, options, scale, start, end in case["units"]
    ]
    return controlnet_pb2.ControlNetSetup(
        job_id=job_id, units=units, width=WIDTH, height=HEIGHT, batch_size=case["batch"],
        classifier_free_guidance=cfg, guess_mode=case["guess"], prompt_embeds=tensors.to_proto(prompt_embeds),
        total_steps=STEPS)


@pytest.mark.parametrize("name", list(CASES))
def test_residuals_equal_the_pipeline(name, stub, channel, base_pipeline, nets):
    case = CASES[name]
    calls, prompt_embeds, cfg = _run_pipeline(base_pipeline, nets, case)
    assert len(calls) == STEPS
    job_id = f"controlnet-conformance-{name}"
    requests = [controlnet_pb2.ComputeResidualsRequest(setup=_setup(case, prompt_embeds, cfg, job_id))]
    requests += [controlnet_pb2.ComputeResidualsRequest(step=controlnet_pb2.ControlNetStepInput(
        step_index=i, timestep=float(t), sample=tensors.to_proto(sample))) for i, (sample, t, _, _) in enumerate(calls)]
    responses = list(stub.ComputeResiduals(iter(requests), timeout=60))

    assert responses[0].WhichOneof("output") == "ready"
    assert responses[0].ready.guess_mode == case["guess"]
    assert list(responses[0].ready.models) == [f"cn{u[0]}" for u in case["units"]]
    assert len(responses) == 1 + STEPS
    active_steps = 0
    for i, (response, (_, _, down, mid)) in enumerate(zip(responses[1:], calls)):
        result = response.residuals
        assert result.step_index == i
        if not result.active:
            # The pipeline ran every unit with scale 0 here: all its residuals are zero.
            assert all(not d.any() for d in down) and not mid.any(), f"step {i}: inactive, but the pipeline's are not 0"
            assert not result.down_block_residuals and not result.HasField("mid_block_residual")
            continue
        active_steps += 1
        got_down = [tensors.from_proto(t, field="down") for t in result.down_block_residuals]
        got_mid = tensors.from_proto(result.mid_block_residual, field="mid")
        assert [list(t.shape) for t in got_down] == [list(t.shape) for t in down]
        assert got_mid.shape == mid.shape
        # Residuals clearly non-zero, so the comparison below could fail.
        assert max(float(t.abs().max()) for t in down) > 1e-2
        difference = max(float((g - e).abs().max()) for g, e in zip([*got_down, got_mid], [*down, mid]))
        assert difference <= TOLERANCE, f"step {i}: max abs difference {difference}"
        assert result.compute_seconds > 0
    expected_active = {"two-units-ranges-cfg-batch2": 2}.get(name, STEPS)
    assert active_steps == expected_active

    job = _job(channel, job_id)
    assert job is not None and job.state == status_pb2.JOB_STATE_SUCCEEDED and job.completed_steps == STEPS


def test_a_different_control_image_changes_the_residuals(stub, base_pipeline, nets):
    """Guards the conformance test: the tiny ControlNets do react to the control image."""
    case = CASES["no-cfg"]
    calls, prompt_embeds, cfg = _run_pipeline(base_pipeline, nets, case)
    sample, t, down, mid = calls[0]
    other = dict(case, units=[(1, 1, "none", {}, 1.2, 0.0, 1.0)])
    responses = list(stub.ComputeResiduals(iter([
        controlnet_pb2.ComputeResidualsRequest(setup=_setup(other, prompt_embeds, cfg)),
        controlnet_pb2.ComputeResidualsRequest(step=controlnet_pb2.ControlNetStepInput(
            step_index=0, timestep=float(t), sample=tensors.to_proto(sample)))]), timeout=60))
    got_mid = tensors.from_proto(responses[1].residuals.mid_block_residual, field="mid")
    assert float((got_mid - mid).abs().max()) > 1e-2


# --- preprocessors ------------------------------------------------------------------------


def test_canny_preprocess_equals_cv2(stub):
    response = stub.Preprocess(controlnet_pb2.PreprocessRequest(
        unit=controlnet_pb2.ControlNetUnit(image=PNGS[1], preprocessor="canny")), timeout=30)
    got = Image.open(io.BytesIO(response.png))
    expected = _canny_reference(Image.open(io.BytesIO(PNGS[1])), 100, 200)
    assert got.mode == "RGB" and got.size == expected.size
    assert np.array_equal(np.array(got), np.array(expected))
    assert np.array(got).any() and not np.array(got).all()  # real edges, not a blank image

    resized = stub.Preprocess(controlnet_pb2.PreprocessRequest(
        unit=controlnet_pb2.ControlNetUnit(image=PNGS[1], preprocessor="canny",
                                           preprocessor_options={"low_threshold": 20, "high_threshold": 60}),
        width=40, height=32), timeout=30)
    got = Image.open(io.BytesIO(resized.png))
    expected = _canny_reference(Image.open(io.BytesIO(PNGS[1])), 20, 60).resize((40, 32), Image.Resampling.LANCZOS)
    assert got.size == (40, 32)
    assert np.array_equal(np.array(got), np.array(expected))


def test_list_preprocessors(stub):
    response = stub.ListPreprocessors(controlnet_pb2.ListPreprocessorsRequest(), timeout=10)
    names = [p.name for p in response.preprocessors]
    assert names == sorted(names)
    assert {"none", "canny", "invert", "binary", "blur_gaussian", "tile_resample"} <= set(names)
    canny = next(p for p in response.preprocessors if p.name == "canny")
    options = {o.name: (o.default_value, o.min_value, o.max_value) for o in canny.options}
    assert options == {"low_threshold": (100, 0, 255), "high_threshold": (200, 0, 255)}


def _reference_preprocessed(name: str, rgb: np.ndarray) -> np.ndarray | None:
    """What a preprocessor should make of ``rgb`` (before resizing), where a one-line reference exists."""
    if name == "invert":
        return 255 - rgb
    if name == "blur_gaussian":
        return cv2.GaussianBlur(rgb, (0, 0), 9.0)
    if name == "tile_resample":
        return rgb  # the default down_sampling_rate 1 keeps the image
    return None


@pytest.mark.parametrize("name", ["invert", "binary", "blur_gaussian", "tile_resample", "scribble_xdog",
                                  "lineart_standard"])
def test_every_preprocessor_returns_an_rgb_image(stub, name):
    response = stub.Preprocess(controlnet_pb2.PreprocessRequest(
        unit=controlnet_pb2.ControlNetUnit(image=PNGS[0], preprocessor=name), width=64, height=48), timeout=30)
    image = Image.open(io.BytesIO(response.png))
    assert image.mode == "RGB" and image.size == (64, 48)
    got = np.array(image)
    expected = _reference_preprocessed(name, np.array(Image.open(io.BytesIO(PNGS[0])).convert("RGB")))
    if expected is not None:
        expected = np.array(Image.fromarray(expected).resize((64, 48), Image.Resampling.LANCZOS))
        assert np.array_equal(got, expected)
    if name in ("binary", "scribble_xdog"):
        unresized = np.array(Image.open(io.BytesIO(stub.Preprocess(controlnet_pb2.PreprocessRequest(
            unit=controlnet_pb2.ControlNetUnit(image=PNGS[0], preprocessor=name)), timeout=30).png)))
        assert set(np.unique(unresized)) == {0, 255}  # black and white, both present


# --- bad input ----------------------------------------------------------------------------


def _cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(IMAGES[0]).convert("CMYK").save(buffer, format="JPEG")
    return buffer.getvalue()


def _png16() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((IMAGES[0][:, :, 0].astype(np.uint16) * 257)).save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode.startswith("I;16")
    return buffer.getvalue()


def _unit(**overrides) -> controlnet_pb2.ControlNetUnit:
    fields = dict(image=PNGS[1], preprocessor="canny")
    fields.update(overrides)
    return controlnet_pb2.ControlNetUnit(**fields)


def _valid_setup(**overrides) -> controlnet_pb2.ControlNetSetup:
    fields = dict(units=[_unit()], width=WIDTH, height=HEIGHT, batch_size=1, classifier_free_guidance=True,
                  prompt_embeds=tensors.to_proto(torch.zeros(2, 5, 8)), total_steps=STEPS)
    fields.update(overrides)
    return controlnet_pb2.ControlNetSetup(**fields)


def _step(shape=(2, 4, HEIGHT // 2, WIDTH // 2), index=0) -> controlnet_pb2.ComputeResidualsRequest:
    return controlnet_pb2.ComputeResidualsRequest(step=controlnet_pb2.ControlNetStepInput(
        step_index=index, timestep=500.0, sample=tensors.to_proto(torch.zeros(shape))))


def _setup_request(**overrides) -> controlnet_pb2.ComputeResidualsRequest:
    return controlnet_pb2.ComputeResidualsRequest(setup=_valid_setup(**overrides))


BAD_STREAMS = {
    "step-before-setup": ([_step()], INVALID, "SETUP_REQUIRED", "setup"),
    "unknown-preprocessor": ([_setup_request(units=[_unit(preprocessor="depth_midas")])], INVALID,
                             "UNKNOWN_PREPROCESSOR", "canny"),
    "option-out-of-range": ([_setup_request(units=[_unit(preprocessor_options={"high_threshold": 300})])], INVALID,
                            "PREPROCESSOR_OPTION_OUT_OF_RANGE", "0 to 255"),
    "unknown-option": ([_setup_request(units=[_unit(preprocessor_options={"sigma": 3})])], INVALID,
                       "UNKNOWN_PREPROCESSOR_OPTION", "low_threshold"),
    "undecodable-image": ([_setup_request(units=[_unit(image=b"definitely not a png")])], INVALID,
                          "UNDECODABLE_IMAGE", "units[0].image"),
    "cmyk-image": ([_setup_request(units=[_unit(image=_cmyk_jpeg())])], INVALID, "UNSUPPORTED_IMAGE_MODE", "CMYK"),
    "16-bit-image": ([_setup_request(units=[_unit(image=_png16())])], INVALID, "UNSUPPORTED_IMAGE_MODE", "I;16"),
    "start-not-before-end": ([_setup_request(units=[_unit(guidance_start=0.6, guidance_end=0.6)])], INVALID,
                             "INVALID_GUIDANCE_RANGE", "start < end"),
    "scale-out-of-range": ([_setup_request(units=[_unit(conditioning_scale=11)])], INVALID,
                           "INVALID_CONDITIONING_SCALE", "0 to 10"),
    "width-not-multiple-of-8": ([_setup_request(width=60)], INVALID, "INVALID_SIZE", "multiple of 8"),
    "too-many-units": ([_setup_request(units=[_unit()] * 4)], INVALID, "TOO_MANY_CONTROLNETS", "1 to 3"),
    "batch-too-large": ([_setup_request(batch_size=5)], INVALID, "BATCH_TOO_LARGE", "1 to 4"),
    "prompt-embeds-wrong-width": ([_setup_request(prompt_embeds=tensors.to_proto(torch.zeros(2, 5, 768)))], INVALID,
                                  "INVALID_TENSOR", "[2, tokens, 8]"),
    "prompt-embeds-without-uncond-half": ([_setup_request(prompt_embeds=tensors.to_proto(torch.zeros(1, 5, 8)))],
                                          INVALID, "INVALID_TENSOR", "classifier-free guidance"),
    "unknown-model": ([_setup_request(units=[_unit(model=model_pb2.ModelReference(name="no-such-controlnet"))])],
                      grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", "cn0"),
    "wrong-sample-shape": ([_setup_request(), _step(shape=(1, 4, HEIGHT // 2, WIDTH // 2))], INVALID,
                           "INVALID_TENSOR", f"[2, 4, {HEIGHT // 2}, {WIDTH // 2}]"),
    "sample-at-latent-size-of-another-vae": ([_setup_request(), _step(shape=(2, 4, HEIGHT // 8, WIDTH // 8))], INVALID,
                                             "INVALID_TENSOR", "divided by 2"),
    "step-index-beyond-run": ([_setup_request(), _step(index=STEPS)], INVALID, "INVALID_STEP_INDEX", "0 to 3"),
    "second-setup": ([_setup_request(), _setup_request()], INVALID, "SETUP_REPEATED", "setup"),
}


@pytest.mark.parametrize("name", list(BAD_STREAMS))
def test_bad_stream_gets_a_clear_error(name, stub, channel):
    requests, code, reason, words = BAD_STREAMS[name]
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.ComputeResiduals(iter(requests), timeout=30))
    error = raised.value
    assert error.code() == code, f"{error.code()} {error.details()}"
    assert words in error.details(), error.details()
    info = _error_info(error)
    assert info is not None and info.domain == "latentwire.dev" and info.reason == reason, info
    _assert_serving(channel)


def test_failed_run_is_recorded(stub, channel):
    requests = [controlnet_pb2.ComputeResidualsRequest(setup=_valid_setup(job_id="controlnet-failing")),
                _step(shape=(1, 4, 8, 8))]
    with pytest.raises(grpc.RpcError):
        list(stub.ComputeResiduals(iter(requests), timeout=30))
    job = _job(channel, "controlnet-failing")
    assert job is not None and job.state == status_pb2.JOB_STATE_FAILED


@pytest.mark.parametrize("unit, reason", [
    (_unit(preprocessor="no-such-thing"), "UNKNOWN_PREPROCESSOR"),
    (_unit(preprocessor="blur_gaussian", preprocessor_options={"sigma": 0}), "PREPROCESSOR_OPTION_OUT_OF_RANGE"),
    (_unit(image=b"\x89PNG\r\n\x1a\n truncated"), "UNDECODABLE_IMAGE"),
])
def test_bad_preprocess_gets_a_clear_error(unit, reason, stub, channel):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Preprocess(controlnet_pb2.PreprocessRequest(unit=unit), timeout=30)
    assert raised.value.code() == INVALID
    assert _error_info(raised.value).reason == reason
    _assert_serving(channel)


def test_cancelled_run_is_recorded_as_cancelled(stub, channel):
    import queue

    outgoing: queue.SimpleQueue = queue.SimpleQueue()
    outgoing.put(controlnet_pb2.ComputeResidualsRequest(setup=_valid_setup(job_id="controlnet-cancelled")))

    def requests():
        while (item := outgoing.get()) is not None:
            yield item

    call = stub.ComputeResiduals(requests(), timeout=60)
    assert next(call).WhichOneof("output") == "ready"
    outgoing.put(_step())
    assert next(call).residuals.active
    assert _job(channel, "controlnet-cancelled").state == status_pb2.JOB_STATE_RUNNING
    call.cancel()
    outgoing.put(None)
    # The server learns of the cancellation asynchronously: wait for it, bounded.
    deadline = time.monotonic() + 15
    while (job := _job(channel, "controlnet-cancelled")).state == status_pb2.JOB_STATE_RUNNING:
        assert time.monotonic() < deadline, "the cancelled run is still RUNNING"
        time.sleep(0.05)
    assert job.state == status_pb2.JOB_STATE_CANCELLED and job.completed_steps == 1
    _assert_serving(channel)


def test_run_closed_before_its_last_step_is_recorded_as_cancelled(stub, channel):
    requests = [controlnet_pb2.ComputeResidualsRequest(setup=_valid_setup(job_id="controlnet-short")), _step()]
    responses = list(stub.ComputeResiduals(iter(requests), timeout=30))
    assert [r.WhichOneof("output") for r in responses] == ["ready", "residuals"]
    job = _job(channel, "controlnet-short")
    assert job.state == status_pb2.JOB_STATE_CANCELLED and job.completed_steps == 1 and job.steps_at_cancel == 1

"""One module of limits and checks (services/runtime/limits.py), one image decoder, model-folder errors.

Unit tests of the shared checks, then the real suite: whatever a stage would refuse, the orchestrator
refuses before a job is stored; a bad registry model answers FAILED_PRECONDITION while the service
keeps serving; a normal run logs no warning.
"""
from __future__ import annotations

import io
import math
import re
import shutil
import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest
from PIL import Image

from latentwire.client import Client, control
from latentwire.common.v1 import status_pb2, status_pb2_grpc
from latentwire.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from services.runtime import images, limits
from services.runtime.errors import ConfigurationError, InvalidArgument, ModelFolderError, quote
from services.suite.launcher import start_service, wait_serving
from test_bad_input import INVALID, _error_info, _expect
from test_image_conditioning import control_image

PROMPT = "a lighthouse"


def _reason(call) -> str:
    with pytest.raises(InvalidArgument) as raised:
        call()
    return raised.value.reason


# ----------------------------------------------------------------------------------------------
# The checks


def test_steps():
    limits.check_steps(1)
    limits.check_steps(limits.MAX_STEPS)
    for steps in (0, -1, limits.MAX_STEPS + 1):
        assert _reason(lambda: limits.check_steps(steps)) == "INVALID_STEPS"
    with pytest.raises(InvalidArgument, match="1 to 20"):
        limits.check_steps(21, 20)


def test_sizes():
    limits.check_size("width", 8)
    limits.check_size("width", limits.MAX_IMAGE_SIZE)
    limits.check_size("width", 0, zero_means="the model's default")
    for value in (0, -8, 12):
        error = pytest.raises(InvalidArgument, limits.check_size, "width", value).value
        assert error.reason == "INVALID_SIZE" and "multiple of 8" in error.message
    assert _reason(lambda: limits.check_size("height", 520, 512)) == "IMAGE_TOO_LARGE"
    assert _reason(lambda: limits.check_size("height", limits.MAX_IMAGE_SIZE + 8)) == "IMAGE_TOO_LARGE"


def test_counts_and_ranges():
    limits.check_num_images(1)
    assert _reason(lambda: limits.check_num_images(0)) == "INVALID_NUM_IMAGES"
    assert _reason(lambda: limits.check_num_images(limits.MAX_BATCH + 1)) == "INVALID_NUM_IMAGES"
    assert _reason(lambda: limits.check_batch(0, 4, "batch_size")) == "INVALID_BATCH_SIZE"
    assert _reason(lambda: limits.check_batch(5, 4, "batch_size")) == "BATCH_TOO_LARGE"
    limits.check_guidance(7.5, 0.0, 0.0)
    limits.check_guidance(0, 1, 1)
    assert _reason(lambda: limits.check_guidance(math.nan, 0, 0)) == "INVALID_GUIDANCE_SCALE"
    assert _reason(lambda: limits.check_guidance(101, 0, 0)) == "INVALID_GUIDANCE_SCALE"
    assert _reason(lambda: limits.check_guidance(7.5, 1.5, 0)) == "INVALID_GUIDANCE_RESCALE"
    assert _reason(lambda: limits.check_guidance(7.5, 0, -0.1)) == "INVALID_ETA"
    limits.check_strength(0.5, 4)
    for strength, steps in ((1.5, 10), (-0.1, 10), (math.inf, 10), (0.05, 10)):
        assert _reason(lambda: limits.check_strength(strength, steps)) == "INVALID_STRENGTH"


def test_prompt_and_mask():
    limits.check_prompt("a cat")
    for prompt in ("", "   "):
        assert _reason(lambda: limits.check_prompt(prompt)) == "EMPTY_PROMPT"
    limits.check_mask_size((64, 48), (64, 48), "init_image")
    error = pytest.raises(InvalidArgument, limits.check_mask_size, (32, 32), (64, 48), "init_image").value
    assert error.reason == "MASK_SIZE_MISMATCH" and "32x32" in error.message and "64x48" in error.message


def test_schedulers():
    limits.check_scheduler("")  # the model's own
    limits.check_scheduler("EulerDiscreteScheduler")
    error = pytest.raises(InvalidArgument, limits.check_scheduler, "NoSuchScheduler" * 10).value
    assert error.reason == "UNKNOWN_SCHEDULER" and "EulerDiscreteScheduler" in error.message
    assert "NoSuchScheduler" * 10 not in error.message, "the caller's input is echoed only as a short prefix"


def test_controlnet_units():
    limits.check_controlnet_count(0)
    limits.check_controlnet_count(limits.MAX_CONTROLNET_UNITS)
    assert _reason(lambda: limits.check_controlnet_count(5, 4)) == "TOO_MANY_CONTROLNETS"
    assert _reason(lambda: limits.check_controlnet_count(0, 4, required=True)) == "INVALID_UNITS"
    limits.check_controlnet_unit("u", 1.0, 0.0, 1.0)
    assert _reason(lambda: limits.check_controlnet_unit("u", -1, 0, 1)) == "INVALID_CONDITIONING_SCALE"
    assert _reason(lambda: limits.check_controlnet_unit("u", 11, 0, 1)) == "INVALID_CONDITIONING_SCALE"
    assert _reason(lambda: limits.check_controlnet_unit("u", 1, 0.6, 0.6)) == "INVALID_GUIDANCE_RANGE"
    assert _reason(lambda: limits.check_controlnet_unit("u", 1, math.nan, 1)) == "INVALID_GUIDANCE_RANGE"


def test_preprocessors():
    assert limits.check_preprocessor("", {}) == ("none", {})
    assert limits.check_preprocessor("passthrough", {}) == ("none", {})
    assert limits.check_preprocessor("canny", {"low_threshold": 50}) == (
        "canny", {"low_threshold": 50.0, "high_threshold": 200.0})
    assert _reason(lambda: limits.check_preprocessor("depth_midas", {})) == "UNKNOWN_PREPROCESSOR"
    assert _reason(lambda: limits.check_preprocessor("canny", {"sigma": 1})) == "UNKNOWN_PREPROCESSOR_OPTION"
    assert _reason(lambda: limits.check_preprocessor("canny", {"low_threshold": 900})) == \
        "PREPROCESSOR_OPTION_OUT_OF_RANGE"


def test_preprocessor_table_matches_the_names():
    """The ControlNet service runs exactly the preprocessors (and options) the orchestrator checks against."""
    from services.controlnet import preprocessors

    assert set(preprocessors.PREPROCESSORS) == set(limits.PREPROCESSORS)
    for name, preprocessor in preprocessors.PREPROCESSORS.items():
        assert preprocessor.options == limits.PREPROCESSORS[name]


def test_dtypes_and_flags():
    import argparse

    from services.runtime.device import resolve_dtype

    assert [str(resolve_dtype(name)) for name in limits.DTYPES] == ["torch.float32", "torch.float16", "torch.bfloat16"]
    with pytest.raises(ConfigurationError, match="--dtype"):
        resolve_dtype("float64")
    parse = limits.flag_at_most(999)
    assert parse("150") == 150 and parse("1000") == 999
    for bad in ("0", "many"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)
    assert limits.flag_at_most(4, minimum=0)("0") == 0


def test_quote_bounds_caller_input():
    assert quote("short") == "'short'"
    long = "x" * 500
    assert quote(long) == repr("x" * 40) + "..." and len(quote(long)) < 50


# ----------------------------------------------------------------------------------------------
# One image decoder


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


PICTURE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8))
BAD_IMAGES = [
    ("empty", b"", "IMAGE_EMPTY"),
    ("not-an-image", b"definitely not an image", "UNDECODABLE_IMAGE"),
    ("truncated-png", _encoded(PICTURE, "PNG")[:200], "UNDECODABLE_IMAGE"),
    ("gif", _encoded(PICTURE, "GIF"), "UNDECODABLE_IMAGE"),
]


@pytest.mark.parametrize("case_id,data,reason", BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
def test_same_input_same_reason_everywhere(case_id, data, reason):
    """The diffusion stages' decode and the classifier's give the same reason, with no Pillow internals."""
    from services.classifier.images import decode_image as classifier_decode

    for decode in (lambda: images.decode_image(data, "image"),
                   lambda: classifier_decode(data, field="image", max_pixels=limits.MAX_INPUT_PIXELS)):
        with pytest.raises(InvalidArgument) as raised:
            decode()
        error = raised.value
        assert error.reason == reason and error.message.startswith("image ")
        assert not re.search(r"0x[0-9a-f]{6,}|<[A-Za-z_.]+ ", error.message), error.message


def test_decoder_applies_exif_orientation_as_load_image():
    from transformers.image_utils import load_image

    from services.classifier.images import decode_image as classifier_decode

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    data = _encoded(PICTURE, "JPEG", exif=exif.tobytes())
    expected = load_image(Image.open(io.BytesIO(data)))
    assert expected.size == (40, 64)
    for decoded in (images.to_rgb(images.decode_image(data, "image")),
                    classifier_decode(data, field="image", max_pixels=limits.MAX_INPUT_PIXELS)):
        assert decoded.size == expected.size and np.array_equal(np.asarray(decoded), np.asarray(expected))


def test_decoder_bounds():
    tiny = _encoded(Image.new("RGB", (4, 4)), "PNG")
    assert _reason(lambda: images.decode_image(tiny, "image")) == "IMAGE_TOO_SMALL"
    images.decode_image(tiny, "image", min_side=1)  # the classifier's bound
    assert _reason(lambda: images.decode_image(_encoded(PICTURE, "PNG"), "image", max_pixels=100)) == "IMAGE_TOO_LARGE"
    cmyk = _encoded(Image.new("CMYK", (16, 16)), "JPEG")
    assert _reason(lambda: images.decode_image(cmyk, "image")) == "UNSUPPORTED_IMAGE_MODE"
    assert images.decode_image(cmyk, "image", modes=None).mode == "CMYK"


# ----------------------------------------------------------------------------------------------
# Model folders


def test_model_folder_error_names_the_model_not_the_path(tmp_path):
    from services.runtime.models import check_pipeline_folder

    with pytest.raises(ModelFolderError) as raised:
        check_pipeline_folder(tmp_path, ("unet",), allow_pickle=False)
    error = raised.value.for_model("tiny-sd")
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "MODEL_FOLDER_INVALID"
    assert "model_index.json" in error.message and "'tiny-sd'" in error.message
    assert str(tmp_path) not in error.message, "a caller never sees the server's paths"
    assert str(tmp_path) in str(error), "the operator (start-up message, log) does"


def test_bad_model_folder_ends_the_start_with_one_line(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "services.text_encoder", "--port", "0", "--model", str(tmp_path)],
                               capture_output=True, text=True, timeout=180)
    assert completed.returncode == 2, completed.stderr
    assert f"error: {tmp_path}: model_index.json is missing" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.slow
def test_bad_registry_model_fails_the_request_and_the_service_keeps_serving(tiny_classifier, tmp_path):
    """A registry model loaded on demand whose folder is unusable: FAILED_PRECONDITION, and the service serves on."""
    from latentwire.classifier.v1 import classifier_pb2_grpc
    from latentwire.client.classifier import ClassifierClient
    from latentwire.client.registry import RegistryClient
    from services.tiny_models.mobilevit import synthetic_images

    broken = tmp_path / "broken"
    shutil.copytree(tiny_classifier, broken)
    (broken / "preprocessor_config.json").unlink()  # the registry takes it; the classifier cannot preprocess
    log_dir = tmp_path / "logs"
    registry = start_service("registry", "services.registry", ["--port", "0", "--data-dir", str(tmp_path / "data")],
                             log_dir=log_dir)
    classifier = None
    try:
        wait_serving(registry.address, 60, "registry", registry.process)
        with RegistryClient(registry.address) as client:
            client.import_folder(broken, "broken-classifier")
        classifier = start_service("classifier", "services.classifier", [
            "--port", "0", "--model", str(tiny_classifier), "--registry", registry.address,
            "--cache-dir", str(tmp_path / "cache")], log_dir=log_dir)
        wait_serving(classifier.address, 180, "classifier", classifier.process)
        with grpc.insecure_channel(classifier.address) as channel:
            stub = classifier_pb2_grpc.ClassifierServiceStub(channel)
            request = ClassifierClient.build_request(synthetic_images(1), model="broken-classifier")
            with pytest.raises(grpc.RpcError) as raised:
                stub.Classify(request, timeout=120)
            error = raised.value
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
            assert _error_info(error).reason == "MODEL_FOLDER_INVALID"
            assert "preprocessor_config.json" in error.details() and str(tmp_path) not in error.details()
            # The service is still up and serves its own model.
            request.ClearField("model")
            assert stub.Classify(request, timeout=60).results[0].classes
        assert classifier.process.poll() is None
    finally:
        for service in (classifier, registry):
            if service is not None:
                service.process.send_signal(signal.SIGTERM)
                assert service.process.wait(60) == 0


# ----------------------------------------------------------------------------------------------
# The real suite: refused before a job is stored


def _job_ids(suite, channel_to) -> tuple[set[str], set[str]]:
    """The orchestrator's stored jobs and the jobs the text encoder has seen."""
    orchestrator = orchestrator_pb2_grpc.OrchestratorServiceStub(channel_to(suite.address))
    stored = {j.job_id for j in orchestrator.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=1000), timeout=30).jobs}
    status = status_pb2_grpc.StatusServiceStub(channel_to(suite.services["text_encoder"].address)).GetStatus(
        status_pb2.GetStatusRequest(), timeout=30)
    return stored, {j.job_id for j in (*status.active_jobs, *status.recent_jobs)}


STAGE_REFUSALS = [
    # The suite's orchestrator runs with --max-steps 1000: lowered to the 999 the denoiser allows.
    ("steps-beyond-the-denoiser", dict(steps=1000), ["1 to 999"], "INVALID_STEPS"),
    ("unknown-scheduler", dict(scheduler="NoSuchScheduler"), ["NoSuchScheduler", "EulerDiscreteScheduler"],
     "UNKNOWN_SCHEDULER"),
    ("unknown-preprocessor", dict(controlnets=[control(control_image(), "hed-from-the-future")]),
     ["hed-from-the-future", "canny"], "UNKNOWN_PREPROCESSOR"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case_id,settings,words,reason", STAGE_REFUSALS, ids=[c[0] for c in STAGE_REFUSALS])
def test_what_a_stage_refuses_is_refused_before_a_job_exists(suite, channel_to, case_id, settings, words, reason):
    before = _job_ids(suite, channel_to)
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel_to(suite.address))
    request = Client.build_request(PROMPT, seed=1, **{"steps": 2, **settings})
    _expect(lambda: stub.Generate(request, timeout=60), INVALID, *words, reason=reason)
    assert _job_ids(suite, channel_to) == before, "a refused request left a job behind"


@pytest.mark.slow
def test_the_denoiser_offers_only_known_schedulers(suite, channel_to):
    from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc

    stub = denoiser_pb2_grpc.DenoiserServiceStub(channel_to(suite.services["denoiser"].address))
    offered = stub.ListSchedulers(denoiser_pb2.ListSchedulersRequest(), timeout=30)
    assert offered.schedulers and set(offered.schedulers) <= set(limits.SCHEDULERS)
    assert offered.default_scheduler in offered.schedulers


def test_orchestrator_help_says_limits_are_lowered():
    completed = subprocess.run([sys.executable, "-m", "services.orchestrator", "--help"], capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    text = " ".join(completed.stdout.split())
    assert (f"--max-steps MAX_STEPS most denoising steps a request may ask for; at most {limits.MAX_STEPS} "
            "(a larger value is lowered to it)") in text

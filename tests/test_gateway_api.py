"""The REST gateway's AUTOMATIC1111 API (services/gateway), driven by `webuiapi` from PyPI, unmodified, and by
request bodies recorded from Open WebUI, against one gateway process over the session suite (`gateway`).

The auth and TLS cases run on a second gateway (HTTP basic, HTTPS with a `latentwire certs` certificate) over a
second orchestrator that checks bearer tokens, both over the session suite's stages.
"""
from __future__ import annotations

import base64
import io
import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

from latentwire.client import Client
from latentwire.client.client import control

DATA = Path(__file__).parent / "data" / "gateway"
PROMPT = "a lighthouse on a cliff at dawn"
SIZE = 64


def _api(gateway) -> webuiapi.WebUIApi:
    host, port = gateway.address.rsplit(":", 1)
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=3)


def _pixels(image) -> np.ndarray:
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def api(gateway):
    return _api(gateway)


@pytest.fixture(scope="module")
def plain(api):
    """One webuiapi txt2img (seed 7, 3 steps, Euler a): shared by the pixel and ControlNet checks."""
    return api.txt2img(prompt=PROMPT, negative_prompt="fog", seed=7, steps=3, cfg_scale=6.0, width=SIZE,
                       height=SIZE)


def test_webuiapi_txt2img_same_pixels_as_the_client(plain, suite):
    """webuiapi's txt2img equals `latentwire generate` (the Python client) with the same seed and settings, and
    answers A1111's info keys, infotexts included."""
    with Client(suite.address, timeout=120) as client:
        expected = client.generate(PROMPT, negative_prompt="fog", seed=7, steps=3, guidance_scale=6.0, width=SIZE,
                                   height=SIZE, sampler="Euler a")
    assert len(plain.images) == 1
    assert np.array_equal(_pixels(plain.image), _pixels(expected.images[0]))
    info = plain.info
    assert info["seed"] == 7 and info["all_seeds"] == [7] and info["sd_model_name"] == "tiny-sd"
    assert info["width"] == SIZE and info["sampler_name"] == "Euler a" and info["steps"] == 3
    assert "Seed: 7" in info["infotexts"][0] and "Steps: 3" in info["infotexts"][0]
    assert plain.parameters["prompt"] == PROMPT and plain.parameters["seed"] == 7


def test_controlnet_unit_in_sd_webui_controlnet_shape(api, plain, suite):
    """A webuiapi ControlNetUnit (alwayson_scripts "ControlNet" args) runs as the suite's ControlNet unit: the same
    pixels as the client's unit, and not the plain image."""
    hint = _picture(3)
    unit = webuiapi.ControlNetUnit(image=hint, module="none", model="cn-b [0123abcd]", weight=0.8,
                                   guidance_start=0.0, guidance_end=0.9)
    result = api.txt2img(prompt=PROMPT, negative_prompt="fog", seed=7, steps=3, cfg_scale=6.0, width=SIZE,
                         height=SIZE, controlnet_units=[unit])
    with Client(suite.address, timeout=120) as client:
        expected = client.generate(PROMPT, negative_prompt="fog", seed=7, steps=3, guidance_scale=6.0, width=SIZE,
                                   height=SIZE, sampler="Euler a",
                                   controlnets=[control(_png(hint), "none", scale=0.8, start=0.0, end=0.9,
                                                        model="cn-b")])
    assert np.array_equal(_pixels(result.image), _pixels(expected.images[0]))
    assert not np.array_equal(_pixels(result.image), _pixels(plain.image))


def test_img2img_inpainting_and_an_options_model_switch(api, gateway):
    """img2img, then an options change to the inpainting model: the next inpainting request (a mask drawn white
    where to repaint) runs on it; switching back restores the default."""
    init = _picture(1)
    img2img = api.img2img(images=[init], prompt=PROMPT, seed=5, steps=3, denoising_strength=0.6, width=SIZE,
                          height=SIZE)
    assert img2img.image.size == (SIZE, SIZE) and img2img.info["sd_model_name"] == "tiny-sd"
    assert img2img.info["denoising_strength"] == 0.6
    assert sorted(m["title"] for m in api.get_sd_models()) == ["tiny-sd", "tiny-sd-inpainting"]
    api.util_set_model("tiny-sd-inpainting")
    try:
        assert api.util_get_current_model() == "tiny-sd-inpainting"
        mask = Image.new("L", (SIZE, SIZE), 0)
        mask.paste(255, (16, 16, 48, 48))
        inpainted = api.img2img(images=[init], mask_image=mask, mask_blur=0, prompt=PROMPT, seed=5, steps=3,
                                denoising_strength=1.0, width=SIZE, height=SIZE)
        assert inpainted.info["sd_model_name"] == "tiny-sd-inpainting"
        assert inpainted.info["is_using_inpainting_conditioning"] is True
        # Outside the mask the image is mostly the init image, inside it repainted.
        out, before = _pixels(inpainted.image), _pixels(init)
        inside = np.abs(out[20:44, 20:44] - before[20:44, 20:44]).mean()
        outside = np.abs(out[:8] - before[:8]).mean()
        assert inside > outside
    finally:
        api.util_set_model("tiny-sd")
    assert api.get_options()["sd_model_checkpoint"] == "tiny-sd"


def test_interrupt_stops_a_running_job_and_progress_follows_it(api, gateway):
    """A long txt2img in the background: /progress shows its steps and a live preview, interrupt ends it early
    and the call answers 200 with the image so far (A1111's), whose infotext keeps the requested steps; /progress
    is idle again."""
    answers = {}

    def run():
        try:
            answers["result"] = _api(gateway).txt2img(prompt=PROMPT, seed=1, steps=900, width=SIZE, height=SIZE)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            answers["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    seen, preview = None, None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and thread.is_alive():
        progress = api.get_progress()
        if progress["state"]["sampling_step"] >= 3:
            seen = progress
            preview = preview or progress["current_image"]
            if preview:
                break
        time.sleep(0.05)
    assert seen is not None, f"the job never showed steps in /progress: {answers}"
    assert seen["state"]["sampling_steps"] == 900 and 0 < seen["progress"] < 1 and seen["eta_relative"] > 0
    assert seen["state"]["job_count"] == 1 and seen["textinfo"].startswith("Sampling step")
    Image.open(io.BytesIO(base64.b64decode(preview))).verify()  # the live preview is an image
    api.interrupt()
    thread.join(60)
    assert not thread.is_alive()
    result = answers["result"]  # a KeyError here: the call failed, see answers["error"]
    assert len(result.images) == 1 and result.images[0].size == (SIZE, SIZE) and result.info["all_seeds"] == [1]
    assert "Steps: 900," in result.info["infotexts"][0]
    idle = api.get_progress()
    assert idle["state"]["job_count"] == 0 and idle["progress"] == 0 and idle["current_image"] is None


def test_skip_finishes_the_current_batch_and_runs_the_next(api, gateway):
    """skip during batch 1 of n_iter 2: batch 1 ends early with its image so far, batch 2 runs in full; both
    images come back (A1111's skip)."""
    answers = {}

    def run():
        try:
            answers["result"] = _api(gateway).txt2img(prompt=PROMPT, seed=21, steps=60, n_iter=2, width=SIZE,
                                                      height=SIZE)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            answers["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and thread.is_alive():
        if api.get_progress()["state"]["sampling_step"] >= 2:
            break
        time.sleep(0.02)
    api.skip()
    thread.join(120)
    assert not thread.is_alive()
    result = answers["result"]  # a KeyError here: the call failed, see answers["error"]
    assert len(result.images) == 2 and result.info["all_seeds"] == [21, 22]
    # Batch 2 ran in full: it is the image of a plain call with its seed.
    full = _api(gateway).txt2img(prompt=PROMPT, seed=22, steps=60, width=SIZE, height=SIZE)
    assert np.array_equal(_pixels(result.images[1]), _pixels(full.image))
    assert not np.array_equal(_pixels(result.images[0]), _pixels(full.image))


def test_hires_fix_batch_and_seed_fields(gateway):
    """enable_hr with its fields runs the suite's hires fix (twice the size), batch_size and n_iter make one
    image per seed, and the variation seed fields reach the infotext."""
    body = {"prompt": PROMPT, "seed": 11, "steps": 2, "width": SIZE, "height": SIZE, "batch_size": 1, "n_iter": 2,
            "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent (nearest)", "hr_second_pass_steps": 2,
            "denoising_strength": 0.5, "subseed": 5, "subseed_strength": 0.25}
    answer = requests.post(f"{gateway.url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    images = [Image.open(io.BytesIO(base64.b64decode(image))) for image in answer.json()["images"]]
    assert [image.size for image in images] == [(2 * SIZE, 2 * SIZE)] * 2
    info = json.loads(answer.json()["info"])
    assert info["all_seeds"] == [11, 12] and info["subseed"] == 5
    text = info["infotexts"][0]
    assert "Hires upscale: 2" in text and "Hires upscaler: Latent (nearest)" in text and "Variation seed: 5" in text


def test_lists_options_png_info_and_docs(api, gateway, plain):
    samplers = {s["name"] for s in api.get_samplers()}
    assert {"Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= samplers
    assert {"automatic", "karras", "sgm_uniform"} <= {s["name"] for s in api.get_schedulers()}
    assert {"Latent", "Lanczos", "None"} <= {u["name"] for u in api.get_upscalers()}
    assert api.get_sd_vae() == [] and api.get_loras() == [] and api.get_embeddings()["loaded"] == {}
    assert "ram" in api.get_memory()
    options = api.get_options()
    assert options["samples_format"] == "png" and options["CLIP_stop_at_last_layers"] == 1
    png = base64.b64decode(plain.json["images"][0])
    info = api.png_info(Image.open(io.BytesIO(png)))
    assert info.parameters["Seed"] == "7" and info.parameters["Prompt"] == PROMPT and "Seed: 7" in info.info
    api.refresh_checkpoints()
    document = requests.get(f"{gateway.url}/openapi.json", timeout=10).json()
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress"} <= set(document["paths"])
    assert requests.get(f"{gateway.url}/docs", timeout=10).status_code == 200


def test_open_webui_bodies(gateway):
    """The bodies Open WebUI sends (tests/data/gateway): a model switch by options round trip, then txt2img with
    the admin's extra parameters (a sampler and an A1111 1.9 lower-case schedule type)."""
    recorded = json.loads((DATA / "open_webui_set_model.json").read_text())
    headers = recorded["headers"]
    titles = [m["title"] for m in requests.get(f"{gateway.url}/sdapi/v1/sd-models", headers=headers, timeout=10).json()]
    assert recorded["model_title"] in titles
    options = requests.get(f"{gateway.url}/sdapi/v1/options", headers=headers, timeout=10).json()
    options["sd_model_checkpoint"] = recorded["model_title"]
    assert requests.post(f"{gateway.url}/sdapi/v1/options", json=options, headers=headers, timeout=10).ok
    recorded = json.loads((DATA / "open_webui_txt2img.json").read_text())
    answer = requests.post(f"{gateway.url}/sdapi/v1/txt2img", json=recorded["body"], headers=recorded["headers"],
                           timeout=120)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    info = json.loads(body["info"])
    assert len(body["images"]) == 1 and "Schedule type: Karras" in info["infotexts"][0]
    assert "Sampler: DPM++ 2M" in info["infotexts"][0]


@pytest.mark.parametrize("body,field", [
    ({"prompt": "x", "steps": "many"}, "steps"),
    ({"prompt": "x", "width": 0}, "width"),
    ({"prompt": "x", "batch_size": 0}, "batch_size"),
])
def test_bad_bodies_get_422_with_field_errors(gateway, body, field):
    answer = requests.post(f"{gateway.url}/sdapi/v1/txt2img", json=body, timeout=10)
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert [item["loc"] for item in detail] == [["body", field]], detail
    assert answer.json()["reason"] == "INVALID_REQUEST_BODY"


def test_suite_errors_keep_their_reason(gateway):
    url = f"{gateway.url}/sdapi/v1"
    unknown = requests.post(f"{url}/txt2img", json={"prompt": "x", "steps": 2, "width": SIZE, "height": SIZE,
                                                    "sampler_name": "Euler b"}, timeout=30)
    assert unknown.status_code == 422 and unknown.json()["reason"] == "UNKNOWN_SAMPLER", unknown.text
    assert "Euler a" in unknown.json()["detail"]
    too_big = requests.post(f"{url}/txt2img", json={"prompt": "x", "steps": 2, "width": 1024, "height": SIZE},
                            timeout=30)
    assert too_big.status_code == 422 and too_big.json()["reason"] == "IMAGE_TOO_LARGE", too_big.text
    no_image = requests.post(f"{url}/img2img", json={"prompt": "x", "init_images": ["bm90IGFuIGltYWdl"]}, timeout=30)
    assert no_image.status_code == 422 and no_image.json()["reason"] == "INVALID_IMAGE", no_image.text
    assert no_image.json()["field"] == "init_images[0]"
    model = requests.post(f"{url}/options", json={"sd_model_checkpoint": "nope"}, timeout=30)
    assert model.status_code == 404 and model.json()["reason"] == "MODEL_NOT_FOUND"
    script = requests.post(f"{url}/txt2img", json={"prompt": "x", "script_name": "x/y/z plot"}, timeout=30)
    assert script.status_code == 422 and script.json()["reason"] == "SCRIPT_NOT_FOUND"


def test_sixteen_rest_clients_and_progress_latency(gateway):
    """A short run of bench/gateway_load.py: 16 REST clients queue through the orchestrator with no failure, and
    /progress answers within 100 ms at p95 while sampling runs."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from gateway_load import run_gateway_load

    summary = run_gateway_load(gateway.url, clients=16, seconds=4, steps=2, size=SIZE).summary()
    assert summary["failed"] == 0 and summary["completed"] >= 16, summary
    assert summary["progress_polls_while_sampling"] >= 10, summary
    assert summary["progress_p95_ms"] < 100, summary


# -- auth and TLS ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def secured(suite, tmp_path_factory):
    """An orchestrator that checks bearer tokens (over the session suite's stages) and a gateway over it with
    --api-auth (alice has a suite token, bob has none) serving HTTPS with a `latentwire certs` certificate."""
    from latentwire.cli.certs import write_certificates
    from services.suite.launcher import ORCHESTRATOR_MODULE, Suite, start_gateway, start_service, wait_serving

    root = tmp_path_factory.mktemp("gateway-secured")
    certs = write_certificates(root / "certs", names=["gateway"])
    tokens = root / "tokens.txt"
    tokens.write_text("alice-token generate,classify principal=alice\n")
    stage_args = [f"--{name.replace('_', '-')}-address" for name in ("text_encoder", "denoiser", "vae")]
    args = ["--host", "127.0.0.1", "--port", "0", "--auth-tokens-file", str(tokens)]
    for flag, name in zip(stage_args, ("text_encoder", "denoiser", "vae")):
        args += [flag, suite.services[name].address]
    orchestrator = start_service("orchestrator-secured", ORCHESTRATOR_MODULE, args, log_dir=suite.log_dir)
    gateway = None
    try:
        wait_serving(orchestrator.address, 120, "orchestrator-secured", orchestrator.process)
        over = Suite(services={"orchestrator": orchestrator}, models=list(suite.models))
        gateway = start_gateway(over, port=0, log_dir=root, args=[
            "--api-auth", "alice:wonderland,bob:builder", "--auth-tokens-file", str(tokens),
            "--tls-cert", str(certs / "gateway.pem"), "--tls-key", str(certs / "gateway-key.pem")])
        yield {"url": f"https://{gateway.address}", "ca": str(certs / "ca.pem"), "orchestrator": orchestrator.address}
    finally:
        for service in (gateway, orchestrator):
            if service is not None and service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        codes = [service.process.wait(30) for service in (gateway, orchestrator) if service is not None]
        assert codes == [0] * len(codes), codes


def test_basic_auth_principals_and_tls(secured):
    url, ca = secured["url"] + "/sdapi/v1", secured["ca"]
    body = {"prompt": PROMPT, "seed": 2, "steps": 2, "width": SIZE, "height": SIZE}
    assert requests.get(f"{url}/progress", verify=ca, timeout=10).status_code == 401
    wrong = requests.post(f"{url}/txt2img", json=body, auth=("alice", "nope"), verify=ca, timeout=10)
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Basic"
    answer = requests.post(f"{url}/txt2img", json=body, auth=("alice", "wonderland"), verify=ca, timeout=120)
    assert answer.status_code == 200, answer.text
    # alice's job belongs to her principal in the suite's job store.
    with Client(secured["orchestrator"], timeout=30, token="alice-token") as client:
        jobs = client.list_jobs(page_size=1).jobs
    assert jobs[0].owner == "alice" and jobs[0].seed == 2
    # bob has no suite token: the orchestrator's refusal comes back with its reason.
    refused = requests.post(f"{url}/txt2img", json=body, auth=("bob", "builder"), verify=ca, timeout=30)
    assert refused.status_code == 401 and refused.json()["reason"] == "MISSING_TOKEN", refused.text
    # Plain HTTP to the HTTPS port gets no answer.
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(secured["url"].replace("https", "http") + "/sdapi/v1/samplers", timeout=5)

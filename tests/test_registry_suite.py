"""The suite on registry models: stages fetch from the registry into their own empty caches."""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from latentwire.client import Client
from latentwire.client.registry import RegistryClient
from latentwire.common.v1 import status_pb2, status_pb2_grpc
from services.suite.launcher import start_suite
from services.tiny_models import create_tiny_sd

from reference import reference_pixels

#: Starts service processes: left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow

PORTS = dict.fromkeys(["orchestrator", "text_encoder", "denoiser", "vae", "registry"], 0)


@pytest.fixture(scope="module")
def second_model(tmp_path_factory):
    """The tiny architecture with other weights (seed 1): a second version of the same model."""
    return create_tiny_sd(tmp_path_factory.mktemp("models-v2") / "tiny-sd", seed=1)


@pytest.fixture(scope="module")
def registry_suite(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("registry-suite")
    # A 1-byte bound: each stage keeps only the model it loaded last (running jobs keep theirs).
    bound = ["--max-model-bytes", "1"]
    suite = start_suite(tiny_model, ports=PORTS, log_dir=root / "logs", registry_dir=root / "registry",
                        cache_root=root / "cache", extra_args={"text_encoder": bound, "denoiser": bound, "vae": bound,
                                                               "orchestrator": ["--max-steps", "1000"]})
    suite.root = root
    yield suite
    codes = suite.stop()
    assert all(code == 0 for code in codes.values()), codes


def _loaded(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        status = status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest(), timeout=10)
    return [m.name for m in status.loaded_models]


def test_stages_fetch_only_their_components(registry_suite, tiny_model):
    with Client(registry_suite.address, timeout=120) as client:
        result = client.generate("a castle", seed=11, steps=6, include_pixels=True, negative_prompt="fog")
    expected = reference_pixels(tiny_model, "a castle", seed=11, steps=6, guidance_scale=7.5, negative_prompt="fog")
    assert float(np.abs(result.pixels - expected).max()) <= 1e-5
    weights = {
        stage: sorted(p.relative_to(registry_suite.root / "cache" / stage / "models" / "tiny-sd" / "1").as_posix()
                      for p in (registry_suite.root / "cache" / stage / "models" / "tiny-sd" / "1").rglob("*.safetensors"))
        for stage in ("text_encoder", "denoiser", "vae")
    }
    assert weights == {
        "text_encoder": ["text_encoder/model.safetensors"],
        "denoiser": ["unet/diffusion_pytorch_model.safetensors"],
        "vae": ["vae/diffusion_pytorch_model.safetensors"],
    }


def test_alias_move_during_a_request(registry_suite, tiny_model, second_model):
    registry = RegistryClient(registry_suite.services["registry"].address)
    version2 = registry.import_folder(second_model, "tiny-sd").model_version
    assert version2.version == 2 and registry.get_model("tiny-sd").aliases["default"] == 1

    with Client(registry_suite.address, timeout=300) as client:
        request = client.build_request("a slow boat", seed=21, steps=300, guidance_scale=1.0, include_pixels=True)
        call = client.stream(request)
        events = []
        moved = threading.Event()
        for event in call:
            events.append(event)
            if event.WhichOneof("event") == "step" and event.step.step == 3 and not moved.is_set():
                registry.set_alias("tiny-sd", "default", 2)  # moved while the job runs
                moved.set()
        accepted = events[0].accepted
        assert accepted.model == "tiny-sd@1" and events[-1].result.model == "tiny-sd@1"
        first = events[-1].result

        # The next request resolves the moved alias: version 2, loaded on demand (the stream says so).
        second_events = list(client.stream(client.build_request("a slow boat", seed=21, steps=4, guidance_scale=1.0,
                                                                include_pixels=True)))
    kinds = [e.WhichOneof("event") for e in second_events]
    assert second_events[0].accepted.model == "tiny-sd@2"
    loading = [e.model_loading for e in second_events if e.WhichOneof("event") == "model_loading"]
    assert {e.stage for e in loading if not e.done} == {"text_encoder", "denoiser", "vae"}
    assert {e.stage for e in loading if e.done} == {"text_encoder", "denoiser", "vae"}
    assert kinds.index("model_loading") < kinds.index("text_encoded")

    from latentwire.client.client import pixels_from_tensor

    old = pixels_from_tensor(first.pixels)
    new = pixels_from_tensor(second_events[-1].result.pixels)
    assert float(np.abs(old - reference_pixels(tiny_model, "a slow boat", seed=21, steps=300,
                                               guidance_scale=1.0)).max()) <= 1e-5
    assert float(np.abs(new - reference_pixels(second_model, "a slow boat", seed=21, steps=4,
                                               guidance_scale=1.0)).max()) <= 1e-5
    # The memory bound unloaded version 1 once version 2 came in.
    for stage in ("text_encoder", "denoiser", "vae"):
        assert _loaded(registry_suite.services[stage].address) == ["tiny-sd@2"]
    registry.close()


def test_unknown_registry_model(registry_suite):
    from latentwire.client import LatentwireError

    with Client(registry_suite.address, timeout=60) as client:
        with pytest.raises(LatentwireError) as raised:
            client.generate("x", model="nothing-here", steps=2)
    assert raised.value.code == grpc.StatusCode.NOT_FOUND

"""The running suite on every model family, shared by the family tests (tests/conftest.py makes these session
fixtures): test_families_suite.py (conformance through the orchestrator), test_families_faults.py (Flux
cancellation on its denoiser) and test_text_encoder_families.py (its text encoder, and the T5-only replica).

- ``start_family_suite``: the suite on registry models, seeded with the tiny SDXL (its default model); every other
  family model is imported into the registry, and the stages fetch each one into their own empty cache on first
  use.
- ``start_second_orchestrator``: two more text-encoder replicas (CLIP-L + CLIP-G of SD3 on "te-clip", SD3's T5
  alone on "te-t5"), a second denoiser ("gpu-b"; the suite's is "gpu-a"), each fed by the same registry into its
  own empty cache (``<suite root>/second/cache/<name>``), and a second orchestrator whose placement file lists
  them with the suite's denoiser and VAE.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from latentwire.client.registry import RegistryClient
from services.suite.launcher import ORCHESTRATOR_MODULE, STAGES, start_service, start_suite, wait_serving

PORTS = dict.fromkeys(["orchestrator", "text_encoder", "denoiser", "vae", "registry"], 0)
#: Registry model names: the folder names of conftest's tiny_family_models ("tiny-sdxl", ...), by family key.
NAMES = {key: f"tiny-{key}" for key in ("sd15", "sdxl", "sdxl-karras", "sdxl-refiner", "sd3", "flux")}
SDXL, SDXL_KARRAS, REFINER, SD3, FLUX, SD15 = (NAMES[k] for k in ("sdxl", "sdxl-karras", "sdxl-refiner", "sd3",
                                                                  "flux", "sd15"))
#: Tiny preview VAEs (tests/test_preview_vae.py imports them into the registry): the denoiser's configured one for
#: Flux (--preview-vae flux=NAME), resolved when a run first asks for previews by "tiny-vae" without naming one.
PREVIEW_VAE_TAESD, PREVIEW_VAE_TAEF1 = "tiny-taesd", "tiny-taef1"
#: The second orchestrator's text-encoder replicas and the SD3 encoders each hosts.
SPLIT = {"te-clip": "text_encoder,text_encoder_2", "te-t5": "text_encoder_3"}


@contextmanager
def start_family_suite(models: dict[str, Path], root: Path) -> Iterator:
    suite = start_suite(models["sdxl"], ports=PORTS, log_dir=root / "logs", registry_dir=root / "registry",
                        cache_root=root / "cache",
                        extra_args={"denoiser": ["--preview-vae", f"flux={PREVIEW_VAE_TAEF1}", "--metrics-port", "0"]})
    suite.root = root
    try:
        with RegistryClient(suite.services["registry"].address, timeout=120) as registry:
            for key, folder in models.items():
                if key != "sdxl":
                    registry.import_folder(folder, folder.name, aliases=["default"])
        yield suite
    finally:
        codes = suite.stop()
        assert all(code == 0 for code in codes.values()), f"unclean exit codes {codes}; logs in {root / 'logs'}"


@contextmanager
def start_second_orchestrator(family_suite) -> Iterator[dict]:
    root = family_suite.root / "second"
    registry = family_suite.services["registry"].address
    started = {}

    def start(name: str, module: str, model: str, *args: str) -> None:
        started[name] = start_service(name, module, [
            "--host", "127.0.0.1", "--port", "0", "--model", model, "--registry", registry,
            "--cache-dir", str(root / "cache" / name), *args], log_dir=root / "logs")

    try:
        for device, encoders in SPLIT.items():
            start(device, STAGES["text_encoder"], SD3, "--encoders", encoders)
        start("gpu-b", STAGES["denoiser"], REFINER)
        placement = root / "placement.yaml"
        placement.write_text(
            "text_encoder:\n"
            + "".join(f"  - {{address: \"{started[d].address}\", device: {d}}}\n" for d in SPLIT)
            + f"denoiser:\n  - {{address: \"{family_suite.services['denoiser'].address}\", device: gpu-a}}\n"
            + f"  - {{address: \"{started['gpu-b'].address}\", device: gpu-b}}\n"
            + f"vae:\n  - \"{family_suite.services['vae'].address}\"\n")
        started["orchestrator"] = start_service("orchestrator", ORCHESTRATOR_MODULE, [
            "--host", "127.0.0.1", "--port", "0", "--placement", str(placement), "--registry", registry,
            "--default-model", SD3], log_dir=root / "logs")
        for name, service in started.items():
            wait_serving(service.address, 300, name, service.process)
        yield started
    finally:
        for service in started.values():
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        codes = {name: service.process.wait(30) for name, service in started.items()}
        assert all(code == 0 for code in codes.values()), f"unclean exit codes {codes}; logs in {root / 'logs'}"

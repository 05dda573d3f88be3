"""Shared fixtures: a tiny model built locally and the real suite on ephemeral ports.

Every service runs as its own process with real gRPC servers, started by the same launcher as `latentwire up`
starts them; nothing of ours is mocked. The session forks them from a fork server that imported torch, diffusers
and transformers once (services/suite/forkserver.py: about 10 s of CPU saved per service started);
LATENTWIRE_TEST_FORK_SERVER=0 starts each as a new interpreter instead.
"""
from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from latentwire.client import Client
from services.suite.launcher import start_suite
from services.tiny_models import create_tiny_sd


def pytest_terminal_summary(terminalreporter):
    """Say which start-up variables made the fork server start services as new interpreters (forkserver.py)."""
    from services.suite import forkserver

    if forkserver.FALLBACKS:
        terminalreporter.write_line(f"fork server: services started as new interpreters because these start-up "
                                    f"variables differed from the server's: {dict(forkserver.FALLBACKS)}")


@pytest.fixture(scope="session", autouse=True)
def fork_server(tmp_path_factory):
    """The session's fork server (its socket in LATENTWIRE_FORK_SERVER, which the launcher, also in `latentwire up`
    processes the tests start, reads), unless LATENTWIRE_TEST_FORK_SERVER=0."""
    import subprocess
    import sys

    from services.suite import forkserver
    from services.suite.launcher import service_environment

    if os.environ.get("LATENTWIRE_TEST_FORK_SERVER", "1") == "0" or os.environ.get(forkserver.ENV_VAR):
        yield None
        return
    socket_path = str(tmp_path_factory.mktemp("fork-server") / "socket")
    process = subprocess.Popen([sys.executable, "-m", "services.suite.forkserver", socket_path],
                               stdout=subprocess.PIPE, env=service_environment())
    ready = process.stdout.readline().decode()
    if not ready.startswith("fork server ready"):
        process.kill()
        # The tests still run, each service started as a new interpreter (slower): say why once.
        import warnings

        warnings.warn(f"the fork server did not start (exit {process.wait()}); services start as new interpreters")
        yield None
        return
    os.environ[forkserver.ENV_VAR] = socket_path
    try:
        yield socket_path
    finally:
        os.environ.pop(forkserver.ENV_VAR, None)
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random-weight Stable Diffusion folder (diffusers format, safetensors), seed 0."""
    return create_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_inpainting_model(tmp_path_factory) -> Path:
    """A tiny dedicated inpainting model (9-channel UNet), seed 0; served by the suite as "tiny-sd-inpainting"."""
    return create_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-inpainting", inpainting=True)


@pytest.fixture(scope="session")
def tiny_controlnets(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny ControlNets for the tiny model (seeds 0 and 1); the suite serves them as "cn-a" (default) and "cn-b"."""
    from services.tiny_models.controlnet import create_tiny_controlnet

    root = tmp_path_factory.mktemp("controlnets")
    return create_tiny_controlnet(root / "cn-a", seed=0), create_tiny_controlnet(root / "cn-b", seed=1)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    """A tiny random-weight MobileViT image classifier (transformers format, safetensors), seed 0, with its ONNX export."""
    from services.classifier.export import export_onnx
    from services.tiny_models import create_tiny_classifier

    folder = create_tiny_classifier(tmp_path_factory.mktemp("models") / "tiny-mobilevit")
    export_onnx(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_family_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random-weight folder per model family (seed 0), by family name ("sd15", "sdxl", "sdxl-refiner",
    "sd3", "flux"), each named "tiny-<family>"; plus "sdxl-karras": the tiny SDXL with use_karras_sigmas set in
    its scheduler config (same weights), a model of its own."""
    import json
    import shutil

    from services.tiny_models import FAMILIES, create_tiny_model

    root = tmp_path_factory.mktemp("family-models")
    models = {family: create_tiny_model(root / f"tiny-{family}", family) for family in FAMILIES}
    karras = Path(shutil.copytree(models["sdxl"], root / "tiny-sdxl-karras"))
    config_path = karras / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["use_karras_sigmas"] = True
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    models["sdxl-karras"] = karras
    return models


@pytest.fixture(scope="session")
def family_suite(tiny_family_models, tmp_path_factory):
    """The suite on registry models of every family (tests/family_suite.py), stages on empty caches; shared by the
    family tests."""
    from family_suite import start_family_suite

    with start_family_suite(tiny_family_models, tmp_path_factory.mktemp("family-suite")) as running:
        yield running


@pytest.fixture(scope="session")
def second_orchestrator(family_suite):
    """SD3's text encoders on two more replicas, a second denoiser and a second orchestrator over them and the
    family suite's denoiser and VAE (tests/family_suite.py)."""
    from family_suite import start_second_orchestrator

    with start_second_orchestrator(family_suite) as started:
        yield started


@pytest.fixture(scope="session")
def suite(tiny_model, tiny_inpainting_model, tiny_controlnets, tiny_classifier, tmp_path_factory):
    """The stage services, the ControlNet service and the orchestrator on the tiny models, each in its own
    process on a free port."""
    log_dir = tmp_path_factory.mktemp("logs")
    inpainting = ["--model", str(tiny_inpainting_model)]
    # Every service serves /metrics on a free port (Service.metrics_address): tests/test_monitoring.py scrapes them.
    metrics = ["--metrics-port", "0"]
    running = start_suite(
        tiny_model,
        ports={"orchestrator": 0, "text_encoder": 0, "denoiser": 0, "vae": 0, "controlnet": 0, "classifier": 0},
        log_dir=log_dir,
        controlnet=tiny_controlnets[0],
        classifier=tiny_classifier,
        extra_args={
            # Small limits so the over-limit tests are cheap; the cancellation test needs many steps.
            "orchestrator": ["--max-image-size", "512", "--max-steps", "1000", *metrics],
            # A checkpoint with every step: tests/test_checkpoint_edges.py forges one taken after step 2.
            "text_encoder": [*inpainting, *metrics], "denoiser": [*inpainting, "--checkpoint-interval-s", "0", *metrics],
            "vae": [*inpainting, *metrics], "controlnet": ["--model", f"cn-b={tiny_controlnets[1]}", *metrics],
            "classifier": metrics,
        },
    )
    running.log_dir = log_dir
    yield running
    codes = running.stop()
    # A graceful shutdown exits 0; anything else means a service crashed or hung.
    assert all(code == 0 for code in codes.values()), f"unclean exit codes {codes}; logs in {log_dir}"


@pytest.fixture(scope="session")
def gateway(suite):
    """The REST gateway (services/gateway: A1111's API and the web page) over the session `suite`, in its own
    process on a free port: ``.address`` (host:port) and ``.url`` (http://host:port). It offers the suite's two
    SD 1.5 models, "tiny-sd" (default) and "tiny-sd-inpainting"."""
    import signal

    from services.suite.launcher import start_gateway

    service = start_gateway(suite, port=0, args=["--checkpoint", "tiny-sd-inpainting"], log_dir=suite.log_dir)
    service.url = f"http://{service.address}"
    yield service
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(30) == 0, f"the gateway exited unclean; log in {suite.log_dir}"


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of the session's own (tests/postgres_server.py: initdb + pg_ctl on a temporary folder and
    a free port); ``.create_database(name)`` gives a test an empty database. Torn down after the session."""
    from postgres_server import start_postgres

    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture()
def client(suite):
    with Client(suite.address, timeout=120) as c:
        yield c


@pytest.fixture()
def channel_to():
    """Open insecure channels to any service address; closed after the test."""
    channels = []

    def open_channel(address: str) -> grpc.Channel:
        channel = grpc.insecure_channel(address)
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        channel.close()


def pytest_report_header(config):
    return f"torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}"

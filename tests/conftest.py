"""Shared fixtures: a tiny model built locally and the real suite on ephemeral ports.

Every service runs as its own process with real gRPC servers, exactly as `latentwire up`
starts them (same launcher); nothing of ours is mocked.
"""
from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from latentwire.client import Client
from latentwire.services.suite.launcher import start_suite
from latentwire.services.tiny_models import create_tiny_sd


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random-weight Stable Diffusion folder (diffusers format, safetensors), seed 0."""
    return create_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def suite(tiny_model, tmp_path_factory):
    """The four services on the tiny model, each in its own process on a free port."""
    log_dir = tmp_path_factory.mktemp("logs")
    running = start_suite(
        tiny_model,
        ports={"orchestrator": 0, "text_encoder": 0, "denoiser": 0, "vae": 0},
        log_dir=log_dir,
        # Small limits so the over-limit tests are cheap; the cancellation test needs many steps.
        extra_args={"orchestrator": ["--max-image-size", "512", "--max-steps", "1000"]},
    )
    running.log_dir = log_dir
    yield running
    codes = running.stop()
    # A graceful shutdown exits 0; anything else means a service crashed or hung.
    assert all(code == 0 for code in codes.values()), f"unclean exit codes {codes}; logs in {log_dir}"


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

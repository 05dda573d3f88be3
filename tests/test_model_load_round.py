"""The orchestrator's LoadModel round per job: skipped while the model is known to be in memory on the stages.

Before each job the orchestrator asks the stages it picked to have the model in memory (LoadModel, a streaming
call: 3 to 5 ms of a request at tiny size). A replica that answered READY, or on which a job with the model
succeeded, within execution.LOADED_MEMO_S is not asked again. Through the session suite, counted by each stage's
own Prometheus series of the RPCs it served.
"""
from __future__ import annotations

import time

from latentwire.client import Client
from metrics_helpers import scrape
from services.orchestrator.execution import LOADED_MEMO_S

STAGES = ("text_encoder", "denoiser", "vae")


def _load_model_calls(address: str) -> float:
    """LoadModel calls a service has served (every status code)."""
    family = scrape(address).get("latentwire_rpc_duration_seconds")
    return sum(sample.value for sample in (family.samples if family else [])
               if sample.name.endswith("_count") and sample.labels.get("method", "").endswith("/LoadModel"))


def test_steady_traffic_on_a_model_never_repeats_the_load_round(suite):
    """Jobs one after another on one model, for longer than the memo lasts: no LoadModel after the first job,
    since each job that succeeded renews what the orchestrator knows (a READY alone would expire and cost every
    job once LOADED_MEMO_S after it a round to every stage)."""
    services = {name: suite.services[name] for name in STAGES}
    with Client(suite.address, timeout=120) as client:
        client.generate("a lighthouse", seed=1, steps=2, guidance_scale=1.0)  # loads it, or finds it loaded
        before = {name: _load_model_calls(service.metrics_address) for name, service in services.items()}
        started = time.monotonic()
        jobs = 0
        while time.monotonic() - started < LOADED_MEMO_S + 2:
            result = client.generate("a lighthouse", seed=jobs, steps=2, guidance_scale=1.0)
            assert result.images, "each job ends with its image"
            jobs += 1
            time.sleep(0.5)
        after = {name: _load_model_calls(service.metrics_address) for name, service in services.items()}
    assert all(calls >= 1 for calls in before.values()), f"the stages served no LoadModel at all: {before}"
    assert after == before, (
        f"{jobs} jobs over {LOADED_MEMO_S + 2:.0f} s asked the stages to load the model again: LoadModel calls "
        f"before {before}, after {after}")

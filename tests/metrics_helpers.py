"""Reading a service's Prometheus /metrics (served on --metrics-port) in tests."""
from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(address: str) -> dict:
    """The metric families a service serves at http://ADDRESS/metrics, by family name."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return {family.name: family for family in text_string_to_metric_families(response.read().decode())}


def batch_counts(address: str) -> tuple[float, float]:
    """(forwards, forwards that held more than one job) of a denoiser's step batcher so far, from its
    latentwire_denoise_batch_jobs histogram."""
    family = scrape(address)["latentwire_denoise_batch_jobs"]
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    total = samples[("latentwire_denoise_batch_jobs_count", None)]
    return total, total - samples[("latentwire_denoise_batch_jobs_bucket", "1.0")]

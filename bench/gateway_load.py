#!/usr/bin/env python
"""Load on the REST gateway: N AUTOMATIC1111 API clients for a while, /progress latency while sampling runs, and
one txt2img over REST against the same request over gRPC and in-process diffusers.

    OMP_NUM_THREADS=1 python bench/gateway_load.py                       # 16 clients for 120 s, tiny SD 1.5
    OMP_NUM_THREADS=1 python bench/gateway_load.py --clients 16 --seconds 15

A suite on the tests' tiny SD 1.5 starts with its gateway (services/suite/launcher.py, free ports; the
orchestrator with --max-concurrent-jobs 2 --max-queued-jobs 8, so 16 clients also meet the documented refusal:
429 RESOURCE_EXHAUSTED, after which a client waits and retries). Reported:

- load: completed / refused (429) / failed (anything else: must be 0), images/s, REST latency p50/p95;
- /progress: a poller asks every 50 ms while the clients run; p50/p95/max latency of the answers that showed a
  job sampling (must stay under 100 ms at p95: the gateway answers it from memory, never waiting on a job);
- one txt2img on the idle suite, median of --repeats: REST (the gateway) vs gRPC (latentwire.client) vs
  diffusers.StableDiffusionPipeline in this process on the same folder, steps, size and seed (the ratios).

A benchmark, not a test: tests/test_gateway_api.py runs ``run_gateway_load`` for a few seconds. Table on stdout,
JSON in bench/results/gateway_load.json.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests


@dataclass
class GatewayLoad:
    """What the REST clients and the /progress poller saw."""

    completed: int = 0
    refused: int = 0
    failed: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    progress_latencies: list[float] = field(default_factory=list)
    progress_sampling: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        def percentile(values: list[float], p: float) -> float:
            values = sorted(values)
            return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")

        return {
            "completed": self.completed, "refused": self.refused, "failed": len(self.failed),
            "images_per_s": self.completed / self.seconds if self.seconds else 0.0,
            "latency_p50_s": percentile(self.latencies, 0.5), "latency_p95_s": percentile(self.latencies, 0.95),
            "progress_polls_while_sampling": self.progress_sampling,
            "progress_p50_ms": percentile(self.progress_latencies, 0.5) * 1000,
            "progress_p95_ms": percentile(self.progress_latencies, 0.95) * 1000,
            "progress_max_ms": max(self.progress_latencies, default=float("nan")) * 1000,
            "seconds": self.seconds,
        }


def run_gateway_load(url: str, *, clients: int, seconds: float, steps: int = 4, size: int = 64,
                     auth: tuple[str, str] | None = None, verify=True) -> GatewayLoad:
    """``clients`` threads POST txt2img back to back for ``seconds`` while one thread polls /progress every 50 ms."""
    result = GatewayLoad()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client_loop(index: int) -> None:
        rng = random.Random(index)
        with requests.Session() as session:
            session.auth, session.verify = auth, verify
            while time.monotonic() < stop_at:
                body = {"prompt": f"load test {index}", "seed": rng.randrange(2**31), "steps": steps, "width": size,
                        "height": size, "cfg_scale": 7.5}
                started = time.monotonic()
                try:
                    answer = session.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=600)
                except requests.RequestException as error:
                    with lock:
                        result.failed.append(f"connection: {type(error).__name__}")
                    continue
                with lock:
                    if answer.status_code == 200 and answer.json()["images"]:
                        result.completed += 1
                        result.latencies.append(time.monotonic() - started)
                    elif answer.status_code == 429:
                        result.refused += 1
                    else:
                        result.failed.append(f"{answer.status_code}: {answer.text[:200]}")
                if answer.status_code == 429:  # the documented refusal: wait, with jitter, and retry
                    time.sleep(rng.uniform(0.5, 1.0))

    def poll_progress() -> None:
        with requests.Session() as session:
            session.auth, session.verify = auth, verify
            while time.monotonic() < stop_at:
                started = time.monotonic()
                answer = session.get(f"{url}/sdapi/v1/progress", params={"skip_current_image": "false"}, timeout=10)
                took = time.monotonic() - started
                if answer.ok and answer.json()["state"]["sampling_steps"]:
                    with lock:
                        result.progress_latencies.append(took)
                        result.progress_sampling += 1
                time.sleep(max(0.0, 0.05 - took))

    started = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    threads.append(threading.Thread(target=poll_progress, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.monotonic() - started
    return result


def single_request_times(url: str, address: str, model: Path, *, steps: int, size: int, repeats: int) -> dict:
    """Median seconds of one txt2img over REST, over gRPC and in-process diffusers (same folder, steps, seed)."""
    import diffusers
    import torch

    from latentwire.client import Client

    def median(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    body = {"prompt": "a lighthouse", "seed": 1, "steps": steps, "width": size, "height": size, "cfg_scale": 7.5}
    with requests.Session() as session:
        rest = median(lambda: session.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=600).raise_for_status())
    with Client(address, timeout=600) as client:
        grpc_s = median(lambda: client.generate("a lighthouse", seed=1, steps=steps, width=size, height=size,
                                                guidance_scale=7.5))
        # The same job as the gateway sends it: live previews every --preview-interval (2) steps, for /progress.
        grpc_previews_s = median(lambda: client.generate("a lighthouse", seed=1, steps=steps, width=size,
                                                         height=size, guidance_scale=7.5, preview_every=2,
                                                         preview_format="jpeg"))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    reference = median(lambda: pipe("a lighthouse", num_inference_steps=steps, width=size, height=size,
                                    guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(1)))
    return {"rest_s": rest, "grpc_s": grpc_s, "grpc_with_previews_s": grpc_previews_s, "diffusers_s": reference,
            "rest_over_grpc": rest / grpc_s, "rest_over_grpc_with_previews": rest / grpc_previews_s,
            "rest_over_diffusers": rest / reference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="single-request timings: median of this many")
    parser.add_argument("--max-concurrent-jobs", type=int, default=2)
    parser.add_argument("--max-queued-jobs", type=int, default=8)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "gateway_load.json"))
    args = parser.parse_args()

    from services.suite.launcher import start_suite
    from services.tiny_models import create_tiny_sd

    with tempfile.TemporaryDirectory() as tmp:
        model = create_tiny_sd(Path(tmp) / "tiny-sd")
        suite = start_suite(
            model, ports=dict.fromkeys(("orchestrator", "text_encoder", "denoiser", "vae", "gateway"), 0),
            log_dir=Path(tmp) / "logs", gateway=True,
            extra_args={"orchestrator": ["--max-concurrent-jobs", str(args.max_concurrent_jobs),
                                         "--max-queued-jobs", str(args.max_queued_jobs)]})
        try:
            url = f"http://{suite.services['gateway'].address}"
            single = single_request_times(url, suite.address, model, steps=args.steps, size=args.size,
                                          repeats=args.repeats)
            load = run_gateway_load(url, clients=args.clients, seconds=args.seconds, steps=args.steps,
                                    size=args.size)
        finally:
            codes = suite.stop()
    summary = load.summary()
    report = {"settings": vars(args), "load": summary, "single_request": single, "failures": load.failed[:20],
              "exit_codes": codes}
    print(f"{args.clients} REST clients for {load.seconds:.0f} s, {args.steps} steps at {args.size}x{args.size}, "
          f"max {args.max_concurrent_jobs} running + {args.max_queued_jobs} queued")
    print(f"  completed {summary['completed']}  refused (429) {summary['refused']}  failed {summary['failed']}  "
          f"{summary['images_per_s']:.2f} images/s  latency p50 {summary['latency_p50_s']:.2f} s "
          f"p95 {summary['latency_p95_s']:.2f} s")
    print(f"  /progress while sampling: {summary['progress_polls_while_sampling']} polls, p50 "
          f"{summary['progress_p50_ms']:.1f} ms  p95 {summary['progress_p95_ms']:.1f} ms  "
          f"max {summary['progress_max_ms']:.1f} ms")
    print(f"  one txt2img: REST {single['rest_s']:.3f} s  gRPC {single['grpc_s']:.3f} s (with the gateway's "
          f"previews {single['grpc_with_previews_s']:.3f} s)  diffusers in-process {single['diffusers_s']:.3f} s")
    print(f"  ratios: REST/gRPC {single['rest_over_grpc']:.2f}, REST/gRPC with previews "
          f"{single['rest_over_grpc_with_previews']:.2f}, REST/diffusers {single['rest_over_diffusers']:.2f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

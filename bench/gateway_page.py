#!/usr/bin/env python
"""What the web page's event stream adds: the delay from a step event on the gRPC stream to the same event on the
gateway's server-sent-events stream (services/gateway/web.py ``/ui/api/jobs/{id}/events``), over whole runs, with
the in-process diffusers pipeline in the same run as the reference for the run time.

A suite on the tests' tiny SD 1.5 (or ``--model FOLDER``) and a gateway (live previews every ``--preview-interval``
steps, JPEG, so the events carry their preview images as the page gets them) start on free ports. Per run, a job is
queued through the page's endpoint (POST /ui/api/generate, whose answer is the job's SSE stream), and while the
page's stream is read, the orchestrator's WatchJob follows the same job over gRPC (the reference stream); each
stamps every step event when it arrives. Reported:

- sse delay: SSE arrival - gRPC arrival of the same step (p50 / p95 / max, milliseconds); the first step event of
  each stream is left out (it may be the catch-up event WatchJob sends when it attaches);
- gateway share: the gateway's own stamp on the event (``sent_at``, as it forwards it) - the direct watcher's gRPC
  arrival: the gateway is a gRPC watcher of the orchestrator too, so this is near 0 (negative when the gateway got
  the event first) and the SSE delay is mostly HTTP and the client;
- run time: POST to the SSE ``result`` event, against the same generation in-process
  (diffusers.StableDiffusionPipeline, same weights, scheduler, steps and seed), as a ratio.

    OMP_NUM_THREADS=1 python bench/gateway_page.py                  # tiny SD 1.5, 5 runs of 30 steps
    OMP_NUM_THREADS=1 python bench/gateway_page.py --runs 3 --steps 50 --size 128

A benchmark, not a test: it asserts nothing. Table on stdout, JSON in bench/results/gateway_page.json.
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc

from latentwire.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from services.suite.launcher import start_gateway, start_suite
from services.tiny_models import create_tiny_sd


def _generate_sse(address: str, body: dict, arrivals: dict, accepted: threading.Event) -> None:
    """POST /ui/api/generate and read its event stream; arrivals["job_id"], arrivals["sse"][step] = (perf_counter,
    time.time(), sent_at, has_preview), arrivals["result"] = perf_counter."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=600)
    connection.request("POST", "/ui/api/generate", json.dumps(body),
                       {"Content-Type": "application/json", "Accept": "text/event-stream"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"/ui/api/generate: HTTP {response.status} {response.read()[:300]!r}")
    kind = None
    try:
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                now, wall = time.perf_counter(), time.time()
                data = json.loads(line[6:])
                if kind == "accepted":
                    arrivals["job_id"] = data["job_id"]
                    accepted.set()
                elif kind == "progress":
                    arrivals["sse"][data["step"]] = (now, wall, data["sent_at"], data["preview"] is not None)
                elif kind == "result":
                    arrivals["result"] = now
                elif kind in ("failure", "end"):
                    break
    finally:
        connection.close()
        accepted.set()


def _watch_grpc(address: str, job_id: str, arrivals: dict, done: threading.Event) -> None:
    """Follow WatchJob; arrivals["grpc"][step] = (perf_counter, time.time())."""
    with grpc.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        for response in stub.WatchJob(orchestrator_pb2.WatchJobRequest(name=f"jobs/{job_id}")):
            if response.event.WhichOneof("event") == "step":
                arrivals["grpc"][response.event.step.step] = (time.perf_counter(), time.time())
    done.set()


def _run_page(gateway: str, orchestrator: str, body: dict) -> dict:
    """One generation through the page's endpoint, its SSE stream read while WatchJob follows the job over gRPC."""
    arrivals: dict = {"sse": {}, "grpc": {}, "result": None, "job_id": None}
    accepted, watched = threading.Event(), threading.Event()
    start = time.perf_counter()
    page = threading.Thread(target=_generate_sse, args=(gateway, body, arrivals, accepted), daemon=True)
    page.start()
    accepted.wait(600)
    watcher = threading.Thread(target=_watch_grpc, args=(orchestrator, arrivals["job_id"], arrivals, watched),
                               daemon=True)
    watcher.start()
    page.join(timeout=600)
    watcher.join(timeout=600)
    arrivals["seconds"] = arrivals["result"] - start if arrivals["result"] else float("nan")
    return arrivals


def _reference_pipeline(folder: Path):
    """The in-process reference: diffusers' pipeline on the same folder, float32 on CPU, with the scheduler the
    page's sampler "Euler a" stands for."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, safety_checker=None)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference_seconds(pipe, body: dict) -> float:
    """The same generation in-process."""
    import torch

    start = time.perf_counter()
    pipe(body["prompt"], negative_prompt=body["negative_prompt"], num_inference_steps=body["steps"],
         guidance_scale=body["cfg_scale"], width=body["width"] or None, height=body["height"] or None,
         generator=torch.Generator("cpu").manual_seed(body["seed"]))
    return time.perf_counter() - start


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="SD 1.5 diffusers folder (default: the tiny one)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=0, help="width and height in pixels (0: the model's default)")
    parser.add_argument("--preview-interval", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gateway_page.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-gateway-page-"))
    folder = args.model or create_tiny_sd(work / "tiny-sd")
    suite = start_suite(folder, ports={"orchestrator": 0, "text_encoder": 0, "denoiser": 0, "vae": 0},
                        log_dir=work / "logs")
    gateway = start_gateway(suite, port=0, args=["--preview-interval", str(args.preview_interval)],
                            log_dir=work / "logs")
    body = {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "steps": args.steps, "cfg_scale": 7.0,
            "seed": 0, "width": args.size, "height": args.size, "sampler": "Euler a"}
    delays, shares, page_seconds, reference_seconds = [], [], [], []
    pipe = _reference_pipeline(folder)
    try:
        _run_page(gateway.address, suite.address, body)  # warm-up: models load, channels open
        for run in range(args.runs):
            body["seed"] = run
            arrivals = _run_page(gateway.address, suite.address, body)
            common = sorted(set(arrivals["sse"]) & set(arrivals["grpc"]))
            skip = max(min(arrivals["sse"], default=0), min(arrivals["grpc"], default=0))
            for step in (s for s in common if s > skip):
                grpc_at, grpc_wall = arrivals["grpc"][step]
                sse_at, _, sent_at, _ = arrivals["sse"][step]
                delays.append((sse_at - grpc_at) * 1000)
                shares.append((sent_at - grpc_wall) * 1000)
            page_seconds.append(arrivals["seconds"])
            reference_seconds.append(_reference_seconds(pipe, body))
    finally:
        gateway.process.terminate()
        gateway.process.wait(30)
        suite.stop()

    result = {
        "model": str(args.model or "tiny-sd"), "runs": args.runs, "steps": args.steps, "size": args.size,
        "preview_interval": args.preview_interval, "events_compared": len(delays),
        "sse_delay_ms": {"p50": statistics.median(delays), "p95": _percentile(delays, 0.95), "max": max(delays)},
        "gateway_share_ms": {"p50": statistics.median(shares), "p95": _percentile(shares, 0.95)},
        "page_run_s": statistics.median(page_seconds), "in_process_run_s": statistics.median(reference_seconds),
    }
    result["ratio"] = result["page_run_s"] / result["in_process_run_s"]
    print(f"{'measure':34} {'p50':>9} {'p95':>9} {'max':>9}")
    print(f"{'sse delay after gRPC (ms)':34} {result['sse_delay_ms']['p50']:9.2f} {result['sse_delay_ms']['p95']:9.2f} "
          f"{result['sse_delay_ms']['max']:9.2f}")
    print(f"{'gateway share (ms)':34} {result['gateway_share_ms']['p50']:9.2f} "
          f"{result['gateway_share_ms']['p95']:9.2f}")
    print(f"step events compared: {len(delays)} over {args.runs} runs of {args.steps} steps")
    print(f"run time: page {result['page_run_s']:.3f} s, in-process diffusers {result['in_process_run_s']:.3f} s, "
          f"ratio {result['ratio']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

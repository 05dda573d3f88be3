"""Throughput under concurrency: images/s and latency at 1, 2, 4, 8 and 16 concurrent clients, for

  A. in-process diffusers: StableDiffusionPipeline, one image after another (the better of torch's default thread
     count and one thread); its images/s is what one process does with no service at all, whatever the clients;
  B. the suite with --step-batch-max 1: every denoising job calls the UNet on its own;
  C. the suite with step-level batching (the default): concurrent jobs share each step's UNet (or transformer)
     forward (services/denoiser/step_batching.py).

    python bench/throughput.py [--size tiny|sd15|sd3-tiny|flux-tiny] [--images-per-level 8] [--levels 1,2,4,8,16]

tiny: the tiny model at 64x64, 20 steps; sd15: the SD 1.5 architecture (random weights, ~4 GB, built once into
$LATENTWIRE_HOME/models/sd15-random) at 256x256, 4 steps; sd3-tiny and flux-tiny: the tiny SD3 and Flux models of
the tests (create_tiny_model, seed 0, built once into $LATENTWIRE_HOME/models/tiny-sd3 or tiny-flux) at their own
32x32 (their VAE does not downsample: 1024 latent tokens for SD3, 256 packed for Flux), 20 steps, the in-process side
their own diffusers pipeline (StableDiffusion3Pipeline, FluxPipeline). Guidance 7.5
(classifier-free guidance on; Flux: its distilled guidance, 3.5, one transformer row per image). Each client
sends max(1, ceil(images-per-level / clients)) requests back to back through the orchestrator (Generate, PNG
result); latency is request to result as the client sees it. Every stage and the orchestrator run with
--max-concurrent-jobs = the largest level, so that the suite admits every client (the default 4 would queue the
rest in the orchestrator). Writes bench/results/throughput-<size>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SETTINGS = {"tiny": {"width": 64, "height": 64, "steps": 20}, "sd15": {"width": 256, "height": 256, "steps": 4},
            "sd3-tiny": {"width": 32, "height": 32, "steps": 20}, "flux-tiny": {"width": 32, "height": 32, "steps": 20}}
#: The tiny families' models (the tests' seed-0 folders), by --size.
FAMILY_SIZES = {"sd3-tiny": "sd3", "flux-tiny": "flux"}
GUIDANCE = 7.5
#: Flux's guidance is embedded (distilled), not classifier-free; FluxPipeline's default.
FLUX_GUIDANCE = 3.5


def guidance_of(size: str) -> float:
    return FLUX_GUIDANCE if size == "flux-tiny" else GUIDANCE


def family_model(size: str) -> tuple[Path, str]:
    """The tiny SD3 or Flux folder under $LATENTWIRE_HOME/models, built on first use."""
    from services.tiny_models import create_tiny_model
    from text_to_image import latentwire_home

    family = FAMILY_SIZES[size]
    path = latentwire_home() / "models" / f"tiny-{family}"
    if (path / "model_index.json").is_file():
        return path, "reused"
    started = time.perf_counter()
    create_tiny_model(path, family, seed=0)
    return path, f"built in {time.perf_counter() - started:.1f} s"


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


def in_process(model: Path, *, requests: int, width: int, height: int, steps: int, guidance: float = GUIDANCE) -> dict:
    """The model's diffusers pipeline (StableDiffusionPipeline, StableDiffusion3Pipeline, FluxPipeline) back to back:
    images/s and per-image latency, best of two thread settings."""
    import diffusers
    import torch

    pipe = diffusers.DiffusionPipeline.from_pretrained(model, safety_checker=None, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    default_threads = torch.get_num_threads()
    best = None
    for threads in dict.fromkeys((default_threads, 1)):
        torch.set_num_threads(threads)
        pipe("warm-up", num_inference_steps=steps, width=width, height=height, output_type="pil")
        latencies = []
        started = time.perf_counter()
        for i in range(requests):
            t0 = time.perf_counter()
            pipe(f"in-process {i}", num_inference_steps=steps, width=width, height=height, guidance_scale=guidance,
                 generator=torch.Generator("cpu").manual_seed(i), output_type="pil")
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
        record = {"threads": threads, "images": requests, "seconds": elapsed, "images_per_s": requests / elapsed,
                  "latency_p50_s": percentile(latencies, 0.5), "latency_p95_s": percentile(latencies, 0.95)}
        if best is None or record["images_per_s"] > best["images_per_s"]:
            best = record
    torch.set_num_threads(default_threads)
    return best


def clients_run(address: str, *, clients: int, requests_per_client: int, width: int, height: int,
                steps: int, guidance: float = GUIDANCE) -> dict:
    """``clients`` threads, each sending ``requests_per_client`` Generate requests back to back."""
    from latentwire.client import Client

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client_loop(index: int) -> None:
        with Client(address, timeout=600) as client:
            barrier.wait()
            for i in range(requests_per_client):
                request = client.build_request(f"throughput {index} {i}", seed=1000 * index + i, steps=steps,
                                               width=width, height=height, guidance_scale=guidance)
                t0 = time.perf_counter()
                try:
                    for event in client.stream(request):
                        if event.WhichOneof("event") == "result":
                            with lock:
                                latencies.append(time.perf_counter() - t0)
                except Exception as error:  # noqa: BLE001 - counted and reported
                    with lock:
                        failures.append(f"{type(error).__name__}: {error}"[:200])

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {"clients": clients, "images": len(latencies), "failed": len(failures), "failures": failures[:5],
            "seconds": elapsed, "images_per_s": len(latencies) / elapsed,
            "latency_p50_s": percentile(latencies, 0.5), "latency_p95_s": percentile(latencies, 0.95),
            "latency_mean_s": statistics.fmean(latencies) if latencies else float("nan")}


def batch_histogram(metrics_address: str) -> dict[str, float]:
    """The denoiser's latentwire_denoise_batch_jobs histogram: forwards by jobs held (cumulative buckets)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "latentwire_denoise_batch_jobs":
            return {s.labels.get("le", s.name.rsplit("_", 1)[-1]): s.value for s in family.samples}
    return {}


def suite_run(model: Path, log_dir: Path, *, batching: bool, levels: list[int], images_per_level: int,
              width: int, height: int, steps: int, guidance: float = GUIDANCE) -> dict:
    from services.suite.launcher import start_suite

    concurrency = str(max(levels))
    stage = ["--max-concurrent-jobs", concurrency]
    denoiser = [*stage, "--metrics-port", "0", *([] if batching else ["--step-batch-max", "1"])]
    suite = start_suite(model, ports=dict.fromkeys(("orchestrator", "text_encoder", "denoiser", "vae"), 0),
                        log_dir=log_dir, extra_args={
                            "orchestrator": [*stage, "--max-queued-jobs", str(4 * max(levels)),
                                             "--jobs-db", str(log_dir / "jobs.db")],
                            "text_encoder": stage, "vae": stage, "denoiser": denoiser})
    try:
        metrics_address = suite.services["denoiser"].metrics_address
        # Warm-up: one request (first-request set-up is not what is measured).
        clients_run(suite.address, clients=1, requests_per_client=1, width=width, height=height, steps=steps,
                    guidance=guidance)
        rows = []
        for clients in levels:
            before = batch_histogram(metrics_address)
            each = max(1, -(-images_per_level // clients))  # ceil
            row = clients_run(suite.address, clients=clients, requests_per_client=each, width=width, height=height,
                              steps=steps, guidance=guidance)
            after = batch_histogram(metrics_address)
            forwards = after.get("count", 0) - before.get("count", 0)
            alone = after.get("1.0", 0) - before.get("1.0", 0)
            jobs = after.get("sum", 0) - before.get("sum", 0)
            row["denoiser_forwards"] = forwards
            row["mean_jobs_per_forward"] = jobs / forwards if forwards else None
            row["forwards_alone"] = alone
            rows.append(row)
            print(f"  {'batching' if batching else 'no batching'} {clients:2d} clients: "
                  f"{row['images_per_s']:.2f} images/s, p50 {row['latency_p50_s']:.3f} s, "
                  f"p95 {row['latency_p95_s']:.3f} s, jobs/forward {row['mean_jobs_per_forward'] or 0:.2f}, "
                  f"failed {row['failed']}", flush=True)
        return {"batching": batching, "levels": rows}
    finally:
        suite.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SETTINGS), default="tiny")
    parser.add_argument("--model", help="model folder (default: the tiny model, or the SD 1.5-architecture one)")
    parser.add_argument("--levels", default="1,2,4,8,16", help="concurrent clients, comma-separated")
    parser.add_argument("--images-per-level", type=int, default=8,
                        help="requests per level, spread over its clients (each sends at least one)")
    parser.add_argument("--reference-requests", type=int, default=10,
                        help="in-process images per thread setting")
    parser.add_argument("--output", default=None, help="JSON report (default bench/results/throughput-SIZE.json)")
    args = parser.parse_args(argv)
    levels = [int(level) for level in args.levels.split(",")]
    settings = SETTINGS[args.size]

    from text_to_image import machine_info, resolve_model

    guidance = guidance_of(args.size)
    if args.size in FAMILY_SIZES and not args.model:
        model, obtained = family_model(args.size)
    else:
        model, obtained = resolve_model(args.size, args.model)
    print(f"model {model} ({obtained}); {settings['width']}x{settings['height']}, {settings['steps']} steps, "
          f"guidance {guidance}; levels {levels}, about {args.images_per_level} images per level", flush=True)
    started = time.perf_counter()
    reference = in_process(model, requests=args.reference_requests, guidance=guidance, **settings)
    print(f"  in-process: {reference['images_per_s']:.2f} images/s ({reference['threads']} threads), "
          f"p50 {reference['latency_p50_s']:.3f} s", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="lw-throughput-") as tmp:
        for batching in (False, True):
            log_dir = Path(tmp) / ("batching" if batching else "unbatched")
            log_dir.mkdir()
            runs.append(suite_run(model, log_dir, batching=batching, levels=levels,
                                  images_per_level=args.images_per_level, guidance=guidance, **settings))
    report = {"settings": {**vars(args), **settings, "guidance_scale": guidance}, "machine": machine_info(),
              "in_process": reference, "suite": runs, "seconds": time.perf_counter() - started}

    print(f"\n{args.size}: {settings['width']}x{settings['height']}, {settings['steps']} steps "
          f"(in-process {reference['images_per_s']:.2f} images/s, p50 {reference['latency_p50_s']:.3f} s)")
    print(f"{'clients':>7} | {'no batching img/s':>17} {'p50':>7} {'p95':>7} {'x in-proc':>9} | "
          f"{'batching img/s':>14} {'p50':>7} {'p95':>7} {'x in-proc':>9} {'jobs/fwd':>8}")
    for plain, batched in zip(runs[0]["levels"], runs[1]["levels"]):
        print(f"{plain['clients']:>7} | {plain['images_per_s']:>17.2f} {plain['latency_p50_s']:>7.3f} "
              f"{plain['latency_p95_s']:>7.3f} {plain['images_per_s'] / reference['images_per_s']:>9.2f} | "
              f"{batched['images_per_s']:>14.2f} {batched['latency_p50_s']:>7.3f} {batched['latency_p95_s']:>7.3f} "
              f"{batched['images_per_s'] / reference['images_per_s']:>9.2f} "
              f"{batched['mean_jobs_per_forward'] or 0:>8.2f}")
    output = Path(args.output or Path(__file__).parent / "results" / f"throughput-{args.size}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"wrote {output} ({report['seconds']:.0f} s)")
    failed = sum(row["failed"] for run in runs for row in run["levels"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

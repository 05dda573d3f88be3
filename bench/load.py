"""Load: N concurrent clients against a running suite for a while; every request completes or is refused.

    python bench/load.py [--clients 16] [--seconds 300] [--steps 6] [--max-concurrent-jobs 2] [--max-queued-jobs 8]
    python bench/load.py --admission stages --seconds 180 --output bench/results/soak-batching.json   # the soak

``--admission stages`` runs the orchestrator as deployed by default (as many jobs as the stages run together, the
denoiser's step-level batching on) instead of a fixed ``--max-concurrent-jobs``. Every service's resident set
(VmRSS) is sampled every 5 s: the report has the samples and the growth from the end of the first minute to the
end (bounded memory shows as growth near zero once the caches are warm).

Starts the suite on the tiny model (its own processes, ephemeral ports), runs the clients, and
reports throughput, latency percentiles (accepted to result, as the client sees it), refusals
(RESOURCE_EXHAUSTED with a retry hint, which the clients honour), the largest queue position seen
in progress events, and every service's peak RSS (VmHWM). The in-process reference is
StableDiffusionPipeline run back to back for the same wall time on the same settings: its
images/s is what one process can do with no queue at all.
Writes bench/results/load.json. tests/test_load.py runs the same driver for a shorter time.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from latentwire.client import Client


@dataclass
class LoadResult:
    """What the clients saw."""

    completed: int = 0
    refused: int = 0
    failed: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    max_queue_position: int = 0
    queued_events: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        latencies = sorted(self.latencies)

        def percentile(p: float) -> float:
            return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

        return {
            "completed": self.completed, "refused": self.refused, "failed": len(self.failed),
            "images_per_s": self.completed / self.seconds if self.seconds else 0.0,
            "latency_p50_s": percentile(0.50), "latency_p95_s": percentile(0.95),
            "latency_mean_s": statistics.fmean(latencies) if latencies else float("nan"),
            "max_queue_position": self.max_queue_position, "queued_events": self.queued_events,
            "seconds": self.seconds,
        }


def _retry_delay(error: grpc.RpcError) -> float:
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    return 1.0


def run_load(address: str, *, clients: int, seconds: float, steps: int = 6, size: int = 64) -> LoadResult:
    """``clients`` threads, each sending Generate requests back to back until ``seconds`` have passed."""
    result = LoadResult()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client_loop(index: int) -> None:
        rng = random.Random(index)
        with Client(address, timeout=600) as client:
            while time.monotonic() < stop_at:
                request = client.build_request(f"load test {index}", seed=rng.randrange(2**31), steps=steps,
                                               width=size, height=size, guidance_scale=7.5)
                started = time.monotonic()
                try:
                    for event in client.stream(request):
                        kind = event.WhichOneof("event")
                        if kind == "queued":
                            with lock:
                                result.queued_events += 1
                                result.max_queue_position = max(result.max_queue_position, event.queued.position)
                        elif kind == "result":
                            with lock:
                                result.completed += 1
                                result.latencies.append(time.monotonic() - started)
                except grpc.RpcError as error:
                    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        with lock:
                            result.refused += 1
                        # Honour the server's hint, with jitter so refused clients do not return in step.
                        time.sleep(min(_retry_delay(error), 5.0) * rng.uniform(0.5, 1.0))
                    else:
                        with lock:
                            result.failed.append(f"{error.code().name}: {error.details()}")

    started = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.monotonic() - started
    return result


def _status_bytes(pid: int, field: str) -> int:
    """A size line of /proc/PID/status ("VmHWM", "VmRSS", ...), in bytes; 0 when absent."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes(pid: int) -> int:
    """A process's peak resident set size (VmHWM), in bytes."""
    return _status_bytes(pid, "VmHWM")


def rss_bytes(pid: int) -> int:
    """A process's resident set size now (VmRSS), in bytes."""
    return _status_bytes(pid, "VmRSS")


def sample_rss(pids: dict[str, int], every_s: float, stop: threading.Event, into: list) -> None:
    """Append (seconds since start, {service: VmRSS bytes}) every ``every_s`` until ``stop`` is set."""
    started = time.monotonic()
    while not stop.wait(every_s):
        into.append((round(time.monotonic() - started, 1), {name: rss_bytes(pid) for name, pid in pids.items()}))


def reference_images_per_s(model: Path, seconds: float, steps: int, size: int) -> float:
    """StableDiffusionPipeline back to back in this process for ``seconds``: images per second.

    Measured with torch's default thread count and with one thread, and the better figure kept: on a
    busy 2-core machine OpenMP's spinning threads can make the default many times slower, and the
    reference should be the best one process can do.
    """
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    default_threads = torch.get_num_threads()
    best = 0.0
    for threads in dict.fromkeys((default_threads, 1)):
        torch.set_num_threads(threads)
        pipe("warm-up", num_inference_steps=steps, width=size, height=size, output_type="np")
        done, started = 0, time.monotonic()
        while time.monotonic() - started < seconds / 2:
            pipe("reference", num_inference_steps=steps, width=size, height=size, guidance_scale=7.5,
                 generator=torch.Generator("cpu").manual_seed(done), output_type="np")
            done += 1
        best = max(best, done / (time.monotonic() - started))
    torch.set_num_threads(default_threads)
    return best


def _growth(samples: list, after_s: float) -> dict[str, int] | None:
    """Each service's VmRSS at the last sample minus at the first sample at or after ``after_s``; None if too short."""
    later = [rss for at, rss in samples if at >= after_s]
    if len(later) < 2:
        return None
    return {name: later[-1][name] - later[0][name] for name in later[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--admission", choices=("fixed", "stages"), default="fixed",
                        help="fixed: the orchestrator runs --max-concurrent-jobs jobs; stages: as many as the stages "
                             "run together (the orchestrator's default), --max-concurrent-jobs ignored")
    parser.add_argument("--max-concurrent-jobs", type=int, default=2)
    parser.add_argument("--max-queued-jobs", type=int, default=8)
    parser.add_argument("--reference-seconds", type=float, default=30)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "load.json"))
    args = parser.parse_args()

    from services.suite.launcher import start_suite
    from services.tiny_models import create_tiny_sd

    with tempfile.TemporaryDirectory() as tmp:
        model = create_tiny_sd(Path(tmp) / "tiny-sd")
        suite = start_suite(
            model, ports=dict.fromkeys(("orchestrator", "text_encoder", "denoiser", "vae"), 0),
            log_dir=Path(tmp) / "logs",
            extra_args={"orchestrator": [
                *(["--max-concurrent-jobs", str(args.max_concurrent_jobs)] if args.admission == "fixed"
                  else ["--admission", "stages"]),
                "--max-queued-jobs", str(args.max_queued_jobs), "--jobs-db", str(Path(tmp) / "jobs.db")]})
        samples: list = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, daemon=True,
                                   args=({n: s.process.pid for n, s in suite.services.items()}, 5.0, stop, samples))
        sampler.start()
        try:
            result = run_load(suite.address, clients=args.clients, seconds=args.seconds, steps=args.steps,
                              size=args.size)
            rss = {name: peak_rss_bytes(s.process.pid) for name, s in suite.services.items()}
        finally:
            stop.set()
            sampler.join()
            suite.stop()
        reference = reference_images_per_s(model, args.reference_seconds, args.steps, args.size)

    summary = result.summary()
    report = {
        "settings": vars(args), "service": summary, "reference_images_per_s": reference,
        "ratio_service_to_reference": summary["images_per_s"] / reference if reference else None,
        "peak_rss_bytes": rss, "failures": result.failed[:20], "rss_samples": samples,
        "rss_growth_after_first_minute_bytes": _growth(samples, after_s=60.0),
    }
    running = (f"max {args.max_concurrent_jobs} running" if args.admission == "fixed"
               else "as many running as the stages run together")
    print(f"{args.clients} clients for {result.seconds:.0f} s, {args.steps} steps at {args.size}x{args.size}, "
          f"{running} + {args.max_queued_jobs} queued")
    print(f"  completed {summary['completed']}  refused {summary['refused']}  failed {summary['failed']}")
    print(f"  throughput {summary['images_per_s']:.2f} images/s (in-process reference {reference:.2f}, "
          f"ratio {report['ratio_service_to_reference']:.2f})")
    print(f"  latency p50 {summary['latency_p50_s']:.2f} s  p95 {summary['latency_p95_s']:.2f} s  "
          f"max queue position {summary['max_queue_position']}")
    print("  peak RSS: " + ", ".join(f"{n} {b / 2**20:.0f} MiB" for n, b in rss.items()))
    growth = report["rss_growth_after_first_minute_bytes"]
    if growth:
        print("  RSS growth from 60 s to the end: " + ", ".join(f"{n} {b / 2**20:+.1f} MiB" for n, b in growth.items()))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    if result.failed:
        print("failures:", *result.failed[:5], sep="\n  ", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The job store's cost: queue throughput and accept-to-start latency with SQLite against PostgreSQL, in one run.

One set of stage processes (text encoder, denoiser, VAE) on the tiny model, and over it:

  sqlite     the orchestrator with its embedded store (--jobs-db FILE, the default kind);
  postgres   an orchestrator on a PostgreSQL database (--jobs-db postgresql://...; a server of its own, started
             as tests/postgres_server.py starts it);
  postgres2  two orchestrators on another PostgreSQL database, the clients spread over both (the shared queue),
             each with half the --max-concurrent-jobs, so the stages see as many jobs at once as in the others.

Per round, each variant gets ``--clients`` callers submitting ``--jobs`` jobs each back to back (``--steps``
denoising steps: little compute, so the queue's own cost shows); the variants alternate within a round, so a
noisy machine shifts them alike. Reported per variant (median over rounds): jobs/s (completed jobs / time to the
last), accept-to-start latency p50/p95 (the job's start_time - create_time, both set by the orchestrator: the
time a job waits in the queue and to be claimed), and end-to-end p50 per job; the same accept-to-start with one
caller (a slot always free: the store's own cost); and the ratios postgres / sqlite.

    python bench/jobs_postgres.py                       # about 2 minutes on a 2-core machine
    python bench/jobs_postgres.py --rounds 1 --jobs 3

This is a benchmark, not a test: it asserts nothing. Results: a table on stdout and JSON (default
bench/results/jobs_postgres.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/postgres_server.py: initdb + pg_ctl on a temporary folder

from latentwire.client import Client  # noqa: E402
from latentwire.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc  # noqa: E402
from services.suite.launcher import ORCHESTRATOR_MODULE, start_service, start_suite, wait_serving  # noqa: E402


def run_variant(addresses: list[str], clients: int, jobs: int, steps: int) -> dict:
    """``clients`` callers, spread over ``addresses``, each running ``jobs`` jobs back to back."""
    channels = [grpc.insecure_channel(address) for address in addresses]
    stubs = [orchestrator_pb2_grpc.OrchestratorServiceStub(channel) for channel in channels]
    done: list[tuple[str, int, float]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def caller(index: int) -> None:
        stub = stubs[index % len(stubs)]
        for n in range(jobs):
            request = Client.build_request("a lighthouse", seed=index * 100 + n, steps=steps, guidance_scale=3.0)
            began = time.perf_counter()
            job_id = ""
            try:
                for event in stub.Generate(request, timeout=300):
                    if event.WhichOneof("event") == "accepted":
                        job_id = event.accepted.job_id
            except grpc.RpcError as error:
                with lock:
                    errors.append(f"{error.code().name}: {error.details()}")
                continue
            with lock:
                done.append((job_id, index % len(stubs), time.perf_counter() - began))

    began = time.perf_counter()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    waits = []
    for job_id, which, _ in done:
        job = stubs[which].GetJob(orchestrator_pb2.GetJobRequest(name=f"jobs/{job_id}"), timeout=10).job
        waits.append(job.start_time.ToNanoseconds() / 1e9 - job.create_time.ToNanoseconds() / 1e9)
    for channel in channels:
        channel.close()
    waits.sort()
    return {"jobs_per_s": len(done) / elapsed, "start_p50_ms": 1000 * statistics.median(waits),
            "start_p95_ms": 1000 * waits[int(0.95 * (len(waits) - 1))],
            "e2e_p50_ms": 1000 * statistics.median(d[2] for d in done), "jobs": len(done), "errors": len(errors),
            "first_error": errors[0] if errors else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=4, help="jobs per client per round")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-concurrent-jobs", type=int, default=4, help="per orchestrator")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "jobs_postgres.json"))
    args = parser.parse_args()

    from postgres_server import start_postgres

    from services.tiny_models import create_tiny_sd

    work = Path(tempfile.mkdtemp(prefix="lw-bench-jobs-"))
    model = create_tiny_sd(work / "tiny-sd")
    server = start_postgres()
    single, shared = server.create_database("bench_jobs"), server.create_database("bench_jobs_shared")
    common = ["--max-queued-jobs", "1000"]
    slots = ["--max-concurrent-jobs", str(args.max_concurrent_jobs)]
    half = ["--max-concurrent-jobs", str(max(1, args.max_concurrent_jobs // 2))]
    suite = start_suite(model, ports={"orchestrator": 0, "text_encoder": 0, "denoiser": 0, "vae": 0},
                        log_dir=work / "logs",
                        extra_args={"orchestrator": [*common, *slots, "--jobs-db", str(work / "jobs.sqlite")]})
    extra = []
    try:
        stage_args = ["--text-encoder-address", suite.services["text_encoder"].address,
                      "--denoiser-address", suite.services["denoiser"].address,
                      "--vae-address", suite.services["vae"].address]
        for name, flags in (("orchestrator-pg", [*slots, "--jobs-db", single]),
                            ("orchestrator-pg2-a", [*half, "--jobs-db", shared]),
                            ("orchestrator-pg2-b", [*half, "--jobs-db", shared])):
            extra.append(start_service(name, ORCHESTRATOR_MODULE, ["--port", "0", *common, *flags, *stage_args],
                                       log_dir=work / "logs"))
        for service in extra:
            wait_serving(service.address, 60, service.name, service.process)
        variants = {"sqlite": [suite.address], "postgres": [extra[0].address],
                    "postgres2": [extra[1].address, extra[2].address]}
        # One small warm-up job per orchestrator (first calls open channels, load nothing else).
        for addresses in variants.values():
            run_variant(addresses, 1, 1, args.steps)
        rounds: dict[str, list[dict]] = {name: [] for name in variants}
        idle: dict[str, list[dict]] = {name: [] for name in variants}
        for number in range(args.rounds):
            for name, addresses in variants.items():
                rounds[name].append(run_variant(addresses, args.clients, args.jobs, args.steps))
                # One caller, jobs back to back: a slot is always free, so accept-to-start is the store's own cost
                # (SQLite: an in-process heap; PostgreSQL: insert, NOTIFY, the claiming UPDATE).
                idle[name].append(run_variant(addresses[:1], 1, args.jobs * 2, args.steps))
                last = rounds[name][-1]
                print(f"round {number + 1} {name}: {last['jobs_per_s']:.2f} jobs/s, {last['errors']} errors "
                      f"{last['first_error']}; idle accept-to-start p50 {idle[name][-1]['start_p50_ms']:.1f} ms",
                      flush=True)
    finally:
        for service in extra:
            service.process.terminate()
            service.process.wait(30)
        suite.stop()
        server.stop()
    table = {name: {key: statistics.median(r[key] for r in results) for key in results[0] if key != "first_error"}
             for name, results in rounds.items()}
    print(f"\n{args.clients} clients x {args.jobs} jobs, {args.steps} steps, tiny model, "
          f"--max-concurrent-jobs {args.max_concurrent_jobs}; median of {args.rounds} rounds")
    idle_table = {name: {key: statistics.median(r[key] for r in results) for key in results[0]
                         if key != "first_error"} for name, results in idle.items()}
    print(f"{'variant':<10} {'jobs/s':>8} {'start p50 ms':>13} {'start p95 ms':>13} {'e2e p50 ms':>11} "
          f"{'idle start p50 ms':>18} {'idle start p95 ms':>18}")
    for name, row in table.items():
        print(f"{name:<10} {row['jobs_per_s']:>8.2f} {row['start_p50_ms']:>13.1f} {row['start_p95_ms']:>13.1f} "
              f"{row['e2e_p50_ms']:>11.1f} {idle_table[name]['start_p50_ms']:>18.1f} "
              f"{idle_table[name]['start_p95_ms']:>18.1f}")
    ratios = {f"{name}/sqlite": {"jobs_per_s": table[name]["jobs_per_s"] / table["sqlite"]["jobs_per_s"],
                                 "start_p50": table[name]["start_p50_ms"] / max(table["sqlite"]["start_p50_ms"], 1e-3),
                                 "idle_start_p50_ms_added": idle_table[name]["start_p50_ms"]
                                 - idle_table["sqlite"]["start_p50_ms"]}
              for name in ("postgres", "postgres2")}
    for name, ratio in ratios.items():
        print(f"{name}: throughput x{ratio['jobs_per_s']:.2f}, accept-to-start p50 x{ratio['start_p50']:.2f} "
              f"(loaded), {ratio['idle_start_p50_ms_added']:+.1f} ms (idle)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"args": vars(args), "machine": platform.platform(), "results": table, "idle": idle_table,
               "rounds": rounds, "idle_rounds": idle, "ratios": ratios}
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

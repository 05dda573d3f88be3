#!/usr/bin/env python
"""What tracing, metrics and mutual TLS cost per call: the runtime's interceptors and credentials on and off.

A grpc.aio server (on its own thread and event loop) and a grpc.aio client in this process, with:

  plain       plaintext, only the error interceptor (the baseline: the runtime before this change)
  telemetry   plaintext, the telemetry interceptors on both ends (SDK tracer provider, no exporter)
  mtls        mutual TLS (ECDSA P-256 certificates from `latentwire certs`) and the telemetry interceptors

For each: small unary calls one after another (latency p50/p95) and 16 MiB unary uploads
(throughput). Modes are interleaved per round, so a noisy machine shifts all of them alike.

    python bench/transport_security.py --calls 2000 --uploads 10 --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from latentwire.cli.certs import write_certificates
from services.runtime import telemetry
from latentwire.client.channels import grpc_options, open_aio_channel
from services.runtime.interceptor import ErrorInterceptor
from latentwire.client.security import PLAINTEXT, CertificateDir

METHOD = "/bench.Echo/Call"
MESSAGE_LIMIT = 64 * 1024 * 1024


async def _call(request: bytes, context) -> bytes:
    return len(request).to_bytes(8, "little")


def _serve(credentials, interceptors, ready: threading.Event, box: dict) -> None:
    async def main():
        server = grpc.aio.server(interceptors=interceptors, options=grpc_options(MESSAGE_LIMIT, 30, 10))
        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(_call)})
        server.add_generic_rpc_handlers((handler,))
        port = (server.add_secure_port("127.0.0.1:0", credentials) if credentials
                else server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        box["address"], box["loop"], box["stop"] = f"127.0.0.1:{port}", asyncio.get_running_loop(), asyncio.Event()
        ready.set()
        await box["stop"].wait()
        await server.stop(None)

    asyncio.run(main())


def start_server(mode: str, certs: CertificateDir) -> dict:
    interceptors = [ErrorInterceptor()] if mode == "plain" else [telemetry.TelemetryInterceptor("bench"),
                                                                 ErrorInterceptor()]
    credentials = None
    if mode == "mtls":
        credentials = grpc.ssl_server_credentials(
            [(certs.key("vae").read_bytes(), certs.cert("vae").read_bytes())],
            root_certificates=certs.ca().read_bytes(), require_client_auth=True)
    box: dict = {}
    ready = threading.Event()
    box["thread"] = threading.Thread(target=_serve, args=(credentials, interceptors, ready, box), daemon=True)
    box["thread"].start()
    ready.wait(30)
    return box


def stop_server(box: dict) -> None:
    box["loop"].call_soon_threadsafe(box["stop"].set)
    box["thread"].join(30)


async def measure(mode: str, address: str, certs: CertificateDir, calls: int, uploads: int) -> dict:
    security = certs.client() if mode == "mtls" else PLAINTEXT
    interceptors = [] if mode == "plain" else telemetry.aio_client_interceptors()
    channel = open_aio_channel(address, grpc_options(MESSAGE_LIMIT, 30, 10), security=security,
                               interceptors=interceptors)
    call = channel.unary_unary(METHOD)
    await call(b"warm-up", timeout=30)
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        await call(b"x" * 64, timeout=30)
        latencies.append(time.perf_counter() - started)
    payload = b"\0" * (16 * 1024 * 1024)
    started = time.perf_counter()
    for _ in range(uploads):
        await call(payload, timeout=60)
    upload_seconds = time.perf_counter() - started
    await channel.close()
    latencies.sort()
    return {"p50_ms": 1000 * statistics.median(latencies), "p95_ms": 1000 * latencies[int(0.95 * len(latencies))],
            "upload_gb_per_s": uploads * len(payload) / upload_seconds / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--uploads", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="bench/results/transport_security.json")
    args = parser.parse_args()

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())  # what a service runs without an OTLP endpoint
    modes = ("plain", "telemetry", "mtls")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as folder:
        certs = CertificateDir(write_certificates(folder, names=["vae", "client"]))
        for _ in range(args.rounds):
            for mode in modes:
                box = start_server(mode, certs)
                try:
                    results[mode].append(asyncio.run(measure(mode, box["address"], certs, args.calls, args.uploads)))
                finally:
                    stop_server(box)
    summary = {m: {k: statistics.median(r[k] for r in results[m]) for k in results[m][0]} for m in modes}
    print(f"{'mode':<10} {'p50 ms':>8} {'p95 ms':>8} {'16 MiB upload GB/s':>19}   (median of {args.rounds} rounds)")
    for mode in modes:
        s = summary[mode]
        print(f"{mode:<10} {s['p50_ms']:8.3f} {s['p95_ms']:8.3f} {s['upload_gb_per_s']:19.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary, "rounds": results}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

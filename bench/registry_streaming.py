#!/usr/bin/env python
"""Model registry artifact streaming over loopback, against a plain file copy and a plain sha256.

One run measures, for one large weight file (by default the SD 1.5-architecture UNet,
unet/diffusion_pytorch_model.safetensors, about 3.4 GB of float32 random weights):

  references, in this process:
    sha256      hashlib.sha256 over the file in 4 MiB blocks (what each end of a transfer must do);
    copy        shutil.copyfile to a new file on the same disk;
    copy+fsync  the same, then fsync (every registry transfer ends in an fsync, so this is the fair one);
    direct+fsync the file read in 8 MiB blocks and written with O_DIRECT (latentwire.client.file_io's
                DirectAppender, as the registry's uploads and the client's downloads write), then fsync: the
                disk's rate without the page cache, which on VMs that return freed memory to the host costs
                a host fault per fresh page (copy+fsync moves with that; this row does not);
  the registry (python -m services.registry on 127.0.0.1, its own process and data folder), once per
  --read-verification mode (default: both, each its own registry process):
    upload      RegistryClient.upload_blob: WriteBlob chunks; the server writes the .partial file,
                hashes it (sha256 on its own thread) and, under "blocks", takes its 1 MiB block
                CRC-32s as it goes, checks the sha256, fsyncs and renames the blob into the store;
    download    RegistryClient.read_blob: ReadBlob chunks; under "blocks" the server checks every
                block it sends against the CRC-32s taken when the blob matched its sha256, under
                "digest" it sends the bytes as stored (verified at rest; the scrub re-hashes blobs
                at rest: services/registry/integrity.py); the client hashes the whole download with
                sha256 (on one thread), writes it (on another) and fsyncs the file.
    Rows of the "digest" registry are named upload/digest and download/digest.

  and the transport alone:
    bare-grpc   a bare grpc.aio server (another process, the registry's channel options) streaming
                ReadBlobResponse messages of the same size from one in-memory buffer, the client
                only counting them: no disk, no hashing, the ceiling gRPC Python sets here;

for chunk sizes 1 MiB and 4 MiB, each repeated --runs times, alternating with the references, so
the ratios hold on a noisy machine. Every file is read once untimed first, so all rows read from
the page cache. GB/s = 1e9 bytes per second. CPU seconds come from /proc (this process and the
registry's). The stored blob and the downloaded copy are deleted between runs.

    python bench/registry_streaming.py
    python bench/registry_streaming.py --file /path/to/big.safetensors --runs 3

This is a benchmark, not a test: it asserts only that every transfer verified. Results go to a
table on stdout and to JSON (default bench/results/registry_streaming.json).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
MIB = 1024 * 1024
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def latentwire_home() -> Path:
    home = os.environ.get("LATENTWIRE_HOME") or Path.home() / ".cache" / "latentwire"
    return Path(home).expanduser()


def resolve_file(args) -> tuple[Path, str]:
    """The file to stream, and where it came from (given / reused / built in N s)."""
    if args.file:
        path = Path(args.file).expanduser()
        if not path.is_file():
            raise SystemExit(f"--file {path} is not a file")
        return path, "given"
    folder = Path(args.folder).expanduser() if args.folder else latentwire_home() / "models" / "sd15-random"
    path = folder / UNET_FILE
    if path.is_file():
        return path, "reused"
    if args.folder:
        raise SystemExit(f"--folder {folder}: no {UNET_FILE} there")
    from services.tiny_models import create_tiny_sd

    print(f"building the SD 1.5-architecture random model into {folder} (~4 GB) ...", flush=True)
    started = time.perf_counter()
    create_tiny_sd(folder, full_size=True, seed=0)
    return path, f"built in {time.perf_counter() - started:.1f} s"


def cpu_seconds(pid: int) -> float | None:
    """On-CPU time of every thread of ``pid`` so far (Linux schedstat), in seconds."""
    try:
        total = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
        return total / 1e9
    except OSError:
        return None


def machine_info() -> dict:
    import grpc

    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "git_commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def bare_server() -> None:
    """Run a bare grpc.aio ReadBlob server (for the transport row); prints its port, serves until killed."""
    import asyncio

    import grpc

    from latentwire.registry.v1 import registry_pb2, registry_pb2_grpc
    from latentwire.client.channels import DEFAULT_MAX_MESSAGE_BYTES, grpc_options

    class Bare(registry_pb2_grpc.RegistryServiceServicer):
        async def ReadBlob(self, request, context):
            payload = os.urandom(request.chunk_size)
            offset = 0
            while offset < request.limit:
                n = min(request.chunk_size, request.limit - offset)
                yield registry_pb2.ReadBlobResponse(offset=offset, data=payload if n == len(payload) else payload[:n],
                                                    size_bytes=request.limit)
                offset += n

    async def serve() -> None:
        server = grpc.aio.server(options=grpc_options(DEFAULT_MAX_MESSAGE_BYTES, 30.0, 10.0))
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(Bare(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())


def direct_copy(source: Path, target: Path) -> None:
    """Copy ``source`` to a new ``target`` written with O_DIRECT (where the file system takes it), then fsync."""
    from latentwire.client.file_io import DirectAppender

    target.touch()
    with open(source, "rb", buffering=0) as src, DirectAppender(target, 0) as writer:
        block = bytearray(8 * MIB)
        while count := src.readinto(block):
            writer.write(memoryview(block)[:count])
    with open(target, "rb+") as file:
        os.fsync(file.fileno())


def bare_stream(address: str, size: int, chunk: int) -> int:
    """Receive ``size`` bytes from the bare server; returns the bytes counted."""
    from latentwire.client.registry import RegistryClient
    from latentwire.registry.v1 import registry_pb2

    with RegistryClient(address, chunk_size=chunk) as client:
        return sum(len(m.data) for m in client._stub.ReadBlob(
            registry_pb2.ReadBlobRequest(sha256="0" * 64, limit=size, chunk_size=chunk)))


class Timer:
    """Wall time plus the CPU time of this process and of the registry process."""

    def __init__(self, server_pid: int | None):
        self.server_pid = server_pid

    def __enter__(self):
        self.server_cpu0 = cpu_seconds(self.server_pid) if self.server_pid else None
        self.client_cpu0 = cpu_seconds(os.getpid())
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        client = cpu_seconds(os.getpid())
        self.client_cpu = None if client is None or self.client_cpu0 is None else client - self.client_cpu0
        server = cpu_seconds(self.server_pid) if self.server_pid else None
        self.server_cpu = None if server is None or self.server_cpu0 is None else server - self.server_cpu0


def measure(name: str, chunk: int | None, size: int, timer: Timer) -> dict:
    return {
        "name": name,
        "chunk_bytes": chunk,
        "seconds": timer.seconds,
        "gb_per_s": size / timer.seconds / 1e9,
        "client_cpu_s": timer.client_cpu,
        "server_cpu_s": timer.server_cpu,
    }


def summarize(runs: list[dict], size: int) -> list[dict]:
    rows: dict[tuple, list[dict]] = {}
    for run in runs:
        rows.setdefault((run["name"], run["chunk_bytes"]), []).append(run)
    summary = []
    for (name, chunk), group in rows.items():
        seconds = [r["seconds"] for r in group]
        median = statistics.median(seconds)
        cpu = [r for r in group if r["client_cpu_s"] is not None]
        summary.append({
            "name": name,
            "chunk_bytes": chunk,
            "runs": len(group),
            "median_s": median,
            "best_s": min(seconds),
            "median_gb_per_s": size / median / 1e9,
            "client_cpu_s": statistics.median(r["client_cpu_s"] for r in cpu) if cpu else None,
            "server_cpu_s": (statistics.median(r["server_cpu_s"] for r in group)
                             if all(r["server_cpu_s"] is not None for r in group) else None),
        })
    by_name = {(s["name"], s["chunk_bytes"]): s for s in summary}
    for row in summary:
        for reference in ("copy+fsync", "sha256"):
            ref = by_name.get((reference, None))
            row[f"vs_{reference.replace('+', '_')}"] = ref["median_s"] / row["median_s"] if ref else None
    return summary


def print_table(report: dict) -> None:
    size = report["config"]["file_bytes"]
    print()
    print(f"file: {report['config']['file']} ({size / 1e9:.2f} GB), {report['config']['runs']} run(s) each, "
          f"median; GB/s = 1e9 B/s")
    header = f"{'what':<15} {'chunk':>6} {'seconds':>8} {'GB/s':>6} {'x copy+fsync':>13} {'x sha256':>9} " \
             f"{'client cpu s':>13} {'server cpu s':>13}"
    print(header)
    print("-" * len(header))
    for row in report["summary"]:
        chunk = f"{row['chunk_bytes'] // MIB} MiB" if row["chunk_bytes"] else ""
        client_cpu = f"{row['client_cpu_s']:.2f}" if row["client_cpu_s"] is not None else "-"
        server_cpu = f"{row['server_cpu_s']:.2f}" if row["server_cpu_s"] is not None else "-"
        print(f"{row['name']:<15} {chunk:>6} {row['median_s']:>8.2f} {row['median_gb_per_s']:>6.2f} "
              f"{row['vs_copy_fsync']:>13.2f} {row['vs_sha256']:>9.2f} {client_cpu:>13} {server_cpu:>13}")
    print("(x copy+fsync, x sha256: the reference's time over this row's; 1.00 = as fast as the reference)")
    load = report["load_average"]
    print(f"load average (1, 5, 15 min): start {', '.join(f'{x:.2f}' for x in load['start'])}, "
          f"end {', '.join(f'{x:.2f}' for x in load['end'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default=None, help="file to stream (default: the SD 1.5 random UNet weights)")
    parser.add_argument("--folder", default=None,
                        help=f"SD folder holding {UNET_FILE} (default $LATENTWIRE_HOME/models/sd15-random, "
                             "built if missing)")
    parser.add_argument("--chunk-mib", type=int, action="append", default=None,
                        help="chunk size in MiB; repeatable (default: 1 and 4)")
    parser.add_argument("--runs", type=int, default=2, help="timed runs of each row (default 2)")
    parser.add_argument("--read-verification", action="append", choices=("blocks", "digest"), default=None,
                        help="the registry's --read-verification; repeatable, one registry each (default: both)")
    parser.add_argument("--workdir", default=None,
                        help="scratch folder for the registry data and the copies (default: a temp folder)")
    parser.add_argument("--output", default=str(BENCH_DIR / "results" / "registry_streaming.json"))
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)  # internal: the transport row
    args = parser.parse_args(argv)
    if args.bare_server:
        bare_server()
        return 0
    chunks = [c * MIB for c in (args.chunk_mib or [1, 4])]
    modes = list(dict.fromkeys(args.read_verification or ["blocks", "digest"]))
    load_start = os.getloadavg()  # other work on the machine moves the ratios: the report says how much there was

    from latentwire.client.registry import RegistryClient, sha256_file
    from services.suite.launcher import start_service, wait_serving

    path, origin = resolve_file(args)
    size = path.stat().st_size
    work = Path(tempfile.mkdtemp(prefix="registry-bench-", dir=args.workdir))
    print(f"file {path} ({size / 1e9:.2f} GB, {origin}); scratch in {work}", flush=True)

    print("warm-up: reading the file once (page cache) ...", flush=True)
    digest = sha256_file(path)

    services = {}  # mode -> (service, its stored blob's path)
    for mode in modes:
        data_dir = work / f"registry-{mode}"
        services[mode] = (start_service("registry", "services.registry",
                                        ["--port", "0", "--data-dir", str(data_dir), "--log-level", "WARNING",
                                         "--read-verification", mode],
                                        log_dir=work / f"logs-{mode}", timeout=60),
                          data_dir / "blobs" / "sha256" / digest[:2] / digest)
    bare = subprocess.Popen([sys.executable, __file__, "--bare-server"], stdout=subprocess.PIPE, text=True)
    bare_address = f"127.0.0.1:{bare.stdout.readline().strip()}"
    runs: list[dict] = []
    exit_codes = {}
    try:
        for service, _ in services.values():
            wait_serving(service.address, 60, "registry")
        for run in range(args.runs):
            # References first in each round.
            with Timer(None) as timer:
                assert sha256_file(path) == digest
            runs.append(measure("sha256", None, size, timer))
            copy = work / "copy"
            with Timer(None) as timer:
                shutil.copyfile(path, copy)
            runs.append(measure("copy", None, size, timer))
            copied = timer
            with Timer(None) as timer:
                with open(copy, "rb+") as file:
                    os.fsync(file.fileno())
            timer.seconds += copied.seconds
            if timer.client_cpu is not None and copied.client_cpu is not None:
                timer.client_cpu += copied.client_cpu
            runs.append(measure("copy+fsync", None, size, timer))
            copy.unlink()
            with Timer(None) as timer:
                direct_copy(path, copy)
            runs.append(measure("direct+fsync", None, size, timer))
            copy.unlink()

            for chunk in chunks:
                with Timer(bare.pid) as timer:
                    assert bare_stream(bare_address, size, chunk) == size
                runs.append(measure("bare-grpc", chunk, size, timer))
                line = f"run {run + 1}: chunk {chunk // MIB} MiB: bare gRPC {runs[-1]['gb_per_s']:.2f} GB/s"
                for mode, (service, stored) in services.items():
                    suffix = "" if mode == "blocks" else f"/{mode}"
                    server_pid = service.process.pid
                    with RegistryClient(service.address, chunk_size=chunk) as client:
                        with Timer(server_pid) as timer:
                            uploaded, sent = client.upload_blob(path, digest, size)
                        assert uploaded and sent == size, (uploaded, sent)
                        runs.append(measure("upload" + suffix, chunk, size, timer))
                        target = work / "download.partial"
                        with Timer(server_pid) as timer:
                            got = client.read_blob(digest, target, size_bytes=size)
                        assert got.bytes_received == size and target.stat().st_size == size
                        runs.append(measure("download" + suffix, chunk, size, timer))
                        target.unlink()
                    # The next upload must send the bytes again: take the blob out of the (bench-owned) store.
                    os.chmod(stored, 0o644)
                    stored.unlink()
                    line += f", {mode}: upload {runs[-2]['gb_per_s']:.2f} GB/s, download {runs[-1]['gb_per_s']:.2f} GB/s"
                print(line, flush=True)
    finally:
        bare.kill()
        bare.wait()
        for mode, (service, _) in services.items():
            service.process.send_signal(signal.SIGTERM)
            exit_codes[mode] = service.process.wait(60)
        shutil.rmtree(work, ignore_errors=True)

    report = {
        "benchmark": "registry_streaming",
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else None,
        "config": {"file": str(path), "file_origin": origin, "file_bytes": size, "sha256": digest,
                   "chunk_bytes": chunks, "runs": args.runs, "read_verification": modes,
                   "transport": "loopback TCP (127.0.0.1), insecure"},
        "machine": machine_info(),
        "summary": summarize(runs, size),
        "runs": runs,
        "registry_exit_codes": exit_codes,
        "load_average": {"start": load_start, "end": os.getloadavg()},
    }
    print_table(report)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

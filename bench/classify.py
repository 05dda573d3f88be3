#!/usr/bin/env python
"""Image classification throughput and latency: the classifier service against in-process inference.

One run measures, per backend (torch float32, torch dynamic int8, ONNX Runtime float32, ONNX Runtime
static int8 with the convolutions quantized: onnx-int8) and per
concurrency (1, 8, 32 callers, each sending one image per request, back to back):

  A. in-process: transformers' pipeline("image-classification") in this process, called from N
     threads (what a web app calling the pipeline from its request threads does). For int8 the
     pipeline gets the quantized model; for ONNX Runtime, which has no transformers pipeline, the
     same steps by hand: the model's image processor, session.run, the pipeline's softmax/top-5.
  B. the service with dynamic batching: the classifier process (--max-batch-size,
     --max-queue-delay-ms), called over gRPC from N threads with ClassifierClient.
  C. the service without dynamic batching (--no-dynamic-batching): each call runs alone.

Every request is one encoded JPEG (384x384; the processor resizes to 288 and crops 256, as
apple/mobilevit-small's does); A decodes it with PIL inside the timed call, B and C send the
bytes. For each cell: images/s over the cell (completed images / time to the last completion),
and p50/p95 request latency. For B and C also the batch sizes the service ran (GetStatistics).
The variants of one concurrency alternate in rounds (A B C A B C ...; each row is its median
round), so their ratio holds on a noisy machine; both services stay up (idle) while A runs.

    python bench/classify.py                    # mobilevit-small architecture, random weights
    python bench/classify.py --size tiny --seconds 3
    python bench/classify.py --backends int8,onnx-int8 --concurrency 8 --rounds 1 --threads 1   # static vs dynamic int8

On a busy 2-core machine give --threads 1: with the libraries' default of one thread per core, both
int8 backends lose more to contention than to arithmetic (measured 2026-12-02 at load 8-9: one
static int8 batch of 4 took 1.1 s on one ONNX Runtime thread and 2.2 s on two; dynamic int8 3.4 s on
one torch thread and 8.5 s on two; separate runs, noisy), and the comparison measures the scheduler, not the kernels.

onnx-int8 is calibrated here on 64 other synthetic JPEGs when the folder has no model.int8.onnx yet
(the random-weight model's top-1 agreement with float32 is printed; it is low because random
networks are too sensitive to quantize, see services/classifier/quantize.py; speed is what counts here).

This is a benchmark, not a test: it asserts nothing. Results: a table on stdout and JSON
(default bench/results/classify-<size>.json).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
BACKENDS = ("torch", "int8", "onnx", "onnx-int8")


def latentwire_home() -> Path:
    return Path(os.environ.get("LATENTWIRE_HOME") or Path.home() / ".cache" / "latentwire").expanduser()


def model_folder(size: str, workdir: Path) -> Path:
    """The model folder with its ONNX export: mobilevit-small-random under $LATENTWIRE_HOME, or a tiny copy."""
    from services.classifier.export import export_onnx
    from services.tiny_models import create_tiny_classifier

    if size == "full":
        folder = latentwire_home() / "models" / "mobilevit-small-random"
        if not (folder / "config.json").is_file():
            print(f"building the mobilevit-small-architecture random model into {folder} ...", flush=True)
            create_tiny_classifier(folder, full_size=True)
    else:
        folder = create_tiny_classifier(workdir / "tiny-mobilevit")
    if not (folder / "model.onnx").is_file():
        result = export_onnx(folder)
        print(f"exported {result.path} (ONNX Runtime vs PyTorch max abs diff {result.max_abs_difference:.1e})")
    return folder


def static_int8(folder: Path, workdir: Path) -> None:
    """model.int8.onnx beside model.onnx, calibrated on synthetic JPEGs unlike the timed ones (other seed)."""
    from services.classifier.quantize import quantize_static_onnx

    if (folder / "model.int8.onnx").is_file():
        return
    calibration = workdir / "calibration"
    calibration.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(jpeg_images(64, seed=1)):
        (calibration / f"{i:03d}.jpg").write_bytes(data)
    path, report = quantize_static_onnx(folder, calibration, min_agreement=0.0)
    print(f"quantized {path}: top-1 agreement with float32 {report.top1_agreement:.1%} on {report.heldout_images} "
          f"held-out images ({report.seconds:.0f} s)", flush=True)


def jpeg_images(count: int, seed: int = 0, size: int = 384) -> list[bytes]:
    from services.tiny_models.mobilevit import synthetic_image

    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(count):
        buffer = io.BytesIO()
        synthetic_image(rng, size).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


# --------------------------------------------------------------------------------------------
# The in-process references


def in_process_classifier(folder: Path, backend: str, threads: int = 0):
    """A callable: encoded image bytes -> top-5 [{label, score}], the pipeline's way."""
    import transformers
    from PIL import Image

    from services.classifier.model import ClassifierModel, quantize_int8

    if backend in ("torch", "int8"):  # onnx and onnx-int8: ONNX Runtime, below
        model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
        if backend == "int8":
            model = quantize_int8(model)
        processor = transformers.AutoImageProcessor.from_pretrained(folder)
        pipe = transformers.pipeline("image-classification", model=model, image_processor=processor, device="cpu")
        return lambda data: pipe(Image.open(io.BytesIO(data)), top_k=5)
    onnx = ClassifierModel(folder, backend=backend, device=torch.device("cpu"), dtype=torch.float32, allow_pickle=False,
                           threads=threads)
    from transformers.image_utils import load_image

    def classify(data: bytes):
        pixel_values = onnx.preprocess(load_image(Image.open(io.BytesIO(data))))
        logits = onnx.forward(pixel_values[None]).numpy()[0]
        return [{"label": label, "score": score} for _, label, score in onnx.top_k(logits, 5)]

    return classify


# --------------------------------------------------------------------------------------------
# Load generation


def drive(call, images: list[bytes], concurrency: int, seconds: float, after_warm_up=None, warm_up=True) -> dict:
    """``concurrency`` threads call ``call(image)`` back to back for ``seconds``; requests under way then finish."""
    for i in range(min(len(images), max(2, concurrency)) if warm_up else 0):  # untimed
        call(images[i])
    if after_warm_up is not None:
        after_warm_up()
    latencies: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + seconds
    last = [start]

    def worker(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            call(images[i % len(images)])
            t1 = time.perf_counter()
            with lock:
                latencies.append(t1 - t0)
                last[0] = max(last[0], t1)
            i += concurrency

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker, k) for k in range(concurrency)]:
            future.result()
    elapsed = last[0] - start
    ms = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "seconds": elapsed,
            "load_average_1min": os.getloadavg()[0], "images_per_s": len(latencies) / elapsed, "latencies_ms": ms}


def merge(runs: list[dict]) -> dict:
    """Rounds of one cell -> one row: the median round's images/s, latency percentiles over every request."""
    ms = np.concatenate([r["latencies_ms"] for r in runs])
    rates = [r["images_per_s"] for r in runs]
    return {"concurrency": runs[0]["concurrency"], "requests": int(ms.size),
            "images_per_s": round(statistics.median(rates), 2), "images_per_s_rounds": [round(r, 2) for r in rates],
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "mean_ms": round(float(ms.mean()), 1),
            "load_average_1min": [round(r["load_average_1min"], 2) for r in runs]}


def histogram(stats) -> dict[int, int]:
    return {b.batch_size: b.execution_count for b in stats.batch_sizes}


def start_classifier(folder: Path, backend: str, dynamic: bool, args, log_dir: Path):
    from services.suite.launcher import start_service, wait_serving

    flags = ["--port", "0", "--model", f"bench={folder}", "--backend", backend,
             "--max-batch-size", str(args.max_batch_size), "--max-queue-delay-ms", str(args.max_queue_delay_ms),
             "--intra-op-threads", str(args.threads), "--model-instances", str(args.model_instances)]
    if not dynamic:
        flags.append("--no-dynamic-batching")
    name = f"classifier-{backend}-{'dynamic' if dynamic else 'nobatch'}"
    service = start_service(name, "services.classifier", flags, log_dir=log_dir)
    wait_serving(service.address, 300, name, service.process)
    return service


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed length of each cell in each round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per cell (variants alternate between rounds)")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    parser.add_argument("--model-instances", type=int, default=1, help="the services' --model-instances")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads for both sides (torch.set_num_threads here, --intra-op-threads for the "
                             "services); 0 keeps the libraries' defaults")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = [b for b in args.backends.split(",") if b]
    levels = [int(c) for c in args.concurrency.split(",")]

    from latentwire.client.classifier import ClassifierClient

    workdir = Path(tempfile.mkdtemp(prefix="bench-classify-"))
    log_dir = workdir / "logs"
    rows = []
    try:
        folder = model_folder(args.size, workdir)
        if "onnx-int8" in backends:
            static_int8(folder, workdir)
        images = jpeg_images(64)
        print(f"model {folder}, {len(images)} JPEG images of 384x384, torch threads {torch.get_num_threads()}",
              flush=True)
        for backend in backends:
            reference = in_process_classifier(folder, backend, args.threads)
            services = {dynamic: start_classifier(folder, backend, dynamic, args, log_dir) for dynamic in (True, False)}
            clients = {dynamic: ClassifierClient(s.address, timeout=600) for dynamic, s in services.items()}
            try:
                variants = [("in-process", reference, None)] + [
                    ("service, dynamic batching" if dynamic else "service, no batching",
                     lambda data, c=client: c.classify([data], top_k=5), client)
                    for dynamic, client in clients.items()]
                for concurrency in levels:
                    runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
                    sizes: dict[str, dict[int, int]] = {name: {} for name, _, _ in variants}
                    # Rounds alternate the variants (A B C A B C ...), so a burst of outside load
                    # hits all of them; each row reports its median round.
                    for round_ in range(args.rounds):
                        for name, call, client in variants:
                            before: dict[int, int] = {}
                            snapshot = (lambda c=client, b=before: b.update(histogram(c.statistics().models[0]))
                                        ) if client else None
                            runs[name].append(drive(call, images, concurrency, args.seconds, snapshot,
                                                    warm_up=round_ == 0))
                            if client:
                                after = histogram(client.statistics().models[0])
                                for size in after:
                                    if after[size] - before.get(size, 0):
                                        sizes[name][size] = sizes[name].get(size, 0) + after[size] - before.get(size, 0)
                    for name, _, client in variants:
                        rows.append({"backend": backend, "variant": name, **merge(runs[name]),
                                     **({"batch_sizes": sizes[name]} if client else {})})
                        print(rows[-1], flush=True)
            finally:
                for client in clients.values():
                    client.close()
                for service in services.values():
                    service.process.terminate()
                    service.process.wait(60)
            del reference
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"{'backend':<9} {'variant':<27} {'conc':>4} {'img/s':>7} {'p50 ms':>8} {'p95 ms':>8}  batch sizes run")
    for row in rows:
        sizes = ", ".join(f"{s}x{n}" for s, n in sorted(row.get("batch_sizes", {}).items()))
        print(f"{row['backend']:<9} {row['variant']:<27} {row['concurrency']:>4} {row['images_per_s']:>7.2f} "
              f"{row['p50_ms']:>8.1f} {row['p95_ms']:>8.1f}  {sizes}")
    print()
    print("service (dynamic batching) / in-process throughput:")
    for backend in backends:
        for concurrency in levels:
            cells = {r["variant"]: r for r in rows if r["backend"] == backend and r["concurrency"] == concurrency}
            ratio = cells["service, dynamic batching"]["images_per_s"] / cells["in-process"]["images_per_s"]
            print(f"  {backend:<9} concurrency {concurrency:>2}: {ratio:.2f}x")

    output = Path(args.output) if args.output else BENCH_DIR / "results" / f"classify-{args.size}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "benchmark": "classify", "size": args.size, "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "load_average_at_end": os.getloadavg()},
        "settings": {"seconds_per_round": args.seconds, "rounds": args.rounds, "max_batch_size": args.max_batch_size,
                     "max_queue_delay_ms": args.max_queue_delay_ms, "model_instances": args.model_instances,
                     "image": "JPEG 384x384, quality 90",
                     "torch_threads": torch.get_num_threads(), "threads_flag": args.threads,
                     "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}},
        "rows": rows,
        "median_latency_note": "p50/p95 are per request of one image",
    }, indent=2))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

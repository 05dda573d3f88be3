#!/usr/bin/env python
"""What running an upscaler model on the VAE stage costs: VaeService.Upscale (a registry upscaler model, PNG in
and out over gRPC, in its own process) against the same network in-process (services/vae/upscaler.py: the file
loaded, image -> network -> 8-bit image) on the same image, in the same run, with the ratio.

Models (random weights, seed 0, as one .safetensors file imported into a registry the VAE fetches from):
"tiny" is the tests' tiny RRDBNet (num_feat 8, one RRDB, x4); "x4plus" has RealESRGAN_x4plus's architecture
(num_feat 64, num_grow_ch 32, 23 RRDBs, x4: 16.7 M parameters, 67 MB). The image is --size pixels square, run
whole (it fits AUTOMATIC1111's 192-pixel tile); --rounds rounds alternate stage and in-process.

    OMP_NUM_THREADS=1 python bench/upscaler.py                   # tiny and x4plus at 128x128
    OMP_NUM_THREADS=1 python bench/upscaler.py --models tiny --rounds 5

A benchmark, not a test: it asserts only that both sides made the same pixels. Table on stdout, JSON in
bench/results/upscaler.json.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "clients" / "python"))

from services.tiny_models import create_tiny_upscaler, ensure_default_model  # noqa: E402
from services.vae.upscaler import Upscaler  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
MODELS = {"tiny": {}, "x4plus": {"num_feat": 64, "num_grow_ch": 32, "num_block": 23}}


def _image(size: int):
    from PIL import Image

    colours = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(colours).resize((size, size), Image.Resampling.BICUBIC)


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,x4plus", help="comma-separated: tiny, x4plus")
    parser.add_argument("--size", type=int, default=128, help="input image side in pixels")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side (after one warm-up each)")
    parser.add_argument("--output", default=str(BENCH_DIR / "results" / "upscaler.json"))
    args = parser.parse_args()

    import grpc
    from PIL import Image

    from latentwire.client.registry import RegistryClient
    from latentwire.vae.v1 import vae_pb2, vae_pb2_grpc
    from services.suite.launcher import start_service, wait_serving

    image = _image(args.size)
    png = io.BytesIO()
    image.save(png, format="PNG")
    png = png.getvalue()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-upscaler-") as tmp:
        root = Path(tmp)
        registry = start_service("registry", "services.registry", ["--host", "127.0.0.1", "--port", "0",
                                                                  "--data-dir", str(root / "registry")],
                                 log_dir=root / "logs")
        vae = None
        try:
            wait_serving(registry.address, 120, "registry", registry.process)
            vae = start_service("vae", "services.vae", [
                "--host", "127.0.0.1", "--port", "0", "--model", f"tiny={ensure_default_model()}",
                "--registry", registry.address, "--cache-dir", str(root / "cache")], log_dir=root / "logs")
            wait_serving(vae.address, 300, "vae", vae.process)
            with RegistryClient(registry.address, timeout=300) as client, grpc.insecure_channel(
                    vae.address, options=[("grpc.max_receive_message_length", 256 << 20)]) as channel:
                stub = vae_pb2_grpc.VaeServiceStub(channel)
                for name in args.models.split(","):
                    file = create_tiny_upscaler(root / name / f"bench-{name}.safetensors", 4, **MODELS[name])
                    client.import_folder(file, f"bench-{name}")
                    request = vae_pb2.UpscaleRequest(images=[png])
                    request.upscaler.name = f"bench-{name}"
                    local = Upscaler.load(file, name, torch.device("cpu"), torch.float32)
                    stage_first = stub.Upscale(request, timeout=3600)  # warm-up: fetch, load
                    local_first = local.upscale(image)
                    same = np.array_equal(np.asarray(Image.open(io.BytesIO(stage_first.png_images[0]))),
                                          np.asarray(local_first))
                    stage, in_process = [], []
                    for _ in range(args.rounds):
                        stage.append(_timed(lambda: stub.Upscale(request, timeout=3600))[0])
                        in_process.append(_timed(lambda: local.upscale(image))[0])
                    row = {"model": name, "size": args.size, "parameters": sum(p.numel() for p in
                                                                                 local.network.parameters()),
                           "stage_s": stage, "in_process_s": in_process, "same_pixels": same,
                           "stage_median_s": statistics.median(stage),
                           "in_process_median_s": statistics.median(in_process)}
                    row["ratio_median"] = row["stage_median_s"] / row["in_process_median_s"]
                    row["ratio_fastest"] = min(stage) / min(in_process)
                    rows.append(row)
                    print(f"{name}: done", file=sys.stderr)
        finally:
            for service in (vae, registry):
                if service is not None and service.process.poll() is None:
                    service.process.terminate()
                    service.process.wait(60)

    print(f"{'model':8} {'params':>10} {'size':>5} {'stage s':>9} {'in-proc s':>9} {'ratio':>6} {'fastest':>7} same")
    for r in rows:
        print(f"{r['model']:8} {r['parameters']:>10} {r['size']:>5} {r['stage_median_s']:>9.3f} "
              f"{r['in_process_median_s']:>9.3f} {r['ratio_median']:>6.2f} {r['ratio_fastest']:>7.2f} "
              f"{r['same_pixels']}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"torch_threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

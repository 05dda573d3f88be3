#!/usr/bin/env python
"""Does a second OpenMP team in a process slow its compute thread down? (a diagnostic)

torch on Linux uses libgomp; every OS thread that starts a parallel region gets its own team of
worker threads. The services compute on a ThreadPoolExecutor thread, while the event-loop thread
runs tensors.from_proto()/to_proto() itself - and torch.isfinite(...).all() or .contiguous() on
a tensor above ATen's grain size (32768 elements) is a parallel region, i.e. a second team.

This script mirrors that: the denoising loop (the denoiser service's own DenoiserModel.denoise)
runs on a worker thread, first with only that thread ever entering OpenMP (phase "one team"),
then after the main thread has run torch.isfinite(t).all() once on a [2, 77, 768] tensor - the
full-size prompt embeddings the denoiser's event loop validates (phase "two teams"). Each run
waits for the machine to be quiet and records other processes' CPU use.

    python bench/omp_teams.py --size tiny --runs 10
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import text_to_image as t2i  # noqa: E402

from services.denoiser.model import DenoiseParams, DenoiserModel  # noqa: E402
from services.denoiser.conditioning import TextConditioning  # noqa: E402
from services.runtime.config import ModelSpec  # noqa: E402
from services.runtime.jobs import Job  # noqa: E402
from services.text_encoder.model import TextEncoderModel  # noqa: E402
from services.vae.model import VaeModel, encode_png  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(t2i.DEFAULTS), default="tiny")
    parser.add_argument("--model")
    parser.add_argument("--stage", choices=("denoiser", "vae"), default="denoiser",
                        help="time the denoising loop, or the VAE decode plus PNG encoding (as the VAE service does)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--quiet-wait", type=float, default=300.0)
    parser.add_argument("--json", help="default bench/results/omp_teams-<size>.json")
    args = parser.parse_args(argv)
    defaults = t2i.DEFAULTS[args.size]
    steps = args.steps or defaults["steps"]
    model_path, _ = t2i.resolve_model(args.size, args.model)
    spec = ModelSpec(name="m", path=model_path, is_default=True)
    cpu = torch.device("cpu")
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
    # Load and encode on the compute thread too, so that phase 1 really has one team only.
    te, dn = pool.submit(lambda: (TextEncoderModel(spec, cpu, torch.float32, False),
                                  DenoiserModel(spec, cpu, torch.float32, False))).result()
    pos, neg = pool.submit(te.encode, [t2i.DEFAULT_PROMPT], [], 1, True).result()
    params = DenoiseParams(height=defaults["height"], width=defaults["width"], num_inference_steps=steps,
                           guidance_scale=defaults["guidance"], guidance_rescale=0.0, eta=0.0, seed=0, scheduler="")
    pids = {"bench": __import__("os").getpid()}
    meter = t2i.CpuMeter(pids)

    def denoise():
        started = time.perf_counter()
        dn.denoise(Job(uuid.uuid4().hex, steps), TextConditioning(pos, neg), params, lambda event: None)
        return time.perf_counter() - started

    if args.stage == "vae":
        vae = pool.submit(VaeModel, spec, cpu, torch.float32, False).result()
        latents = pool.submit(
            lambda: dn.denoise(Job("x", 1), TextConditioning(pos, neg), params, lambda e: None).latents).result()
        del dn, te

        def denoise():  # noqa: F811 - the VAE stage: what VaeService.Decode's worker does
            started = time.perf_counter()
            pixels = vae.decode(latents)
            [encode_png(image, {}) for image in pixels]
            return time.perf_counter() - started

    def measure(phase):
        pool.submit(denoise).result()  # warm-up
        out = []
        for _ in range(args.runs):
            if args.quiet_wait > 0:
                t2i.wait_until_quiet(pids, limit_s=args.quiet_wait)
            meter.start()
            wall = pool.submit(denoise).result()
            cpu_s = meter.stop()
            out.append({"wall_s": wall, "cpu_s": cpu_s, "threads": threading.active_count(),
                        "os_threads": t2i.thread_count(pids["bench"]),
                        "context_switches": meter.switches["bench"]})
            print(f"  {phase}: {wall:.4f} s (others {cpu_s.get('others', 0):.2f} s, "
                  f"os threads {out[-1]['os_threads']}, context switches {out[-1]['context_switches']})", flush=True)
        return out

    results = {"one_team": measure("one team")}
    if args.stage == "denoiser":
        # What the denoiser's event loop does with full-size prompt embeddings in tensors.from_proto.
        torch.isfinite(torch.zeros(2, 77, 768)).all()
    else:
        # What the VAE's event loop does with 256x256 pixels in tensors.to_proto (a permuted view).
        torch.zeros(1, 3, 256, 256).permute(0, 2, 3, 1).contiguous()
    results["two_teams"] = measure("two teams")

    summary = {}
    for phase, rows in results.items():
        clean = [r["wall_s"] for r in rows if not t2i.disturbed(r)]
        summary[phase] = {"median_s": statistics.median(clean) if clean else None,
                          "per_step_ms": statistics.median(clean) / steps * 1000 if clean and args.stage == "denoiser"
                          else None,
                          "clean_runs": len(clean), "os_threads": rows[-1]["os_threads"],
                          "context_switches": statistics.median(r["context_switches"] for r in rows)}
    print()
    print(f"omp teams: stage={args.stage} size={args.size}, {steps} steps, torch threads {torch.get_num_threads()}")
    for phase, s in summary.items():
        per_step = f" ({s['per_step_ms']:.2f} ms/step)" if s["per_step_ms"] is not None else ""
        print(f"  {phase:10s} median {s['median_s']:.4f} s{per_step} over "
              f"{s['clean_runs']} undisturbed runs; process threads {s['os_threads']}, "
              f"context switches per run {s['context_switches']:.0f}")
    ratio = summary["two_teams"]["median_s"] / summary["one_team"]["median_s"]
    print(f"  two teams / one team: {ratio:.3f}")
    out = Path(args.json) if args.json else t2i.BENCH_DIR / "results" / f"omp_teams-{args.stage}-{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "machine": t2i.machine_info(), "summary": summary,
                               "ratio": ratio, "runs": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Where the suite's extra time goes: each stage's own code in this process vs. the same stage over gRPC.

For one model and one set of settings this times, interleaved, per repetition:

  rtt       Health/Check on each service (a bare gRPC unary round trip, no model work)
  local     the services' own domain code (TextEncoderModel.encode, DenoiserModel.denoise,
            VaeModel.decode + encode_png) called directly in this process (main thread only: a
            second thread doing torch work would start a second OpenMP team, see omp_teams.py)
  direct    the same work as an RPC straight to the stage service (Encode, Denoise stream, Decode)
  suite     a full Generate through the orchestrator (its per-stage timings)

    python bench/overhead_breakdown.py --size tiny --reps 20

Companion of bench/text_to_image.py (a diagnostic, not part of the headline figures).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import text_to_image as t2i  # noqa: E402

from latentwire.client import Client  # noqa: E402
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc  # noqa: E402
from services.denoiser.model import DenoiseParams, DenoiserModel  # noqa: E402
from services.denoiser.conditioning import TextConditioning  # noqa: E402
from services.runtime import tensors  # noqa: E402
from services.runtime.config import ModelSpec  # noqa: E402
from services.runtime.jobs import Job  # noqa: E402
from services.suite.launcher import start_suite  # noqa: E402
from services.text_encoder.model import TextEncoderModel  # noqa: E402
from services.vae.model import VaeModel, encode_png  # noqa: E402
from latentwire.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc  # noqa: E402
from latentwire.vae.v1 import vae_pb2, vae_pb2_grpc  # noqa: E402

OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(t2i.DEFAULTS), default="tiny")
    parser.add_argument("--model")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rtt-calls", type=int, default=50, help="Health/Check calls per service per repetition")
    parser.add_argument("--prompt", default=t2i.DEFAULT_PROMPT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="default bench/results/overhead_breakdown-<size>.json")
    parser.add_argument("--quiet-wait", type=float, default=300.0,
                        help="before each repetition, wait up to this long for other processes to go quiet")
    args = parser.parse_args(argv)
    for key in ("steps", "width", "height", "guidance"):
        if getattr(args, key) is None:
            setattr(args, key, t2i.DEFAULTS[args.size][key])
    model_path, _ = t2i.resolve_model(args.size, args.model)
    log_dir = Path(tempfile.mkdtemp(prefix="latentwire-breakdown-logs-"))
    suite = start_suite(model_path, ports=dict.fromkeys(("orchestrator", "text_encoder", "denoiser", "vae"), 0),
                        log_dir=log_dir)
    try:
        spec = ModelSpec(name=model_path.name, path=model_path, is_default=True)
        cpu = torch.device("cpu")
        te = TextEncoderModel(spec, cpu, torch.float32, False)
        dn = DenoiserModel(spec, cpu, torch.float32, False)
        vae = VaeModel(spec, cpu, torch.float32, False)
        addr = {name: s.address for name, s in suite.services.items()}
        channels = {name: grpc.insecure_channel(a, options=OPTIONS) for name, a in addr.items()}
        health = {name: health_pb2_grpc.HealthStub(c) for name, c in channels.items()}
        te_stub = text_encoder_pb2_grpc.TextEncoderServiceStub(channels["text_encoder"])
        dn_stub = denoiser_pb2_grpc.DenoiserServiceStub(channels["denoiser"])
        vae_stub = vae_pb2_grpc.VaeServiceStub(channels["vae"])
        client = Client(suite.address, timeout=3600)
        params = DenoiseParams(height=args.height, width=args.width, num_inference_steps=args.steps,
                               guidance_scale=args.guidance, guidance_rescale=0.0, eta=0.0, seed=args.seed,
                               scheduler="")

        def local_encode():
            started = time.perf_counter()
            pos, neg = te.encode([args.prompt], [], 1, True)
            return time.perf_counter() - started, (pos, neg)

        def direct_encode():
            request = text_encoder_pb2.EncodeRequest(prompts=[args.prompt], num_images_per_prompt=1,
                                                     do_classifier_free_guidance=True, job_id=uuid.uuid4().hex)
            started = time.perf_counter()
            response = te_stub.Encode(request)
            return time.perf_counter() - started, response

        def local_denoise(pos, neg):
            stamps = []
            started = time.perf_counter()
            out = dn.denoise(Job(uuid.uuid4().hex, args.steps), TextConditioning(pos, neg), params,
                             lambda event: stamps.append(time.perf_counter()))
            ended = time.perf_counter()
            return {"total": ended - started, "first": stamps[0] - started, "interval": t2i._interval(stamps),
                    "latents": out.latents}

        def direct_denoise(encoded):
            request = denoiser_pb2.DenoiseRequest(
                job_id=uuid.uuid4().hex, prompt_embeds=encoded.prompt_embeds,
                negative_prompt_embeds=encoded.negative_prompt_embeds, height=args.height, width=args.width,
                num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
            stamps, result = [], None
            started = time.perf_counter()
            for event in dn_stub.Denoise(request):
                if event.HasField("step"):
                    stamps.append(time.perf_counter())
                else:
                    result = event.result
            ended = time.perf_counter()
            return {"total": ended - started, "first": stamps[0] - started, "interval": t2i._interval(stamps),
                    "server_total": result.elapsed_seconds, "latents": result.latents}

        def local_decode(latents):
            started = time.perf_counter()
            pixels = vae.decode(latents)
            pngs = [encode_png(p, {"parameters": "x"}) for p in pixels]
            return time.perf_counter() - started, pngs

        def direct_decode(latents_proto):
            request = vae_pb2.DecodeRequest(latents=latents_proto, include_pixels=True,
                                            png_texts=[vae_pb2.PngText(entries={"parameters": "x"})],
                                            job_id=uuid.uuid4().hex)
            started = time.perf_counter()
            vae_stub.Decode(request)
            return time.perf_counter() - started

        def rtt(name):
            check = health_pb2.HealthCheckRequest(service="")
            health[name].Check(check)
            started = time.perf_counter()
            for _ in range(args.rtt_calls):
                health[name].Check(check)
            return (time.perf_counter() - started) / args.rtt_calls

        rows: list[dict] = []
        pids = {"bench": __import__("os").getpid(), **{n: s.process.pid for n, s in suite.services.items()}}
        meter = t2i.CpuMeter(pids)
        for rep in range(args.reps + 1):  # repetition 0 is the warm-up
            row = {}
            if args.quiet_wait > 0:
                row["waited_for_quiet_s"] = t2i.wait_until_quiet(pids, limit_s=args.quiet_wait)
            meter.start()
            row["rtt"] = {name: rtt(name) for name in addr}
            row["local_encode"], (pos, neg) = local_encode()
            row["direct_encode"], encoded = direct_encode()
            d = local_denoise(pos, neg)
            row["local_denoise"] = {k: v for k, v in d.items() if k != "latents"}
            latents = d["latents"]
            d = direct_denoise(encoded)
            row["direct_denoise"] = {k: v for k, v in d.items() if k != "latents"}
            row["local_decode"], _ = local_decode(latents)
            row["direct_decode"] = direct_decode(tensors.to_proto(latents, "latents"))
            started = time.perf_counter()
            result = client.generate(args.prompt, seed=args.seed, steps=args.steps, guidance_scale=args.guidance,
                                     width=args.width, height=args.height, include_pixels=True)
            row["suite"] = {"wall": time.perf_counter() - started, **result.timings,
                            "first": result.steps[0].elapsed_seconds,
                            "interval": t2i._interval([s.elapsed_seconds for s in result.steps])}
            row["cpu_s"] = meter.stop()
            if rep:
                rows.append(row)
            print(f"rep {rep}/{args.reps}: suite {row['suite']['wall']:.3f} s, direct denoise "
                  f"{row['direct_denoise']['total']:.3f} s, local {row['local_denoise']['total']:.3f} s, "
                  f"other processes' CPU {row['cpu_s'].get('others', 0):.2f} s", flush=True)
        client.close()
        for channel in channels.values():
            channel.close()
    finally:
        codes = suite.stop()

    def col(*keys):
        out = []
        for row in rows:
            value = row
            for key in keys:
                value = value[key]
            out.append(value)
        return med(out)

    ms = lambda v: "-" if v is None else f"{v * 1000:8.2f} ms"  # noqa: E731
    summary = {
        "rtt": {name: col("rtt", name) for name in addr},
        "text_encoder": {"local": col("local_encode"), "direct_rpc": col("direct_encode"),
                         "via_orchestrator": col("suite", "text_encoder")},
        "denoiser_total": {"local": col("local_denoise", "total"),
                           "direct_rpc": col("direct_denoise", "total"),
                           "direct_rpc_server_side": col("direct_denoise", "server_total"),
                           "via_orchestrator": col("suite", "denoiser")},
        "denoiser_first_step": {"local": col("local_denoise", "first"),
                                "direct_rpc": col("direct_denoise", "first"), "via_orchestrator": col("suite", "first")},
        "denoiser_step_interval": {"local": col("local_denoise", "interval"),
                                   "direct_rpc": col("direct_denoise", "interval"),
                                   "via_orchestrator": col("suite", "interval")},
        "vae_decode_plus_png": {"local": col("local_decode"), "direct_rpc": col("direct_decode"),
                                "via_orchestrator": col("suite", "vae")},
        "suite_wall": col("suite", "wall"),
    }
    print()
    print(f"overhead breakdown: size={args.size} {args.width}x{args.height} {args.steps} steps, "
          f"guidance {args.guidance}, {args.reps} repetitions (medians)")
    print("  gRPC Health/Check round trip: " + ", ".join(f"{n} {ms(v).strip()}" for n, v in summary["rtt"].items()))
    for key in ("text_encoder", "denoiser_total", "denoiser_first_step", "denoiser_step_interval",
                "vae_decode_plus_png"):
        print(f"  {key:24s} " + "  ".join(f"{k} {ms(v).strip()}" for k, v in summary[key].items()))
    print(f"  suite wall (Generate)    {ms(summary['suite_wall']).strip()}")
    out = Path(args.json) if args.json else t2i.BENCH_DIR / "results" / f"overhead_breakdown-{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "machine": t2i.machine_info(), "summary": summary,
                               "rows": rows, "exit_codes": codes}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

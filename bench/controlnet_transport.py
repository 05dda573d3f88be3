#!/usr/bin/env python
"""ControlNet round trip: the per-step cost of running the ControlNet as a service instead of in-process.

One run, for the SD 1.5 ControlNet architecture (random weights; built with
``create_tiny_controlnet(path, full_size=True)`` into $LATENTWIRE_HOME/models/sd15-controlnet-random
when missing) at 512x512 with classifier-free guidance (sample [2, 4, 64, 64], prompt_embeds
[2, 77, 768], control image [2, 3, 512, 512]), and for each service dtype:

  A. in-process: ``ControlNetModel.from_pretrained(folder, torch_dtype=dtype)`` called in this
     process exactly as the ControlNet service calls it (same control image preparation, same
     arguments, under torch.inference_mode; torch runs on this process's main thread only);
  B. service: ``python -m services.controlnet --model cn=folder --dtype DTYPE`` in its
     own process; this process is the denoiser's side of one ComputeResiduals stream, with the same
     blocking pattern as services/denoiser/controlnet.py (a queue-fed request iterator, next() per
     step): encode the sample, send the step, wait for the residuals, decode them into tensors.

After one untimed step of each, timed pairs run A B, B A, A B ... strictly one after the other (while A
runs the service idles; while B runs this process waits on the stream), so the ratio holds on a
noisy machine. Before each pair it waits (--quiet-wait) until processes outside the benchmark
are quiet, and redoes a pair during which they used more than 5 % of a CPU (--max-redo); the
summary uses the undisturbed pairs when there are any. This process re-executes itself with the
glibc malloc settings the service processes get (MALLOC_ENV of services/suite/launcher.py), so
both sides of the comparison allocate alike. Reported per step: bytes on the wire (request + response, protobuf sizes), A, B,
the service's own compute_seconds, transport = B - A and B - compute_seconds, and the codec part
of it (measured separately in this process: to_proto + response serialisation as the service
does it, parse + from_proto as the client does it). A full step is ControlNet + UNet: the SD 1.5
UNet (from $LATENTWIRE_HOME/models/sd15-random when present, else built in memory with random
weights) is run in this process on the same inputs with the residuals added, and the transport's
share of (A + UNet) is reported.

float16 is not run as a service dtype on CPU: CPUs without native float16 arithmetic run float16
convolutions far slower than float32 (on the 2-core AVX512 machine this was written on, one
[2, 320, 64, 64] 3x3 conv took 48 s in float16 against 0.085 s in float32; this script measures the
ratio on a 32 times smaller input first and records it). bfloat16 has the same 2 bytes per element on the wire and fast
CPU kernels (AVX512-BF16), so it stands in for the half-precision transport; the float16 codec
cost is measured on residuals cast to float16.

    python bench/controlnet_transport.py
    python bench/controlnet_transport.py --dtypes float32 --steps 2 --unet-runs 0

This is a benchmark, not a test: it asserts nothing. Results go to a table on stdout and to JSON
(default bench/results/controlnet_transport-512.json).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import queue
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from text_to_image import CpuMeter, latentwire_home, machine_info, wait_until_quiet  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------
# Models and inputs


def resolve_controlnet(given: str | None) -> tuple[Path, str]:
    from services.tiny_models import create_tiny_controlnet

    if given:
        path = Path(given).expanduser()
        if not (path / "config.json").is_file():
            raise SystemExit(f"--controlnet {path}: no config.json there; pass a diffusers ControlNetModel folder")
        return path, "given"
    path = latentwire_home() / "models" / "sd15-controlnet-random"
    if (path / "config.json").is_file():
        return path, "reused"
    print(f"building the SD 1.5-architecture random ControlNet into {path} (~1.4 GB) ...", flush=True)
    started = time.perf_counter()
    try:
        create_tiny_controlnet(path, full_size=True, seed=0)
    except FileExistsError:
        if not (path / "config.json").is_file():
            raise
    return path, f"built in {time.perf_counter() - started:.1f} s"


def load_unet(dtype: torch.dtype):
    """The SD 1.5 UNet: from the benchmark model folder when present, else random weights in memory."""
    from diffusers import UNet2DConditionModel

    folder = latentwire_home() / "models" / "sd15-random"
    if (folder / "unet" / "config.json").is_file():
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, use_safetensors=True)
        origin = f"{folder}/unet"
    else:
        from services.tiny_models.stable_diffusion import _full_unet

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            unet = _full_unet().to(dtype)
        origin = "built in memory (SD 1.5 architecture, seed 0)"
    return unet.eval(), origin


def control_png(size: int) -> bytes:
    """A control image with edges: a gradient with a grid of lines (content does not change the cost)."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    image = np.stack([x * 255 // size, y * 255 // size, ((x // 32 + y // 32) % 2) * 200], axis=2).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def fp16_conv_ratio() -> dict:
    """Seconds of one 3x3 conv as in SD 1.5's first block (320 channels), on [1, 320, 16, 16] (1/32 of a
    512x512 step's input, so float16 takes seconds, not a minute), in float32, bfloat16 and float16."""
    out = {}
    with torch.inference_mode():
        for name in ("float32", "bfloat16", "float16"):
            conv = torch.nn.Conv2d(320, 320, 3, padding=1).to(DTYPES[name])
            x = torch.randn(1, 320, 16, 16, dtype=DTYPES[name])
            conv(x)
            started = time.perf_counter()
            conv(x)
            out[name] = time.perf_counter() - started
    return out


# --------------------------------------------------------------------------------------------
# The denoiser's side of the stream (same pattern as services/denoiser/controlnet.py)


class Stream:
    def __init__(self, address: str, setup):
        import grpc

        from latentwire.controlnet.v1 import controlnet_pb2, controlnet_pb2_grpc
        from latentwire.client.channels import DEFAULT_MAX_MESSAGE_BYTES, grpc_options

        self.pb = controlnet_pb2
        self.channel = grpc.insecure_channel(address, options=grpc_options(DEFAULT_MAX_MESSAGE_BYTES, 30.0, 10.0))
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.requests.put(controlnet_pb2.ComputeResidualsRequest(setup=setup))
        started = time.perf_counter()
        self.call = controlnet_pb2_grpc.ControlNetServiceStub(self.channel).ComputeResiduals(self._outgoing())
        first = next(self.call)
        self.setup_s = time.perf_counter() - started
        assert first.WhichOneof("output") == "ready", first

    def _outgoing(self):
        while (item := self.requests.get()) is not None:
            yield item

    def step(self, index: int, timestep: float, sample: torch.Tensor) -> dict:
        from services.runtime import tensors

        started = time.perf_counter()
        request = self.pb.ComputeResidualsRequest(step=self.pb.ControlNetStepInput(
            step_index=index, timestep=timestep, sample=tensors.to_proto(sample, "sample")))
        self.requests.put(request)
        response = next(self.call)
        received = time.perf_counter()
        result = response.residuals
        down = [tensors.from_proto(t, field="down_block_residuals", rank=4) for t in result.down_block_residuals]
        mid = tensors.from_proto(result.mid_block_residual, field="mid_block_residual", rank=4)
        ended = time.perf_counter()
        return {
            "wall_s": ended - started,
            "until_received_s": received - started,
            "client_decode_s": ended - received,
            "compute_s": result.compute_seconds,
            "request_bytes": request.ByteSize(),
            "response_bytes": response.ByteSize(),
            "residuals": (down, mid),
        }

    def close(self) -> None:
        self.requests.put(None)
        for _ in self.call:
            pass
        self.channel.close()


# --------------------------------------------------------------------------------------------
# Pieces measured in this process


def codec_costs(down: list[torch.Tensor], mid: torch.Tensor, sample: torch.Tensor, runs: int = 5) -> dict:
    """Median seconds of each codec step of one step's messages, as the service and the client do them."""
    from latentwire.controlnet.v1 import controlnet_pb2 as pb
    from services.runtime import tensors

    def encode_response():
        return pb.ComputeResidualsResponse(residuals=pb.ControlNetResiduals(
            step_index=0, active=True,
            down_block_residuals=[tensors.to_proto(t, f"down_block_residuals[{i}]") for i, t in enumerate(down)],
            mid_block_residual=tensors.to_proto(mid, "mid_block_residual"), compute_seconds=1.0))

    timings: dict[str, list[float]] = {k: [] for k in ("server_to_proto_s", "server_serialize_s", "client_parse_s",
                                                       "client_from_proto_s", "request_roundtrip_codec_s")}
    for _ in range(runs):
        t0 = time.perf_counter()
        response = encode_response()
        t1 = time.perf_counter()
        data = response.SerializeToString()
        t2 = time.perf_counter()
        parsed = pb.ComputeResidualsResponse.FromString(data)
        t3 = time.perf_counter()
        [tensors.from_proto(t, field="d") for t in parsed.residuals.down_block_residuals]
        tensors.from_proto(parsed.residuals.mid_block_residual, field="m")
        t4 = time.perf_counter()
        request = pb.ComputeResidualsRequest(step=pb.ControlNetStepInput(sample=tensors.to_proto(sample)))
        tensors.from_proto(pb.ComputeResidualsRequest.FromString(request.SerializeToString()).step.sample, field="s")
        t5 = time.perf_counter()
        for key, value in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            timings[key].append(value)
    out = {k: statistics.median(v) for k, v in timings.items()}
    out["total_s"] = sum(out.values())
    out["response_bytes"] = len(data)
    return out


def prepare_control_image(png: bytes, size: int, dtype: torch.dtype) -> torch.Tensor:
    """The pipeline's prepare_image for batch 1 with guidance: [2, 3, size, size] in [0, 1]."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    image = processor.preprocess(Image.open(io.BytesIO(png)), height=size, width=size).to(torch.float32)
    # repeat_interleave as the pipeline does, even for batch 1: preprocess returns channels-last strides
    # and repeat_interleave a contiguous copy, which the convolutions run differently (other sums, other speed).
    image = image.repeat_interleave(1, dim=0).to(dtype=dtype)
    return torch.cat([image] * 2)


def _disturbed(cpu: dict, wall_s: float) -> bool:
    """Whether processes outside the benchmark used > 5 % of one CPU meanwhile (and > 3 of /proc/stat's 10 ms ticks)."""
    return (cpu.get("others") or 0) > max(0.05 * wall_s, 0.03)


def run_dtype(name: str, folder: Path, args, inputs: dict, log_dir: Path) -> dict:
    from diffusers import ControlNetModel

    from latentwire.controlnet.v1 import controlnet_pb2 as pb
    from services.runtime import tensors
    from services.suite.launcher import start_service, wait_serving

    dtype = DTYPES[name]
    print(f"[{name}] starting the ControlNet service ...", flush=True)
    started = time.perf_counter()
    service = start_service("controlnet", "services.controlnet",
                            ["--port", "0", "--model", f"cn={folder}", "--dtype", name, "--max-concurrent-jobs", "1"],
                            log_dir=log_dir)
    try:
        wait_serving(service.address, 600, "controlnet", service.process)
        service_start_s = time.perf_counter() - started
        net = ControlNetModel.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True).eval()
        image = prepare_control_image(inputs["png"], args.size, dtype)
        sample = inputs["sample"].to(dtype)
        embeds = inputs["prompt_embeds"].to(dtype)
        total = 1 + args.steps * (1 + args.max_redo)  # step indices stay distinct across redone pairs
        setup = pb.ControlNetSetup(
            job_id=f"bench-{name}", units=[pb.ControlNetUnit(image=inputs["png"], preprocessor="none")],
            width=args.size, height=args.size, batch_size=1, classifier_free_guidance=True,
            prompt_embeds=tensors.to_proto(embeds), total_steps=total)
        stream = Stream(service.address, setup)
        print(f"[{name}] service SERVING after {service_start_s:.1f} s; setup answered in {stream.setup_s:.2f} s",
              flush=True)

        def in_process(timestep: float):
            # On this process's main thread, the only one here that runs torch: like the service's
            # compute thread, it has the process's only OpenMP team.
            with torch.inference_mode():
                started = time.perf_counter()
                down, mid = net(sample, timestep, encoder_hidden_states=embeds, controlnet_cond=image,
                                conditioning_scale=1.0, guess_mode=False, return_dict=False)
                return time.perf_counter() - started, list(down), mid

        pids = {"bench": os.getpid(), "service": service.process.pid}
        warm_a, down_a, mid_a = in_process(999.0)
        warm_b = stream.step(0, 999.0, sample)
        print(f"[{name}] warm-up: in-process {warm_a:.2f} s, service {warm_b['wall_s']:.2f} s; "
              f"timing {args.steps} pairs (A B, B A, ...) ...", flush=True)
        steps: list[dict] = []
        discarded: list[dict] = []
        for k in range(args.steps):
            timestep = 999.0 - 50.0 * (k + 1)
            for attempt in range(args.max_redo + 1):
                waited = wait_until_quiet(pids, limit_s=args.quiet_wait)
                meter = CpuMeter(pids)
                b_first = k % 2 == 1  # A B, B A, A B ...: whichever runs first after the wait pays for it
                if b_first:
                    meter.start()
                    b = stream.step(k + 1 + len(discarded), timestep, sample)
                    cpu_b = meter.stop()
                meter.start()
                a_s, down_a, mid_a = in_process(timestep)
                cpu_a = meter.stop()
                if not b_first:
                    meter.start()
                    b = stream.step(k + 1 + len(discarded), timestep, sample)
                    cpu_b = meter.stop()
                down_b, mid_b = b.pop("residuals")
                difference = max(float((x.float() - y.float()).abs().max())
                                 for x, y in zip([*down_a, mid_a], [*down_b, mid_b]))
                record = {"in_process_s": a_s, **b, "max_abs_difference": difference, "quiet_wait_s": waited,
                          "order": "BA" if b_first else "AB",
                          "cpu_in_process": cpu_a, "cpu_service": cpu_b,
                          "disturbed": _disturbed(cpu_a, a_s) or _disturbed(cpu_b, b["wall_s"])}
                line = (f"[{name}] step {k + 1} ({record['order']}): A {a_s:.2f} s | B {b['wall_s']:.2f} s (service compute "
                        f"{b['compute_s']:.2f} s) | B-A {b['wall_s'] - a_s:+.3f} s | B-compute "
                        f"{b['wall_s'] - b['compute_s']:.3f} s | others' CPU {cpu_a.get('others', 0):.2f}/"
                        f"{cpu_b.get('others', 0):.2f} s | max|diff| {difference:.1e}")
                if record["disturbed"] and attempt < args.max_redo:
                    discarded.append(record)
                    print(line + " -> disturbed, redone", flush=True)
                    continue
                steps.append(record)
                print(line + (" -> disturbed (kept: out of redos)" if record["disturbed"] else ""), flush=True)
                break
        stream.close()
        wait_until_quiet(pids, limit_s=args.quiet_wait)
        codec = codec_costs(down_a, mid_a, sample)
        codec16 = codec_costs([d.float().half() for d in down_a], mid_a.float().half(), sample) if name == "bfloat16" else None
        unet_s, unet_disturbed, unet_origin = [], [], None
        if args.unet_runs > 0:
            del net  # room for the UNet
            unet, unet_origin = load_unet(dtype)
            with torch.inference_mode():
                for run in range(args.unet_runs + 1):  # the first is a warm-up
                    if run:
                        wait_until_quiet(pids, limit_s=args.quiet_wait)
                    meter = CpuMeter(pids)
                    meter.start()
                    started = time.perf_counter()
                    unet(sample, 949.0, encoder_hidden_states=embeds, down_block_additional_residuals=down_a,
                         mid_block_additional_residual=mid_a, return_dict=False)
                    elapsed = time.perf_counter() - started
                    if run:
                        unet_s.append(elapsed)
                        unet_disturbed.append(_disturbed(meter.stop(), elapsed))
            del unet
            print(f"[{name}] UNet with residuals ({unet_origin}): {', '.join(f'{s:.2f}' for s in unet_s)} s"
                  + (" (disturbed)" if any(unet_disturbed) else ""), flush=True)
        return {"dtype": name, "service_start_s": service_start_s, "setup_s": stream.setup_s,
                "warm_up": {"in_process_s": warm_a, "service_s": warm_b["wall_s"]}, "steps": steps,
                "discarded_steps": discarded, "codec": codec, "codec_float16_cast": codec16, "unet_s": unet_s,
                "unet_disturbed": unet_disturbed, "unet_origin": unet_origin}
    finally:
        service.process.send_signal(signal.SIGTERM)
        try:
            service.process.wait(60)
        except Exception:  # noqa: BLE001 - a hung service must not hang the benchmark
            service.process.kill()


# --------------------------------------------------------------------------------------------
# Reporting


def summary_row(result: dict) -> dict:
    quiet = [s for s in result["steps"] if not s["disturbed"]]
    steps = quiet or result["steps"]

    def median(key, fn=None):
        values = [fn(s) if fn else s[key] for s in steps]
        return statistics.median(values) if values else None

    a = median("in_process_s")
    b = median("wall_s")
    transport = median(None, lambda s: s["wall_s"] - s["in_process_s"])
    transport_compute = median(None, lambda s: s["wall_s"] - s["compute_s"])
    unet = statistics.median(result["unet_s"]) if result["unet_s"] else None
    return {
        "dtype": result["dtype"],
        "request_bytes": median("request_bytes"),
        "response_bytes": median("response_bytes"),
        "in_process_s": a,
        "service_s": b,
        "service_compute_s": median("compute_s"),
        "transport_s": transport,
        "transport_vs_compute_s": transport_compute,
        "codec_s": result["codec"]["total_s"],
        "unet_s": unet,
        "full_step_s": a + unet if unet is not None else None,
        "share": transport_compute / (a + unet) if unet is not None else None,
        "max_abs_difference": max(s["max_abs_difference"] for s in result["steps"]) if steps else None,
        "steps_used": len(steps),
        "steps_disturbed": sum(s["disturbed"] for s in steps),
        "unet_disturbed": any(result["unet_disturbed"]),
    }


def print_table(rows: list[dict]) -> None:
    head = ("| service dtype | bytes/step (req + resp) | in-process ControlNet s | service step s | service compute s "
            "| transport s (B-A) | transport s (B-compute) | codec s | UNet s | transport share of full step |")
    print(head)
    print("| --- " + "| ---: " * 9 + "|")
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        share = f"{100 * r['share']:.1f} %" if r["share"] is not None else "-"
        print(f"| {r['dtype']} | {r['request_bytes'] / 1e6:.2f} + {r['response_bytes'] / 1e6:.2f} MB "
              f"| {f(r['in_process_s'], '.2f')} | {f(r['service_s'], '.2f')} | {f(r['service_compute_s'], '.2f')} "
              f"| {f(r['transport_s'], '+.3f')} | {f(r['transport_vs_compute_s'], '.3f')} | {f(r['codec_s'], '.3f')} "
              f"| {f(r['unet_s'], '.2f')} | {share} |")
    for r in rows:
        print(f"{r['dtype']}: medians of {r['steps_used']} timed pair(s), {r['steps_disturbed']} of them disturbed by "
              f"other processes{'; UNet run disturbed' if r['unet_disturbed'] else ''}; max abs difference "
              f"service vs in-process {r['max_abs_difference']:.1e}")


def _reexec_with_service_malloc_settings() -> None:
    """Run under the service processes' glibc malloc settings (read by glibc at start, hence the re-exec)."""
    from services.suite.launcher import MALLOC_ENV

    missing = {k: v for k, v in MALLOC_ENV.items() if k not in os.environ}
    if missing:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **missing})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="width and height in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=4, help="timed step pairs per dtype, after one warm-up (default 4)")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="service dtypes, comma-separated: float32, bfloat16 (float16: see the docstring)")
    parser.add_argument("--unet-runs", type=int, default=1,
                        help="timed UNet forwards per dtype, after one warm-up (0: skip the UNet)")
    parser.add_argument("--controlnet", default=None, help="ControlNetModel folder (default: the SD 1.5 random one)")
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="seconds to wait at most, before each timed pair, for other processes to go quiet")
    parser.add_argument("--max-redo", type=int, default=2,
                        help="times a timed pair is redone when other processes used the CPU meanwhile")
    parser.add_argument("--json", default=None, help="where to write the JSON results")
    args = parser.parse_args(argv)
    _reexec_with_service_malloc_settings()

    folder, origin = resolve_controlnet(args.controlnet)
    json_path = Path(args.json) if args.json else BENCH_DIR / "results" / f"controlnet_transport-{args.size}.json"
    log_dir = Path(tempfile.mkdtemp(prefix="controlnet-bench-logs-"))
    print(f"ControlNet: {folder} ({origin}); service logs: {log_dir}", flush=True)
    conv = fp16_conv_ratio()
    print("one 3x3 conv, 320 channels, [1, 320, 16, 16]: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in conv.items()), flush=True)

    generator = torch.Generator().manual_seed(0)
    latent = args.size // 8
    inputs = {
        "sample": torch.randn(2, 4, latent, latent, generator=generator),
        "prompt_embeds": torch.randn(2, 77, 768, generator=generator),
        "png": control_png(args.size),
    }
    def write_json(results: list[dict], complete: bool) -> None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({
            "benchmark": "controlnet_transport",
            "complete": complete,
            "machine": machine_info(),
            "settings": {**vars(args), "controlnet": str(folder), "controlnet_origin": origin,
                         "sample_shape": list(inputs["sample"].shape), "prompt_embeds_shape": [2, 77, 768],
                         "classifier_free_guidance": True, "batch_size": 1,
                         "environment": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OMP_"))},
                         "torch_threads": torch.get_num_threads()},
            "conv_3x3_seconds": conv,
            "summary": [summary_row(r) for r in results],
            "results": results,
        }, indent=2, default=str))

    results = []
    names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for name in names:
        if name not in DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype {name!r}")
    for name in names:
        results.append(run_dtype(name, folder, args, inputs, log_dir))
        write_json(results, complete=len(results) == len(names))  # a later failure keeps what was measured

    rows = [summary_row(r) for r in results]
    print()
    print_table(rows)
    for r in results:
        c = r["codec"]
        print(f"codec ({r['dtype']}): server to_proto {c['server_to_proto_s'] * 1000:.0f} ms + serialize "
              f"{c['server_serialize_s'] * 1000:.0f} ms; client parse {c['client_parse_s'] * 1000:.0f} ms + from_proto "
              f"{c['client_from_proto_s'] * 1000:.0f} ms; sample both ways {c['request_roundtrip_codec_s'] * 1000:.1f} ms")
        if r["codec_float16_cast"]:
            c = r["codec_float16_cast"]
            print(f"codec (float16, residuals cast): total {c['total_s'] * 1000:.0f} ms for {c['response_bytes'] / 1e6:.2f} MB")
    print(f"\nJSON: {json_path}")


if __name__ == "__main__":
    main()

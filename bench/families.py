#!/usr/bin/env python
"""Model families: the suite against each family's in-process diffusers pipeline, and bytes per hop.

For each family asked for (sdxl and flux at 1024x1024, sd15 at 512x512, 20 steps by default) one run:

  1. builds (once) a bench variant of the family's tiny model: the same tiny UNet / transformer, text
     encoders, tokenizers and scheduler as ``create_tiny_model(path, family)``, but a VAE with 4 levels
     (8x downsampling, as the real SD 1.5 / SDXL / Flux VAEs), so 1024x1024 means 128x128 latents, as for
     the real models, instead of the test VAE's 512x512 (SDXL, 2x) or 1024x1024 (Flux, 1x). The VAE is
     narrow (8 channels per level) and has no mid-block attention: the bench is about what the suite adds,
     and the VAE's own cost only adds noise. Saved as a diffusers folder the family's pipeline loads
     (default ``$LATENTWIRE_HOME/models/bench-<family>-vae8``);
  2. starts the suite on it (start_suite: text encoder, denoiser, VAE and orchestrator, each its own process)
     and loads the family's pipeline (``families.Family.pipeline``) in this process;
  3. warm-up, one each, compared: in-process ``output_type="np"`` against the suite's float pixels
     (``include_pixels=True``): the max abs pixel difference (a conformance check, not asserted);
  4. bytes per hop: drives the stage services directly with their stubs, in the orchestrator's order and with
     the requests it sends (Describe, Encode, Denoise with include_checkpoints as the orchestrator asks,
     Decode), summing ``message.ByteSize()``; multi-encoder families also ask each encoder alone (what a
     replica hosting only that encoder returns). The client <-> orchestrator hop is counted on the timed runs;
  5. N timed pairs, alternating (A B A B ...): A the in-process pipeline (``output_type="pil"`` plus PNG
     encoding, what the suite returns), with hooks timing its text encoders, denoising loop (first text
     encoder call end -> VAE decode start) and steps (``callback_on_step_end``); B ``Client.generate`` (PNG
     only), with the orchestrator's stage timings and step events.

Reported per family (medians): in-process and suite seconds per step (denoising stage / steps, and the step
interval), added milliseconds per step (suite denoiser stage - in-process loop, / steps; and end to end:
(suite wall - in-process wall) / steps) and bytes per hop. Before each timed run it waits (at most
--quiet-wait s) until processes outside the benchmark use < 0.1 CPU, and records the CPU they used during
the run (the machine may be shared; the JSON says how much).

This process re-executes itself once with the services' glibc malloc settings (launcher.MALLOC_ENV), so both
sides allocate alike. Thread settings (OMP_NUM_THREADS) are inherited by the suite's processes.

    OMP_NUM_THREADS=1 python bench/families.py                      # sdxl, flux, sd15
    OMP_NUM_THREADS=1 python bench/families.py --family flux --runs 5

A benchmark, not a test: it asserts nothing. Table on stdout, JSON in bench/results/families.json.
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import forward_probe  # noqa: E402  (bench/forward_probe.py)

#: Per family: the tiny model to start from and the settings of the run (guidance: the family's default).
FAMILY_SETTINGS = {
    "sdxl": {"tiny": "sdxl", "width": 1024, "height": 1024, "steps": 20, "guidance": 5.0, "runs": 3, "forward_pairs": 10},
    "flux": {"tiny": "flux", "width": 1024, "height": 1024, "steps": 20, "guidance": 3.5, "runs": 5, "forward_pairs": 15},
    "sd15": {"tiny": "sd15", "width": 512, "height": 512, "steps": 20, "guidance": 7.5, "runs": 5, "forward_pairs": 15},
}
DEFAULT_FAMILIES = ("sdxl", "flux", "sd15")
#: VAE levels of the bench variants: 4 levels downsample 8x (2 ** (levels - 1)), as the real models' VAEs.
VAE_LEVELS = 4
VAE_WIDTH = 8
GRPC_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]


def _reexec_with_malloc_env() -> None:
    """Run this process under the services' malloc settings (glibc reads them at start), once."""
    from services.suite.launcher import MALLOC_ENV

    if all(os.environ.get(key) is not None for key in MALLOC_ENV) or os.environ.get("LATENTWIRE_BENCH_REEXEC"):
        return
    env = {**MALLOC_ENV, **os.environ, "LATENTWIRE_BENCH_REEXEC": "1"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


# --------------------------------------------------------------------------------------------
# Bench variants of the tiny models


def bench_model_path(family: str, models_dir: str | None) -> Path:
    if models_dir:
        return Path(models_dir).expanduser() / f"bench-{family}-vae8"
    import text_to_image as t2i

    return t2i.latentwire_home() / "models" / f"bench-{family}-vae8"


def build_bench_model(path: Path, family: str, *, seed: int = 0) -> Path:
    """Write the bench variant of ``family``'s tiny model to ``path``: its own folder with the VAE replaced
    by a ``VAE_LEVELS``-level one (same latent channels, scaling and shift factors, force_upcast). Atomic:
    built in a temporary sibling, then renamed; an existing folder is never overwritten."""
    from diffusers import AutoencoderKL

    from services.tiny_models import create_tiny_model
    from services.tiny_models.folder import seeded

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        model = create_tiny_model(staging / "model", FAMILY_SETTINGS[family]["tiny"], seed=seed)
        old = json.loads((model / "vae" / "config.json").read_text())
        vae = seeded(seed, lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(VAE_WIDTH,) * VAE_LEVELS,
            down_block_types=("DownEncoderBlock2D",) * VAE_LEVELS,
            up_block_types=("UpDecoderBlock2D",) * VAE_LEVELS,
            layers_per_block=1,
            norm_num_groups=2,
            mid_block_add_attention=False,
            latent_channels=old["latent_channels"],
            scaling_factor=old["scaling_factor"],
            shift_factor=old.get("shift_factor"),
            force_upcast=old.get("force_upcast", True),
            use_quant_conv=old.get("use_quant_conv", True),
            use_post_quant_conv=old.get("use_post_quant_conv", True),
            sample_size=FAMILY_SETTINGS[family]["width"],
        ))
        shutil.rmtree(model / "vae")
        vae.save_pretrained(model / "vae", safe_serialization=True)
        os.rename(model, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def ensure_bench_model(family: str, models_dir: str | None) -> tuple[Path, str]:
    path = bench_model_path(family, models_dir)
    if (path / "model_index.json").is_file():
        return path, "reused"
    started = time.perf_counter()
    build_bench_model(path, family)
    return path, f"built in {time.perf_counter() - started:.1f} s"


# --------------------------------------------------------------------------------------------
# A: the family's pipeline in this process


class InProcess:
    """The family's diffusers pipeline with timestamp hooks on its text encoders, denoiser and VAE decode."""

    def __init__(self, folder: Path, family):
        import diffusers

        from services.runtime.families import TEXT_ENCODER_COMPONENTS

        # Every model call timed as in the suite's processes (bench/forward_probe.py, class-level wrappers);
        # installed first, so that the VAE decode wrapped below is the timed one.
        self.calls: list[tuple[str, int, int]] = []
        forward_probe.install(lambda kind, start, end: self.calls.append((kind, start, end)))
        extra = {"safety_checker": None, "requires_safety_checker": False} if family.name == "sd" else {}
        self.pipe = getattr(diffusers, family.pipeline).from_pretrained(str(folder), **extra)
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler = type(self.pipe.scheduler).__name__
        self._marks: dict[str, list[float]] = {}
        self._cpu: dict[str, list[float]] = {}  # process CPU seconds at each mark (every thread)
        for name in TEXT_ENCODER_COMPONENTS:
            encoder = getattr(self.pipe, name, None)
            if encoder is not None:
                encoder.register_forward_hook(lambda *_: self._mark("te_end"))
        getattr(self.pipe, family.denoiser).register_forward_pre_hook(lambda *_: self._mark("denoiser_start"))
        decode = self.pipe.vae.decode

        def timed_decode(*args, **kwargs):
            self._mark("vae_start")
            return decode(*args, **kwargs)

        self.pipe.vae.decode = timed_decode  # instance attribute: only this pipeline's VAE

    def _mark(self, name: str) -> None:
        self._marks.setdefault(name, []).append(time.perf_counter())
        self._cpu.setdefault(name, []).append(time.process_time())

    def run(self, prompt: str, *, seed: int, steps: int, guidance: float, width: int, height: int,
            png_text: str = "", float_pixels: bool = False) -> dict:
        """One call; PNG bytes out (as the suite returns) unless ``float_pixels`` (then the float array)."""
        import torch
        from PIL.PngImagePlugin import PngInfo

        self._marks, self._cpu = {}, {}
        self.calls.clear()

        def on_step_end(pipe, step, timestep, callback_kwargs):
            self._mark("step_end")
            return {}

        started = time.perf_counter()
        output = self.pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np" if float_pixels else "pil",
            callback_on_step_end=on_step_end,
        )
        pixels = None
        if float_pixels:
            pixels = output.images
        else:
            for image in output.images:  # as services/vae/model.py encode_png
                info = PngInfo()
                info.add_text("parameters", png_text)
                image.save(io.BytesIO(), format="PNG", pnginfo=info)
        ended = time.perf_counter()
        m = self._marks
        steps_end = m.get("step_end", [])
        te_end = m["te_end"][-1]
        return {
            "wall_s": ended - started,
            "stages_s": {"text_encoder": te_end - started, "denoiser": m["vae_start"][0] - te_end,
                         "vae": ended - m["vae_start"][0]},
            "steps": len(steps_end),
            "step_interval_s": _interval(steps_end),
            "first_step_s": steps_end[0] - m["denoiser_start"][0] if steps_end else None,
            # CPU time of this process in the denoising loop (same span as stages_s["denoiser"])
            "loop_cpu_s": self._cpu["vae_start"][0] - self._cpu["te_end"][-1],
            **model_time(self.calls),
            "pixels": pixels,
        }


def model_time(calls: list[tuple[str, int, int]]) -> dict:
    """Seconds spent inside the models' own calls during one run (bench/forward_probe.py), by kind, and the
    denoiser's forwards one by one."""
    by_kind: dict[str, float] = {kind: 0.0 for kind in forward_probe.TARGETS}
    forwards, stamps = [], []
    for kind, start, end in calls:
        by_kind[kind] += (end - start) / 1e9
        if kind == "denoiser":
            forwards.append((end - start) / 1e9)
            stamps.append((start, end))
    stamps.sort()
    # Between one denoiser forward's end and the next one's start: the step's work outside the network.
    gaps = [(stamps[i + 1][0] - stamps[i][1]) / 1e6 for i in range(len(stamps) - 1)]
    return {"model_s": by_kind, "denoiser_forwards_s": forwards, "denoiser_gaps_ms": gaps}


def _interval(stamps: list[float]) -> float | None:
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None


# --------------------------------------------------------------------------------------------
# B: the suite through the client


class SuiteSide:
    def __init__(self, folder: Path, log_dir: Path):
        from latentwire.client import Client
        from services.suite.launcher import start_suite

        started = time.perf_counter()
        log_dir.mkdir(parents=True, exist_ok=True)
        # Every service process times its model calls into this file (bench/probes/sitecustomize.py).
        self.forward_log = str(log_dir / "forward-calls.log")
        Path(self.forward_log).unlink(missing_ok=True)
        pythonpath = os.pathsep.join(p for p in (str(BENCH_DIR / "probes"), os.environ.get("PYTHONPATH")) if p)
        self.suite = start_suite(folder, ports=dict.fromkeys(("orchestrator", "text_encoder", "denoiser", "vae"), 0),
                                 log_dir=log_dir,
                                 env={forward_probe.ENV: self.forward_log, "PYTHONPATH": pythonpath})
        self.start_s = time.perf_counter() - started
        self.client = Client(self.suite.address, timeout=3600)

    @property
    def pids(self) -> dict[str, int]:
        return {name: service.process.pid for name, service in self.suite.services.items()}

    def addresses(self) -> dict[str, str]:
        return {name: service.address for name, service in self.suite.services.items()}

    def run(self, prompt: str, *, seed: int, steps: int, guidance: float, width: int, height: int,
            include_pixels: bool = False) -> dict:
        from latentwire.client import Client

        settings = dict(seed=seed, steps=steps, guidance_scale=guidance, width=width, height=height,
                        include_pixels=include_pixels)
        received: dict[str, list[int]] = {}
        last: list = []

        def on_event(event) -> None:
            received.setdefault(event.WhichOneof("event"), []).append(event.ByteSize())
            last[:] = [event]

        started_ns = time.perf_counter_ns()
        started = time.perf_counter()
        result = self.client.generate(prompt, on_event=on_event, **settings)
        wall = time.perf_counter() - started
        calls = forward_probe.read_log(self.forward_log, started_ns, time.perf_counter_ns())
        step_times = [s.elapsed_seconds for s in result.steps]
        return {
            "wall_s": wall,
            "stages_s": dict(result.timings),
            "steps": len(step_times),
            "step_interval_s": _interval(step_times),
            "first_step_s": step_times[0] if step_times else None,
            "orchestrator_total_s": result.total_seconds,
            **model_time(calls),
            "bytes": {"GenerateRequest": Client.build_request(prompt, **settings).ByteSize(),
                      "GenerateResponse": {kind: {"messages": len(sizes), "bytes": sum(sizes)}
                                           for kind, sizes in received.items()}},
            "model": last[0].result.model if last else "",
            "png": result.images[0] if result.images else b"",
            "pixels": result.pixels,
        }


# --------------------------------------------------------------------------------------------
# Bytes per hop, driving the stages directly in the orchestrator's order


def measure_bytes(addresses: dict[str, str], family, model_name: str, prompt: str, png_text: str, *,
                  seed: int, steps: int, guidance: float, width: int, height: int) -> dict:
    """ByteSize() of every message of one job on each stage hop (what the orchestrator sends and receives)."""
    import grpc

    from latentwire.common.v1 import model_pb2
    from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
    from latentwire.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc
    from latentwire.vae.v1 import vae_pb2, vae_pb2_grpc

    channels = {name: grpc.insecure_channel(addresses[name], options=GRPC_OPTIONS)
                for name in ("text_encoder", "denoiser", "vae")}
    try:
        model = model_pb2.ModelReference(name=model_name)
        te = text_encoder_pb2_grpc.TextEncoderServiceStub(channels["text_encoder"])
        dn = denoiser_pb2_grpc.DenoiserServiceStub(channels["denoiser"])
        vae = vae_pb2_grpc.VaeServiceStub(channels["vae"])
        hops: dict = {}
        job_id = uuid.uuid4().hex
        # The orchestrator describes a model once (then caches the answer) and asks each text-encoder replica
        # for its group of the model's encoders, here all on one replica.
        request = denoiser_pb2.DescribeModelRequest(model=model)
        described = dn.DescribeModel(request)
        hops["DescribeModel"] = {"request": request.ByteSize(), "response": described.ByteSize()}
        do_cfg = guidance > 1 and not described.guidance_distilled
        request = text_encoder_pb2.EncodeRequest(model=model, prompts=[prompt], num_images_per_prompt=1,
                                                 do_classifier_free_guidance=do_cfg, job_id=job_id,
                                                 encoders=described.text_encoders)
        encoded = te.Encode(request)
        hops["Encode"] = {"request": request.ByteSize(), "response": encoded.ByteSize()}
        if family.multi_encoder:
            per_encoder = {}
            for embeddings in encoded.encoders:
                alone = text_encoder_pb2.EncodeRequest()
                alone.CopyFrom(request)
                alone.encoders[:] = [embeddings.encoder]
                response = te.Encode(alone)
                per_encoder[embeddings.encoder] = {
                    "request": alone.ByteSize(), "response": response.ByteSize(),
                    "tensors": {field.name: value.ByteSize() for field, value in embeddings.ListFields()
                                if field.name != "encoder"},
                    "shapes": {field.name: list(value.shape) for field, value in embeddings.ListFields()
                               if field.name != "encoder"},
                }
            hops["Encode"]["per_encoder"] = per_encoder

        request = denoiser_pb2.DenoiseRequest(
            model=model, job_id=job_id, height=height, width=width, num_inference_steps=steps,
            guidance_scale=guidance, seed=seed, include_checkpoints=True)  # as the orchestrator asks
        if family.multi_encoder:
            request.text_embeddings.extend(encoded.encoders)
        else:
            request.prompt_embeds.CopyFrom(encoded.prompt_embeds)
            if encoded.HasField("negative_prompt_embeds"):
                request.negative_prompt_embeds.CopyFrom(encoded.negative_prompt_embeds)
        step_sizes, checkpoint_sizes, result = [], [], None
        for event in dn.Denoise(request):
            if event.HasField("step"):
                step_sizes.append(event.ByteSize())
                checkpoint_sizes.append(event.step.checkpoint.ByteSize() if event.step.HasField("checkpoint") else 0)
            else:
                result = event
        hops["Denoise"] = {
            "request": request.ByteSize(),
            "step_messages": len(step_sizes),
            "step_bytes_total": sum(step_sizes),
            "step_bytes_median": statistics.median(step_sizes) if step_sizes else 0,
            "checkpoint_bytes_median": statistics.median(checkpoint_sizes) if checkpoint_sizes else 0,
            "result": result.ByteSize(),
            "result_latents_shape": list(result.result.latents.shape),
            "response_total": sum(step_sizes) + result.ByteSize(),
        }
        request = vae_pb2.DecodeRequest(model=model, latents=result.result.latents, include_pixels=False,
                                        png_texts=[vae_pb2.PngText(entries={"parameters": png_text})], job_id=job_id)
        decoded = vae.Decode(request)
        hops["Decode"] = {"request": request.ByteSize(), "response": decoded.ByteSize(),
                          "png_bytes": sum(len(png) for png in decoded.png_images)}
        return hops
    finally:
        for channel in channels.values():
            channel.close()


def step_message_costs(folder: Path, latents_shape: list[int], *, steps: int, reps: int = 30) -> dict:
    """CPU milliseconds the suite spends per denoising step on its step message, outside the network itself.

    The per-step part of what the suite adds: the denoiser captures a checkpoint (services/denoiser/checkpoint.py,
    with a real scheduler of the model after one step), encodes it and serializes the DenoiseResponse; the
    orchestrator parses it and sends the client a DenoisingStep. Timed with process CPU time over ``reps``
    repetitions (median), so other processes on the machine barely move it; gRPC's own copies and the loopback
    transfer are not in it.
    """
    import diffusers
    import torch

    from latentwire.denoiser.v1 import denoiser_pb2
    from latentwire.orchestrator.v1 import orchestrator_pb2
    from services.denoiser import checkpoint as checkpoints

    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, config["_class_name"]).from_pretrained(folder / "scheduler")
    kwargs = {"mu": 1.0} if scheduler.config.get("use_dynamic_shifting") else {}
    scheduler.set_timesteps(steps, **kwargs)
    generator = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(latents_shape, generator=generator)
    writer = checkpoints.CheckpointWriter(scheduler, generator)
    latents = scheduler.step(torch.zeros_like(latents), scheduler.timesteps[0], latents).prev_sample
    capture, encode, orchestrator = [], [], []
    for _ in range(reps):
        started = time.process_time()
        captured = writer.capture(1, steps, latents)  # in the loop's thread, between two steps
        captured_at = time.process_time()
        # in the denoiser's event-loop thread (servicer.py), while the next step computes
        step = denoiser_pb2.DenoiseStep(step=1, total_steps=steps, elapsed_seconds=1.0,
                                        checkpoint=checkpoints.to_proto(captured))
        data = denoiser_pb2.DenoiseResponse(step=step).SerializeToString()
        encoded_at = time.process_time()
        event = denoiser_pb2.DenoiseResponse.FromString(data)  # the orchestrator, in its own process
        orchestrator_pb2.GenerateResponse(step=orchestrator_pb2.DenoisingStep(
            step=event.step.step, total_steps=event.step.total_steps, elapsed_seconds=1.0)).SerializeToString()
        ended = time.process_time()
        capture.append(captured_at - started)
        encode.append(encoded_at - captured_at)
        orchestrator.append(ended - encoded_at)

    def ms(values: list[float]) -> dict:
        return {"median": statistics.median(values) * 1000, "min": min(values) * 1000}

    return {"latents_shape": latents_shape, "reps": reps, "message_bytes": len(data),
            "capture_ms": ms(capture), "encode_serialize_ms": ms(encode), "orchestrator_parse_relay_ms": ms(orchestrator)}


def interrupt_hook_costs(folder: Path, width: int, height: int, *, pairs: int = 3) -> dict:
    """One denoiser forward (the family's UNet / transformer, with the inputs its pipeline gives it at ``width``
    x ``height``) as diffusers runs it and as the suite's denoiser runs it: with services/runtime/interrupt.py
    installed as the denoiser service does at load (on CPU a check before every layer holding weights and every
    block, sliced attention),
    inside a running job. One network, its checks installed and removed between calls (``interrupt.install`` /
    ``uninstall``, microseconds), so both run the very same weights in the same memory; ``pairs`` pairs after
    one warm-up call each, the order within a pair alternating (plain first, then hooked first), so that the
    machine's drift (the same forward varies by 5 to 10 % from one minute to the next here) falls on both alike.
    Wall and CPU seconds; the paired differences' median is what the hooks add to a step."""
    import diffusers
    import torch

    from services.runtime import interrupt
    from services.runtime.families import family_of_folder
    from services.runtime.jobs import Job

    family = family_of_folder(folder)
    extra = {"safety_checker": None, "requires_safety_checker": False} if family.name == "sd" else {}
    pipe = getattr(diffusers, family.pipeline).from_pretrained(str(folder), **extra)
    pipe.set_progress_bar_config(disable=True)
    network = getattr(pipe, family.denoiser)
    captured = []

    def capture(module, args, kwargs):
        if not captured:
            captured.append((args, kwargs))

    handle = network.register_forward_pre_hook(capture, with_kwargs=True)
    pipe("a photograph", num_inference_steps=1, width=width, height=height, output_type="latent",
         generator=torch.Generator("cpu").manual_seed(0))
    handle.remove()
    args, kwargs = captured[0]
    hooks = interrupt.install(network)
    job = Job(uuid.uuid4().hex, 1)

    def forward(hooked: bool) -> tuple[float, float]:
        if hooked:
            interrupt.install(network)
        else:
            interrupt.uninstall(network)
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad(), interrupt.running(job):
            out = network(*args, **kwargs)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        del out
        return wall, cpu

    # How many attention calls a forward makes each way: equal counts mean no attention was cut into slices.
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, {}

    def counted(*a, **k):
        calls[mode] = calls.get(mode, 0) + 1
        return sdpa(*a, **k)

    torch.nn.functional.scaled_dot_product_attention = counted
    try:
        for mode in ("plain", "hooked"):
            forward(mode == "hooked")  # also the warm-up
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    runs = {"plain": [], "hooked": []}
    for i in range(pairs):
        for hooked in ((False, True) if i % 2 == 0 else (True, False)):
            runs["hooked" if hooked else "plain"].append(forward(hooked))
    wall = {k: [w for w, _ in v] for k, v in runs.items()}
    cpu = {k: [c for _, c in v] for k, v in runs.items()}
    paired_wall = [(h - p) * 1000 for p, h in zip(wall["plain"], wall["hooked"])]
    paired_cpu = [(h - p) * 1000 for p, h in zip(cpu["plain"], cpu["hooked"])]
    return {"hooks": hooks, "pairs": pairs, "attention_calls": calls,
            "diffusers_s": statistics.median(cpu["plain"]), "hooked_s": statistics.median(cpu["hooked"]),
            "added_ms": statistics.median(paired_cpu),
            "wall": {"diffusers_s": statistics.median(wall["plain"]), "hooked_s": statistics.median(wall["hooked"]),
                     "added_ms_paired_median": statistics.median(paired_wall),
                     "added_ms_paired_min": min(paired_wall), "added_ms_paired_max": max(paired_wall),
                     "added_ms_paired": paired_wall},
            "diffusers_all_s": cpu["plain"], "hooked_all_s": cpu["hooked"]}


# --------------------------------------------------------------------------------------------


def png_parameters(png: bytes) -> str:
    from PIL import Image

    return Image.open(io.BytesIO(png)).info.get("parameters", "") if png else ""


def bench_family(name: str, args, log_root: Path) -> dict:
    import numpy as np

    import text_to_image as t2i
    from services.runtime.families import family_of_folder

    cfg = {**FAMILY_SETTINGS[name]}
    for key in ("width", "height", "steps", "runs"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    folder, origin = ensure_bench_model(name, args.models_dir)
    family = family_of_folder(folder)
    settings = dict(seed=args.seed, steps=cfg["steps"], guidance=cfg["guidance"], width=cfg["width"],
                    height=cfg["height"])
    print(f"[{name}] model {folder} ({origin}), family {family.name}, {cfg['width']}x{cfg['height']}, "
          f"{cfg['steps']} steps, guidance {cfg['guidance']}", flush=True)
    log_dir = log_root / name
    suite = SuiteSide(folder, log_dir)
    print(f"[{name}] suite SERVING after {suite.start_s:.1f} s (logs {log_dir})", flush=True)
    try:
        inproc = InProcess(folder, family)
        pids = {"bench": os.getpid(), **suite.pids}
        meter = t2i.CpuMeter(pids)

        # Warm-up, compared on float pixels.
        started = time.perf_counter()
        a = inproc.run(args.prompt, float_pixels=True, **settings)
        warm_a = time.perf_counter() - started
        started = time.perf_counter()
        b = suite.run(args.prompt, include_pixels=True, **settings)
        warm_b = time.perf_counter() - started
        diff = (float(np.max(np.abs(a["pixels"].astype(np.float32) - b["pixels"])))
                if b["pixels"] is not None and a["pixels"].shape == b["pixels"].shape else None)
        png_text = png_parameters(b["png"])
        print(f"[{name}] warm-up: in-process {warm_a:.2f} s, suite {warm_b:.2f} s, max abs pixel diff "
              f"{'-' if diff is None else f'{diff:.3g}'}", flush=True)

        hops = measure_bytes(suite.addresses(), family, b["model"], args.prompt, png_text, **settings)
        print(f"[{name}] bytes per hop measured", flush=True)
        step_costs = step_message_costs(folder, hops["Denoise"]["result_latents_shape"], steps=cfg["steps"])
        forward_ab = interrupt_hook_costs(folder, cfg["width"], cfg["height"],
                                          pairs=args.forward_pairs or cfg["forward_pairs"])
        print(f"[{name}] one denoiser forward, {forward_ab['pairs']} alternating pairs: the suite's (interrupt hooks) "
              f"adds {forward_ab['wall']['added_ms_paired_median']:+.1f} ms (paired median; range "
              f"{forward_ab['wall']['added_ms_paired_min']:+.1f} to {forward_ab['wall']['added_ms_paired_max']:+.1f})",
              flush=True)

        runs: dict[str, list[dict]] = {"inprocess": [], "suite": []}
        for i in range(cfg["runs"]):
            for label in ("inprocess", "suite"):
                gc.collect()
                waited = t2i.wait_until_quiet(pids, limit_s=args.quiet_wait) if args.quiet_wait > 0 else 0.0
                meter.start()
                if label == "inprocess":
                    record = inproc.run(args.prompt, png_text=png_text, **settings)
                else:
                    record = suite.run(args.prompt, **settings)
                record["cpu_s"] = meter.stop()
                record["waited_for_quiet_s"] = waited
                for key in ("pixels", "png"):
                    record.pop(key, None)
                runs[label].append(record)
            pa, pb = runs["inprocess"][-1], runs["suite"][-1]
            print(f"[{name}] run {i + 1}/{cfg['runs']}: in-process {pa['wall_s']:.2f} s (loop "
                  f"{pa['stages_s']['denoiser']:.2f} s), suite {pb['wall_s']:.2f} s (denoiser "
                  f"{pb['stages_s'].get('denoiser', float('nan')):.2f} s); other processes' CPU "
                  f"{pa['cpu_s'].get('others', 0):.2f} / {pb['cpu_s'].get('others', 0):.2f} s", flush=True)
    finally:
        exit_codes = suite.suite.stop()

    steps = cfg["steps"]

    def med(label, *keys):
        values = []
        for record in runs[label]:
            value = record
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            if value is not None:
                values.append(value)
        return statistics.median(values) if values else None

    a_loop, b_loop = med("inprocess", "stages_s", "denoiser"), med("suite", "stages_s", "denoiser")
    # CPU seconds: far less sensitive than wall time to other processes on a shared machine.
    for label in runs:
        for record in runs[label]:
            record["cpu_total_s"] = sum(v for k, v in record["cpu_s"].items()
                                        if k not in ("others", "steal") and v is not None)
    a_cpu, b_cpu = med("inprocess", "cpu_total_s"), med("suite", "cpu_total_s")
    a_loop_cpu, b_loop_cpu = med("inprocess", "loop_cpu_s"), med("suite", "cpu_s", "denoiser")
    a_wall, b_wall = med("inprocess", "wall_s"), med("suite", "wall_s")
    paired_loop = [(b["stages_s"]["denoiser"] - a["stages_s"]["denoiser"]) / steps
                   for a, b in zip(runs["inprocess"], runs["suite"])]
    paired_wall = [(b["wall_s"] - a["wall_s"]) / steps for a, b in zip(runs["inprocess"], runs["suite"])]
    def outside_ms(record: dict, span: str) -> float:
        """Milliseconds per step of ``span`` (the denoiser stage / loop, or the whole call) outside the models."""
        model = record["model_s"]
        if span == "denoiser_stage":
            return (record["stages_s"]["denoiser"] - model["denoiser"]) / steps * 1000
        return (record["wall_s"] - sum(model.values())) / steps * 1000

    outside = {}
    for span in ("denoiser_stage", "end_to_end"):
        a_out = [outside_ms(r, span) for r in runs["inprocess"]]
        b_out = [outside_ms(r, span) for r in runs["suite"]]
        paired = [b - a for a, b in zip(a_out, b_out)]
        outside[span] = {"inprocess": a_out, "suite": b_out, "added_medians": statistics.median(b_out)
                         - statistics.median(a_out), "added_paired_median": statistics.median(paired),
                         "added_paired_min": min(paired), "added_paired_max": max(paired)}
    forwards = {label: statistics.median(f for r in runs[label] for f in r["denoiser_forwards_s"]) * 1000
                for label in runs}
    gaps = {label: statistics.median(g for r in runs[label] for g in r["denoiser_gaps_ms"]) for label in runs}
    summary = {
        "denoiser_forward_ms_median_in_runs": forwards,
        "gap_between_forwards_ms_median": gaps,
        "denoiser_forwards_per_run": {label: len(runs[label][0]["denoiser_forwards_s"]) for label in runs},
        "inprocess": {"wall_s": a_wall, "loop_s": a_loop, "per_step_s": a_loop / steps,
                      "step_interval_s": med("inprocess", "step_interval_s"),
                      "first_step_s": med("inprocess", "first_step_s"),
                      "stages_s": {s: med("inprocess", "stages_s", s) for s in ("text_encoder", "denoiser", "vae")}},
        "suite": {"wall_s": b_wall, "denoiser_stage_s": b_loop, "per_step_s": b_loop / steps,
                  "step_interval_s": med("suite", "step_interval_s"), "first_step_s": med("suite", "first_step_s"),
                  "stages_s": {s: med("suite", "stages_s", s) for s in ("text_encoder", "denoiser", "vae")}},
        "added_ms_per_step": {
            "denoiser_stage_medians": (b_loop - a_loop) / steps * 1000,
            "denoiser_stage_paired_median": statistics.median(paired_loop) * 1000,
            "end_to_end_medians": (b_wall - a_wall) / steps * 1000,
            "end_to_end_paired_median": statistics.median(paired_wall) * 1000,
            "step_interval": ((med("suite", "step_interval_s") or 0) - (med("inprocess", "step_interval_s") or 0))
            * 1000,
        },
        "cpu": {
            "inprocess_total_s": a_cpu,
            "inprocess_loop_s": a_loop_cpu,
            "suite_total_s": b_cpu,
            "suite_by_process_s": {name: med("suite", "cpu_s", name) for name in runs["suite"][0]["cpu_s"]},
            "suite_denoiser_process_s": b_loop_cpu,
            "added_ms_per_step_total": (b_cpu - a_cpu) / steps * 1000,
            "added_ms_per_step_denoiser": (b_loop_cpu - a_loop_cpu) / steps * 1000,
            "added_ms_per_step_denoiser_paired": statistics.median(
                (b["cpu_s"]["denoiser"] - a["loop_cpu_s"]) / steps * 1000
                for a, b in zip(runs["inprocess"], runs["suite"])),
        },
        # What the suite adds per step, in two parts measured each where it can be measured to well under a ms:
        # (1) everything outside the models' own calls (transport, serialization, checkpoints, orchestration,
        # the loop's bookkeeping): stage time minus the denoiser's forwards within the same run, which the
        # machine's minute-to-minute drift (a 5 to 10 % change of every forward) does not enter; (2) the
        # forward itself, which the suite runs with its interrupt hooks: alternating pairs (forward_ab).
        "outside_models_ms_per_step": outside,
        "forward_ab": forward_ab,
        "added_ms_per_step_by_parts": {
            "denoiser_stage": outside["denoiser_stage"]["added_paired_median"]
            + forward_ab["wall"]["added_ms_paired_median"],
            "end_to_end": outside["end_to_end"]["added_paired_median"] + forward_ab["wall"]["added_ms_paired_median"],
            "outside_the_forward_only": outside["denoiser_stage"]["added_paired_median"],
        },
        "ratio_wall": b_wall / a_wall,
        "others_cpu_s_median": {label: med(label, "cpu_s", "others") for label in runs},
        "max_abs_pixel_diff_warmup": diff,
    }
    hops["Generate (client <-> orchestrator)"] = runs["suite"][-1]["bytes"]
    return {
        "family": family.name,
        "model": str(folder),
        "model_origin": origin,
        "config": {**cfg, "seed": args.seed, "scheduler": inproc.scheduler, "prompt": args.prompt},
        "suite_start_s": suite.start_s,
        "warmup_s": {"inprocess": warm_a, "suite": warm_b},
        "summary": summary,
        "bytes_per_hop": hops,
        "step_message_cpu_ms": step_costs,
        "runs": runs,
        "suite_exit_codes": exit_codes,
    }


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def print_report(results: dict[str, dict]) -> None:
    print()
    print("families: suite vs in-process (medians; ms unless noted)")
    rows = [("family", "size", "steps", "in-proc s/step", "suite s/step", "added ms/step (stage)",
             "(paired)", "added ms/step (e2e)", "(paired)", "in-proc wall s", "suite wall s", "pixel diff",
             "others' CPU s")]
    for name, r in results.items():
        s, c = r["summary"], r["config"]
        diff = s["max_abs_pixel_diff_warmup"]
        rows.append((name, f"{c['width']}x{c['height']}", str(c["steps"]),
                     f"{s['inprocess']['per_step_s']:.4f}", f"{s['suite']['per_step_s']:.4f}",
                     f"{s['added_ms_per_step']['denoiser_stage_medians']:+.2f}",
                     f"{s['added_ms_per_step']['denoiser_stage_paired_median']:+.2f}",
                     f"{s['added_ms_per_step']['end_to_end_medians']:+.2f}",
                     f"{s['added_ms_per_step']['end_to_end_paired_median']:+.2f}",
                     f"{s['inprocess']['wall_s']:.2f}", f"{s['suite']['wall_s']:.2f}",
                     "-" if diff is None else f"{diff:.3g}",
                     " / ".join("-" if v is None else f"{v:.1f}" for v in s["others_cpu_s_median"].values())))
    _table(rows)
    print()
    print("added ms per step by parts: outside the models (same-run: stage time minus the models' calls; paired "
          "median, range) + the suite's forward against diffusers' (alternating pairs)")
    rows = [("family", "outside, stage", "(range)", "outside, e2e", "(range)", "forward", "(range)",
             "total, stage", "total, e2e", "forward ms in runs (in-proc / suite)")]
    for name, r in results.items():
        s = r["summary"]
        o, f, t = s["outside_models_ms_per_step"], s["forward_ab"]["wall"], s["added_ms_per_step_by_parts"]
        fw = s["denoiser_forward_ms_median_in_runs"]
        rows.append((name, f"{o['denoiser_stage']['added_paired_median']:+.2f}",
                     f"{o['denoiser_stage']['added_paired_min']:+.2f}..{o['denoiser_stage']['added_paired_max']:+.2f}",
                     f"{o['end_to_end']['added_paired_median']:+.2f}",
                     f"{o['end_to_end']['added_paired_min']:+.2f}..{o['end_to_end']['added_paired_max']:+.2f}",
                     f"{f['added_ms_paired_median']:+.1f}",
                     f"{f['added_ms_paired_min']:+.1f}..{f['added_ms_paired_max']:+.1f}",
                     f"{t['denoiser_stage']:+.2f}", f"{t['end_to_end']:+.2f}",
                     f"{fw['inprocess']:.1f} / {fw['suite']:.1f}"))
    _table(rows)
    print()
    print("CPU seconds (medians): in-process = this process; suite = every process of the suite plus the client")
    rows = [("family", "in-proc loop", "suite denoiser proc", "added CPU ms/step (denoiser)", "(paired)",
             "in-proc total", "suite total", "added CPU ms/step (total)", "suite by process")]
    for name, r in results.items():
        cpu = r["summary"]["cpu"]
        rows.append((name, f"{cpu['inprocess_loop_s']:.3f}", f"{cpu['suite_denoiser_process_s']:.3f}",
                     f"{cpu['added_ms_per_step_denoiser']:+.2f}", f"{cpu['added_ms_per_step_denoiser_paired']:+.2f}",
                     f"{cpu['inprocess_total_s']:.3f}", f"{cpu['suite_total_s']:.3f}",
                     f"{cpu['added_ms_per_step_total']:+.2f}",
                     ", ".join(f"{k} {v:.2f}" for k, v in cpu["suite_by_process_s"].items()
                               if v is not None and k not in ("others", "steal"))))
    _table(rows)
    print()
    print("bytes per hop (one job)")
    for name, r in results.items():
        h = r["bytes_per_hop"]
        print(f"  [{name}]")
        if "DescribeModel" in h:
            print(f"    DescribeModel        request {h['DescribeModel']['request']:>10,}  "
                  f"response {h['DescribeModel']['response']:>10,}")
        print(f"    Encode               request {h['Encode']['request']:>10,}  response {h['Encode']['response']:>10,}")
        for encoder, e in h["Encode"].get("per_encoder", {}).items():
            print(f"      {encoder:18s} request {e['request']:>10,}  response {e['response']:>10,}  "
                  + ", ".join(f"{k} {v:,} {r['bytes_per_hop']['Encode']['per_encoder'][encoder]['shapes'][k]}"
                              for k, v in e["tensors"].items()))
        d = h["Denoise"]
        print(f"    Denoise              request {d['request']:>10,}  {d['step_messages']} steps x "
              f"{d['step_bytes_median']:,.0f} (checkpoint {d['checkpoint_bytes_median']:,.0f}) = "
              f"{d['step_bytes_total']:,}; result {d['result']:,} {d['result_latents_shape']}")
        print(f"    Decode               request {h['Decode']['request']:>10,}  response {h['Decode']['response']:>10,}")
        g = h["Generate (client <-> orchestrator)"]
        print(f"    Generate             request {g['GenerateRequest']:>10,}  responses "
              + ", ".join(f"{k} {v['messages']} x = {v['bytes']:,}" for k, v in g["GenerateResponse"].items()))
    print()


def _table(rows: list[tuple[str, ...]]) -> None:
    width = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.rjust(width[i]) for i, cell in enumerate(row)))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", choices=sorted(FAMILY_SETTINGS), default=list(DEFAULT_FAMILIES),
                        help="families to run, in order (default: sdxl flux sd15)")
    parser.add_argument("--runs", type=int, help="timed pairs per family (default: sdxl 3, flux 5, sd15 5)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 20)")
    parser.add_argument("--width", type=int, help="image width in pixels (default: 1024; sd15 512)")
    parser.add_argument("--height", type=int, help="image height in pixels (default: 1024; sd15 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse on the moon, highly detailed")
    parser.add_argument("--models-dir", help="where the bench models live (default $LATENTWIRE_HOME/models)")
    parser.add_argument("--json", help="default bench/results/families.json")
    parser.add_argument("--step-costs-only", action="store_true",
                        help="only measure the per-step CPU costs of the suite's denoiser: the step message and the "
                             "interrupt hooks (no suite); JSON default bench/results/families-step-costs.json")
    parser.add_argument("--forward-pairs", type=int,
                        help="alternating pairs of one denoiser forward with and without the interrupt checks "
                             "(default: sdxl 10, flux 15, sd15 15; with --step-costs-only 3)")
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="before each timed run, wait up to this many seconds until other processes use "
                             "< 0.1 CPU (0: don't wait)")
    args = parser.parse_args(argv)
    if (args.runs is not None and args.runs < 1) or (args.steps is not None and args.steps < 1):
        parser.error("--runs and --steps must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if argv is None:
        _reexec_with_malloc_env()
    import text_to_image as t2i

    if args.step_costs_only:
        return main_step_costs(args)
    log_root = Path(tempfile.mkdtemp(prefix="latentwire-bench-families-"))
    out = Path(args.json) if args.json else BENCH_DIR / "results" / "families.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results, failures = {}, {}
    for name in args.family:
        try:
            results[name] = bench_family(name, args, log_root)
        except Exception as error:  # noqa: BLE001 - one family's failure (stage code missing) must not stop the rest
            failures[name] = f"{type(error).__name__}: {error}"
            print(f"[{name}] FAILED: {failures[name]} (service logs in {log_root / name})", flush=True)
        report = {  # written after each family, so a long run keeps what it measured
            "benchmark": "families",
            "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else None,
            "machine": t2i.machine_info(),
            "load_average": os.getloadavg(),
            "results": results,
            "failures": failures,
            "log_dir": str(log_root),
        }
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if results:
        print_report(results)
    print(f"wrote {out}")
    return 1 if failures else 0


def main_step_costs(args) -> int:
    """--step-costs-only: the per-step message CPU cost of each family's bench model at its bench size."""
    import text_to_image as t2i

    results = {}
    for name in args.family:
        cfg = FAMILY_SETTINGS[name]
        folder, _ = ensure_bench_model(name, args.models_dir)
        channels = json.loads((folder / "vae" / "config.json").read_text())["latent_channels"]
        factor = 2 ** (VAE_LEVELS - 1)
        shape = [1, channels, (args.height or cfg["height"]) // factor, (args.width or cfg["width"]) // factor]
        results[name] = step_message_costs(folder, shape, steps=args.steps or cfg["steps"], reps=100)
        r = results[name]
        r["interrupt_hooks"] = interrupt_hook_costs(folder, args.width or cfg["width"], args.height or cfg["height"],
                                                    pairs=args.forward_pairs or 3)
        h = r["interrupt_hooks"]
        print(f"  {name:5s} attention calls per forward, diffusers / hooked: {h['attention_calls']}", flush=True)
        print(f"  {name:5s} one denoiser forward, CPU s (median of {h['pairs']} alternating pairs): diffusers "
              f"{h['diffusers_s']:.4f}, with {h['hooks']} interrupt hooks {h['hooked_s']:.4f} ({h['added_ms']:+.2f} ms; "
              f"wall {h['wall']['added_ms_paired_median']:+.2f} ms)", flush=True)
        print(f"  {name:5s} latents {shape}: step message {r['message_bytes']:,} bytes; CPU ms per step, median "
              f"(min): checkpoint capture {r['capture_ms']['median']:.3f} ({r['capture_ms']['min']:.3f}), encode + "
              f"serialize {r['encode_serialize_ms']['median']:.3f} ({r['encode_serialize_ms']['min']:.3f}), "
              f"orchestrator parse + relay {r['orchestrator_parse_relay_ms']['median']:.3f} "
              f"({r['orchestrator_parse_relay_ms']['min']:.3f})", flush=True)
    out = Path(args.json) if args.json else BENCH_DIR / "results" / "families-step-costs.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "families --step-costs-only", "command": " ".join(
        [Path(sys.executable).name, *sys.argv]), "machine": t2i.machine_info(), "load_average": os.getloadavg(),
        "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

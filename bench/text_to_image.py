#!/usr/bin/env python
"""Text-to-image overhead: the latentwire suite against diffusers' in-process pipeline.

One run measures, for the same model folder, prompt, seed, scheduler, steps and size:

  A. in-process: diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
     requires_safety_checker=False), called with generator=torch.Generator("cpu").manual_seed(seed)
     and output_type="np", in this process;
  B. the suite: start_suite(folder) on ephemeral ports (text encoder, denoiser, VAE and
     orchestrator, each in its own process), then Client.generate(..., include_pixels=True).

Both are warmed up with one untimed run, then timed alternately (A B A B ...), strictly one after
the other: while A runs the suite's services sit idle in their processes; while B runs this
process only waits on the gRPC stream. Reported: median/mean wall time, suite/in-process ratio,
added time per denoising step, max abs pixel difference (a conformance check), per-stage times,
per-step times (in-process from hook/callback timestamps, suite from the step events), and, per
process and run, CPU time, minor page faults and context switches (from /proc, where available).

Before each timed run it waits until processes outside the benchmark are quiet, and it redoes a
pair during which they used the CPU (--quiet-wait, --max-redo). Torch threads are left at their
defaults; the suite's processes inherit this process's environment, so allocator settings such as
MALLOC_ARENA_MAX apply to both sides (they are recorded in the JSON).

    python bench/text_to_image.py --size tiny
    python bench/text_to_image.py --size full --runs 3

This is a benchmark, not a test: it asserts nothing. Results go to a plain table on stdout and to
JSON (default bench/results/text_to_image-<size>.json).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

DEFAULTS = {
    "tiny": {"width": 64, "height": 64, "steps": 20, "guidance": 7.5, "runs": 10},
    "full": {"width": 256, "height": 256, "steps": 4, "guidance": 7.5, "runs": 3},
}
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
STAGES = ("text_encoder", "denoiser", "vae")


# --------------------------------------------------------------------------------------------
# Model folders


def latentwire_home() -> Path:
    home = os.environ.get("LATENTWIRE_HOME") or Path.home() / ".cache" / "latentwire"
    return Path(home).expanduser()


def resolve_model(size: str, model: str | None) -> tuple[Path, str]:
    """The model folder, and how it was obtained (given / reused / built in N s)."""
    from services.tiny_models import create_tiny_sd, ensure_default_model

    if model:
        path = Path(model).expanduser()
        if not (path / "model_index.json").is_file():
            raise SystemExit(f"--model {path}: no model_index.json there; pass a diffusers model folder")
        return path, "given"
    if size == "tiny":
        started = time.perf_counter()
        existed = (latentwire_home() / "models" / "tiny-sd" / "model_index.json").is_file()
        path = ensure_default_model()
        return path, "reused" if existed else f"built in {time.perf_counter() - started:.1f} s"
    path = latentwire_home() / "models" / "sd15-random"
    if (path / "model_index.json").is_file():
        return path, "reused"
    print(f"building the SD 1.5-architecture random model into {path} (~4 GB, ~30 s) ...", flush=True)
    started = time.perf_counter()
    try:
        create_tiny_sd(path, full_size=True, seed=0)
    except FileExistsError:
        if not (path / "model_index.json").is_file():
            raise
    return path, f"built in {time.perf_counter() - started:.1f} s"


# --------------------------------------------------------------------------------------------
# Per-process CPU time (Linux /proc; None elsewhere)


def cpu_seconds(pid: int) -> float | None:
    """On-CPU time of every thread of ``pid`` so far, in seconds (schedstat: ns resolution)."""
    task_dir = Path(f"/proc/{pid}/task")
    try:
        total = 0
        for task in task_dir.iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # the thread ended meanwhile
        return total / 1e9
    except OSError:
        return None


def minor_faults(pid: int) -> int | None:
    """Minor page faults of ``pid`` so far (every thread): first touches of freshly mapped memory."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    except (OSError, ValueError, IndexError):
        return None


def context_switches(pid: int) -> int | None:
    """Voluntary + involuntary context switches of every thread of ``pid`` so far.

    Many per step in a compute process means its OpenMP workers sleep and are woken for every
    parallel region instead of spinning (libgomp does that once a process has more OpenMP threads
    than cores, e.g. after a second thread started its own team).
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                for line in (task / "status").read_text().splitlines():
                    if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                        total += int(line.split()[1])
            except (OSError, ValueError):
                continue
    except OSError:
        return None
    return total


def thread_count(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def system_cpu() -> tuple[float, float] | None:
    """Machine-wide (busy, steal) CPU seconds so far, from /proc/stat (USER_HZ ticks)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / hz, steal / hz


class CpuMeter:
    """CPU seconds each watched process spent between start() and stop(), plus everything else.

    ``others`` is machine-wide busy time minus the watched processes' time: work of processes that
    are not part of the benchmark (another job on the machine skews the figures; 10 ms ticks).
    """

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self._before: dict[str, float | None] = {}
        self._faults: dict[str, int | None] = {}
        self._system: tuple[float, float] | None = None
        self.faults: dict[str, int | None] = {}

    def start(self) -> None:
        self._faults = {name: minor_faults(pid) for name, pid in self.pids.items()}
        self._switches = {name: context_switches(pid) for name, pid in self.pids.items()}
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._system = system_cpu()

    def stop(self) -> dict[str, float | None]:
        system = system_cpu()
        out = {}
        for name, pid in self.pids.items():
            after, before = cpu_seconds(pid), self._before.get(name)
            out[name] = None if after is None or before is None else after - before
        if system is not None and self._system is not None:
            ours = sum(v for v in out.values() if v is not None)
            out["others"] = max(0.0, system[0] - self._system[0] - ours)
            out["steal"] = system[1] - self._system[1]
        self.faults, self.switches = {}, {}
        for name, pid in self.pids.items():
            after, before = minor_faults(pid), self._faults.get(name)
            self.faults[name] = None if after is None or before is None else after - before
            after, before = context_switches(pid), self._switches.get(name)
            self.switches[name] = None if after is None or before is None else after - before
        return out


def disturbed(record: dict) -> bool:
    """Whether processes outside the benchmark used > 5 % of one CPU during a run (and > 3 of /proc/stat's 10 ms ticks)."""
    return (record["cpu_s"].get("others") or 0) > max(0.05 * record["wall_s"], 0.03)


def wait_until_quiet(pids: dict[str, int], *, limit_s: float, window_s: float = 1.0, max_load: float = 0.1) -> float:
    """Wait (at most ``limit_s``) until processes outside the benchmark use < ``max_load`` CPUs; return the wait."""
    started = time.perf_counter()
    meter = CpuMeter(pids)
    while True:
        meter.start()
        time.sleep(window_s)
        others = meter.stop().get("others")
        waited = time.perf_counter() - started
        if others is None or others / window_s < max_load or waited >= limit_s:
            return waited


# --------------------------------------------------------------------------------------------
# A: the in-process pipeline, instrumented with hooks (timestamps only)


class InProcess:
    def __init__(self, model: Path, scheduler: str):
        import diffusers

        self.pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            str(model), safety_checker=None, requires_safety_checker=False
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.default_scheduler = type(self.pipe.scheduler).__name__
        self.scheduler = scheduler or self.default_scheduler
        if self.scheduler != self.default_scheduler:
            self.pipe.scheduler = getattr(diffusers, self.scheduler).from_config(self.pipe.scheduler.config)
        self._marks: dict[str, list[float]] = {}
        pipe = self.pipe
        pipe.text_encoder.register_forward_pre_hook(lambda *_: self._mark("te_start"))
        pipe.text_encoder.register_forward_hook(lambda *_: self._mark("te_end"))
        pipe.unet.register_forward_pre_hook(lambda *_: self._mark("unet_start"))
        decode = pipe.vae.decode

        def timed_decode(*args, **kwargs):
            self._mark("vae_start")
            try:
                return decode(*args, **kwargs)
            finally:
                self._mark("vae_end")

        pipe.vae.decode = timed_decode  # instance attribute: only this pipeline's VAE

    def _mark(self, name: str) -> None:
        self._marks.setdefault(name, []).append(time.perf_counter())

    def run(self, prompt: str, *, seed: int, steps: int, guidance: float, width: int, height: int) -> dict:
        self._marks = {}

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
            output_type="np",
            callback_on_step_end=on_step_end,
        )
        ended = time.perf_counter()
        m = self._marks
        step_end = m.get("step_end", [])
        te_end = m["te_end"][-1]
        stages = {
            # call start -> last text-encoder forward (tokenizing and both CFG passes included)
            "text_encoder": te_end - started,
            # -> VAE decode start: latents, timesteps and the whole UNet/scheduler loop
            "denoiser": m["vae_start"][0] - te_end,
            # -> call end: VAE decode plus postprocessing to float numpy
            "vae": ended - m["vae_start"][0],
        }
        return {
            "wall_s": ended - started,
            "stages_s": stages,
            "steps": len(step_end),
            # steady-state step interval: from the first step's end to the last one's
            "step_interval_s": _interval(step_end),
            "first_step_s": step_end[0] - m["unet_start"][0] if step_end else None,
            "loop_s": step_end[-1] - m["unet_start"][0] if step_end else None,
            "pixels": output.images,
        }


def _interval(stamps: list[float], steps: list[int] | None = None) -> float | None:
    """Time per step between the first and the last stamp; ``steps`` numbers the stamps (default 1, 2, ...)."""
    steps = steps or list(range(1, len(stamps) + 1))
    return (stamps[-1] - stamps[0]) / (steps[-1] - steps[0]) if len(stamps) > 1 and steps[-1] > steps[0] else None


# --------------------------------------------------------------------------------------------
# B: the suite through the client


class SuiteRunner:
    def __init__(self, model: Path, log_dir: Path):
        from latentwire.client import Client
        from services.suite.launcher import start_suite

        started = time.perf_counter()
        self.suite = start_suite(
            model, ports={"orchestrator": 0, "text_encoder": 0, "denoiser": 0, "vae": 0}, log_dir=log_dir
        )
        self.start_s = time.perf_counter() - started
        self.client = Client(self.suite.address, timeout=3600)

    @property
    def pids(self) -> dict[str, int]:
        return {name: service.process.pid for name, service in self.suite.services.items()}

    def run(self, prompt: str, *, seed: int, steps: int, guidance: float, width: int, height: int,
            scheduler: str, step_event_interval_ms: int = 0) -> dict:
        events: list[tuple[str, float]] = []

        def on_event(event) -> None:
            events.append((event.WhichOneof("event"), time.perf_counter()))

        started = time.perf_counter()
        result = self.client.generate(
            prompt,
            seed=seed,
            steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            num_images=1,
            scheduler=scheduler,
            include_pixels=True,
            on_event=on_event,
            step_event_interval_ms=step_event_interval_ms,
        )
        ended = time.perf_counter()
        step_elapsed = [s.elapsed_seconds for s in result.steps]  # orchestrator clock, from the Denoise call
        step_numbers = [s.step for s in result.steps]  # every step, or fewer with step_event_interval_ms
        step_received = [t for kind, t in events if kind == "step"]  # this process's clock
        first = {}
        for kind, t in events:
            first.setdefault(kind, t)
        return {
            "wall_s": ended - started,
            "stages_s": dict(result.timings),
            "orchestrator_total_s": result.total_seconds,
            # Orchestrator time outside the three stage calls (validation, model pinning/loading
            # checks, relaying, building the result) and client time outside the orchestrator.
            "orchestrator_outside_stages_s": result.total_seconds - sum(result.timings.values()),
            "client_outside_orchestrator_s": ended - started - result.total_seconds,
            "steps": len(result.steps),
            "step_interval_s": _interval(step_elapsed, step_numbers),
            "step_interval_received_s": _interval(step_received, step_numbers),
            "step_events": len(step_numbers),
            # Denoise call start (orchestrator) -> first step event (orchestrator)
            "first_step_s": step_elapsed[0] if step_elapsed else None,
            "accepted_after_s": first.get("accepted", ended) - started,
            "result_after_last_event_s": ended - max(t for kind, t in events if kind != "result"),
            "pixels": result.pixels,
        }

    def stop(self) -> dict[str, int]:
        self.client.close()
        return self.suite.stop()


# --------------------------------------------------------------------------------------------
# Reporting


def summarize(values: list[float | None]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def machine_info() -> dict:
    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    import diffusers
    import grpc

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "grpcio": grpc.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        # Allocator and threading settings in the environment (the suite's processes inherit it).
        "environment": {k: v for k, v in os.environ.items()
                        if k.startswith(("MALLOC_", "GLIBC_TUNABLES", "OMP_", "GOMP_", "KMP_", "LD_PRELOAD"))},
        "git_commit": commit,
        "git_dirty": dirty,
    }


def fmt_s(value: float | None, unit: str = "s") -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value * 1000:.2f} ms"
    return f"{value:.4f} s" if value < 10 else f"{value:.2f} s"


def print_report(report: dict) -> None:
    cfg, summary = report["config"], report["summary"]
    m = report["machine"]
    print()
    print(f"text-to-image overhead: size={cfg['size']} model={cfg['model']}")
    print(f"  {cfg['width']}x{cfg['height']}, {cfg['steps']} steps, guidance {cfg['guidance']}, "
          f"scheduler {cfg['scheduler']}, seed {cfg['seed']}, {cfg['runs']} timed runs each (alternating)")
    if cfg.get("step_event_interval_ms"):
        print(f"  the suite's client asks for a step event at most every {cfg['step_event_interval_ms']} ms")
    print(f"  {m['cpu_count']} CPUs ({m['cpu_model']}), torch {m['torch']} threads={m['torch_num_threads']} "
          f"interop={m['torch_num_interop_threads']}, {m['date']}")
    print()
    rows = [("", "in-process", "suite", "suite - in-process")]

    def row(label, a, b, unit="s"):
        diff = None if a is None or b is None else b - a
        rows.append((label, fmt_s(a, unit), fmt_s(b, unit), fmt_s(diff, unit) if diff is not None else "-"))

    a, b = summary["inprocess"], summary["suite"]
    row("wall median", a["wall_s"]["median"], b["wall_s"]["median"])
    row("wall mean", a["wall_s"]["mean"], b["wall_s"]["mean"])
    row("wall min", a["wall_s"]["min"], b["wall_s"]["min"])
    row("wall max", a["wall_s"]["max"], b["wall_s"]["max"])
    for stage in STAGES:
        row(f"{stage} median", a["stages_s"][stage]["median"], b["stages_s"][stage]["median"])
    row("step interval median", a["step_interval_s"]["median"] if a["step_interval_s"] else None,
        b["step_interval_s"]["median"] if b["step_interval_s"] else None, "ms")
    row("first step median", a["first_step_s"]["median"] if a["first_step_s"] else None,
        b["first_step_s"]["median"] if b["first_step_s"] else None, "ms")
    row("orchestrator, outside stages", None, b["orchestrator_outside_stages_s"]["median"], "ms")
    row("client, outside orchestrator", None, b["client_outside_orchestrator_s"]["median"], "ms")
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  " + "  ".join(cell.ljust(width[i]) if i == 0 else cell.rjust(width[i]) for i, cell in enumerate(r)))
    print()
    o = summary["overhead"]
    print(f"  ratio suite/in-process (medians):      {o['ratio_median']:.4f}  ({(o['ratio_median'] - 1) * 100:+.2f} %)")
    print(f"  ratio suite/in-process (means):        {o['ratio_mean']:.4f}  ({(o['ratio_mean'] - 1) * 100:+.2f} %)")
    print(f"  median of paired ratios:               {o['paired_ratio_median']:.4f}")
    print(f"  added per denoising step (medians):    {o['added_ms_per_step_median']:.3f} ms")
    print(f"  added per denoising step (means):      {o['added_ms_per_step_mean']:.3f} ms")
    print(f"  added per step (paired median):        {o['added_ms_per_step_paired_median']:.3f} ms")
    print(f"  max abs pixel difference (all runs):   {summary['max_abs_pixel_diff']:.3g}")
    cpu = summary.get("cpu_s_per_run") or {}
    if cpu:
        print()
        print("  CPU seconds per run (median), by process:")
        for label in ("inprocess", "suite"):
            parts = ", ".join(f"{name} {fmt_s(v['median']) if v else '-'}" for name, v in cpu[label].items())
            print(f"    during {label:10s} {parts}")
    print()
    faults = summary.get("minor_faults_per_run") or {}
    if faults:
        print("  minor page faults per run (median), by process:")
        for label in ("inprocess", "suite"):
            print(f"    during {label:10s} " + ", ".join(f"{n} {v}" for n, v in faults.get(label, {}).items()))
    switches = summary.get("context_switches_per_run") or {}
    if switches:
        print("  context switches per run (median), by process:")
        for label in ("inprocess", "suite"):
            print(f"    during {label:10s} " + ", ".join(f"{n} {v}" for n, v in switches.get(label, {}).items()))
    threads = report.get("process_threads") or {}
    if threads.get("before_warmup") and threads.get("after_runs"):
        print("  OS threads per process (before warm-up -> after the timed runs): " + ", ".join(
            f"{name} {threads['before_warmup'][name]}->{threads['after_runs'].get(name)}"
            for name in threads["before_warmup"]))
    disturbed = summary.get("disturbed_runs") or {}
    if any(disturbed.values()):
        print(f"  WARNING: other processes used > 5 % of a CPU during runs {disturbed} (0-based); "
              "figures may be skewed")
    print(f"  suite start (spawn + load + SERVING): {report['suite_start_s']:.2f} s; "
          f"warm-up: in-process {report['warmup']['inprocess_s']:.3f} s, suite {report['warmup']['suite_s']:.3f} s")
    print()


# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(DEFAULTS), default="tiny",
                        help="tiny: the tiny test model at 64x64, 20 steps; full: SD 1.5 architecture at 256x256, 4 steps")
    parser.add_argument("--steps", type=int, help="denoising steps (tiny 20, full 4)")
    parser.add_argument("--runs", type=int, help="timed runs of each (tiny 10, full 3)")
    parser.add_argument("--width", type=int, help="image width in pixels (tiny 64, full 256)")
    parser.add_argument("--height", type=int, help="image height in pixels (tiny 64, full 256)")
    parser.add_argument("--guidance", type=float, help="guidance scale (7.5)")
    parser.add_argument("--model", help="model folder (default: $LATENTWIRE_HOME/models/tiny-sd or .../sd15-random, "
                                        "built if missing)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", default="", help="scheduler class name (default: the model's own)")
    parser.add_argument("--json", help="where to write the JSON (default bench/results/text_to_image-<size>.json)")
    parser.add_argument("--log-dir", help="service logs (default: a fresh temporary folder)")
    parser.add_argument("--quiet-wait", type=float, default=300.0,
                        help="before each timed run, wait up to this many seconds until other processes on the "
                             "machine use < 0.1 CPU (0: don't wait)")
    parser.add_argument("--max-redo", type=int, default=10,
                        help="redo at most this many (A, B) pairs during which other processes used the CPU")
    parser.add_argument("--step-event-interval-ms", type=int, default=0,
                        help="the suite's client asks for a step event at most every this many ms "
                             "(GenerateRequest.step_event_interval_ms; 0: every step, the default)")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.runs < 1 or args.steps < 1:
        parser.error("--runs and --steps must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    json_path = Path(args.json) if args.json else BENCH_DIR / "results" / f"text_to_image-{args.size}.json"
    model, model_origin = resolve_model(args.size, args.model)
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="latentwire-bench-logs-"))
    print(f"model: {model} ({model_origin}); service logs: {log_dir}", flush=True)

    # Suite first (its processes load while nothing else runs), then the in-process pipeline.
    suite = SuiteRunner(model, log_dir)
    print(f"suite SERVING at {suite.suite.address} after {suite.start_s:.2f} s", flush=True)
    try:
        started = time.perf_counter()
        inproc = InProcess(model, args.scheduler)
        load_s = time.perf_counter() - started
        scheduler = inproc.scheduler
        settings = dict(seed=args.seed, steps=args.steps, guidance=args.guidance, width=args.width, height=args.height)
        pids = {"bench": os.getpid(), **suite.pids}
        meter = CpuMeter(pids)

        # OS threads per process: a thread appearing in a service after its first request is a
        # second OpenMP team (torch work on the event-loop thread as well as the compute thread).
        threads = {"before_warmup": {name: thread_count(pid) for name, pid in pids.items()}}
        # Warm-up: one untimed run each (first-call costs: oneDNN primitives, allocator, gRPC channels).
        started = time.perf_counter()
        inproc.run(args.prompt, **settings)
        warm_a = time.perf_counter() - started
        started = time.perf_counter()
        suite.run(args.prompt, scheduler=scheduler, step_event_interval_ms=args.step_event_interval_ms, **settings)
        warm_b = time.perf_counter() - started
        print(f"warm-up: in-process {warm_a:.3f} s, suite {warm_b:.3f} s; timing {args.runs} x (A B) ...", flush=True)
        threads["after_warmup"] = {name: thread_count(pid) for name, pid in pids.items()}

        runs: dict[str, list[dict]] = {"inprocess": [], "suite": []}
        discarded: list[dict] = []  # pairs redone because another process used the CPU meanwhile
        diffs = []
        i = 0
        while i < args.runs:
            pair = {}
            for label in ("inprocess", "suite"):
                gc.collect()
                waited = wait_until_quiet(pids, limit_s=args.quiet_wait) if args.quiet_wait > 0 else 0.0
                meter.start()
                if label == "inprocess":
                    record = inproc.run(args.prompt, **settings)
                else:
                    record = suite.run(args.prompt, scheduler=scheduler,
                                       step_event_interval_ms=args.step_event_interval_ms, **settings)
                record["cpu_s"] = meter.stop()
                record["minor_faults"] = meter.faults
                record["context_switches"] = meter.switches
                record["waited_for_quiet_s"] = waited
                pair[label] = record
            a, b = pair["inprocess"]["pixels"], pair["suite"]["pixels"]
            diff = float(np.max(np.abs(a.astype(np.float32) - b))) if a.shape == b.shape else float("inf")
            others = [pair[label]["cpu_s"].get("others") for label in pair]
            line = (f"  run {i + 1}/{args.runs}: in-process {pair['inprocess']['wall_s']:.4f} s, "
                    f"suite {pair['suite']['wall_s']:.4f} s, max |diff| {diff:.3g}, other processes' CPU "
                    f"{' / '.join('-' if o is None else f'{o:.2f} s' for o in others)}")
            if any(disturbed(r) for r in pair.values()) and len(discarded) < args.max_redo:
                print(line + " -> disturbed, redone", flush=True)
                for record in pair.values():
                    del record["pixels"]
                discarded.append(pair)
                continue
            print(line, flush=True)
            diffs.append(diff)
            for label, record in pair.items():
                runs[label].append(record)
            i += 1
        threads["after_runs"] = {name: thread_count(pid) for name, pid in pids.items()}
    finally:
        exit_codes = suite.stop()

    shapes = {label: list(r[-1]["pixels"].shape) for label, r in runs.items()}
    for records in runs.values():
        for record in records:
            del record["pixels"]

    def field(label, key):
        return summarize([r[key] for r in runs[label]])

    summary = {}
    for label in runs:
        summary[label] = {
            key: field(label, key)
            for key in ("wall_s", "step_interval_s", "first_step_s", "loop_s", "step_interval_received_s",
                        "orchestrator_total_s", "orchestrator_outside_stages_s", "client_outside_orchestrator_s",
                        "accepted_after_s", "result_after_last_event_s")
            if key in runs[label][0]
        }
        summary[label]["stages_s"] = {s: summarize([r["stages_s"].get(s) for r in runs[label]]) for s in STAGES}
    summary["cpu_s_per_run"] = {
        label: {name: summarize([r["cpu_s"].get(name) for r in runs[label]]) for name in [*pids, "others", "steal"]}
        for label in runs
    }
    summary["minor_faults_per_run"] = {
        label: {name: statistics.median(r["minor_faults"][name] for r in runs[label])
                for name in pids if all(r["minor_faults"].get(name) is not None for r in runs[label])}
        for label in runs
    }
    summary["context_switches_per_run"] = {
        label: {name: statistics.median(r["context_switches"][name] for r in runs[label])
                for name in pids if all(r["context_switches"].get(name) is not None for r in runs[label])}
        for label in runs
    }
    summary["disturbed_runs"] = {label: [i for i, r in enumerate(runs[label]) if disturbed(r)] for label in runs}
    summary["redone_pairs"] = len(discarded)
    wa = [r["wall_s"] for r in runs["inprocess"]]
    wb = [r["wall_s"] for r in runs["suite"]]
    ma, mb = statistics.median(wa), statistics.median(wb)
    fa, fb = statistics.fmean(wa), statistics.fmean(wb)
    summary["overhead"] = {
        "ratio_median": mb / ma,
        "ratio_mean": fb / fa,
        "paired_ratio_median": statistics.median(b / a for a, b in zip(wa, wb)),
        "added_ms_per_step_median": (mb - ma) / args.steps * 1000,
        "added_ms_per_step_mean": (fb - fa) / args.steps * 1000,
        "added_ms_per_step_paired_median": statistics.median(b - a for a, b in zip(wa, wb)) / args.steps * 1000,
        "added_s_median": mb - ma,
    }
    summary["max_abs_pixel_diff"] = max(diffs)
    report = {
        "benchmark": "text_to_image",
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else None,
        "config": {
            "size": args.size,
            "model": str(model),
            "model_origin": model_origin,
            "prompt": args.prompt,
            "seed": args.seed,
            "scheduler": scheduler,
            "steps": args.steps,
            "guidance": args.guidance,
            "width": args.width,
            "height": args.height,
            "runs": args.runs,
            "step_event_interval_ms": args.step_event_interval_ms,
            "pixel_shapes": shapes,
        },
        "machine": machine_info(),
        "process_threads": threads,
        "suite_start_s": suite.start_s,
        "inprocess_load_s": load_s,
        "warmup": {"inprocess_s": warm_a, "suite_s": warm_b},
        "summary": summary,
        "per_run_max_abs_pixel_diff": diffs,
        "runs": runs,
        "discarded_pairs": discarded,
        "suite_exit_codes": exit_codes,
        "log_dir": str(log_dir),
    }
    print_report(report)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

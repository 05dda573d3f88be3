"""Times every forward of the models a generation runs (denoiser, VAE decode, text encoders), in any process.

A benchmark aid, not part of the services. ``install(record)`` wraps, at class level, the ``forward`` of the
denoiser networks and text encoders and ``AutoencoderKL.decode``; each call then reports
``record(kind, start_ns, end_ns)`` with ``time.perf_counter_ns()`` stamps (CLOCK_MONOTONIC on Linux: one
clock for every process on the machine, so a benchmark can line the stamps of a service's process up with
its own). A wrapper costs two clock reads and one call: a few microseconds against forwards of tens of
milliseconds and more.

In a service process it is installed by ``bench/probes/sitecustomize.py`` when the benchmark puts
``bench/probes`` on the service's PYTHONPATH and names a file in ``LATENTWIRE_BENCH_FORWARD_LOG``: each call
then appends one line ``kind start_ns end_ns`` to that file. ``read_log(path, start_ns, end_ns)`` gives back
the calls inside a window.
"""
from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

ENV = "LATENTWIRE_BENCH_FORWARD_LOG"

#: kind -> (module, class, method) wrapped; kind "denoiser" is what a denoising step runs.
TARGETS = {
    "denoiser": [("diffusers", "UNet2DConditionModel", "forward"), ("diffusers", "SD3Transformer2DModel", "forward"),
                 ("diffusers", "FluxTransformer2DModel", "forward")],
    "vae_decode": [("diffusers", "AutoencoderKL", "decode")],
    "text_encoder": [("transformers", "CLIPTextModel", "forward"),
                     ("transformers", "CLIPTextModelWithProjection", "forward"),
                     ("transformers", "T5EncoderModel", "forward")],
}
_installed = False
#: Where the wrappers report: the ``record`` of the latest ``install`` call.
_record: list[Callable[[str, int, int], None]] = []


def install(record: Callable[[str, int, int], None]) -> None:
    """Wrap the targets (once per process); from now on every call reports ``record(kind, start_ns, end_ns)``
    (a later call replaces the recorder)."""
    global _installed
    _record[:] = [record]
    if _installed:
        return
    import importlib

    for kind, targets in TARGETS.items():
        for module_name, class_name, method in targets:
            cls = getattr(importlib.import_module(module_name), class_name)
            original = getattr(cls, method)

            def wrapped(self, *args, __original=original, __kind=kind, **kwargs):
                started = time.perf_counter_ns()
                try:
                    return __original(self, *args, **kwargs)
                finally:
                    _record[0](__kind, started, time.perf_counter_ns())

            setattr(cls, method, functools.wraps(original)(wrapped))
    _installed = True


def install_from_env() -> None:
    """In a service process: append ``kind start_ns end_ns`` lines to the file ``$LATENTWIRE_BENCH_FORWARD_LOG``."""
    path = os.environ.get(ENV)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(kind: str, start_ns: int, end_ns: int) -> None:
        os.write(fd, f"{kind} {start_ns} {end_ns}\n".encode())

    install(record)


def read_log(path: str, start_ns: int, end_ns: int) -> list[tuple[str, int, int]]:
    """The calls of a log file that started at or after ``start_ns`` and ended by ``end_ns``."""
    calls = []
    try:
        with open(path) as log:
            for line in log:
                kind, started, ended = line.split()
                if int(started) >= start_ns and int(ended) <= end_ns:
                    calls.append((kind, int(started), int(ended)))
    except FileNotFoundError:
        pass
    return calls

"""The C allocator's settings for a service process, so that messages of megabytes reuse memory.

A denoiser step message carries its checkpoint's latents (4 MB for tiny SDXL at 1024x1024), and the
orchestrator parses one per step. glibc serves a block that large with a fresh mmap and gives it back with
munmap when it is freed, so every step's buffers fault in new zeroed pages (about a thousand per 4 MB), on the
event loop's thread, while the denoising loop waits for the interpreter lock. Measured here: building and
serialising one such step message took 14.5 ms; with the thresholds below, 2.2 ms (docs/benchmarks.md).

Raising the mmap threshold keeps blocks up to MMAP_THRESHOLD in the heap, where a freed block is reused by the
next step; larger blocks (model weights) still map their own pages and go back to the system when freed, and
free heap beyond TRIM_THRESHOLD at its top is given back. An operator's own MALLOC_MMAP_THRESHOLD_ or
MALLOC_TRIM_THRESHOLD_ environment setting wins. Other C libraries (musl, macOS) are left as they are.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

#: Blocks up to this size come from the heap (glibc's default starts at 128 KiB, adapting up to 32 MiB).
MMAP_THRESHOLD = 64 << 20
#: Free memory at the heap's top beyond this size goes back to the system.
TRIM_THRESHOLD = 256 << 20

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune() -> bool:
    """Set the thresholds for this process; True when they were set (glibc), False when left as they are."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # musl has a mallopt that does nothing
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = True
    for env, parameter, value in (("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                  ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        if env in os.environ:
            continue
        if mallopt(parameter, value) != 1:
            log.warning("could not set the C allocator's %s; large messages will fault in fresh pages", env)
            done = False
    return done

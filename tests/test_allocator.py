"""The services' C allocator settings (services/runtime/allocator.py): a step message's megabytes reuse the heap
instead of faulting in fresh pages every step."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from services.runtime import allocator

# Builds and drops 40 messages of 4 MB (a tiny SDXL step's latents at 1024x1024) and counts the page faults.
_PROBE = textwrap.dedent("""
    import resource, sys
    from services.runtime import allocator
    from latentwire.common.v1 import tensor_pb2
    if sys.argv[1] == "tuned":
        assert allocator.tune()
    payload = bytes(4 << 20)
    tensor_pb2.Tensor(raw_contents=payload).SerializeToString()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        tensor_pb2.Tensor(raw_contents=payload).SerializeToString()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str, env: dict | None = None) -> int:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                          timeout=120, env=env)
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_process_reuses_memory_for_large_messages():
    plain, tuned = _faults("plain"), _faults("tuned")
    # Untuned, each 4 MB buffer is a fresh mapping: about a thousand faults per copy, two copies per message.
    assert plain > 40 * 1000, plain
    assert tuned < plain / 20, (plain, tuned)


def test_thresholds_fit_step_messages_not_weights():
    assert allocator.MMAP_THRESHOLD >= 32 << 20  # a 16 MB step message stays in the heap
    assert allocator.TRIM_THRESHOLD > allocator.MMAP_THRESHOLD

"""Options for the denoiser's network on an accelerator: channels_last memory format and torch.compile.

Both are off by default and change no API; each is a flag of ``python -m services.denoiser``:

- ``--channels-last``: the UNet's weights in NHWC (``torch.channels_last``). On NVIDIA GPUs with tensor cores
  cuDNN's convolutions run faster in that layout (diffusers' own speed-up guide recommends it). Results differ
  from NCHW only by float rounding (tiny UNet, float32 CPU: 5e-7). Transformers (SD3, Flux) have no convolutions
  worth it: the flag leaves them as they are.
- ``--compile MODE``: ``torch.compile(network, mode=MODE)`` for the denoising loop's forward, ``default``,
  ``reduce-overhead`` (on CUDA: CUDA graphs, which replay a whole forward for a fixed shape with one launch; a
  new size or batch records a new graph) or ``max-autotune``. A compiled network cannot run the cancellation hooks
  (interrupt.py: they read the calling thread's job, which TorchDynamo cannot trace), so they come off the
  network: cancels and deadlines then take effect between steps only (plus inside the VAE and text encoder as
  before). Jobs with LoRAs or circular tiling, which patch the network per thread, run the network uncompiled.
  Each new shape compiles first: the first job of a size is slower (tens of seconds on CPU, where inductor
  compiles C++; not worth it there at small sizes).

Measured: docs/benchmarks.md ("GPU-ready options"); no GPU host was available when this was written, so the
CUDA figures are still to be taken.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class Acceleration:
    """What ``apply`` does to a loaded model's network."""

    channels_last: bool = False
    compile_mode: str = "off"


def apply(model: Any, options: Acceleration) -> None:
    """Put ``model``'s network (its ``family.denoiser`` attribute: unet or transformer) in the asked layout, and
    set ``model.compiled_network`` (None when not compiling), which the loop calls for jobs that allow it."""
    import torch

    from services.runtime import interrupt

    network = getattr(model, model.family.denoiser)
    if options.channels_last and model.family.denoiser == "unet":  # transformers have no convolutions worth it
        network.to(memory_format=torch.channels_last)
    model.compiled_network = None
    if options.compile_mode != "off":
        interrupt.uninstall(network)
        model.compiled_network = torch.compile(network, mode=options.compile_mode)

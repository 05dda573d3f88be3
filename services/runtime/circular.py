"""Seamless tiling (AUTOMATIC1111's "Tiling"): convolutions that pad circularly for one job only.

A1111 sets ``padding_mode = "circular"`` on every ``torch.nn.Conv2d`` of the loaded model (UNet and VAE), so
the image wraps at its edges and tiles without seams. Here several jobs run at once on one shared model
(services/runtime/worker.py), so nothing on the module is flipped: ``install(module)`` wraps each Conv2d's
``_conv_forward`` on its instance with a function that, while the calling thread's job runs inside
``circular(True)``, pads as ``padding_mode="circular"`` does (torch's own ``Conv2d._conv_forward``: ``F.pad``
circular, then a convolution without padding), and otherwise calls the layer's own ``_conv_forward``. The
switch is a context variable, so each worker thread (each job) sees only its own; hooks on the same layers
(interrupt.py's pre-hooks, LoRA forward hooks) compose with it, since ``forward`` still runs them.

``install`` runs on the first job that asks for tiling (a model never tiled keeps its convolutions as they are);
it is idempotent and safe while other jobs run: a layer calls either its own method or the wrapper, which
calls that same method when the switch is off. torch is imported only by the functions that need it.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

_CIRCULAR: contextvars.ContextVar[bool] = contextvars.ContextVar("latentwire_circular_padding", default=False)
_INSTALL_LOCK = threading.Lock()
#: Attribute marking a module whose Conv2d layers are wrapped.
_MARK = "_latentwire_circular_installed"


@contextlib.contextmanager
def circular(enabled: bool = True) -> Iterator[None]:
    """Let the wrapped convolutions of the current context (the job's thread) pad circularly while the block runs
    (``enabled``; False: as they are)."""
    token = _CIRCULAR.set(bool(enabled))
    try:
        yield
    finally:
        _CIRCULAR.reset(token)


def enabled() -> bool:
    """Whether the current context's convolutions pad circularly."""
    return _CIRCULAR.get()


def install(module: torch.nn.Module) -> None:
    """Wrap every Conv2d of ``module`` (once) so that it pads circularly inside ``circular(True)``."""
    if getattr(module, _MARK, False):
        return
    import torch

    with _INSTALL_LOCK:
        if getattr(module, _MARK, False):
            return
        for layer in module.modules():
            if isinstance(layer, torch.nn.Conv2d) and not hasattr(layer, "_latentwire_own_conv_forward"):
                _wrap(layer)
        setattr(module, _MARK, True)


@contextlib.contextmanager
def tiling(enabled: bool, *modules: torch.nn.Module) -> Iterator[None]:
    """``circular(enabled)`` around a job's work on ``modules``, installing the wrappers first when enabled."""
    if enabled:
        for module in modules:
            install(module)
    with circular(enabled):
        yield


def _wrap(layer: torch.nn.Conv2d) -> None:
    import torch.nn.functional as F
    from torch.nn.modules.utils import _pair

    own = layer._conv_forward  # the bound method of the class (or a wrapper another library put there)

    def conv_forward(input, weight, bias):
        if not _CIRCULAR.get() or layer.padding_mode == "circular":
            return own(input, weight, bias)
        # Copied from torch.nn.Conv2d._conv_forward, the padding_mode != "zeros" branch, with mode="circular".
        return F.conv2d(F.pad(input, layer._reversed_padding_repeated_twice, mode="circular"), weight, bias,
                        layer.stride, _pair(0), layer.dilation, layer.groups)

    layer._latentwire_own_conv_forward = own
    layer._conv_forward = conv_forward

"""Device and dtype selection, the same for every service."""
from __future__ import annotations

import torch

from . import limits
from .errors import ConfigurationError, quote

#: The torch dtype of each name limits.py allows (float32, float16, bfloat16).
_DTYPES = {name: getattr(torch, name) for name in limits.DTYPES}


def resolve_device(name: str) -> torch.device:
    """Turn ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` into a torch.device, refusing one this host lacks."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigurationError(f"--device {quote(name)} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigurationError(f"--device {name}: CUDA is not available on this host; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigurationError(f"--device {name}: this host has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigurationError("--device mps: MPS is not available on this host; use --device cpu")
    elif device.type != "cpu":
        raise ConfigurationError(f"--device {name}: only cpu, cuda and mps are supported")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    """Turn ``float32``, ``float16`` or ``bfloat16`` into a torch dtype."""
    return _DTYPES[limits.check_dtype(name)]


def dtype_name(dtype: torch.dtype) -> str:
    """The config name of a torch dtype (inverse of resolve_dtype)."""
    return str(dtype).removeprefix("torch.")

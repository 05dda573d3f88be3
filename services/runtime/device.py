"""Device and dtype selection, the same for every service."""
from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """Turn ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` into a torch.device, refusing one this host lacks."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SystemExit(f"--device {name!r} is not a torch device; use cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: CUDA is not available on this host; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {name}: this host has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise SystemExit("--device mps: MPS is not available on this host; use --device cpu")
    elif device.type != "cpu":
        raise SystemExit(f"--device {name}: only cpu, cuda and mps are supported")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    """Turn ``float32``, ``float16`` or ``bfloat16`` into a torch dtype."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise SystemExit(f"--dtype {name!r} is not supported; use one of {', '.join(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The config name of a torch dtype (inverse of resolve_dtype)."""
    return str(dtype).removeprefix("torch.")

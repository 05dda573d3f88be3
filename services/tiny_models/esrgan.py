"""A tiny ESRGAN-type upscaler (RRDBNet) as one .safetensors file, the way community upscalers ship.

    create_tiny_upscaler(path, scale=4)                  # BasicSR layout (conv_first, body.0.rdb1.conv1, ...)
    create_tiny_upscaler(path, scale=4, layout="old")   # ESRGAN's layout (model.0, model.1.sub.0.RDB1.conv1.0, ...)

Scale 4 is a plain RRDBNet with two x2 upsamplings; scale 2 (1) pixel-unshuffles its input by 2 (4) as Real-ESRGAN's
x2 (x1) models do. num_grow_ch defaults to 32, the value every released model uses (and the only one spandrel's
loader builds). Weights are drawn from a torch.Generator seeded with ``seed``; the last convolution is scaled down and
its bias is 0.5, so the output is mid-grey plus structure rather than mostly clamped.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

LAYOUTS = ("new", "old")


def tiny_upscaler_state(scale: int = 4, *, layout: str = "new", num_feat: int = 8, num_grow_ch: int = 32,
                        num_block: int = 1, seed: int = 0, channels: int = 3) -> dict[str, torch.Tensor]:
    """The state dict of a random RRDBNet in ``layout`` ("new": BasicSR's keys; "old": ESRGAN's)."""
    from services.vae.upscaler import Architecture, RRDBNet

    if scale not in (1, 2, 4):
        raise ValueError(f"scale {scale} is not 1, 2 or 4")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    shuffle = 4 // scale
    arch = Architecture(channels * shuffle ** 2, channels, num_feat, num_grow_ch, num_block, 2, shuffle)
    torch.manual_seed(seed)  # the module's own init, then redrawn from one generator below
    network = RRDBNet(arch)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in network.state_dict().items():
        fan_in = value[0].numel() if value.ndim > 1 else 1
        std = (2.0 / fan_in) ** 0.5 if value.ndim > 1 else 0.02
        state[key] = torch.randn(value.shape, generator=generator) * std
    state["conv_last.weight"] = state["conv_last.weight"] * 0.1  # the output varies about mid-grey, mostly in [0, 1]
    state["conv_last.bias"] = torch.full_like(state["conv_last.bias"], 0.5)
    return state if layout == "new" else to_old_layout(state, num_block, num_upsamples=2)


def to_old_layout(state: dict[str, torch.Tensor], num_block: int, num_upsamples: int) -> dict[str, torch.Tensor]:
    """BasicSR keys -> ESRGAN's original sequential keys (what old community .pth files hold)."""
    last = 3 * num_upsamples + 4
    names = {"conv_first": "model.0", "conv_body": f"model.1.sub.{num_block}", "conv_hr": f"model.{last - 2}",
             "conv_last": f"model.{last}"}
    names.update({f"conv_up{i}": f"model.{3 * i}" for i in range(1, num_upsamples + 1)})
    out = {}
    for key, value in state.items():
        if key.startswith("body."):
            _, block, rdb, conv, kind = key.split(".")
            out[f"model.1.sub.{block}.{rdb.upper()}.{conv}.0.{kind}"] = value
        else:
            module, kind = key.split(".")
            out[f"{names[module]}.{kind}"] = value
    return out


def create_tiny_upscaler(path: str | os.PathLike, scale: int = 4, *, layout: str = "new", seed: int = 0,
                         **sizes) -> Path:
    """Write a tiny RRDBNet upscaler to ``path`` (a .safetensors file; a .pth with torch.save) and return it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in tiny_upscaler_state(scale, layout=layout, seed=seed, **sizes).items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return path

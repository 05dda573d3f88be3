"""ESRGAN-type upscaler models (RRDBNet: ESRGAN, Real-ESRGAN, BSRGAN and the community models trained with them,
4x-UltraSharp, ...) read from one weights file and run on images, whole or in overlapping tiles.

The network follows xinntao's BasicSR ``basicsr/archs/rrdbnet_arch.py`` (RRDBNet, RRDB, ResidualDenseBlock; Apache
2.0) and ESRGAN's original ``RRDBNet_arch.py``; the file layouts, the detection of the architecture from the state
dict and the pixel-unshuffle of x2/x1 models as spandrel's ESRGAN architecture reads them. Both layouts in the wild
load into the one BasicSR-layout module:

- new (BasicSR / Real-ESRGAN): ``conv_first``, ``body.N.rdbK.convJ``, ``conv_body``, ``conv_up1``, ``conv_up2``,
  ``conv_hr``, ``conv_last`` (BSRGAN's ``RRDB_trunk.N.RDBK.convJ``, ``trunk_conv``, ``upconv1``, ``HRconv`` too);
- old (ESRGAN): ``model.0``, ``model.1.sub.N.RDBK.convJ.0``, ``model.1.sub.NB`` (the trunk conv), then one
  ``model.3k`` per x2 upsampling, ``model.3k+2`` (HR conv) and ``model.3k+4`` (last conv).

Architecture parameters (channels in and out, num_feat, num_grow_ch, num_block, scale) come from the keys and
shapes. A model whose first convolution takes 4x (16x) its output channels pixel-unshuffles its input by 2 (4):
Real-ESRGAN's x2 (x1) models. Images go in as RGB in [0, 1] (the colour order BasicSR trains in; AUTOMATIC1111
feeds BGR, an inheritance of cv2) and come out clamped to [0, 1], quantised with rounding.

Large images run in tiles with overlap as AUTOMATIC1111's ``upscale_with_model`` does (``images.split_grid`` /
``combine_grid``: tile 192, overlap 8, tiles blended linearly over the overlap).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from services.runtime import interrupt
from services.runtime.errors import FailedPrecondition, InvalidArgument, quote

#: AUTOMATIC1111's defaults (Settings > Upscaling: "Tile size for ESRGAN upscalers", "Tile overlap").
DEFAULT_TILE_SIZE = 192
DEFAULT_TILE_OVERLAP = 8
#: Largest output side an upscale may produce, in pixels (4x a 2048 image).
MAX_OUTPUT_SIDE = 8192


# ----------------------------------------------------------------------------------------------
# The network (BasicSR's rrdbnet_arch.py)


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convolutions, each seeing the block's input and every earlier output (BasicSR)."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x  # residual scaling 0.2, as ESRGAN


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks, residual-scaled by 0.2 (BasicSR)."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


@dataclass(frozen=True)
class Architecture:
    """An RRDBNet's parameters, read from its state dict."""

    in_channels: int
    out_channels: int
    num_feat: int
    num_grow_ch: int
    num_block: int
    #: Nearest-neighbour x2 upsamplings inside the network (conv_up1, conv_up2, ...).
    num_upsamples: int
    #: The input's pixel-unshuffle factor (1: none; 2: Real-ESRGAN x2 models; 4: x1 models).
    shuffle_factor: int

    @property
    def scale(self) -> int:
        """Output size over input size."""
        return 2 ** self.num_upsamples // self.shuffle_factor


class RRDBNet(nn.Module):
    """ESRGAN's generator in BasicSR's layout; ``forward`` takes [batch, channels, height, width] in [0, 1].

    With a shuffle factor the input is reflect-padded to a multiple of it and pixel-unshuffled, and the output is
    cropped back to ``scale`` times the input (spandrel's ESRGAN does the same; BasicSR needs divisible sizes).
    """

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        self.conv_first = nn.Conv2d(arch.in_channels, arch.num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(arch.num_feat, arch.num_grow_ch) for _ in range(arch.num_block)))
        self.conv_body = nn.Conv2d(arch.num_feat, arch.num_feat, 3, 1, 1)
        for i in range(1, arch.num_upsamples + 1):
            setattr(self, f"conv_up{i}", nn.Conv2d(arch.num_feat, arch.num_feat, 3, 1, 1))
        self.conv_hr = nn.Conv2d(arch.num_feat, arch.num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(arch.num_feat, arch.out_channels, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    @property
    def scale(self) -> int:
        return self.arch.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[2:]
        factor = self.arch.shuffle_factor
        if factor > 1:
            pad_h, pad_w = (-height) % factor, (-width) % factor
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
            x = F.pixel_unshuffle(x, downscale_factor=factor)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(1, self.arch.num_upsamples + 1):
            up = getattr(self, f"conv_up{i}")
            feat = self.lrelu(up(F.interpolate(feat, scale_factor=2, mode="nearest")))
        out = self.conv_last(self.lrelu(self.conv_hr(feat)))
        if factor > 1:
            out = out[:, :, : height * self.scale, : width * self.scale]
        return out


# ----------------------------------------------------------------------------------------------
# State dicts: both layouts -> BasicSR's, architecture from shapes


_OLD_RDB = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)")
_BSRGAN_RDB = re.compile(r"RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.(weight|bias)")
_NEW_RDB = re.compile(r"body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias)")
_OLD_SEQUENCE = re.compile(r"model\.(\d+)\.(weight|bias)")
#: BSRGAN / RealSR names -> BasicSR names.
_RENAMES = {"trunk_conv": "conv_body", "HRconv": "conv_hr", "upconv1": "conv_up1", "upconv2": "conv_up2",
            "upconv3": "conv_up3"}


def _invalid(name: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"upscaler {quote(name)} is not an ESRGAN-type (RRDBNet) model: {why}",
                           reason="UPSCALER_INVALID", metadata={"upscaler": name})


def is_rrdbnet(keys) -> bool:
    """Whether tensor names are an RRDBNet's, in either layout (what the registry recognises an upscaler by)."""
    keys = set(keys)
    old = "model.0.weight" in keys and "model.1.sub.0.RDB1.conv1.0.weight" in keys
    new = {"conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_last.weight"} <= keys
    bsrgan = {"conv_first.weight", "RRDB_trunk.0.RDB1.conv1.weight", "trunk_conv.weight", "conv_last.weight"} <= keys
    return old or new or bsrgan


def to_new_layout(state: dict[str, torch.Tensor], name: str = "upscaler") -> dict[str, torch.Tensor]:
    """A state dict in any of the known layouts -> BasicSR's key names (tensors shared, not copied)."""
    for wrapper in ("params_ema", "params"):  # BasicSR training checkpoints
        if wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not is_rrdbnet(state):
        raise _invalid(name, "its tensor names are neither ESRGAN's (model.0, model.1.sub.N.RDBK...) nor BasicSR's "
                             "(conv_first, body.N.rdbK..., conv_body, conv_last)")
    if "model.0.weight" not in state:  # new (or BSRGAN) layout
        out = {}
        for key, value in state.items():
            if match := _BSRGAN_RDB.fullmatch(key):
                block, rdb, conv, kind = match.groups()
                key = f"body.{block}.rdb{rdb}.conv{conv}.{kind}"
            else:
                module, _, kind = key.partition(".")
                key = f"{_RENAMES.get(module, module)}.{kind}"
            out[key] = value
        return out
    out = {}
    blocks = {int(m.group(1)) for k in state if (m := _OLD_RDB.fullmatch(k))}
    num_block = max(blocks) + 1
    sequence: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if match := _OLD_RDB.fullmatch(key):
            block, rdb, conv, kind = match.groups()
            out[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = value
        elif key in (f"model.1.sub.{num_block}.weight", f"model.1.sub.{num_block}.bias"):
            out[f"conv_body.{key.rsplit('.', 1)[1]}"] = value
        elif match := _OLD_SEQUENCE.fullmatch(key):
            sequence.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            raise _invalid(name, f"it has a tensor {quote(key, 60)} outside ESRGAN's layout (ESRGAN+ and other "
                                 "variants are not supported)")
    # model.0: first conv; model.3, 6, ...: an upconv each (Upsample, Conv, LeakyReLU); then HR conv, LeakyReLU,
    # last conv (ESRGAN's sequential: 3 entries per upsampling).
    indices = sorted(sequence)
    last = indices[-1]
    if indices[0] != 0 or len(indices) < 3 or last < 4 or (last - 4) % 3 or indices[-2] != last - 2:
        raise _invalid(name, "its model.N sequence is not ESRGAN's (first conv, upconvs, HR conv, last conv)")
    num_upsamples = (last - 4) // 3
    names = {0: "conv_first", last - 2: "conv_hr", last: "conv_last"}
    names.update({3 * (i + 1): f"conv_up{i + 1}" for i in range(num_upsamples)})
    for index, tensors in sequence.items():
        if index not in names:
            raise _invalid(name, f"it has a model.{index} that ESRGAN's layout has not")
        for kind, value in tensors.items():
            out[f"{names[index]}.{kind}"] = value
    return out


def architecture_of(state: dict[str, torch.Tensor], name: str = "upscaler") -> Architecture:
    """An RRDBNet's parameters from a BasicSR-layout state dict's keys and shapes."""
    try:
        first = state["conv_first.weight"]
        last = state["conv_last.weight"]
        grow = state["body.0.rdb1.conv1.weight"]
    except KeyError as error:
        raise _invalid(name, f"it lacks {quote(error.args[0], 60)}") from None
    num_block = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    num_upsamples = sum(1 for k in state if re.fullmatch(r"conv_up\d+\.weight", k))
    in_channels, out_channels, num_feat = first.shape[1], last.shape[0], first.shape[0]
    shuffle = 1
    for factor in (2, 4):  # Real-ESRGAN x2 / x1: the input pixel-unshuffled by 2 / 4
        if in_channels == out_channels * factor ** 2:
            shuffle, in_channels = factor, out_channels
    arch = Architecture(in_channels * shuffle ** 2, out_channels, num_feat, grow.shape[0], num_block, num_upsamples,
                        shuffle)
    if arch.scale < 1 or 2 ** num_upsamples % shuffle:
        raise _invalid(name, f"its scale is {2 ** num_upsamples}/{shuffle}")
    if out_channels not in (1, 3):
        raise _invalid(name, f"it outputs {out_channels} channels; upscalers here take RGB (3) or grayscale (1)")
    return arch


def build(state: dict[str, torch.Tensor], name: str = "upscaler") -> RRDBNet:
    """The network for a state dict of either layout, its weights loaded (strictly: every tensor used, each of its
    shape), in eval mode."""
    state = to_new_layout(state, name)
    network = RRDBNet(architecture_of(state, name))
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError:
        raise _invalid(name, "its tensors do not fit one RRDBNet (missing, extra or mis-shaped weights)") from None
    return network.eval()


def read_state_dict(path: Path, name: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """A weights file's tensors: .safetensors always; a pickle (.pth, .pt, .ckpt) only with ``allow_pickle``, and
    then with torch.load(weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception:  # safetensors' own errors name the path
            raise _invalid(name, "its file is not a readable safetensors file") from None
    if not allow_pickle:
        raise FailedPrecondition(f"upscaler {quote(name)} is a pickle file; unpickling can run code, so this service "
                                 "refuses it without --allow-pickle (or convert it to safetensors)",
                                 reason="MODEL_FILES_REFUSED", metadata={"upscaler": name})
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        raise _invalid(name, "its pickle file does not hold plain tensors") from None
    if not isinstance(state, dict):
        raise _invalid(name, "its pickle file does not hold a state dict")
    return state


# ----------------------------------------------------------------------------------------------
# Running on images


class Upscaler:
    """A loaded upscaler on one device and dtype."""

    def __init__(self, network: RRDBNet, name: str, device: torch.device, dtype: torch.dtype):
        self.name = name
        self.network = network.to(device=device, dtype=dtype)
        self.device = device
        self.dtype = dtype
        interrupt.install(self.network)  # cancellation between the network's blocks

    @classmethod
    def load(cls, path: Path, name: str, device: torch.device, dtype: torch.dtype,
             allow_pickle: bool = False) -> Upscaler:
        return cls(build(read_state_dict(Path(path), name, allow_pickle), name), name, device, dtype)

    @property
    def scale(self) -> int:
        return self.network.scale

    @torch.inference_mode()
    def run(self, image: Image.Image) -> Image.Image:
        """One image through the network, whole (A1111's ``upscale_without_tiling``, in RGB)."""
        rgb = np.asarray(image.convert("L" if self.network.arch.out_channels == 1 else "RGB"), dtype=np.float32)
        if rgb.ndim == 2:
            rgb = rgb[:, :, None]
        x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)) / 255.0).unsqueeze(0)
        out = self.network(x.to(device=self.device, dtype=self.dtype))
        out = out[0].float().cpu().clamp_(0, 1).numpy().transpose(1, 2, 0)
        out = (out * 255.0).round().astype(np.uint8)
        return Image.fromarray(out[:, :, 0] if out.shape[2] == 1 else out).convert("RGB")

    def upscale(self, image: Image.Image, tile_size: int = DEFAULT_TILE_SIZE,
                tile_overlap: int = DEFAULT_TILE_OVERLAP) -> Image.Image:
        """``image`` at ``scale`` times its size: whole when it fits one tile (or ``tile_size`` is 0), else in
        overlapping tiles as A1111's ``upscale_with_model``."""
        if tile_size <= 0 or (image.width <= tile_size and image.height <= tile_size):
            return self.run(image)
        return upscale_tiled(self.run, image, tile_size, tile_overlap, self.scale)


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along one side, as A1111's ``images.split_grid`` places them (the last flush with the end)."""
    if size <= tile:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    step = (size - tile) / (count - 1) if count > 1 else 0
    return [min(int(i * step), size - tile) for i in range(count)]


def upscale_tiled(run, image: Image.Image, tile: int, overlap: int, scale: int) -> Image.Image:
    """``run`` on overlapping ``tile`` x ``tile`` crops, blended as A1111's ``images.combine_grid``: each tile after
    the first in a row (each row after the first) is pasted over the overlap through a linear ramp mask, the rest
    pasted as it is. A side shorter than ``tile`` is one tile of that side."""
    if overlap >= tile:
        raise InvalidArgument(f"tile overlap {overlap} is not below the tile size {tile}", reason="INVALID_TILING")
    tile_w, tile_h = min(tile, image.width), min(tile, image.height)
    out_w, out_h = image.width * scale, image.height * scale
    ov = overlap * scale
    mask_w = _ramp(ov, tile_h * scale, horizontal=True)
    mask_h = _ramp(ov, out_w, horizontal=False)
    combined = Image.new("RGB", (out_w, out_h))
    for row, y in enumerate(_starts(image.height, tile_h, overlap)):
        line = Image.new("RGB", (out_w, tile_h * scale))
        for col, x in enumerate(_starts(image.width, tile_w, overlap)):
            up = run(image.crop((x, y, x + tile_w, y + tile_h)))
            if col == 0 or ov == 0:
                line.paste(up, (x * scale, 0))
                continue
            line.paste(up.crop((0, 0, ov, up.height)), (x * scale, 0), mask=mask_w)
            line.paste(up.crop((ov, 0, up.width, up.height)), (x * scale + ov, 0))
        if row == 0 or ov == 0:
            combined.paste(line, (0, y * scale))
            continue
        combined.paste(line.crop((0, 0, out_w, ov)), (0, y * scale), mask=mask_h)
        combined.paste(line.crop((0, ov, out_w, line.height)), (0, y * scale + ov))
    return combined


def _ramp(overlap: int, length: int, *, horizontal: bool) -> Image.Image | None:
    """A1111's blend mask: 0 -> 255 across the overlap (uint8 of ``arange(overlap) * 255 / overlap``)."""
    if overlap == 0:
        return None
    ramp = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)
    mask = np.repeat(ramp[None, :], length, axis=0) if horizontal else np.repeat(ramp[:, None], length, axis=1)
    return Image.fromarray(mask, "L")


"""Recognising ESRGAN-type upscaler files (RRDBNet) by their tensor names, without torch.

Community upscalers ship as one weights file: RealESRGAN_x4plus, 4x-UltraSharp, BSRGAN, ... in BasicSR's key layout
(``conv_first``, ``body.N.rdbK.convJ``, ``conv_body``, ``conv_last``), BSRGAN's (``RRDB_trunk.N.RDBK.convJ``,
``trunk_conv``) or ESRGAN's original one (``model.0``, ``model.1.sub.N.RDBK.convJ.0``). The registry import
(latentwire.client.registry) stores one as a MODEL_KIND_UPSCALER version; the VAE stage runs it
(services/vae/upscaler.py, which uses the same test).

A pickle file (.pth) is read here only as a list of the strings its pickle pushes (pickletools, nothing executed),
and only after the caller allowed pickles: loading it later still unpickles it (torch.load with weights_only).
"""
from __future__ import annotations

import os
import pickletools
import zipfile
from typing import Iterable

#: The file an upscaler version holds, by format (the registry requires one of them at the top level).
UPSCALER_FILES = ("upscaler.safetensors", "upscaler.pth")
#: Largest pickle read to list its strings (the tensor data lives in other members of the zip).
MAX_PICKLE_BYTES = 64 * 1024 * 1024
#: BasicSR training checkpoints wrap the state dict in one of these.
_WRAPPERS = ("params_ema", "params")


def is_rrdbnet(keys: Iterable[str]) -> bool:
    """Whether tensor names are an RRDBNet's, in ESRGAN's, BasicSR's or BSRGAN's layout (spandrel's detection)."""
    keys = set(keys)
    old = {"model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight"} <= keys
    new = {"conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_last.weight"} <= keys
    bsrgan = {"conv_first.weight", "RRDB_trunk.0.RDB1.conv1.weight", "trunk_conv.weight", "conv_last.weight"} <= keys
    return old or new or bsrgan


def pickle_strings(path: str | os.PathLike) -> set[str] | None:
    """The strings a torch zip checkpoint's pickle pushes (its state dict's keys among them), read with pickletools
    without running the pickle; None for a file that is not a torch zip checkpoint (the legacy format too)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if m.filename.endswith("/data.pkl") or m.filename == "data.pkl"]
            if len(members) != 1 or members[0].file_size > MAX_PICKLE_BYTES:
                return None
            data = archive.read(members[0])
    except (OSError, zipfile.BadZipFile):
        return None
    strings = set()
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if isinstance(argument, str) and "UNICODE" in opcode.name:
                strings.add(argument)
    except Exception:  # noqa: BLE001 - a damaged pickle: not one we recognise
        return None
    return strings


def is_upscaler_pickle(path: str | os.PathLike) -> bool:
    """Whether a pickle file is a torch checkpoint of an RRDBNet (possibly wrapped in params_ema / params)."""
    strings = pickle_strings(path)
    return strings is not None and is_rrdbnet(strings)

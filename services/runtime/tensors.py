"""Tensor codec: torch tensors <-> latentwire.common.v1.Tensor (raw row-major little-endian bytes)."""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

from latentwire.common.v1 import tensor_pb2

from .errors import InvalidArgument

DataType = tensor_pb2.DataType

# torch dtype <-> wire dtype. bfloat16 has no numpy type: its bytes travel as int16 views.
_TORCH_TO_WIRE = {
    torch.float32: DataType.DATA_TYPE_FLOAT32,
    torch.float16: DataType.DATA_TYPE_FLOAT16,
    torch.bfloat16: DataType.DATA_TYPE_BFLOAT16,
    torch.float64: DataType.DATA_TYPE_FLOAT64,
    torch.int64: DataType.DATA_TYPE_INT64,
    torch.int32: DataType.DATA_TYPE_INT32,
    torch.uint8: DataType.DATA_TYPE_UINT8,
    torch.bool: DataType.DATA_TYPE_BOOL,
}
_WIRE_TO_TORCH = {wire: dt for dt, wire in _TORCH_TO_WIRE.items()}
_ITEMSIZE = {wire: torch.empty((), dtype=dt).element_size() for dt, wire in _TORCH_TO_WIRE.items()}

#: Largest number of dimensions a tensor on the wire may have.
MAX_RANK = 8
#: Most elements a shape may describe, zero-length dimensions counted as 1: a shape such as
#: [0, 2**62, 8] holds no bytes, but numpy and torch cannot make an array of it. A gRPC message
#: (at most 2 GiB) holds fewer elements than this anyway.
MAX_ELEMENTS = 2**31


def to_proto(tensor: torch.Tensor, name: str = "", into: tensor_pb2.Tensor | None = None) -> tensor_pb2.Tensor:
    """Encode a tensor (any device) as a wire Tensor: contiguous row-major, little-endian bytes. With ``into``
    (a Tensor field of a message being built), fill that field in place and return it: a message passed to a
    parent's constructor is copied whole, which for the denoiser's per-step latents is a megabyte a copy."""
    if tensor.dtype not in _TORCH_TO_WIRE:
        raise TypeError(f"tensor dtype {tensor.dtype} has no wire encoding")
    cpu = tensor.detach().to("cpu")
    # numpy makes the row-major copy: a torch .contiguous() here would start a second OpenMP
    # thread team on the event-loop thread, which slows the compute thread's parallel regions.
    array = (cpu.view(torch.int16) if cpu.dtype == torch.bfloat16 else cpu).numpy()
    array = np.ascontiguousarray(array)
    if sys.byteorder != "little":
        array = array.byteswap()
    message = tensor_pb2.Tensor() if into is None else into
    message.name, message.dtype, message.raw_contents = name, _TORCH_TO_WIRE[cpu.dtype], array.tobytes()
    message.shape[:] = list(cpu.shape)
    return message


def from_proto(
    message: tensor_pb2.Tensor,
    *,
    field: str,
    rank: int | None = None,
    dtypes: tuple[int, ...] | None = None,
    allow_nonfinite: bool = False,
) -> torch.Tensor:
    """Decode and validate a wire Tensor; a malformed one raises InvalidArgument naming ``field``.

    ``rank`` and ``dtypes`` restrict what the caller accepts; NaN and infinity are refused unless
    ``allow_nonfinite`` (scheduler state may hold an infinite sigma). The result is a CPU tensor that
    owns its memory (safe to keep after the request message is gone).
    """
    if message.dtype not in _WIRE_TO_TORCH:
        raise InvalidArgument(
            f"{field}: dtype {DataType.Name(message.dtype) if message.dtype in DataType.values() else message.dtype}"
            " is not supported; use DATA_TYPE_FLOAT32, DATA_TYPE_FLOAT16 or DATA_TYPE_BFLOAT16",
            reason="INVALID_TENSOR",
            metadata={"field": field},
        )
    if dtypes is not None and message.dtype not in dtypes:
        allowed = ", ".join(DataType.Name(d) for d in dtypes)
        raise InvalidArgument(
            f"{field}: dtype {DataType.Name(message.dtype)} is not accepted here; use one of {allowed}",
            reason="INVALID_TENSOR",
            metadata={"field": field},
        )
    shape = list(message.shape)
    if len(shape) > MAX_RANK or any(d < 0 for d in shape):
        raise InvalidArgument(
            f"{field}: shape {shape[:MAX_RANK]}{'...' if len(shape) > MAX_RANK else ''} is invalid; dimensions must be "
            f">= 0 and at most {MAX_RANK} of them ({len(shape)} sent)",
            reason="INVALID_TENSOR",
            metadata={"field": field},
        )
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise InvalidArgument(
            f"{field}: shape {shape[:MAX_RANK]} is too large; its dimensions (a 0 counted as 1) may multiply to at "
            f"most {MAX_ELEMENTS}",
            reason="INVALID_TENSOR",
            metadata={"field": field},
        )
    if rank is not None and len(shape) != rank:
        raise InvalidArgument(
            f"{field}: expected a rank-{rank} tensor, got shape {shape}",
            reason="INVALID_TENSOR",
            metadata={"field": field},
        )
    itemsize = _ITEMSIZE[message.dtype]
    expected = math.prod(shape) * itemsize
    if len(message.raw_contents) != expected:
        raise InvalidArgument(
            f"{field}: raw_contents holds {len(message.raw_contents)} bytes but shape {shape} of "
            f"{DataType.Name(message.dtype)} needs {expected}",
            reason="INVALID_TENSOR",
            metadata={"field": field},
        )
    torch_dtype = _WIRE_TO_TORCH[message.dtype]
    np_dtype = np.dtype(np.int16 if torch_dtype == torch.bfloat16 else torch.empty((), dtype=torch_dtype).numpy().dtype)
    array = np.frombuffer(message.raw_contents, dtype=np_dtype.newbyteorder("<")).reshape(shape)
    array = array.astype(np_dtype.newbyteorder("="), copy=True)
    # The finiteness check runs in numpy, not torch, for the same reason as in to_proto.
    if array.dtype.kind == "f":
        finite = bool(np.isfinite(array).all())
    elif torch_dtype == torch.bfloat16:  # exponent bits all ones: inf or NaN
        finite = not bool(((array.view(np.uint16) & 0x7F80) == 0x7F80).any())
    else:
        finite = True
    tensor = torch.from_numpy(array)
    if torch_dtype == torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    if not finite and not allow_nonfinite:
        raise InvalidArgument(
            f"{field}: contains NaN or infinite values", reason="INVALID_TENSOR", metadata={"field": field}
        )
    return tensor


def is_set(message: tensor_pb2.Tensor) -> bool:
    """Whether a Tensor field was filled in (proto3 message fields default to an empty message)."""
    return message.dtype != DataType.DATA_TYPE_UNSPECIFIED or len(message.shape) > 0 or len(message.raw_contents) > 0

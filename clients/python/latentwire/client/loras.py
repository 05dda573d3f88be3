"""LoRA weights for a request, from the CLI's ``NAME[:WEIGHT[:UNET_WEIGHT]]`` (A1111's ``<lora:NAME:te:unet>``)."""
from __future__ import annotations

from latentwire.common.v1 import lora_pb2

__all__ = ["lora_weight"]


def lora_weight(spec: str | lora_pb2.LoraWeight) -> lora_pb2.LoraWeight:
    """"NAME", "NAME:W" or "NAME:TE:UNET" (NAME may end in @VERSION or @ALIAS) as a LoraWeight; weight 1 when none.

    ValueError for a weight that is not a number."""
    if isinstance(spec, lora_pb2.LoraWeight):
        return spec
    name, *weights = spec.split(":")
    if not name or len(weights) > 2:
        raise ValueError(f"--lora {spec!r}: use NAME, NAME:WEIGHT or NAME:TE_WEIGHT:UNET_WEIGHT")
    try:
        numbers = [float(w) for w in weights]
    except ValueError:
        raise ValueError(f"--lora {spec!r}: the weight must be a number") from None
    entry = lora_pb2.LoraWeight(weight=numbers[0] if numbers else 1.0)
    entry.model.name = name
    if len(numbers) == 2:
        entry.unet_weight = numbers[1]
    return entry

"""Hires fix with an upscaler model from the registry (an ESRGAN-type network, registry kind MODEL_KIND_UPSCALER),
run on the VAE stage.

- ``is_model_reference``: whether a hires upscaler name that is not built in may name a registry model (checked
  at acceptance by ``pin_upscaler``, which pins it to "name@VERSION"; UNKNOWN_UPSCALER for a name the registry
  lacks or that is no upscaler, as for an unknown built-in name).
- ``upscale_png``: AUTOMATIC1111's ``Upscaler.upscale`` for a hires target (modules/upscaler.py, called by
  ``images.resize_image``): the model runs (VaeService.Upscale) until the image covers the target size, at most
  three times, then the result is resized to exactly the target with LANCZOS.
"""
from __future__ import annotations

import dataclasses
import io
import re

import grpc
from PIL import Image

from latentwire.client import hires as builtin
from latentwire.registry.v1 import registry_pb2
from latentwire.vae.v1 import vae_pb2, vae_pb2_grpc
from services.runtime.errors import InvalidArgument, NotFound, from_rpc_error, quote

#: A registry reference: NAME, NAME@VERSION or NAME@ALIAS (the registry's own rules check it further).
_REFERENCE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}(@[A-Za-z0-9_-]{1,128})?")
#: Model passes at most (A1111's Upscaler.upscale loop).
MAX_PASSES = 3


def is_model_reference(name: str) -> bool:
    """Whether ``name`` (not a built-in upscaler) can be a registry model reference."""
    return bool(_REFERENCE.fullmatch(name.strip()))


def unknown(name: str, why: str = "") -> InvalidArgument:
    """UNKNOWN_UPSCALER for a hires upscaler that is neither built in nor a registry upscaler model."""
    return InvalidArgument(
        f"hires upscaler {quote(name)} is not one latentwire runs{why}; use one of "
        f"{', '.join(builtin.upscaler_names())} or an upscaler model in the registry (`latentwire upscalers`)",
        reason="UNKNOWN_UPSCALER", metadata={"field": "hires.upscaler"})


async def pin_upscaler(params, stages, deadline):
    """``params`` with a model upscaler pinned to "name@VERSION" (the registry's kind checked); unchanged for a
    built-in upscaler or no hires fix."""
    fix = params.hires
    if fix is None or builtin.canonical_upscaler(fix.upscaler) is not None:
        return params
    if stages.registry is None:
        raise unknown(fix.upscaler, " (this orchestrator has no model registry for upscaler models)")
    try:
        response = await stages.registry.ResolveModel(
            registry_pb2.ResolveModelRequest(reference=fix.upscaler), timeout=deadline.remaining())
    except grpc.RpcError as error:
        failure = from_rpc_error(error, "registry")
        if isinstance(failure, (NotFound, InvalidArgument)):
            raise unknown(fix.upscaler) from None
        raise failure from None
    version = response.model_version
    if version.kind != registry_pb2.MODEL_KIND_UPSCALER:
        raise unknown(fix.upscaler, f" (the registry's model of that name is a "
                                    f"{registry_pb2.ModelKind.Name(version.kind)})")
    pinned = dataclasses.replace(fix, upscaler=f"{version.model_id}@{version.version}")
    return dataclasses.replace(params, hires=pinned)


async def upscale_png(replicas, png: bytes, width: int, height: int, upscaler: str, job) -> bytes:
    """The decoded first pass (``png``) brought to ``width`` x ``height`` with the registry upscaler model
    ``upscaler`` on the VAE stage, then LANCZOS (PNG, lossless, so the encode sees exactly these pixels)."""
    from .replicas import call_with_failover

    with Image.open(io.BytesIO(png)) as opened:
        image = opened.convert("RGB")
    # A1111's images.resize_image: the upscaler runs only when the target is larger than the image.
    if max(width / image.width, height / image.height) > 1.0:
        for _ in range(MAX_PASSES):
            size = image.size
            request = vae_pb2.UpscaleRequest(images=[png], job_id=job.job_id)
            request.upscaler.name = upscaler
            response = await call_with_failover(
                replicas, "vae", lambda replica: vae_pb2_grpc.VaeServiceStub(replica.channel).Upscale(
                    request, timeout=replicas.deadline.remaining()))
            png = response.png_images[0]
            with Image.open(io.BytesIO(png)) as opened:
                image = opened.convert("RGB")
            if image.size == size or (image.width >= width and image.height >= height):
                break
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()

"""VAE tiling and slicing for large images: decode (and encode) in overlapping tiles, one image of a batch at a time,
as diffusers' AutoencoderKL does after ``enable_tiling()`` and ``enable_slicing()``, without flipping those flags on
the VAE that concurrent jobs share.

diffusers' ``decode`` with both flags: each image of the batch alone (``z.split(1)``), and an image whose latents are
larger than ``tile_latent_min_size`` on a side through ``tiled_decode`` (tiles of ``tile_latent_min_size`` latent
pixels overlapping by ``tile_overlap_factor``, blended); ``encode`` likewise with ``_tiled_encode`` above
``tile_sample_min_size`` pixels. The tile sizes are the VAE's own (its config's sample_size), or, with the
service's --vae-tile-size, set on a shallow copy of the module for the call (the copy shares every layer and weight;
only its tile attributes differ), so a job never changes what another job's decode does.

Whether a request tiles: VaeTiling ON always, OFF never, UNSPECIFIED (automatic) when the image has more pixels than
the service's --vae-tile-above (default DEFAULT_TILE_ABOVE: a normal size never tiles).
"""
from __future__ import annotations

import copy

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from latentwire.common.v1 import preview_pb2

#: Pixels (width x height) above which a decode or encode tiles by default: 1536 x 1536 (an SDXL image at 1024 x 1024
#: and a 2x hires fix of 768 x 768 decode whole).
DEFAULT_TILE_ABOVE = 1536 * 1536


def use_tiles(mode: int, width: int, height: int, tile_above: int) -> bool:
    """Whether a request's decode or encode of a ``width`` x ``height`` image tiles (VaeTiling ``mode``)."""
    if mode == preview_pb2.VAE_TILING_ON:
        return True
    if mode == preview_pb2.VAE_TILING_OFF:
        return False
    return width * height > tile_above


def supports_tiling(vae) -> bool:
    """Whether the VAE class has diffusers' tiled decode (AutoencoderKL does)."""
    return hasattr(vae, "tiled_decode") and hasattr(vae, "_tiled_encode")


def _tiling_vae(vae, tile_size: int):
    """The VAE whose tile attributes a tiled call reads: ``vae`` itself, or a shallow copy with tiles of
    ``tile_size`` pixels (as AutoencoderKL.__init__ derives tile_latent_min_size from the sample size)."""
    if not tile_size:
        return vae
    view = copy.copy(vae)  # shares the submodules (and so the weights) of the shared VAE
    view.tile_sample_min_size = tile_size
    view.tile_latent_min_size = int(tile_size / (2 ** (len(vae.config.block_out_channels) - 1)))
    return view


def decode(vae, z: torch.Tensor, tile_size: int = 0) -> torch.Tensor:
    """AutoencoderKL.decode(z) as with enable_slicing() and enable_tiling(): images one at a time, each through
    tiled_decode when its latents exceed one tile. Returns the decoded sample."""
    tiler = _tiling_vae(vae, tile_size)
    decoded = []
    for z_slice in z.split(1):
        # AutoencoderKL._decode's test, on the tile attributes of the call.
        if z_slice.shape[-1] > tiler.tile_latent_min_size or z_slice.shape[-2] > tiler.tile_latent_min_size:
            decoded.append(tiler.tiled_decode(z_slice, return_dict=False)[0])
        else:
            decoded.append(vae.decode(z_slice, return_dict=False)[0])
    return torch.cat(decoded)


def encode(vae, x: torch.Tensor, tile_size: int = 0) -> DiagonalGaussianDistribution:
    """AutoencoderKL.encode(x).latent_dist as with enable_slicing() and enable_tiling()."""
    tiler = _tiling_vae(vae, tile_size)
    encoded = []
    for x_slice in x.split(1):
        height, width = x_slice.shape[-2:]
        if width > tiler.tile_sample_min_size or height > tiler.tile_sample_min_size:
            # AutoencoderKL._encode's tiled branch (_tiled_encode: the tiled_encode diffusers keeps after 1.0).
            encoded.append(tiler._tiled_encode(x_slice))
        else:
            encoded.append(vae.encode(x_slice).latent_dist.parameters)
    return DiagonalGaussianDistribution(torch.cat(encoded))

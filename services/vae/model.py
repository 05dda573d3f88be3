"""Decoding latents into images with a Stable Diffusion model's VAE, as the pipeline does."""
from __future__ import annotations

import io

import diffusers
import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from latentwire.services.runtime.config import ModelSpec
from latentwire.services.runtime.errors import InvalidArgument
from latentwire.services.runtime.models import check_pipeline_folder, use_safetensors


class VaeModel:
    """The VAE of one model folder, on one device and dtype."""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, allow_pickle: bool):
        index = check_pipeline_folder(spec.path, ("vae",), allow_pickle)
        vae_cls = getattr(diffusers, index["vae"][1])
        self.vae = vae_cls.from_pretrained(
            spec.path, subfolder="vae", torch_dtype=dtype, use_safetensors=use_safetensors(allow_pickle)
        ).to(device)
        self.vae.eval()
        self.scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.scale_factor)
        self.device = device
        self.dtype = dtype

    def check_latents(self, latents: torch.Tensor, *, max_image_size: int, max_batch: int) -> None:
        """Refuse latents this VAE cannot decode."""
        batch, channels, height, width = latents.shape
        expected = self.vae.config.latent_channels
        if channels != expected or height < 1 or width < 1 or batch < 1:
            raise InvalidArgument(
                f"latents has shape {list(latents.shape)}; this VAE needs [batch >= 1, {expected}, height >= 1, width >= 1]",
                reason="INVALID_TENSOR",
                metadata={"field": "latents"},
            )
        if batch > max_batch:
            raise InvalidArgument(f"latents holds {batch} images; at most {max_batch} per request", reason="BATCH_TOO_LARGE")
        if max(height, width) * self.scale_factor > max_image_size:
            raise InvalidArgument(
                f"latents decode to {width * self.scale_factor}x{height * self.scale_factor} pixels; "
                f"this service allows at most {max_image_size} per side",
                reason="IMAGE_TOO_LARGE",
            )

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents (as the denoiser returns them) -> float32 pixels in [0, 1], shape [batch, height, width, 3]."""
        latents = latents.to(device=self.device, dtype=self.dtype)
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * image.shape[0])


def encode_png(pixels: np.ndarray, text: dict[str, str]) -> bytes:
    """One [height, width, 3] float image in [0, 1] -> 8-bit RGB PNG with text chunks.

    Quantised as diffusers' numpy_to_pil does: (x * 255).round().
    """
    image = Image.fromarray((pixels * 255).round().astype("uint8"))
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()

"""A Stable Diffusion model's VAE: decoding latents into images, and encoding init images and
masks for image-to-image and inpainting, as diffusers' pipelines do."""
from __future__ import annotations

import io
from dataclasses import dataclass

import diffusers
import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from services.runtime import images, interrupt, limits
from services.runtime.config import ModelSpec
from services.runtime.errors import InvalidArgument, quote
from services.runtime.jobs import StepTimes, Work
from services.runtime.models import check_pipeline_folder, use_safetensors


@dataclass(frozen=True)
class Encoded:
    """An init image prepared for the denoiser: latent distributions (unsampled) and the mask at latent size."""

    image_mean: torch.Tensor
    image_std: torch.Tensor
    width: int
    height: int
    masked_mean: torch.Tensor | None = None
    masked_std: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class VaeModel:
    """The VAE of one model folder, on one device and dtype."""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, allow_pickle: bool):
        index = check_pipeline_folder(spec.path, ("vae",), allow_pickle)
        vae_cls = getattr(diffusers, index["vae"][1])
        self.vae = vae_cls.from_pretrained(
            spec.path, subfolder="vae", torch_dtype=dtype, use_safetensors=use_safetensors(allow_pickle)
        ).to(device)
        self.vae.eval()
        # Cancellation and deadlines take effect between the encoder's and decoder's blocks and attention
        # slices: one encode of a large image takes minutes on CPU (the mid block's attention over every pixel).
        interrupt.install(self.vae)
        #: How long an encode and a decode take, by size, from this model's completed jobs.
        self.encode_times = StepTimes()
        self.decode_times = StepTimes()
        self.scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.scale_factor)
        # The inpainting pipeline's mask processor: grayscale, binarised at 0.5, not normalised.
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
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
        limits.check_batch(batch, max_batch, "latents")
        if max(height, width) * self.scale_factor > max_image_size:
            raise InvalidArgument(
                f"latents decode to {width * self.scale_factor}x{height * self.scale_factor} pixels; "
                f"this service allows at most {max_image_size} per side",
                reason="IMAGE_TOO_LARGE",
            )

    def check_size(self, image: Image.Image, mask: Image.Image | None, width: int, height: int, *,
                   max_image_size: int) -> tuple[int, int]:
        """The size the image is prepared at: ``width`` x ``height``, or 0 for the image's own rounded down
        to a multiple of the scale factor (as the pipelines' image processor does)."""
        if mask is not None:
            limits.check_mask_size(mask.size, image.size, "image")
        for name, value in (("width", width), ("height", height)):
            limits.check_size(name, value, max_image_size, zero_means="the image's own size")
            if value % self.scale_factor:  # a VAE downsampling more than 8x
                raise InvalidArgument(f"{name} is {value}; use 0 or a positive multiple of {self.scale_factor} pixels",
                                      reason="INVALID_SIZE", metadata={"field": name})
        height, width = self.image_processor.get_default_height_width(image, height or None, width or None)
        if width < self.scale_factor or height < self.scale_factor:
            raise InvalidArgument(f"image is too small: {image.width}x{image.height} pixels", reason="IMAGE_TOO_SMALL")
        if max(width, height) > max_image_size:
            raise InvalidArgument(f"image would be encoded at {width}x{height} pixels; this service allows at most "
                                  f"{max_image_size} per side", reason="IMAGE_TOO_LARGE")
        return width, height

    def encode_work(self, width: int, height: int, with_mask: bool) -> Work:
        """An encode's work for the estimate: pixels encoded (the masked image is a second encode)."""
        return Work(self.encode_times, width * height * (2 if with_mask else 1))

    def decode_work(self, latents: torch.Tensor) -> Work:
        """A decode's work for the estimate: pixels decoded."""
        batch, _, height, width = latents.shape
        return Work(self.decode_times, batch * height * width * self.scale_factor ** 2)

    @torch.inference_mode()
    def encode(self, image: Image.Image, mask: Image.Image | None, width: int, height: int) -> Encoded:
        """Prepare an init image (and mask) as StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline do.

        The image is resized to ``width`` x ``height`` and normalised to [-1, 1]; the mask is binarised; the
        masked image is the image where the mask is below 0.5; the mask is resized to the latents' size.
        Distributions are returned unsampled: the pipelines sample them from the job's generator.
        """
        init_image = self.image_processor.preprocess(images.to_rgb(image), height=height, width=width)
        init_image = init_image.to(dtype=torch.float32)
        mean, std = self._distribution(init_image)
        if mask is None:
            return Encoded(mean, std, width, height)
        mask_condition = self.mask_processor.preprocess(mask, height=height, width=width)
        masked_image = init_image * (mask_condition < 0.5)
        masked_mean, masked_std = self._distribution(masked_image)
        latent_mask = torch.nn.functional.interpolate(
            mask_condition, size=(height // self.scale_factor, width // self.scale_factor)
        )
        return Encoded(mean, std, width, height, masked_mean, masked_std, latent_mask)

    def _distribution(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distribution = self.vae.encode(image.to(device=self.device, dtype=self.dtype)).latent_dist
        return distribution.mean, distribution.std

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents (as the denoiser returns them) -> float32 pixels in [0, 1], shape [batch, height, width, 3]."""
        latents = latents.to(device=self.device, dtype=self.dtype)
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * image.shape[0])


#: Longest PNG text keyword, in characters (PNG specification, tEXt/iTXt chunks).
MAX_PNG_KEYWORD = 79


def _png_keyword_char(char: str) -> bool:
    """A character a PNG keyword may hold: printable Latin-1 (32-126, 161-255)."""
    return 32 <= ord(char) <= 126 or 161 <= ord(char) <= 255


def check_png_texts(texts: list[dict[str, str]]) -> None:
    """PNG text keywords are 1-79 printable Latin-1 characters (the PNG specification); any value is fine:
    one outside Latin-1 goes as an iTXt chunk (UTF-8), as Pillow's PngInfo.add_text does."""
    for i, entries in enumerate(texts):
        for key in entries:
            field = f"png_texts[{i}]"
            if not 1 <= len(key) <= MAX_PNG_KEYWORD:
                raise InvalidArgument(
                    f"{field} has a key of {len(key)} characters; PNG text keys are 1 to {MAX_PNG_KEYWORD} characters",
                    reason="INVALID_PNG_TEXT", metadata={"field": field})
            if not all(_png_keyword_char(c) for c in key):
                raise InvalidArgument(
                    f"{field} key {quote(key)} is not printable Latin-1; PNG text keys take only Latin-1 letters, "
                    "digits, spaces and punctuation (the value may be any text)",
                    reason="INVALID_PNG_TEXT", metadata={"field": field})


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

"""A model's VAE: decoding latents into images, and encoding init images and masks for image-to-image and
inpainting, as each family's diffusers pipelines do (SD 1.x/2.x, SDXL and its refiner, SD3, Flux).

What differs by family (services/runtime/families.py, read from the folder's model_index.json):

- unscaling before decode: SD ``latents / scaling_factor``; SDXL the same, or ``latents * latents_std /
  scaling_factor + latents_mean`` when the VAE config has both (StableDiffusionXLPipeline's decode branch);
  SD3 and Flux ``latents / scaling_factor + shift_factor``;
- SDXL's float32 upcast (``force_upcast``): decode upcasts a float16 VAE, encode upcasts whatever the dtype;
- image sizes: Flux's image processors round to ``vae_scale_factor * 2`` (its latents are packed in 2x2
  patches), the others to ``vae_scale_factor``.
"""
from __future__ import annotations

import copy
import io
from dataclasses import dataclass

import diffusers
import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from services.runtime import families, images, interrupt, limits
from services.runtime.config import ModelSpec
from services.runtime.errors import InvalidArgument, ModelFolderError, quote
from services.runtime.jobs import StepTimes, Work
from services.runtime.models import check_pipeline_folder, use_safetensors

from . import tiled


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


#: Families whose pipelines upcast the VAE to float32 when its config says force_upcast (the SDXL pipelines).
_UPCASTING_FAMILIES = ("sdxl", "sdxl-refiner")
#: Families whose pipelines shift latents by the VAE's shift_factor (StableDiffusion3Pipeline, FluxPipeline).
_SHIFTING_FAMILIES = ("sd3", "flux")


def upcasting(family: families.Family, dtype: torch.dtype, force_upcast: bool) -> tuple[bool, bool]:
    """Whether a VAE of ``family`` loaded in ``dtype`` decodes and encodes in float32, as diffusers does.

    Decode: StableDiffusionXLPipeline's ``needs_upcasting = vae.dtype == torch.float16 and
    vae.config.force_upcast``. Encode: StableDiffusionXLImg2ImgPipeline.prepare_latents and
    StableDiffusionXLInpaintPipeline._encode_vae_image upcast whenever ``force_upcast`` is set (so a bfloat16 VAE
    decodes in bfloat16 but encodes in float32). Other families never upcast; float32 needs no upcast.
    Returns (decode_upcast, encode_upcast).
    """
    upcast = family.name in _UPCASTING_FAMILIES and bool(force_upcast) and dtype != torch.float32
    return upcast and dtype == torch.float16, upcast


class VaeModel:
    """The VAE of one model folder, on one device and dtype."""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, allow_pickle: bool):
        index = check_pipeline_folder(spec.path, ("vae",), allow_pickle)
        try:
            self.family = families.family_of_index(index)
        except ValueError as error:
            raise ModelFolderError(spec.path, str(error)) from None
        vae_cls = getattr(diffusers, index["vae"][1])
        vae = vae_cls.from_pretrained(
            spec.path, subfolder="vae", torch_dtype=dtype, use_safetensors=use_safetensors(allow_pickle)
        ).to(device)
        vae.eval()
        config = vae.config
        self.decode_upcast, self.encode_upcast = upcasting(self.family, vae.dtype, config.force_upcast)
        # The pipelines upcast with vae.to(torch.float32): the float32 weights are the loaded ones, rounded to
        # the service's dtype first. A second float32 copy only when one direction still runs in the service's
        # dtype (bfloat16 decodes); otherwise the one VAE is upcast once, here, and never cast back, so
        # concurrent jobs never see it change dtype mid-call.
        # (Module.float() casts as ModelMixin.to(torch.float32) does, without its warning about fp32 modules.)
        if self.decode_upcast and self.encode_upcast:
            vae = vae.float()
        upcast = copy.deepcopy(vae).float() if self.decode_upcast != self.encode_upcast else vae
        #: The VAE with the model's config, in the service's dtype unless both directions upcast.
        self.vae = vae
        self.decoder = upcast if self.decode_upcast else vae
        self.encoder = upcast if self.encode_upcast else vae
        # Cancellation and deadlines take effect between the encoder's and decoder's blocks and attention
        # slices: one encode of a large image takes minutes on CPU (the mid block's attention over every pixel).
        for module in {id(m): m for m in (self.vae, self.decoder, self.encoder)}.values():
            interrupt.install(module)
        #: How long an encode and a decode take, by size, from this model's completed jobs.
        self.encode_times = StepTimes()
        self.decode_times = StepTimes()
        #: Pixels per latent pixel (the VAE's downsampling).
        self.scale_factor = 2 ** (len(config.block_out_channels) - 1)
        #: Image sizes are multiples of this: Flux's image processors use vae_scale_factor * 2 (2x2 packing).
        self.size_multiple = self.scale_factor * 2 if self.family.name == "flux" else self.scale_factor
        self.scaling_factor = float(config.scaling_factor)
        #: The shift the family's pipeline applies (SD3, Flux); 0 for the others, whose pipelines ignore it.
        shift = getattr(config, "shift_factor", None) if self.family.name in _SHIFTING_FAMILIES else None
        self.shift_factor = float(shift or 0.0)
        # SDXL's per-channel latent statistics (StableDiffusionXLPipeline's "denormalize" branch), when both set.
        self.latents_mean = self.latents_std = None
        if self.family.name in _UPCASTING_FAMILIES and getattr(config, "latents_mean", None) is not None \
                and getattr(config, "latents_std", None) is not None:
            self.latents_mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1)
            self.latents_std = torch.tensor(config.latents_std).view(1, -1, 1, 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.size_multiple,
                                                 vae_latent_channels=config.latent_channels)
        # The inpainting pipelines' mask processor: grayscale, binarised at 0.5, not normalised.
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.size_multiple, vae_latent_channels=config.latent_channels, do_normalize=False,
            do_binarize=True, do_convert_grayscale=True,
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
        to a multiple of the size multiple (as the family's image processor does; Flux: vae_scale_factor * 2)."""
        if mask is not None:
            limits.check_mask_size(mask.size, image.size, "image")
        for name, value in (("width", width), ("height", height)):
            limits.check_size(name, value, max_image_size, zero_means="the image's own size")
            if value % self.size_multiple:  # a VAE downsampling more than 8x, or Flux's 2x2 packing
                raise InvalidArgument(f"{name} is {value}; use 0 or a positive multiple of {self.size_multiple} pixels",
                                      reason="INVALID_SIZE", metadata={"field": name})
        height, width = self.image_processor.get_default_height_width(image, height or None, width or None)
        if width < self.size_multiple or height < self.size_multiple:
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
    def encode(self, image: Image.Image, mask: Image.Image | None, width: int, height: int,
               tile_size: int | None = None) -> Encoded:
        """Prepare an init image (and mask) as the family's image-to-image / inpainting pipeline does.

        The image is resized to ``width`` x ``height`` and normalised to [-1, 1]; the mask is binarised; the
        masked image is the image where the mask is below 0.5; the mask is resized to the latents' size
        (unpacked: Flux's denoiser packs it). Distributions are returned unsampled: the pipelines sample them
        from the job's generator, then scale: ``(sample - shift_factor) * scaling_factor``. With ``tile_size`` (0:
        the VAE's own tiles) the images encode in tiles, one at a time (tiled.py).
        """
        init_image = self.image_processor.preprocess(images.to_rgb(image), height=height, width=width)
        init_image = init_image.to(dtype=torch.float32)
        mean, std = self._distribution(init_image, tile_size)
        if mask is None:
            if self.latents_mean is not None:
                # StableDiffusionXLImg2ImgPipeline.prepare_latents: (sample - latents_mean) * scaling / latents_std.
                # The contract has one scalar scaling and shift, so the per-channel statistics go into the
                # distribution: sampling it and scaling gives the same latents (to rounding). The inpainting
                # pipeline (_encode_vae_image) does not use them, hence only here.
                latents_mean = self.latents_mean.to(device=mean.device, dtype=mean.dtype)
                latents_std = self.latents_std.to(device=mean.device, dtype=mean.dtype)
                mean, std = (mean - latents_mean) / latents_std, std / latents_std
            return Encoded(mean, std, width, height)
        mask_condition = self.mask_processor.preprocess(mask, height=height, width=width)
        masked_image = init_image * (mask_condition < 0.5)
        masked_mean, masked_std = self._distribution(masked_image, tile_size)
        latent_mask = torch.nn.functional.interpolate(
            mask_condition, size=(height // self.scale_factor, width // self.scale_factor)
        )
        return Encoded(mean, std, width, height, masked_mean, masked_std, latent_mask)

    def _distribution(self, image: torch.Tensor, tile_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # SDXL's force_upcast: the image goes in as float32 too (image.float()), to the float32 VAE.
        image = image.to(device=self.device, dtype=self.encoder.dtype)
        if tile_size is not None:
            distribution = tiled.encode(self.encoder, image, tile_size)
        else:
            distribution = self.encoder.encode(image).latent_dist
        return distribution.mean, distribution.std

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the denoiser returns them -> what the VAE decodes (the family pipeline's arithmetic)."""
        if self.latents_mean is not None:
            # StableDiffusionXLPipeline: "unscale/denormalize the latents" with the mean and std when both set.
            latents_mean = self.latents_mean.to(latents.device, latents.dtype)
            latents_std = self.latents_std.to(latents.device, latents.dtype)
            return latents * latents_std / self.scaling_factor + latents_mean
        latents = latents / self.vae.config.scaling_factor
        if self.family.name in _SHIFTING_FAMILIES:
            # StableDiffusion3Pipeline / FluxPipeline: (latents / scaling_factor) + shift_factor.
            latents = latents + self.shift_factor
        return latents

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, tile_size: int | None = None) -> np.ndarray:
        """Latents (as the denoiser returns them) -> float32 pixels in [0, 1], shape [batch, height, width, 3]; with
        ``tile_size`` (0: the VAE's own tiles) in tiles, one image at a time (tiled.py)."""
        # An upcast decode casts the latents to float32 first, as StableDiffusionXLPipeline does.
        latents = latents.to(device=self.device, dtype=self.decoder.dtype)
        if tile_size is not None:
            image = tiled.decode(self.decoder, self.unscale(latents), tile_size)
        else:
            image = self.decoder.decode(self.unscale(latents), return_dict=False)[0]
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

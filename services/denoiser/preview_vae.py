"""Tiny preview VAEs: live previews by method "tiny-vae", decoded by a diffusers AutoencoderTiny (TAESD, TAESDXL,
TAESD3, TAEF1) as the family's diffusers pipeline decodes when its ``vae`` is one.

Which preview VAE a run uses:

- the request's ``previews.preview_vae``: a registry model of kind MODEL_KIND_PREVIEW_VAE;
- else the denoiser's ``--preview-vae FAMILY=NAME`` for the model's family (as SD.Next picks TAESD, TAESDXL, TAESD3
  or TAEF1 by the model's type once "TAESD" is the preview method): NAME a registry reference, or a local
  AutoencoderTiny folder given as a path (anything with a '/'); "sdxl"'s also serves the SDXL refiner, whose
  latents are SDXL's, unless "sdxl-refiner" has its own;
- else the run is refused (FAILED_PRECONDITION, PREVIEW_VAE_NOT_CONFIGURED).

Registry preview VAEs are resolved on each request (an alias may move) and fetched through the service's model
store into its digest-keyed cache (``ModelStore.fetch_of_kind``); loaded ones are kept per version ("name@VERSION")
in a small cache every job shares: decoding changes nothing in the module, so concurrent jobs may use one.

Decoding (``to_pixels``) copies the pipelines' last steps: ``latents / vae.config.scaling_factor`` for SD 1.x/2.x
(StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline: an AutoencoderTiny has no latents_mean);
``latents / scaling_factor + shift_factor`` for SD3 and Flux (Flux's packed latents are unpacked first, by
preview.emitter, with the model's own VAE scale as FluxPipeline does); then ``vae.decode`` and
``VaeImageProcessor.postprocess`` (denormalised, clamped) quantised as its ``numpy_to_pil`` does (x 255, rounded).
A batch previews as one image, its samples side by side, as the approx method's previews do.
"""
from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderTiny
from diffusers.image_processor import VaeImageProcessor

from services.runtime.errors import ConfigurationError, FailedPrecondition, InvalidArgument, ModelFolderError, quote
from services.runtime.families import FAMILIES
from services.runtime.models import check_model_folder

log = logging.getLogger(__name__)

#: The registry kind of a preview VAE.
KIND = "MODEL_KIND_PREVIEW_VAE"
#: Preview VAEs kept loaded per process (a TAESD is 2.4M parameters, ~10 MB in float32).
CACHE_SIZE = 8
#: The families whose pipelines add the VAE's shift_factor after scaling (SD3 and Flux).
_SHIFTED = ("sd3", "flux")
#: Families whose --preview-vae serves another family with the same latents when that one has none of its own.
_FALLBACK = {"sdxl-refiner": "sdxl"}
#: Only postprocess is used: the scale factor does not matter.
_PROCESSOR = VaeImageProcessor()


@dataclass(frozen=True)
class PreviewVae:
    """A loaded preview VAE: its key ("name@VERSION", or the local folder's name) and the module."""

    key: str
    vae: AutoencoderTiny

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)


def parse_defaults(values: list[str] | None) -> dict[str, str]:
    """``--preview-vae`` values, each FAMILY=NAME (NAME: a registry reference, or a folder path with a '/'), by
    family name. Raises ConfigurationError saying which value is wrong, so the service refuses to start."""
    defaults: dict[str, str] = {}
    for value in values or []:
        family, sep, name = (part.strip() for part in value.partition("="))
        if not sep or not family or not name:
            raise ConfigurationError(f"--preview-vae {quote(value)}: give FAMILY=NAME, e.g. sd=taesd or "
                                     "flux=taef1 (NAME a registry model or an AutoencoderTiny folder path)")
        if family not in FAMILIES:
            raise ConfigurationError(f"--preview-vae {quote(value)}: {quote(family)} is not a model family; use one "
                                     f"of {', '.join(FAMILIES)}")
        if family in defaults:
            raise ConfigurationError(f"--preview-vae {quote(value)}: family {family} is given twice")
        if "/" in name:
            folder = Path(name).expanduser()
            if not folder.is_dir():
                raise ConfigurationError(f"--preview-vae {quote(value)}: no such folder")
        defaults[family] = name
    return defaults


class PreviewVaes:
    """The preview VAEs of one denoiser: its configured defaults and the loaded ones, shared by every job."""

    def __init__(self, defaults: dict[str, str], store, device: torch.device, dtype: torch.dtype,
                 size: int = CACHE_SIZE):
        self.defaults = dict(defaults)
        self.store = store  # the service's ModelStore: registry client and model cache
        self.device, self.dtype, self.size = device, dtype, size
        self._loaded: collections.OrderedDict[str, PreviewVae] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)

    def for_run(self, name: str, model) -> PreviewVae:
        """The preview VAE a run of ``model`` uses: ``name`` (the request's previews.preview_vae) or the configured
        one for the model's family, loaded and checked against the model's latent channels (blocking)."""
        family = model.family.name
        configured = not name
        if configured:
            name = self.defaults.get(family) or self.defaults.get(_FALLBACK.get(family, ""), "")
            if not name:
                raise FailedPrecondition(
                    f"this denoiser has no preview VAE configured for {model.family.title} models; name one in "
                    "previews.preview_vae (a registry model of kind MODEL_KIND_PREVIEW_VAE), start the denoiser with "
                    f"--preview-vae {family}=NAME, or use previews.method approx",
                    reason="PREVIEW_VAE_NOT_CONFIGURED", metadata={"field": "previews.preview_vae", "family": family})
        if configured and "/" in name:
            preview_vae = self._local(name)
        else:
            key, folder = self.store.fetch_of_kind(name, KIND)
            preview_vae = self._load(key, folder)
        if preview_vae.latent_channels != model.latent_channels:
            problem = (f"preview VAE {quote(preview_vae.key)} decodes latents of {preview_vae.latent_channels} "
                       f"channels; this {model.family.title} model's have {model.latent_channels}")
            if configured:
                raise FailedPrecondition(f"{problem}: the denoiser's --preview-vae {family}=... names the wrong one; "
                                         "name a fitting one in previews.preview_vae, or use previews.method approx",
                                         reason="PREVIEW_VAE_MISMATCH", metadata={"family": family})
            raise InvalidArgument(f"{problem}; name the preview VAE made for this model's family (TAESD for SD "
                                  "1.x/2.x, TAESDXL for SDXL, TAESD3 for SD3, TAEF1 for Flux)",
                                  reason="PREVIEW_VAE_MISMATCH",
                                  metadata={"field": "previews.preview_vae", "family": family})
        return preview_vae

    def _local(self, path: str) -> PreviewVae:
        """A configured local AutoencoderTiny folder."""
        folder = Path(path).expanduser()
        return self._load(folder.name, folder)

    def _load(self, key: str, folder: Path) -> PreviewVae:
        """The preview VAE ``key`` from ``folder``, loaded once (least recently used dropped beyond the cache)."""
        with self._load_locks[key]:  # two jobs asking for one new preview VAE load it once
            with self._lock:
                if key in self._loaded:
                    self._loaded.move_to_end(key)
                    return self._loaded[key]
            try:
                config = check_model_folder(folder, allow_pickle=False)
            except ModelFolderError as error:
                raise error.for_model(key) from None
            if config.get("_class_name") != "AutoencoderTiny":
                raise FailedPrecondition(f"preview VAE {quote(key)} is not a diffusers AutoencoderTiny folder (its "
                                         "config.json names another class); import a TAESD-type model",
                                         reason="PREVIEW_VAE_INVALID", metadata={"model": key})
            log.info("loading preview VAE %r on %s", key, self.device)
            try:
                vae = AutoencoderTiny.from_pretrained(folder, torch_dtype=self.dtype, use_safetensors=True)
            except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
                log.warning("preview VAE %s did not load: %s", key, error)  # may name server paths
                raise FailedPrecondition(f"preview VAE {quote(key)} does not load as an AutoencoderTiny (its config "
                                         "and weights do not fit); import a TAESD-type model",
                                         reason="PREVIEW_VAE_INVALID", metadata={"model": key}) from None
            loaded = PreviewVae(key, vae.to(self.device).eval())
            with self._lock:
                self._loaded[key] = loaded
                while len(self._loaded) > self.size:
                    self._loaded.popitem(last=False)
            return loaded


@torch.inference_mode()
def decode(latents: torch.Tensor, family: str, preview_vae: PreviewVae) -> torch.Tensor:
    """[batch, channels, h, w] (unpacked) latents -> [batch, 3, H, W] images in [-1, 1], as the family's pipeline
    decodes with an AutoencoderTiny as its vae."""
    vae = preview_vae.vae
    latents = latents.to(vae.device, vae.dtype)
    # Copied from StableDiffusion3Pipeline.__call__ / FluxPipeline.__call__ (output_type != "latent").
    if family in _SHIFTED:
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
    # Copied from StableDiffusionPipeline.__call__ / StableDiffusionXLPipeline.__call__ (no latents_mean).
    else:
        latents = latents / vae.config.scaling_factor
    return vae.decode(latents, return_dict=False)[0]


@torch.inference_mode()
def to_pixels(latents: torch.Tensor, family: str, preview_vae: PreviewVae) -> np.ndarray:
    """The preview of a step's (unpacked) latents: one [H, W * batch, 3] uint8 image, samples side by side, each
    as VaeImageProcessor.postprocess(..., output_type="pil") makes it."""
    images = _PROCESSOR.postprocess(decode(latents, family, preview_vae), output_type="np")  # [batch, H, W, 3]
    return np.concatenate(list((images * 255).round().astype("uint8")), axis=1)  # as numpy_to_pil quantises

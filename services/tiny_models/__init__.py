"""Models built locally with random weights, for tests and benchmarks (no model hub access).

- build_clip_tokenizer(): a deterministic CLIP-style byte-level BPE tokenizer (< 1000 ids).
- build_t5_tokenizer(): a deterministic T5-style unigram tokenizer (t5_tokenizer.py).
- create_tiny_sd(path, full_size=False, seed=0): write a diffusers Stable Diffusion folder.
- create_tiny_model(path, family, seed=0): a tiny folder of any family in FAMILIES (families.py):
  sd15, sdxl / sdxl-refiner (create_tiny_sdxl, sdxl.py), sd3 (create_tiny_sd3, sd3.py),
  flux (create_tiny_flux, flux.py); folder.py writes them all atomically.
- default_model_path() / ensure_default_model(): the shared tiny model under $LATENTWIRE_HOME.
- create_tiny_classifier(path, full_size=False, seed=0): write a transformers MobileViT classifier folder;
  default_classifier_path() / ensure_default_classifier(): the shared tiny one (mobilevit.py).
- create_tiny_controlnet(path, full_size=False, seed=0, family="sd15"): write a diffusers ControlNetModel folder
  (family "sdxl": one for the tiny SDXL base, with its "text_time" added conditioning);
  default_controlnet_path() / ensure_default_controlnet(): the shared tiny one (controlnet.py).
- create_tiny_preview_vae(path, kind="taesd", full_size=False, seed=0): write a diffusers AutoencoderTiny folder,
  a tiny preview VAE ("taesd": 4 latent channels; "taesd3", "taef1": 16); also create_tiny_model(path, kind)
  (preview_vae.py).
- create_tiny_upscaler(path, scale=4, layout="new", seed=0): write a tiny ESRGAN-type (RRDBNet) upscaler as one
  .safetensors file, BasicSR's or ESRGAN's old key layout (esrgan.py).
"""
from services.runtime.image_processors import choose_pil_image_processors

choose_pil_image_processors()  # before diffusers is imported: see services/runtime/image_processors.py

from .stable_diffusion import create_tiny_sd, default_model_path, ensure_default_model
from .mobilevit import create_tiny_classifier, default_classifier_path, ensure_default_classifier
from .controlnet import create_tiny_controlnet, default_controlnet_path, ensure_default_controlnet
from .tokenizer import build_clip_tokenizer
from .t5_tokenizer import build_t5_tokenizer
from .families import FAMILIES, create_tiny_model
from .sdxl import create_tiny_sdxl
from .sd3 import create_tiny_sd3
from .flux import create_tiny_flux
from .preview_vae import create_tiny_preview_vae
from .esrgan import create_tiny_upscaler

__all__ = ["build_clip_tokenizer", "build_t5_tokenizer", "create_tiny_sd", "default_model_path", "ensure_default_model",
           "FAMILIES", "create_tiny_model", "create_tiny_sdxl", "create_tiny_sd3", "create_tiny_flux",
           "create_tiny_classifier", "default_classifier_path", "ensure_default_classifier",
           "create_tiny_controlnet", "default_controlnet_path", "ensure_default_controlnet",
           "create_tiny_preview_vae", "create_tiny_upscaler"]

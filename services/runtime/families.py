"""Model families: what a diffusers pipeline folder is (SD 1.x/2.x, SDXL, its refiner, SD3, Flux), read from its
model_index.json, and what each family's pipeline defaults to.

Every stage asks this one module: the text encoder which encoders a model has, the denoiser which loop runs it,
the VAE how it scales latents, the registry which kind a folder is. Nothing here imports torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from latentwire.client.families import family_name_of_index

#: Component names of text encoders (with their tokenizers "tokenizer", "tokenizer_2", ...), in pipeline order.
TEXT_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class Family:
    """One model family and its pipeline's defaults."""

    #: "sd" (SD 1.x/2.x), "sdxl", "sdxl-refiner", "sd3" or "flux".
    name: str
    #: Human name, for messages and the README.
    title: str
    #: diffusers pipeline class of text-to-image (image-to-image for the refiner), the conformance reference.
    pipeline: str
    #: The denoising network's component: "unet" or "transformer".
    denoiser: str
    #: Guidance scale the pipeline's __call__ defaults to.
    default_guidance_scale: float
    #: Guidance embedded in the model (Flux): no classifier-free guidance, no negative prompt.
    guidance_distilled: bool
    #: Registry kind (latentwire.registry.v1.ModelKind name) of a version of this family.
    registry_kind: str
    #: Default T5 tokens per prompt (max_sequence_length), 0 without T5.
    max_sequence_length: int = 0

    @property
    def multi_encoder(self) -> bool:
        """Whether the text encoder returns per-encoder embeddings (every family but SD 1.x/2.x)."""
        return self.name != "sd"


SD = Family("sd", "Stable Diffusion 1.x/2.x", "StableDiffusionPipeline", "unet", 7.5, False,
            "MODEL_KIND_STABLE_DIFFUSION")
SDXL = Family("sdxl", "Stable Diffusion XL", "StableDiffusionXLPipeline", "unet", 5.0, False,
              "MODEL_KIND_STABLE_DIFFUSION_XL")
SDXL_REFINER = Family("sdxl-refiner", "Stable Diffusion XL refiner", "StableDiffusionXLImg2ImgPipeline", "unet", 5.0,
                      False, "MODEL_KIND_STABLE_DIFFUSION_XL_REFINER")
SD3 = Family("sd3", "Stable Diffusion 3", "StableDiffusion3Pipeline", "transformer", 7.0, False,
             "MODEL_KIND_STABLE_DIFFUSION_3", max_sequence_length=256)
FLUX = Family("flux", "Flux", "FluxPipeline", "transformer", 3.5, True, "MODEL_KIND_FLUX", max_sequence_length=512)

#: Every family, by name.
FAMILIES: dict[str, Family] = {f.name: f for f in (SD, SDXL, SDXL_REFINER, SD3, FLUX)}


def family_of_index(index: dict) -> Family:
    """The family of a model_index.json's content. Raises ValueError for a pipeline latentwire does not serve.

    The pipeline class table lives on the client's light side (latentwire.client.families), which the
    client's import reads too: one table.
    """
    return FAMILIES[family_name_of_index(index)]


def family_of_folder(path: str | Path) -> Family:
    """The family of a diffusers pipeline folder (reads its model_index.json)."""
    return family_of_index(json.loads((Path(path) / "model_index.json").read_text()))


def text_encoders(index: dict) -> tuple[str, ...]:
    """Component names of the text encoders a model_index.json lists (not null), in pipeline order."""
    return tuple(c for c in TEXT_ENCODER_COMPONENTS if _present(index, c))


def tokenizer_of(encoder: str) -> str:
    """The tokenizer component of a text encoder component: text_encoder_2 -> tokenizer_2."""
    return encoder.replace("text_encoder", "tokenizer")


def _present(index: dict, component: str) -> bool:
    entry = index.get(component)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and entry[1] is not None

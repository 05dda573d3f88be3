"""Which model family a diffusers pipeline folder is, from its model_index.json alone (no torch).

The one table of pipeline class names: the client's import reads it to pick a version's registry kind,
the registry to check that a version's model_index.json fits its kind, and every stage through
``services.runtime.families`` (which adds each family's pipeline defaults) to choose its code path.
It lives on the light side because the client may not import the services.
"""
from __future__ import annotations

__all__ = ["FAMILY_NAMES", "PIPELINE_FAMILIES", "REGISTRY_KINDS", "family_name_of_index", "family_of_kind"]

#: Family names: "sd" (SD 1.x/2.x), "sdxl", "sdxl-refiner", "sd3", "flux".
FAMILY_NAMES = ("sd", "sdxl", "sdxl-refiner", "sd3", "flux")

#: Registry kind (latentwire.registry.v1.ModelKind name) of a version of each family.
REGISTRY_KINDS = {
    "sd": "MODEL_KIND_STABLE_DIFFUSION",
    "sdxl": "MODEL_KIND_STABLE_DIFFUSION_XL",
    "sdxl-refiner": "MODEL_KIND_STABLE_DIFFUSION_XL_REFINER",
    "sd3": "MODEL_KIND_STABLE_DIFFUSION_3",
    "flux": "MODEL_KIND_FLUX",
}

#: Pipeline class names (model_index.json "_class_name") of each family; any mode's pipeline counts.
#: An SDXL class names the refiner when the folder says so (see family_name_of_index).
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd", "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionControlNetPipeline": "sd", "StableDiffusionControlNetImg2ImgPipeline": "sd",
    "StableDiffusionControlNetInpaintPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl", "StableDiffusionXLControlNetPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3", "StableDiffusion3Img2ImgPipeline": "sd3",
    "StableDiffusion3InpaintPipeline": "sd3",
    "FluxPipeline": "flux", "FluxImg2ImgPipeline": "flux", "FluxInpaintPipeline": "flux",
}

_TITLES = "Stable Diffusion 1.x/2.x, Stable Diffusion XL (and its refiner), Stable Diffusion 3, Flux"


def family_name_of_index(index: dict) -> str:
    """The family name of a model_index.json's content. Raises ValueError for a pipeline latentwire does not serve."""
    name = index.get("_class_name", "")
    family = PIPELINE_FAMILIES.get(name) if isinstance(name, str) else None
    if family is None:
        # A folder saved by a pipeline class not listed: tell by its components.
        transformer = index.get("transformer")
        transformer = transformer[1] if _present(index, "transformer") else None
        if transformer == "FluxTransformer2DModel":
            family = "flux"
        elif transformer == "SD3Transformer2DModel":
            family = "sd3"
        elif _present(index, "unet") and _present(index, "text_encoder_2"):
            family = "sdxl"
        elif _present(index, "unet") and _present(index, "text_encoder"):
            family = "sd"
        else:
            shown = name[:80] if isinstance(name, str) and name else "(none)"
            raise ValueError(f"model_index.json names the pipeline {shown}, which latentwire does not serve; "
                             f"it serves {_TITLES}")
    if family == "sdxl" and (index.get("requires_aesthetics_score") or not _present(index, "text_encoder")):
        return "sdxl-refiner"
    return family


def family_of_kind(kind: str) -> str | None:
    """The family a registry kind name holds, or None for a kind that is no pipeline (ControlNet, classifier)."""
    for family, name in REGISTRY_KINDS.items():
        if name == kind:
            return family
    return None


def _present(index: dict, component: str) -> bool:
    entry = index.get(component)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and entry[1] is not None

"""transformers' PIL image processors, chosen explicitly where torchvision is not installed.

transformers 5 gives the name ``<Model>ImageProcessor`` to its torchvision-backed processors and,
without torchvision, falls back to ``<Model>ImageProcessorPil`` with a warning the first time the
name is looked up. diffusers looks up CLIPImageProcessor and SiglipImageProcessor when it is
imported (pipeline feature extractors, IP-Adapter), so every diffusion service logged two warnings
at start. latentwire installs torch's CPU wheel without torchvision, and the PIL processors are the
ones its pipelines are compared with: bind those names to them before diffusers is imported
(each model service's package ``__init__`` calls this). The classifier loads its own processor
with ``backend="pil"`` (services/classifier/model.py).
"""
from __future__ import annotations

import importlib.util
import sys

#: The processor names diffusers imports.
DIFFUSERS_PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor")


def choose_pil_image_processors() -> None:
    """Make ``transformers.<Name>ImageProcessor`` the PIL processor when torchvision is missing (idempotent)."""
    if importlib.util.find_spec("torchvision") is not None:
        return  # the default backend is installed: nothing falls back
    import transformers

    pil_processors = {name: getattr(transformers, f"{name}Pil") for name in DIFFUSERS_PROCESSORS}
    # Loading those classes can put a fresh lazy module in sys.modules: bind the names on the one imports see.
    module = sys.modules["transformers"]
    for name, processor in pil_processors.items():
        setattr(module, name, processor)

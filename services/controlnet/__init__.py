"""The ControlNet service: per-step residuals and control-image preprocessors."""
from services.runtime.image_processors import choose_pil_image_processors

choose_pil_image_processors()  # before diffusers or transformers load a processor: see image_processors.py

"""Text encoding: a Stable Diffusion model's tokenizer and CLIP text encoder.

The encoding itself is diffusers' own ``StableDiffusionPipeline.encode_prompt`` on a pipeline
that holds only the tokenizer and text encoder, so embeddings equal what the in-process pipeline
computes (padding, CLIP skip, dtype handling included).
"""
from __future__ import annotations

import threading

import torch
import transformers
from diffusers import StableDiffusionPipeline

from services.runtime import limits
from services.runtime.config import ModelSpec
from services.runtime.errors import InvalidArgument
from services.runtime.models import check_pipeline_folder, use_safetensors


class TextEncoderModel:
    """Tokenizer plus text encoder of one model folder, on one device and dtype."""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, allow_pickle: bool):
        index = check_pipeline_folder(spec.path, ("text_encoder", "tokenizer"), allow_pickle)
        tokenizer_cls = getattr(transformers, index["tokenizer"][1])
        encoder_cls = getattr(transformers, index["text_encoder"][1])
        self.tokenizer = tokenizer_cls.from_pretrained(spec.path, subfolder="tokenizer")
        # A fast tokenizer's padding and truncation settings are state of one Rust object that every
        # call sets afresh: concurrent requests (checked on the event loop, encoded on worker threads)
        # would see each other's settings, e.g. an unpadded 2-token negative prompt. One call at a time.
        self._tokenizer_lock = threading.Lock()
        self.text_encoder = encoder_cls.from_pretrained(
            spec.path, subfolder="text_encoder", dtype=dtype, use_safetensors=use_safetensors(allow_pickle)
        ).to(device)
        self.text_encoder.eval()
        self.device = device
        self._pipeline = StableDiffusionPipeline(
            vae=None,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=None,
            scheduler=None,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    @property
    def max_tokens(self) -> int:
        """Tokens one prompt may take, start and end tokens included (77 for CLIP)."""
        return int(self.tokenizer.model_max_length)

    def check_prompt(self, prompt: str, field: str, *, allow_empty: bool) -> None:
        """Refuse a prompt that is empty (when not allowed) or longer than the encoder's context.

        diffusers silently truncates long prompts; a service should say so instead.
        """
        if not allow_empty:
            limits.check_prompt(prompt, field)
        with self._tokenizer_lock:
            count = len(self.tokenizer(prompt, truncation=False).input_ids)
        if count > self.max_tokens:
            raise InvalidArgument(
                f"{field} is {count} tokens long, but the text encoder reads at most {self.max_tokens} "
                "(start and end tokens included); shorten it",
                reason="PROMPT_TOO_LONG",
                metadata={"tokens": str(count), "max_tokens": str(self.max_tokens)},
            )

    @torch.inference_mode()
    def encode(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (prompt_embeds, negative_prompt_embeds), repeated per image as the pipeline does."""
        with self._tokenizer_lock:
            prompt_embeds, negative_prompt_embeds = self._pipeline.encode_prompt(
                prompts,
                self.device,
                num_images_per_prompt,
                do_classifier_free_guidance,
                negative_prompts or None,
            )
        return prompt_embeds, negative_prompt_embeds if do_classifier_free_guidance else None

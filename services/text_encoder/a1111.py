"""The text encoder's AUTOMATIC1111 path: weighted, chunked prompts and clip skip (EncodeRequest.prompt_syntax).

When it runs (``reading``): prompt_syntax A1111; or automatic (unspecified) and a prompt or negative prompt has
attention syntax (``(``, ``)``, ``[``, ``]``, ``\\``, the word ``BREAK``), or is longer than a CLIP encoder's window
(its tokenizer's model_max_length, 77 with start and end), or clip_skip is above 1; or prompt_syntax PLAIN with
clip_skip above 1 (then brackets stay plain text: A1111's emphasis "None"). Anything else keeps the family's
diffusers path (model.py) unchanged.

What it computes, per family:

- SD 1.x/2.x: ``weighted.encode_weighted`` (A1111's ``FrozenCLIPEmbedderWithCustomWords``): chunks of 75 tokens,
  "Original" emphasis, ``hidden_states[-clip_skip]`` then the final layer norm.
- SDXL and its refiner, as A1111's sgm conditioner: each CLIP encoder ``hidden_states[-(clip_skip + 1)]`` without
  the final layer norm (clip skip 1 is the penultimate layer, what diffusers' SDXL pipeline takes), weighted and
  chunked on its own; the denoiser concatenates the encoders along the features (conditioning.py). The pooled
  embeddings are text_encoder_2's first chunk's. Note: A1111 itself ignores clip skip for SDXL unless its
  ``sdxl_clip_l_skip`` option is on (and then for CLIP-L only); SD.Next and ComfyUI apply it to both, as here.
- SD3: the CLIP encoders take the weights ("Original" emphasis on ``hidden_states[-(clip_skip + 1)]``, no final
  layer norm, pooled ``text_embeds`` unweighted, one chunk: SD3 keeps CLIP's 77 tokens); T5 reads the text without
  its weights (the text of every fragment, BREAK a space) with its max_sequence_length.
- Flux: every encoder reads the text without its weights (CLIP-L gives only its pooled output, which A1111-style
  emphasis does not touch; T5's weights are not applied), with the family's token limits; clip skip is ignored.

Every prompt of a request is encoded as one batch of its distinct texts (A1111 encodes the texts of one prompt's
schedule together: the chunk count is the longest's and "Original" emphasis restores the batch's mean); the
negative prompts likewise. Then prompt and negative prompt embeddings are padded to the same chunk count with the
empty prompt's embeddings (A1111's "Pad prompt/negative prompt" option), as the denoiser batches them together.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from latentwire.text_encoder.v1 import text_encoder_pb2
from services.runtime import limits
from services.runtime.errors import InvalidArgument
from services.runtime.prompt_syntax import parse_prompt_attention

from .model import EncoderEmbeddings, TextEncoderModel, _per_image
from .weighted import CHUNK_LENGTH, encode_weighted, empty_prompt_embeds, pad_cond_uncond, tokenize_weighted

#: Characters and words that make a prompt A1111 syntax (":" only means something inside brackets).
_SYNTAX = re.compile(r"[()\[\]\\]|\bBREAK\b")
#: Most 75-token chunks of one prompt on the A1111 path (750 tokens).
MAX_CHUNKS = 10
#: Families whose CLIP encoders take chunked, weighted prompts.
_CHUNKED = ("sd", "sdxl", "sdxl-refiner")


def has_syntax(text: str) -> bool:
    """Whether a prompt uses A1111's attention syntax (brackets, escapes, BREAK)."""
    return _SYNTAX.search(text) is not None


def strip_weights(text: str) -> str:
    """A prompt's text without its attention syntax (what a T5 encoder reads): the fragments' text, BREAK a space."""
    return "".join(" " if weight == -1 and part == "BREAK" else part for part, weight in parse_prompt_attention(text))


class A1111Reading:
    """The A1111 path for one Encode request on one model."""

    def __init__(self, model: TextEncoderModel, clip_skip: int, emphasis: str):
        self.model = model
        self.family = model.family
        self.clip_skip = max(clip_skip, 1)
        self.emphasis = emphasis
        self._check_clip_skip()

    def _check_clip_skip(self) -> None:
        # SDXL reads one layer further back than SD (its default is the penultimate layer).
        offset = 1 if self.family.name in ("sdxl", "sdxl-refiner", "sd3") else 0
        for encoder in self.model.hosted:
            if self.model.is_t5(encoder):
                continue
            layers = self.model.text_encoders[encoder].config.num_hidden_layers
            if self.clip_skip + offset > layers:
                raise InvalidArgument(
                    f"clip_skip is {self.clip_skip}; this model's {encoder} has {layers} layers, so use 1 to "
                    f"{layers - offset}", reason="INVALID_CLIP_SKIP", metadata={"field": "clip_skip"})

    def check(self, prompts: Sequence[str], negatives: Sequence[str], encoders: tuple[str, ...],
              max_sequence_length: int) -> None:
        """Refuse empty prompts, and prompts longer than MAX_CHUNKS chunks (SD, SDXL) or than the family's token
        limits (SD3, Flux, on the text without its weights)."""
        for i, prompt in enumerate(prompts):
            limits.check_prompt(prompt, f"prompts[{i}]")
        if self.family.name in _CHUNKED:
            most = MAX_CHUNKS * CHUNK_LENGTH
            for field, texts in (("prompts", prompts), ("negative_prompts", negatives)):
                for i, text in enumerate(texts):
                    for encoder in encoders:
                        with self.model._tokenizer_lock:
                            chunks, count = tokenize_weighted(self.model.tokenizers[encoder], text,
                                                              emphasis=self.emphasis)
                        if len(chunks) > MAX_CHUNKS:
                            raise InvalidArgument(
                                f"{field}[{i}] is {count} tokens long, but the A1111 reading takes at most {most} "
                                f"({MAX_CHUNKS} chunks of {CHUNK_LENGTH}); shorten it", reason="PROMPT_TOO_LONG",
                                metadata={"tokens": str(count), "max_tokens": str(most), "encoder": encoder})
        else:
            for field, texts, allow_empty in (("prompts", prompts, False), ("negative_prompts", negatives, True)):
                for i, text in enumerate(texts):
                    self.model.check_prompt(self._text(text), f"{field}[{i}]", allow_empty=allow_empty,
                                            encoders=encoders, max_sequence_length=max_sequence_length)

    def _text(self, text: str) -> str:
        return text if self.emphasis == "None" else strip_weights(text)

    # -- the work -------------------------------------------------------------------------------------

    def _weighted(self, encoder: str, prompts: list[str], layer_offset: int, max_chunks: int = MAX_CHUNKS):
        """(prompt_embeds [len(prompts), 77k, d], pooled or None) of the distinct prompts, encoded as one batch."""
        distinct = list(dict.fromkeys(prompts))
        encoded = encode_weighted(
            self.model.text_encoders[encoder], self.model.tokenizers[encoder], distinct,
            clip_skip=self.clip_skip + layer_offset, final_layer_norm=layer_offset == 0, emphasis=self.emphasis,
            max_chunks=max_chunks)
        rows = torch.tensor([distinct.index(p) for p in prompts])
        pooled = encoded.pooled_prompt_embeds
        return encoded.prompt_embeds[rows], None if pooled is None else pooled[rows]

    def _empty(self, encoder: str, layer_offset: int) -> torch.Tensor:
        return empty_prompt_embeds(self.model.text_encoders[encoder], self.model.tokenizers[encoder],
                                   clip_skip=self.clip_skip + layer_offset, final_layer_norm=layer_offset == 0,
                                   emphasis=self.emphasis)

    @torch.inference_mode()
    def encode(self, prompts: list[str], negatives: list[str] | None, num_images_per_prompt: int,
               do_classifier_free_guidance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SD 1.x/2.x: (prompt_embeds, negative_prompt_embeds or None), repeated per image."""
        with self.model._tokenizer_lock:
            cond, _ = self._weighted("text_encoder", prompts, 0)
            uncond = None
            if do_classifier_free_guidance:
                uncond, _ = self._weighted("text_encoder", negatives or [""] * len(prompts), 0)
                if cond.shape[1] != uncond.shape[1]:
                    cond, uncond = pad_cond_uncond(cond, uncond, self._empty("text_encoder", 0))
        return (_per_image(cond, num_images_per_prompt),
                None if uncond is None else _per_image(uncond, num_images_per_prompt))

    @torch.inference_mode()
    def encode_per_encoder(self, encoders: tuple[str, ...], prompts: list[str], negatives: list[str] | None,
                           num_images_per_prompt: int, do_classifier_free_guidance: bool,
                           max_sequence_length: int) -> list[EncoderEmbeddings]:
        """SDXL (and its refiner), SD3, Flux: one EncoderEmbeddings per encoder, repeated per image."""
        if self.family.name not in _CHUNKED:
            stripped = self.model.encode_per_encoder(
                encoders, [self._text(p) for p in prompts], [self._text(n) for n in negatives] if negatives else None,
                num_images_per_prompt, do_classifier_free_guidance, max_sequence_length,
                clip_skip=self.clip_skip - 1 or None)
            if self.family.name != "sd3" or self.emphasis == "None":
                return stripped
            # SD3's CLIP encoders take the weights (one chunk: SD3 keeps CLIP's 77 tokens), T5 the stripped text.
            return [self._sd3_clip(part.encoder, prompts, negatives, num_images_per_prompt,
                                   do_classifier_free_guidance) if not self.model.is_t5(part.encoder) else part
                    for part in stripped]
        zero_negative = not negatives and self.model.force_zeros_for_empty_prompt
        with self.model._tokenizer_lock:
            encoded = {}
            for encoder in encoders:
                cond, pooled = self._weighted(encoder, prompts, 1)
                uncond = negative_pooled = None
                if do_classifier_free_guidance and not zero_negative:
                    uncond, negative_pooled = self._weighted(encoder, negatives or [""] * len(prompts), 1)
                encoded[encoder] = [cond, uncond, pooled, negative_pooled]
            # Every sequence of this call padded to the longest's chunk count (cond/uncond, and both encoders alike,
            # which the denoiser concatenates along the features).
            chunks = max(t.shape[1] for parts in encoded.values() for t in parts[:2] if t is not None)
            results = []
            for encoder, (cond, uncond, pooled, negative_pooled) in encoded.items():
                empty = self._empty(encoder, 1) if chunks > CHUNK_LENGTH + 2 else None
                cond = _pad_to(cond, chunks, empty)
                if do_classifier_free_guidance:
                    if zero_negative:  # as the pipelines (and A1111's SDXL) do for an empty negative prompt
                        uncond = torch.zeros_like(cond)
                        negative_pooled = torch.zeros_like(pooled) if pooled is not None else None
                    else:
                        uncond = _pad_to(uncond, chunks, empty)
                results.append(EncoderEmbeddings(
                    encoder,
                    _per_image(cond, num_images_per_prompt),
                    None if uncond is None else _per_image(uncond, num_images_per_prompt),
                    None if pooled is None else _per_image(pooled, num_images_per_prompt),
                    None if negative_pooled is None else _per_image(negative_pooled, num_images_per_prompt)))
            return results


    def _sd3_clip(self, encoder: str, prompts: list[str], negatives: list[str] | None, num_images_per_prompt: int,
                  do_classifier_free_guidance: bool) -> EncoderEmbeddings:
        """One SD3 CLIP encoder, weighted: ``hidden_states[-(clip_skip + 1)]`` without the final layer norm and the
        pooled ``text_embeds``, as StableDiffusion3Pipeline._get_clip_prompt_embeds takes them."""
        with self.model._tokenizer_lock:
            cond, pooled = self._weighted(encoder, prompts, 1, max_chunks=1)
            uncond = negative_pooled = None
            if do_classifier_free_guidance:  # as the pipeline: "" for each prompt without a negative prompt
                uncond, negative_pooled = self._weighted(encoder, negatives or [""] * len(prompts), 1, max_chunks=1)

        def repeat(tensor):
            return None if tensor is None else _per_image(tensor, num_images_per_prompt)

        return EncoderEmbeddings(encoder, repeat(cond), repeat(uncond), repeat(pooled), repeat(negative_pooled))


def _pad_to(embeds: torch.Tensor, length: int, empty: torch.Tensor | None) -> torch.Tensor:
    """Append whole copies of the empty prompt's embeddings [1, 77, d] up to ``length`` tokens."""
    missing = (length - embeds.shape[1]) // empty.shape[1] if empty is not None else 0
    if missing <= 0:
        return embeds
    return torch.cat([embeds, empty.repeat((embeds.shape[0], missing, 1))], dim=1)


def reading(model: TextEncoderModel, request: text_encoder_pb2.EncodeRequest, prompts: Sequence[str],
            negatives: Sequence[str], encoders: tuple[str, ...]) -> A1111Reading | None:
    """The A1111 path for this request, or None for the family's diffusers path (the rule in the module
    docstring)."""
    mode, clip_skip = request.prompt_syntax, request.clip_skip
    if clip_skip < 0:
        raise InvalidArgument(f"clip_skip is {clip_skip}; use 1 (the last layer) or more, or 0 for 1",
                              reason="INVALID_CLIP_SKIP", metadata={"field": "clip_skip"})
    if mode == text_encoder_pb2.PROMPT_SYNTAX_PLAIN:
        return A1111Reading(model, clip_skip, "None") if clip_skip > 1 else None
    if mode == text_encoder_pb2.PROMPT_SYNTAX_A1111 or clip_skip > 1:
        return A1111Reading(model, clip_skip, "Original")
    if mode != text_encoder_pb2.PROMPT_SYNTAX_UNSPECIFIED:
        raise InvalidArgument(f"prompt_syntax is {mode}, which this text encoder does not know; leave it unset",
                              reason="INVALID_PROMPT_SYNTAX", metadata={"field": "prompt_syntax"})
    texts = [*prompts, *negatives]
    if any(has_syntax(text) for text in texts) or _longer_than_clip(model, texts, encoders):
        return A1111Reading(model, clip_skip, "Original")
    return None


def _longer_than_clip(model: TextEncoderModel, texts: Sequence[str], encoders: tuple[str, ...]) -> bool:
    """Whether a text has more tokens than a CLIP encoder's window (start and end tokens included)."""
    for encoder in encoders:
        if model.is_t5(encoder):
            continue
        tokenizer = model.tokenizers[encoder]
        with model._tokenizer_lock:
            if any(len(tokenizer(text, truncation=False).input_ids) > int(tokenizer.model_max_length)
                   for text in texts):
                return True
    return False

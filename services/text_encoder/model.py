"""Text encoding: the tokenizers and text encoders of a model folder, for every family (services.runtime.families).

SD 1.x/2.x: diffusers' own ``StableDiffusionPipeline.encode_prompt`` on a pipeline that holds only the tokenizer
and text encoder, so embeddings equal what the in-process pipeline computes (padding, CLIP skip, dtype handling
included).

SDXL, its refiner, SD3 and Flux: one ``EncoderEmbeddings`` per encoder, exactly what the family's pipeline takes
from that encoder before it combines the encoders (the denoiser combines them: services/denoiser/conditioning.py),
so a model's encoders may run on different replicas. SD3 and Flux call their pipeline's own per-encoder methods
(``_get_clip_prompt_embeds``, ``_get_t5_prompt_embeds``) on a pipeline object that holds the hosted encoders;
SDXL's ``encode_prompt`` is one loop over both encoders, so its loop body is copied here for one encoder.
"""
from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass

import torch
import transformers
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

from services.runtime import families, limits
from services.runtime.config import ModelSpec
from services.runtime.errors import FailedPrecondition, InvalidArgument, ModelFolderError, quote
from services.runtime.models import check_pipeline_folder, use_safetensors

log = logging.getLogger(__name__)

#: What each text encoder component is, for messages.
_ENCODER_TITLES = {"CLIPTextModel": "CLIP", "CLIPTextModelWithProjection": "CLIP", "T5EncoderModel": "T5"}


@dataclass(frozen=True)
class EncoderEmbeddings:
    """What one text encoder produced for a request (proto latentwire.common.v1.EncoderEmbeddings), repeated per
    image; a field is None where the family's pipeline takes nothing of that kind from this encoder."""

    encoder: str
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None


def components_for(encoders: tuple[str, ...] | None) -> tuple[str, ...]:
    """Components of a model folder the service needs (fetched from the registry): the hosted encoders (all
    when ``encoders`` is None) and their tokenizers."""
    hosted = encoders if encoders is not None else families.TEXT_ENCODER_COMPONENTS
    return tuple(c for e in families.TEXT_ENCODER_COMPONENTS if e in hosted for c in (e, families.tokenizer_of(e)))


def _listed(index: dict, component: str) -> bool:
    """Whether model_index.json lists a component (not [null, null])."""
    entry = index.get(component)
    return isinstance(entry, list) and len(entry) == 2 and all(entry)


def _transformers_class(path, index: dict, component: str) -> type:
    """The transformers class model_index.json names for a component; ModelFolderError for any other name."""
    name = index[component][1]
    cls = getattr(transformers, name, None) if isinstance(name, str) and not name.startswith("_") else None
    if not isinstance(cls, type):
        raise ModelFolderError(path, f"model_index.json names {quote(name)} for {component}, which is not a "
                                     "transformers class")
    return cls


def _per_image(tensor: torch.Tensor, num_images_per_prompt: int) -> torch.Tensor:
    """Repeat each prompt's embeddings once per image, as every pipeline does ("mps friendly method")."""
    if tensor.ndim == 2:
        return tensor.repeat(1, num_images_per_prompt).view(tensor.shape[0] * num_images_per_prompt, -1)
    batch, seq_len, _ = tensor.shape
    return tensor.repeat(1, num_images_per_prompt, 1).view(batch * num_images_per_prompt, seq_len, -1)


class TextEncoderModel:
    """Tokenizers plus text encoders of one model folder (those this replica hosts), on one device and dtype."""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, allow_pickle: bool,
                 encoders: tuple[str, ...] | None = None):
        """``encoders``: the text encoder components this replica hosts (the --encoders flag); None: all."""
        index = check_pipeline_folder(spec.path, (), allow_pickle)
        try:
            self.family = families.family_of_index(index)
        except ValueError as error:
            raise ModelFolderError(spec.path, str(error)) from None
        #: Text encoder components of the model, in pipeline order.
        self.model_encoders = families.text_encoders(index)
        #: Those this replica holds.
        self.hosted = tuple(e for e in self.model_encoders if encoders is None or e in encoders)
        check_pipeline_folder(spec.path, components_for(self.hosted), allow_pickle)
        if self.hosted != self.model_encoders:
            log.info("model %r: hosting %s of its text encoders %s (--encoders)", spec.name,
                     ", ".join(self.hosted) or "none", ", ".join(self.model_encoders))
        self.device = device
        self.dtype = dtype
        self.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", False))
        self.encoder_classes = {e: index[e][1] for e in self.model_encoders}
        self.tokenizers = {}
        # A module, so the model store counts the weights (models.module_bytes).
        self.text_encoders = torch.nn.ModuleDict()
        for encoder in self.hosted:
            tokenizer = families.tokenizer_of(encoder)
            if not _listed(index, tokenizer):
                raise ModelFolderError(spec.path, f"model_index.json lists {encoder} but not its {tokenizer}")
            self.tokenizers[encoder] = _transformers_class(spec.path, index, tokenizer).from_pretrained(
                spec.path, subfolder=tokenizer)
            module = _transformers_class(spec.path, index, encoder).from_pretrained(
                spec.path, subfolder=encoder, dtype=dtype, use_safetensors=use_safetensors(allow_pickle)
            ).to(device)
            module.eval()
            self.text_encoders[encoder] = module
        # A fast tokenizer's padding and truncation settings are state of one Rust object that every
        # call sets afresh: concurrent requests (checked on the event loop, encoded on worker threads)
        # would see each other's settings, e.g. an unpadded 2-token negative prompt. One call at a time.
        self._tokenizer_lock = threading.Lock()
        self._pipeline = self._build_pipeline()

    def _build_pipeline(self):
        """The family's pipeline holding only the hosted tokenizers and encoders, whose per-encoder methods
        compute the embeddings (None for SDXL, whose loop body is copied in _encode_sdxl)."""
        te = {e: self.text_encoders[e] for e in self.hosted}
        tok = {e: self.tokenizers[e] for e in self.hosted}
        if self.family is families.SD:
            if "text_encoder" not in te:
                return None
            return StableDiffusionPipeline(
                vae=None, text_encoder=te["text_encoder"], tokenizer=tok["text_encoder"], unet=None, scheduler=None,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if self.family is families.SD3:
            # _get_clip_prompt_embeds reads the dtype of text_encoder and the context of tokenizer (through
            # tokenizer_max_length) for both CLIP encoders: on a replica without CLIP-L, CLIP-G stands in (same
            # service dtype, both CLIP tokenizers read 77 tokens). Index 0 is only called when CLIP-L is hosted.
            first = "text_encoder" if "text_encoder" in te else "text_encoder_2"
            return StableDiffusion3Pipeline(
                transformer=None, scheduler=None, vae=None,
                text_encoder=te.get(first), tokenizer=tok.get(first),
                text_encoder_2=te.get("text_encoder_2"), tokenizer_2=tok.get("text_encoder_2"),
                text_encoder_3=te.get("text_encoder_3"), tokenizer_3=tok.get("text_encoder_3"))
        if self.family is families.FLUX:
            return FluxPipeline(
                scheduler=None, vae=None, transformer=None,
                text_encoder=te.get("text_encoder"), tokenizer=tok.get("text_encoder"),
                text_encoder_2=te.get("text_encoder_2"), tokenizer_2=tok.get("text_encoder_2"))
        return None

    # ------------------------------------------------------------------------------------------
    # Request rules

    def is_t5(self, encoder: str) -> bool:
        """Whether a component is a T5 encoder (reads max_sequence_length tokens; CLIP reads its tokenizer's)."""
        return self.encoder_classes.get(encoder) == "T5EncoderModel"

    def max_sequence_length(self, requested: int) -> int:
        """T5 tokens per prompt: ``requested`` (1..512), or the family's default for 0."""
        limits.check_max_sequence_length(requested)
        return requested or self.family.max_sequence_length or limits.MAX_SEQUENCE_LENGTH

    def select_encoders(self, requested: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The encoders a request runs (in component order) and those of the model it leaves to other replicas.

        Empty ``requested``: every hosted encoder, the others missing. Otherwise exactly those named: one the
        model lacks is INVALID_ARGUMENT (UNKNOWN_ENCODER), one this replica does not host FAILED_PRECONDITION
        (ENCODER_NOT_HOSTED).
        """
        for name in requested:
            if name not in self.model_encoders:
                raise InvalidArgument(
                    f"encoders names {quote(name)}, which this model does not have; its text encoders are "
                    f"{', '.join(self.model_encoders)}", reason="UNKNOWN_ENCODER",
                    metadata={"encoder": name, "encoders": ",".join(self.model_encoders)})
            if name not in self.hosted:
                raise FailedPrecondition(
                    f"this replica does not host the model's {name}; it hosts "
                    f"{', '.join(self.hosted) or 'none of its text encoders'}: ask a replica that hosts {name}",
                    reason="ENCODER_NOT_HOSTED", metadata={"encoder": name, "hosted": ",".join(self.hosted)})
        if requested:
            return tuple(e for e in self.model_encoders if e in requested), ()
        if self.family is families.SD and not self.hosted:
            raise FailedPrecondition(
                "this replica does not host the model's text_encoder (--encoders); ask a replica that hosts it",
                reason="ENCODER_NOT_HOSTED", metadata={"encoder": "text_encoder", "hosted": ""})
        return self.hosted, tuple(e for e in self.model_encoders if e not in self.hosted)

    def check_prompt(self, prompt: str, field: str, *, allow_empty: bool, encoders: tuple[str, ...] | None = None,
                     max_sequence_length: int = 0) -> None:
        """Refuse a prompt that is empty (when not allowed) or longer than what one of ``encoders`` (default:
        every hosted one) reads: a CLIP tokenizer's context (77 tokens), or ``max_sequence_length`` T5 tokens.

        diffusers silently truncates long prompts; a service should say so instead.
        """
        if not allow_empty:
            limits.check_prompt(prompt, field)
        for encoder in self.hosted if encoders is None else encoders:
            tokenizer = self.tokenizers[encoder]
            t5 = self.is_t5(encoder)
            most = max_sequence_length if t5 else int(tokenizer.model_max_length)
            with self._tokenizer_lock:
                count = len(tokenizer(prompt, truncation=False).input_ids)
            if count > most:
                title = _ENCODER_TITLES.get(self.encoder_classes[encoder], encoder)
                hint = (f"; shorten it or raise max_sequence_length (at most {limits.MAX_SEQUENCE_LENGTH})"
                        if t5 and most < limits.MAX_SEQUENCE_LENGTH else "; shorten it")
                where = f"{encoder} ({title})" if self.family.multi_encoder else "the text encoder"
                raise InvalidArgument(
                    f"{field} is {count} tokens long, but {where} reads at most {most} (start and end tokens "
                    f"included){hint}", reason="PROMPT_TOO_LONG",
                    metadata={"tokens": str(count), "max_tokens": str(most), "encoder": encoder})

    # ------------------------------------------------------------------------------------------
    # The work

    @torch.inference_mode()
    def encode(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SD 1.x/2.x: (prompt_embeds, negative_prompt_embeds), repeated per image as the pipeline does."""
        with self._tokenizer_lock:
            prompt_embeds, negative_prompt_embeds = self._pipeline.encode_prompt(
                prompts,
                self.device,
                num_images_per_prompt,
                do_classifier_free_guidance,
                negative_prompts or None,
            )
        return prompt_embeds, negative_prompt_embeds if do_classifier_free_guidance else None

    @torch.inference_mode()
    def encode_per_encoder(
        self,
        encoders: tuple[str, ...],
        prompts: list[str],
        negative_prompts: list[str] | None,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        max_sequence_length: int,
        clip_skip: int | None = None,
    ) -> list[EncoderEmbeddings]:
        """SDXL, SD3, Flux: one EncoderEmbeddings per encoder in ``encoders`` (hosted, component order), each as
        the family's pipeline computes it from that encoder, repeated per image. Negatives only with guidance
        (Flux too when asked: its pipeline's true CFG encodes the negative prompt with the same methods).
        ``clip_skip``: diffusers' (layers skipped before the penultimate), for SD3's CLIP encoders only (a1111.py)."""
        negatives = negative_prompts or None
        with self._tokenizer_lock:
            if self.family in (families.SDXL, families.SDXL_REFINER):
                return [self._encode_sdxl(e, prompts, negatives, num_images_per_prompt, do_classifier_free_guidance)
                        for e in encoders]
            run = self._encode_sd3 if self.family is families.SD3 else self._encode_flux
            if clip_skip and self.family is families.SD3:
                run = functools.partial(self._encode_sd3, clip_skip=clip_skip)
            results = []
            for encoder in encoders:
                positive = run(encoder, prompts, num_images_per_prompt, max_sequence_length)
                negative = EncoderEmbeddings(encoder)
                if do_classifier_free_guidance:
                    # As the pipelines do: "" for each prompt when no negative prompt is given.
                    negative = run(encoder, negatives or [""] * len(prompts), num_images_per_prompt,
                                   max_sequence_length)
                results.append(EncoderEmbeddings(
                    encoder, positive.prompt_embeds, negative.prompt_embeds, positive.pooled_prompt_embeds,
                    negative.pooled_prompt_embeds))
            return results

    def _encode_t5(self, encoder: str, prompts: list[str], num_images_per_prompt: int,
                   max_sequence_length: int) -> EncoderEmbeddings:
        """The T5 encoder's share of SD3's and Flux's encode_prompt (their _get_t5_prompt_embeds)."""
        embeds = self._pipeline._get_t5_prompt_embeds(
            prompt=prompts, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length, device=self.device, dtype=self.dtype)
        return EncoderEmbeddings(encoder, prompt_embeds=embeds)

    def _encode_sd3(self, encoder: str, prompts: list[str], num_images_per_prompt: int,
                    max_sequence_length: int, clip_skip: int | None = None) -> EncoderEmbeddings:
        """StableDiffusion3Pipeline.encode_prompt's call for one encoder (CLIP: index 0 or 1; T5)."""
        if self.is_t5(encoder):
            return self._encode_t5(encoder, prompts, num_images_per_prompt, max_sequence_length)
        embeds, pooled = self._pipeline._get_clip_prompt_embeds(
            prompt=prompts, device=self.device, num_images_per_prompt=num_images_per_prompt, clip_skip=clip_skip,
            clip_model_index=families.TEXT_ENCODER_COMPONENTS.index(encoder))
        return EncoderEmbeddings(encoder, prompt_embeds=embeds, pooled_prompt_embeds=pooled)

    def _encode_flux(self, encoder: str, prompts: list[str], num_images_per_prompt: int,
                     max_sequence_length: int) -> EncoderEmbeddings:
        """FluxPipeline.encode_prompt's call for one encoder: CLIP gives only its pooled output, T5 the sequence."""
        if self.is_t5(encoder):
            return self._encode_t5(encoder, prompts, num_images_per_prompt, max_sequence_length)
        pooled = self._pipeline._get_clip_prompt_embeds(
            prompt=prompts, device=self.device, num_images_per_prompt=num_images_per_prompt)
        return EncoderEmbeddings(encoder, pooled_prompt_embeds=pooled)

    def _encode_sdxl(self, encoder: str, prompts: list[str], negative_prompts: list[str] | None,
                     num_images_per_prompt: int, do_classifier_free_guidance: bool) -> EncoderEmbeddings:
        """One encoder's share of StableDiffusionXLPipeline.encode_prompt (clip_skip None, prompt_2 and
        negative_prompt_2 unset, so every encoder reads the same prompts)."""
        # Copied from diffusers 0.42 StableDiffusionXLPipeline.encode_prompt: the body of its loops over the
        # encoders, then its dtype cast and per-image repeat, applied to this encoder's part (the pipeline casts
        # and repeats the concatenation of the parts, which is the same numbers).
        tokenizer, text_encoder = self.tokenizers[encoder], self.text_encoders[encoder]
        text_input_ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        output = text_encoder(text_input_ids.to(self.device), output_hidden_states=True)
        # "We are only ALWAYS interested in the pooled output of the final text encoder": the pipeline keeps the
        # first 2-D output[0], which only a CLIPTextModelWithProjection (text_encoder_2) has.
        pooled = output[0] if output[0].ndim == 2 else None
        prompt_embeds = output.hidden_states[-2]

        negative_embeds = negative_pooled = None
        zero_out_negative_prompt = negative_prompts is None and self.force_zeros_for_empty_prompt
        if do_classifier_free_guidance and zero_out_negative_prompt:
            negative_embeds = torch.zeros_like(prompt_embeds)
            negative_pooled = torch.zeros_like(pooled) if pooled is not None else None
        elif do_classifier_free_guidance:
            uncond_tokens = negative_prompts or [""] * len(prompts)
            uncond_input = tokenizer(
                uncond_tokens, padding="max_length", max_length=prompt_embeds.shape[1], truncation=True,
                return_tensors="pt",
            )
            output = text_encoder(uncond_input.input_ids.to(self.device), output_hidden_states=True)
            negative_pooled = output[0] if output[0].ndim == 2 else None
            negative_embeds = output.hidden_states[-2]

        # The pipeline casts to text_encoder_2's dtype (this service's dtype where another replica hosts it).
        cast = self.text_encoders["text_encoder_2"].dtype if "text_encoder_2" in self.text_encoders else self.dtype
        prompt_embeds = _per_image(prompt_embeds.to(dtype=cast, device=self.device), num_images_per_prompt)
        if negative_embeds is not None:
            negative_embeds = _per_image(negative_embeds.to(dtype=cast, device=self.device), num_images_per_prompt)
        if pooled is not None:
            pooled = _per_image(pooled, num_images_per_prompt)
        if negative_pooled is not None:
            negative_pooled = _per_image(negative_pooled, num_images_per_prompt)
        return EncoderEmbeddings(encoder, prompt_embeds, negative_embeds, pooled, negative_pooled)

"""Text conditioning of a denoising run: the per-encoder embeddings of a multi-encoder model combined as the
family's diffusers pipeline combines them in its encode_prompt.

The text encoder returns what each encoder produced before the pipeline combines them (services/text_encoder,
common.v1.EncoderEmbeddings); the encoders may run on different replicas. ``combine`` does the pipeline's own
arithmetic on them, so the denoiser feeds the network exactly what the in-process pipeline would:

- SDXL (StableDiffusionXLPipeline.encode_prompt): prompt_embeds = cat([text_encoder, text_encoder_2], dim=-1);
  pooled = text_encoder_2's pooled output. The refiner has text_encoder_2 only.
- SD3 (StableDiffusion3Pipeline.encode_prompt): clip = cat([text_encoder, text_encoder_2], -1), padded with zeros
  to T5's width; prompt_embeds = cat([clip, text_encoder_3], dim=-2); pooled = cat of the two CLIP pooled outputs.
- Flux (FluxPipeline.encode_prompt): prompt_embeds = text_encoder_2 (T5); pooled = text_encoder's pooled output.

Each encoder's tensors arrive already repeated per image (num_images_per_prompt); repetition commutes with the
concatenations, so the result is bit-identical to the pipeline's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from services.runtime.errors import InvalidArgument, quote
from services.runtime.families import Family

#: Reason of every refusal of text embeddings that do not fit the model.
INVALID_TEXT_EMBEDDINGS = "INVALID_TEXT_EMBEDDINGS"


@dataclass(frozen=True)
class TextConditioning:
    """The text conditioning a denoising loop feeds its network, combined as the pipeline does."""

    #: Sequence embeddings [batch, tokens, width].
    prompt_embeds: torch.Tensor
    #: Unconditional sequence embeddings of the same shape; None without classifier-free guidance.
    negative_prompt_embeds: torch.Tensor | None = None
    #: Pooled embeddings [batch, size] (SDXL's text_embeds, SD3's and Flux's pooled_projections).
    pooled_prompt_embeds: torch.Tensor | None = None
    #: Unconditional pooled embeddings; None without classifier-free guidance.
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        """Images in the run (prompts times images per prompt)."""
        return self.prompt_embeds.shape[0]


@dataclass(frozen=True)
class EncoderParts:
    """What one text encoder produced for a request (common.v1.EncoderEmbeddings, decoded)."""

    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None


#: Per family: the encoders the pipeline combines, and which of their outputs it takes ("sequence", "pooled").
_INPUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "sdxl": {"text_encoder": ("sequence",), "text_encoder_2": ("sequence", "pooled")},
    "sdxl-refiner": {"text_encoder_2": ("sequence", "pooled")},
    "sd3": {"text_encoder": ("sequence", "pooled"), "text_encoder_2": ("sequence", "pooled"),
            "text_encoder_3": ("sequence",)},
    "flux": {"text_encoder": ("pooled",), "text_encoder_2": ("sequence",)},
}


def expected_encoders(family: Family) -> tuple[str, ...]:
    """The text encoders whose embeddings a denoising run of this family needs, in component order."""
    return tuple(_INPUTS.get(family.name, {}))


def _refuse(message: str, field: str = "text_embeddings") -> InvalidArgument:
    return InvalidArgument(message, reason=INVALID_TEXT_EMBEDDINGS, metadata={"field": field})


def _check_parts(family: Family, parts: dict[str, EncoderParts], do_cfg: bool) -> None:
    """Every encoder the pipeline combines is there, with the outputs it takes, in shapes that fit together."""
    inputs = _INPUTS[family.name]
    unknown = sorted(set(parts) - set(inputs))
    if unknown:
        raise _refuse(f"text_embeddings has encoder {quote(unknown[0])}, which a {family.title} model does not use; "
                      f"send one entry for each of {', '.join(inputs)}")
    missing = [e for e in inputs if e not in parts]
    if missing:
        raise _refuse(f"text_embeddings lacks encoder {', '.join(missing)}; a {family.title} model needs one entry "
                      f"for each of {', '.join(inputs)} (a text-encoder replica reports the encoders it does not "
                      "host in missing_encoders: ask another replica for them)")
    batch = None
    for encoder, needs in inputs.items():
        part = parts[encoder]
        wanted = [("prompt_embeds", "negative_prompt_embeds", 3)] if "sequence" in needs else []
        if "pooled" in needs:
            wanted.append(("pooled_prompt_embeds", "negative_pooled_prompt_embeds", 2))
        for name, negative_name, rank in wanted:
            tensor, negative = getattr(part, name), getattr(part, negative_name)
            field = f"text_embeddings[{encoder}].{name}"
            if tensor is None:
                raise _refuse(f"{field} is missing; the {family.title} pipeline takes it from {encoder}", field)
            if tensor.ndim != rank or tensor.shape[0] < 1 or any(d < 1 for d in tensor.shape):
                raise _refuse(f"{field} has shape {list(tensor.shape)}; it must have {rank} non-empty dimensions, "
                              "batch first", field)
            if batch is None:
                batch = tensor.shape[0]
            elif tensor.shape[0] != batch:
                raise _refuse(f"{field} has batch {tensor.shape[0]} but other embeddings have {batch}; every "
                              "encoder's embeddings must be for the same prompts and images per prompt", field)
            if do_cfg:
                if negative is None:
                    raise InvalidArgument(
                        f"guidance_scale > 1 needs text_embeddings[{encoder}].{negative_name} (classifier-free "
                        "guidance); encode with do_classifier_free_guidance or set guidance_scale <= 1",
                        reason="MISSING_NEGATIVE_EMBEDS", metadata={"field": f"text_embeddings[{encoder}]"})
                if negative.shape != tensor.shape:
                    raise _refuse(f"text_embeddings[{encoder}].{negative_name} has shape {list(negative.shape)}, "
                                  f"{name} {list(tensor.shape)}; they must match",
                                  f"text_embeddings[{encoder}].{negative_name}")
    if family.name == "sd3":
        clip = [parts[e].prompt_embeds for e in ("text_encoder", "text_encoder_2")]
        # No width check against T5: the pipeline's F.pad crops CLIP when T5 is narrower (tiny models).
        if clip[0].shape[1] != clip[1].shape[1]:
            raise _refuse(f"the CLIP encoders' prompt_embeds have {clip[0].shape[1]} and {clip[1].shape[1]} tokens; "
                          "they must have the same (77)")
    if family.name in ("sdxl",):
        a, b = parts["text_encoder"].prompt_embeds, parts["text_encoder_2"].prompt_embeds
        if a.shape[1] != b.shape[1]:
            raise _refuse(f"text_encoder's prompt_embeds have {a.shape[1]} tokens, text_encoder_2's {b.shape[1]}; "
                          "they must have the same")


def combine(family: Family, parts: dict[str, EncoderParts], do_cfg: bool) -> TextConditioning:
    """Combine per-encoder embeddings as ``family``'s pipeline does (see the module docstring).

    Negatives are combined only with classifier-free guidance (``do_cfg``). Raises InvalidArgument
    (reason INVALID_TEXT_EMBEDDINGS, or MISSING_NEGATIVE_EMBEDS) when an encoder or an output is missing,
    an encoder is not one the family uses, or the shapes do not fit together.
    """
    if family.name not in _INPUTS:
        raise _refuse(f"a {family.title} model takes prompt_embeds, not text_embeddings", "prompt_embeds")
    _check_parts(family, parts, do_cfg)

    def side(negative: bool) -> tuple[torch.Tensor, torch.Tensor]:
        def seq(encoder):
            part = parts[encoder]
            return part.negative_prompt_embeds if negative else part.prompt_embeds

        def pooled(encoder):
            part = parts[encoder]
            return part.negative_pooled_prompt_embeds if negative else part.pooled_prompt_embeds

        if family.name == "sdxl":
            # Copied from StableDiffusionXLPipeline.encode_prompt: torch.concat(prompt_embeds_list, dim=-1)
            return torch.concat([seq("text_encoder"), seq("text_encoder_2")], dim=-1), pooled("text_encoder_2")
        if family.name == "sdxl-refiner":
            return seq("text_encoder_2"), pooled("text_encoder_2")
        if family.name == "sd3":
            # Copied from StableDiffusion3Pipeline.encode_prompt
            clip_prompt_embeds = torch.cat([seq("text_encoder"), seq("text_encoder_2")], dim=-1)
            t5_prompt_embed = seq("text_encoder_3")
            clip_prompt_embeds = torch.nn.functional.pad(
                clip_prompt_embeds, (0, t5_prompt_embed.shape[-1] - clip_prompt_embeds.shape[-1]))
            prompt_embeds = torch.cat([clip_prompt_embeds, t5_prompt_embed], dim=-2)
            return prompt_embeds, torch.cat([pooled("text_encoder"), pooled("text_encoder_2")], dim=-1)
        # flux: FluxPipeline.encode_prompt
        return seq("text_encoder_2"), pooled("text_encoder")

    prompt_embeds, pooled_prompt_embeds = side(False)
    negative = negative_pooled = None
    if do_cfg:
        negative, negative_pooled = side(True)
    return TextConditioning(prompt_embeds, negative, pooled_prompt_embeds, negative_pooled)

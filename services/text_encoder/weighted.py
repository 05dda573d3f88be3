"""AUTOMATIC1111's long, weighted prompt encoding for CLIP text encoders.

A faithful re-implementation (our own code, A1111's algorithm) of ``TextConditionalModel`` /
``FrozenCLIPEmbedderWithCustomWords`` in AUTOMATIC1111/stable-diffusion-webui ``modules/sd_hijack_clip.py``
(commit 5ad03e65863b0972e133c00692556752016f10c8), its "Original" emphasis (``modules/sd_emphasis.py``) and the
cond/uncond padding of ``modules/sd_samplers_cfg_denoiser.py`` (commit 72632242f7d612c7cb1c1b0b9f86ffcbfeb4e1e8),
on a transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` and its ``CLIPTokenizer``:

- the prompt is split into weighted fragments (``prompt_syntax.parse_prompt_attention``), each fragment tokenized
  without special tokens;
- tokens fill chunks of 75; ``BREAK`` starts a new chunk; when a chunk is full and a comma lies within the last
  ``comma_padding_backtrack`` (A1111's default 20) tokens, the tokens after that comma move to the next chunk;
- each chunk is ``BOS + 75 tokens + EOS``, short chunks filled with EOS and then, where the tokenizer's padding id
  differs from EOS, everything after the first EOS set to the padding id (A1111's ``id_pad``: EOS for CLIP ViT-L,
  0 = "!" for OpenCLIP; the diffusers tokenizers of SD 1.x, SD 2.x and SDXL carry exactly those as ``pad_token``);
- each chunk is encoded on its own and the chunks are concatenated along the sequence axis: ``[B, 77 * k, d]``;
- "Original" emphasis: each token's embedding times its weight, then the whole batch's mean restored;
- clip skip as A1111's ``CLIP_stop_at_last_layers``: ``hidden_states[-n]`` then the final layer norm (1 = the last
  layer's output as the encoder returns it);
- with a projection head, the pooled output is the first chunk's ``text_embeds`` (what A1111's SDXL conditioner
  takes), from the full encoder, before emphasis.

Textual-inversion embeddings (A1111's ``fixes``): where a request's active embedding's name starts in the token
stream (textual_inversion.find_at), the chunk takes one placeholder token per vector and a fix, and the encoder
call writes the vectors over the placeholders' embeddings (textual_inversion.fixes_for), as A1111 does.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from services.runtime.errors import InvalidArgument, quote
from services.runtime.prompt_syntax import parse_prompt_attention

from . import textual_inversion

__all__ = [
    "CHUNK_LENGTH",
    "EMPHASIS_MODES",
    "PromptChunk",
    "WeightedEmbeddings",
    "tokenize_weighted",
    "encode_weighted",
    "empty_prompt_embeds",
    "pad_cond_uncond",
    "pad_cond_uncond_v0",
]

#: Prompt tokens per chunk; each chunk adds BOS and EOS, 77 tokens in all (CLIP's context length).
CHUNK_LENGTH = 75
#: A1111's default of opts.comma_padding_backtrack (tokens).
COMMA_PADDING_BACKTRACK = 20
#: A1111's emphasis options: "Original" (its default), "No norm" (no mean restore), "Ignore" (brackets parsed,
#: weights dropped) and "None" (brackets are plain text).
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")


@dataclass
class PromptChunk:
    """One chunk of a prompt: 77 token ids (BOS, 75 prompt or EOS tokens, EOS) and each token's weight."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    #: Textual-inversion fixes: (offset among the prompt tokens, vectors [n, d]) (A1111's PromptChunkFix).
    fixes: list = field(default_factory=list)


@dataclass(frozen=True)
class WeightedEmbeddings:
    """The encoding of a batch of prompts."""

    #: [batch, 77 * chunks, hidden size]: each chunk's embeddings, concatenated along the sequence axis.
    prompt_embeds: torch.Tensor
    #: [batch, projection dim]: the first chunk's text_embeds, for a CLIPTextModelWithProjection; else None.
    pooled_prompt_embeds: torch.Tensor | None
    #: The chunks encoded, per prompt (shorter prompts were filled with empty chunks up to the longest).
    chunks: list[list[PromptChunk]]
    #: A1111's token count: the longest prompt's tokens, counted as its UI shows them ("12/75", "80/150").
    token_count: int


def _comma_token(tokenizer) -> int | None:
    return tokenizer.get_vocab().get(",</w>")


def tokenize_weighted(
    tokenizer,
    prompt: str,
    *,
    emphasis: str = "Original",
    comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK,
) -> tuple[list[PromptChunk], int]:
    """A prompt's chunks (77 ids and weights each) and its token count, as A1111's ``tokenize_line``.

    Chunks are filled with the EOS id here; ``encode_weighted`` swaps in the padding id where it differs.
    """
    _check_emphasis(emphasis)
    fragments = parse_prompt_attention(prompt) if emphasis != "None" else [[prompt, 1.0]]
    tokenized = tokenizer([text for text, _ in fragments], truncation=False, add_special_tokens=False)["input_ids"]
    bos, eos, comma = tokenizer.bos_token_id, tokenizer.eos_token_id, _comma_token(tokenizer)

    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    token_count = 0
    last_comma = -1

    def close_chunk(is_last: bool = False) -> None:
        nonlocal chunk, token_count, last_comma
        # The last chunk counts its real tokens; every other one counts as full.
        token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
        fill = CHUNK_LENGTH - len(chunk.tokens)
        if fill > 0:
            chunk.tokens += [eos] * fill
            chunk.multipliers += [1.0] * fill
        chunk.tokens = [bos, *chunk.tokens, eos]
        chunk.multipliers = [1.0, *chunk.multipliers, 1.0]
        last_comma = -1
        chunks.append(chunk)
        chunk = PromptChunk()

    for tokens, (text, weight) in zip(tokenized, fragments):
        if text == "BREAK" and weight == -1:
            close_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif (comma_padding_backtrack != 0 and len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(chunk.tokens) - last_comma <= comma_padding_backtrack):
                # The chunk is full and a comma is near its end: the words after the comma start the next chunk.
                cut = last_comma + 1
                moved_tokens, moved_multipliers = chunk.tokens[cut:], chunk.multipliers[cut:]
                chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                close_chunk()
                chunk.tokens, chunk.multipliers = moved_tokens, moved_multipliers
            if len(chunk.tokens) == CHUNK_LENGTH:
                close_chunk()
            found = textual_inversion.find_at(tokenizer, tokens, position)
            if found is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1
                continue
            # A1111: an embedding's vectors stay in one chunk; placeholders (id 0) take their places.
            vectors, name_length = found
            if len(chunk.tokens) + vectors.shape[0] > CHUNK_LENGTH:
                close_chunk()
            chunk.fixes.append((len(chunk.tokens), vectors))
            chunk.tokens += [0] * vectors.shape[0]
            chunk.multipliers += [weight] * vectors.shape[0]
            position += name_length

    if chunk.tokens or not chunks:
        close_chunk(is_last=True)
    return chunks, token_count


def _empty_chunk(tokenizer) -> PromptChunk:
    """The chunk A1111 fills a shorter prompt of a batch with: BOS and 76 EOS, all of weight 1."""
    return PromptChunk(
        tokens=[tokenizer.bos_token_id] + [tokenizer.eos_token_id] * (CHUNK_LENGTH + 1),
        multipliers=[1.0] * (CHUNK_LENGTH + 2),
    )


def _check_emphasis(emphasis: str) -> None:
    if emphasis not in EMPHASIS_MODES:
        raise InvalidArgument(
            f"unknown emphasis {quote(emphasis)}: use one of {', '.join(EMPHASIS_MODES)}", reason="UNKNOWN_EMPHASIS"
        )


def _final_layer_norm(text_encoder) -> torch.nn.Module:
    # CLIPTextModel holds it; CLIPTextModelWithProjection holds a CLIPTextModel as text_model.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


@torch.no_grad()
def encode_weighted(
    text_encoder,
    tokenizer,
    prompts: str | Sequence[str],
    *,
    clip_skip: int = 1,
    final_layer_norm: bool = True,
    emphasis: str = "Original",
    comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK,
    pad_token_id: int | None = None,
    max_chunks: int | None = None,
) -> WeightedEmbeddings:
    """Encode prompts as A1111 does (``TextConditionalModel.forward``): chunks of 75 tokens, weights, clip skip.

    ``prompts`` are encoded as one batch, as A1111 encodes the texts of one prompt's schedule (prompt editing):
    the batch has as many chunks as its longest prompt, and the "Original" emphasis restores the mean of the
    whole batch. The sequence embeddings are ``hidden_states[-clip_skip]`` followed by the final layer norm when
    ``final_layer_norm`` (A1111's SD 1.x: ``clip_skip`` = CLIP_stop_at_last_layers, layer norm on); A1111's
    SDXL takes ``clip_skip=2, final_layer_norm=False`` from both of its encoders. ``pad_token_id`` defaults to
    the tokenizer's padding id. ``max_chunks`` refuses longer prompts (PROMPT_TOO_LONG).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise InvalidArgument("there is no prompt to encode", reason="INVALID_ARGUMENT")
    num_layers = text_encoder.config.num_hidden_layers
    if not 1 <= clip_skip <= num_layers:
        raise InvalidArgument(f"clip skip must be between 1 and {num_layers} for this text encoder",
                              reason="INVALID_CLIP_SKIP")
    _check_emphasis(emphasis)

    chunks_of: dict[str, list[PromptChunk]] = {}
    token_count = 0
    for prompt in prompts:
        if prompt not in chunks_of:
            chunks_of[prompt], count = tokenize_weighted(
                tokenizer, prompt, emphasis=emphasis, comma_padding_backtrack=comma_padding_backtrack
            )
            token_count = max(token_count, count)
    batch_chunks = [chunks_of[prompt] for prompt in prompts]
    chunk_count = max(len(chunks) for chunks in batch_chunks)
    if max_chunks is not None and chunk_count > max_chunks:
        raise InvalidArgument(
            f"the prompt has {token_count} tokens, more than the {max_chunks * CHUNK_LENGTH} allowed: shorten it",
            reason="PROMPT_TOO_LONG",
        )
    empty = _empty_chunk(tokenizer)
    batch_chunks = [chunks + [empty] * (chunk_count - len(chunks)) for chunks in batch_chunks]

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    device = text_encoder.device
    embeds, pooled = [], None
    for index in range(chunk_count):
        rows = [chunks[index] for chunks in batch_chunks]
        tokens = torch.tensor([row.tokens for row in rows], dtype=torch.long, device=device)
        if pad != eos:
            # Everything after a chunk's first EOS becomes the padding id (A1111's process_tokens).
            for row_index, row in enumerate(rows):
                tokens[row_index, row.tokens.index(eos) + 1:] = pad
        with textual_inversion.fixes_for(text_encoder, [row.fixes for row in rows]):
            output = text_encoder(input_ids=tokens, output_hidden_states=True)
        if clip_skip == 1 and final_layer_norm:
            z = output.last_hidden_state
        else:
            z = output.hidden_states[-clip_skip]
            if final_layer_norm:
                z = _final_layer_norm(text_encoder)(z)
        if index == 0 and getattr(output, "text_embeds", None) is not None:
            pooled = output.text_embeds
        multipliers = torch.tensor([row.multipliers for row in rows], dtype=torch.float32, device=device)
        embeds.append(_emphasize(z, multipliers, emphasis))
    return WeightedEmbeddings(
        prompt_embeds=torch.cat(embeds, dim=1), pooled_prompt_embeds=pooled, chunks=batch_chunks,
        token_count=token_count,
    )


def _emphasize(z: torch.Tensor, multipliers: torch.Tensor, emphasis: str) -> torch.Tensor:
    """A1111's emphasis on one chunk's batch ``z`` [B, 77, d] with weights [B, 77]."""
    if emphasis in ("Ignore", "None"):
        return z
    weighted = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    if emphasis == "Original":
        # A1111: "restoring original mean is likely not correct, but it seems to work well to prevent artifacts".
        # A mean of exactly 0 (a final layer norm still at its initial weights, as in random test models) would
        # make A1111's ratio 0/0 = NaN; there we leave the weighted embeddings as they are.
        new_mean = weighted.mean()
        if new_mean != 0:
            weighted = weighted * (z.mean() / new_mean)
    return weighted.to(z.dtype)


def empty_prompt_embeds(text_encoder, tokenizer, **options) -> torch.Tensor:
    """The empty prompt's embeddings [1, 77, d] (A1111's ``cond_stage_model_empty_prompt``), to pad with."""
    return encode_weighted(text_encoder, tokenizer, [""], **options).prompt_embeds


def pad_cond_uncond(cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give prompt and negative prompt embeddings the same length, as A1111's "Pad prompt/negative prompt" option.

    The shorter one gets whole copies of the empty prompt's embeddings ``empty`` [1, 77, d] appended (for SDXL:
    both encoders' empty embeddings concatenated along the last axis). A1111's default (neither option) instead
    runs the UNet once for each when their lengths differ.
    """
    repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
    if repeats < 0:
        cond = torch.cat([cond, empty.repeat((cond.shape[0], -repeats, 1))], dim=1)
    elif repeats > 0:
        uncond = torch.cat([uncond, empty.repeat((uncond.shape[0], repeats, 1))], dim=1)
    return cond, uncond


def pad_cond_uncond_v0(cond: torch.Tensor, uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A1111's "Pad prompt/negative prompt (v0)" option (DDIM's padding before 1.6): the negative prompt's last
    vector repeated up to the prompt's length, or the negative prompt cut to it."""
    if uncond.shape[1] < cond.shape[1]:
        uncond = torch.cat([uncond, uncond[:, -1:].repeat([1, cond.shape[1] - uncond.shape[1], 1])], dim=1)
    elif uncond.shape[1] > cond.shape[1]:
        uncond = uncond[:, :cond.shape[1]]
    return cond, uncond

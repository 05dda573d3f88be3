"""A1111's long, weighted prompt encoding (services/text_encoder/weighted.py) on the tiny SD 1.5 and SDXL encoders.

Expected values are computed by hand here (tokenize, split, wrap, pad, run the encoder, weight) or by diffusers'
own ``encode_prompt``; float32 on CPU, in-process only.
"""
from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from services.runtime.errors import InvalidArgument
from services.tiny_models.tokenizer import build_clip_tokenizer
from services.text_encoder.weighted import (
    encode_weighted,
    empty_prompt_embeds,
    pad_cond_uncond,
    pad_cond_uncond_v0,
    tokenize_weighted,
)

# 49 tokens of the tiny tokenizer, no commas: four of them make a 196-token prompt (three chunks).
SENTENCE = ("a photo of an astronaut riding a horse on the moon in a white space suit floating above the earth "
            "with high quality and sharp focus ")
LONG_PROMPT = (SENTENCE * 4).strip()
EXACT = {"atol": 1e-6, "rtol": 0}


@pytest.fixture(scope="module")
def sd15(tiny_model):
    """The tiny SD 1.5's (text encoder, tokenizer)."""
    encoder = CLIPTextModel.from_pretrained(tiny_model / "text_encoder").eval()
    return encoder, CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")


@pytest.fixture(scope="module")
def sdxl(tiny_family_models):
    """The tiny SDXL's two (text encoder, tokenizer) pairs: CLIP-L style, then bigG style with a projection."""
    root = tiny_family_models["sdxl"]
    return (
        (CLIPTextModel.from_pretrained(root / "text_encoder").eval(),
         CLIPTokenizer.from_pretrained(root / "tokenizer")),
        (CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2").eval(),
         CLIPTokenizer.from_pretrained(root / "tokenizer_2")),
    )


def hand_chunks(tokenizer, ids: list[int]) -> torch.Tensor:
    """Split ids in 75s, wrap each in BOS ... EOS, pad to 77 with the tokenizer's padding id: [chunks, 77]."""
    rows = []
    for start in range(0, max(len(ids), 1), 75):
        part = ids[start:start + 75]
        row = [tokenizer.bos_token_id, *part, tokenizer.eos_token_id]
        rows.append(row + [tokenizer.pad_token_id] * (77 - len(row)))
    return torch.tensor(rows)


@torch.no_grad()
def hand_encode(encoder, tokenizer, ids: list[int], layer: int = -1, norm: bool = True) -> torch.Tensor:
    """Each chunk through the encoder on its own, then concatenated along the sequence: [1, 77 * chunks, d]."""
    outputs = []
    for row in hand_chunks(tokenizer, ids):
        hidden = encoder(input_ids=row[None], output_hidden_states=True).hidden_states[layer]
        final_layer_norm = encoder.text_model.final_layer_norm if hasattr(encoder, "text_model") else \
            encoder.final_layer_norm
        outputs.append(final_layer_norm(hidden) if norm else hidden)
    return torch.cat(outputs, dim=1)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_plain_prompt_equals_diffusers_sd15(tiny_model, sd15):
    encoder, tokenizer = sd15
    pipe = diffusers.StableDiffusionPipeline(
        vae=None, text_encoder=encoder, tokenizer=tokenizer, unet=None, scheduler=None, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    # diffusers 0.42's clip_skip fails on transformers 5's CLIPTextModel (it reads text_encoder.text_model), so
    # clip skip is checked by hand below.
    for prompt in ("a photo of a cat on the moon", ""):
        expected, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        got = encode_weighted(encoder, tokenizer, prompt).prompt_embeds
        torch.testing.assert_close(got, expected, **EXACT)


def test_plain_prompt_equals_diffusers_sdxl(tiny_family_models, sdxl):
    (encoder, tokenizer), (encoder_2, tokenizer_2) = sdxl
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=encoder, text_encoder_2=encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=None, scheduler=None,
    )
    prompt = "a photo of a cat on the moon"
    expected, _, expected_pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    first = encode_weighted(encoder, tokenizer, prompt, clip_skip=2, final_layer_norm=False)
    second = encode_weighted(encoder_2, tokenizer_2, prompt, clip_skip=2, final_layer_norm=False)
    assert first.pooled_prompt_embeds is None
    torch.testing.assert_close(torch.cat([first.prompt_embeds, second.prompt_embeds], dim=-1), expected, **EXACT)
    torch.testing.assert_close(second.pooled_prompt_embeds, expected_pooled, **EXACT)


def test_weight_one_equals_plain_word(sd15, sdxl):
    sdxl_layers = {"clip_skip": 2, "final_layer_norm": False}
    for (encoder, tokenizer), options in ((sd15, {}), (sdxl[0], sdxl_layers), (sdxl[1], sdxl_layers)):
        plain = encode_weighted(encoder, tokenizer, "a cat on a mat", **options)
        weighted = encode_weighted(encoder, tokenizer, "a (cat:1.0) on a mat", **options)
        assert torch.equal(weighted.prompt_embeds, plain.prompt_embeds)
        if plain.pooled_prompt_embeds is not None:
            assert torch.equal(weighted.pooled_prompt_embeds, plain.pooled_prompt_embeds)
    # The tiny SDXL CLIP-L's final layer norm is at its initial weights: its output's mean is exactly 0, where
    # A1111's mean restore would divide 0 by 0 there; nothing may turn NaN.
    encoder, tokenizer = sdxl[0]
    plain = encode_weighted(encoder, tokenizer, "a cat on a mat").prompt_embeds
    assert plain.mean() == 0 and torch.isfinite(encode_weighted(encoder, tokenizer, "a (cat:1.5)").prompt_embeds).all()
    # ... and a weight other than 1 does change it
    encoder, tokenizer = sd15
    assert not torch.allclose(encode_weighted(encoder, tokenizer, "a (cat:1.3) on a mat").prompt_embeds,
                              encode_weighted(encoder, tokenizer, "a cat on a mat").prompt_embeds)


@pytest.mark.parametrize("which", ["sd15", "sdxl-1", "sdxl-2"])
def test_long_prompt_equals_chunks_encoded_by_hand(which, sd15, sdxl):
    encoder, tokenizer = {"sd15": sd15, "sdxl-1": sdxl[0], "sdxl-2": sdxl[1]}[which]
    ids = ids_of(tokenizer, LONG_PROMPT)
    assert 150 < len(ids) <= 225 and "," not in LONG_PROMPT
    got = encode_weighted(encoder, tokenizer, LONG_PROMPT)
    assert got.prompt_embeds.shape == (1, 3 * 77, encoder.config.hidden_size)
    assert got.token_count == len(ids)
    torch.testing.assert_close(got.prompt_embeds, hand_encode(encoder, tokenizer, ids), **EXACT)
    if which == "sdxl-2":  # pads with "!" (id 0) after the last chunk's EOS, as A1111's OpenCLIP id_pad
        last = got.chunks[0][-1].tokens
        assert tokenizer.pad_token_id != tokenizer.eos_token_id and last[-1] == tokenizer.eos_token_id
        first_chunk = hand_chunks(tokenizer, ids)[:1]
        expected_pooled = encoder(input_ids=first_chunk).text_embeds
        torch.testing.assert_close(got.pooled_prompt_embeds, expected_pooled, **EXACT)
    # SDXL's layers: hidden_states[-2], no final layer norm
    if which != "sd15":
        got = encode_weighted(encoder, tokenizer, LONG_PROMPT, clip_skip=2, final_layer_norm=False)
        torch.testing.assert_close(got.prompt_embeds, hand_encode(encoder, tokenizer, ids, -2, norm=False), **EXACT)


# The tiny encoders' final layer norms are at their initial weights (1, 0), so their outputs' mean is about 0 and
# a mean restore on it is rounding noise: the weighting tests read the last layer before the norm instead.
RAW = {"final_layer_norm": False}


def test_weight_scales_exactly_its_tokens_then_the_mean_is_restored(sd15):
    encoder, tokenizer = sd15
    plain_ids = ids_of(tokenizer, "a cat on a mat")
    covered = ids_of(tokenizer, "cat")
    start = len(ids_of(tokenizer, "a"))
    assert plain_ids[start:start + len(covered)] == covered
    base = hand_encode(encoder, tokenizer, plain_ids, norm=False)
    multipliers = torch.ones(1, 77)
    multipliers[0, 1 + start:1 + start + len(covered)] = 1.5  # +1: BOS
    scaled = base * multipliers[..., None]

    no_norm = encode_weighted(encoder, tokenizer, "a (cat:1.5) on a mat", emphasis="No norm", **RAW).prompt_embeds
    torch.testing.assert_close(no_norm, scaled, **EXACT)
    changed = (no_norm != base).any(dim=-1)[0]
    assert changed.nonzero().flatten().tolist() == list(range(1 + start, 1 + start + len(covered)))

    got = encode_weighted(encoder, tokenizer, "a (cat:1.5) on a mat", **RAW).prompt_embeds
    ratio = base.mean() / scaled.mean()
    assert abs(ratio.item() - 1) > 1e-3  # the mean restore does something here
    torch.testing.assert_close(got, scaled * ratio, **EXACT)
    torch.testing.assert_close(got.mean(), base.mean(), atol=1e-6, rtol=1e-5)
    # "Ignore" parses the brackets and drops the weight; "None" keeps them as text
    ignored = encode_weighted(encoder, tokenizer, "a (cat:1.5) on a mat", emphasis="Ignore", **RAW).prompt_embeds
    torch.testing.assert_close(ignored, base, **EXACT)
    literal = ids_of(tokenizer, "a (cat) on a mat")
    (chunk,), _ = tokenize_weighted(tokenizer, "a (cat) on a mat", emphasis="None")
    assert len(literal) > len(plain_ids) and chunk.tokens[1:1 + len(literal)] == literal
    assert set(chunk.multipliers) == {1.0}


def test_the_mean_is_restored_over_the_whole_batch(sd15):
    """A1111 encodes a prompt's schedule (prompt editing) as one batch: the mean restore spans all of it."""
    encoder, tokenizer = sd15
    batch = encode_weighted(encoder, tokenizer, ["a (cat:1.5)", "a dog on a mat"], **RAW).prompt_embeds
    base = torch.cat([hand_encode(encoder, tokenizer, ids_of(tokenizer, text), norm=False)
                      for text in ("a cat", "a dog on a mat")])
    multipliers = torch.ones(2, 77)
    start = 1 + len(ids_of(tokenizer, "a"))
    multipliers[0, start:start + len(ids_of(tokenizer, "cat"))] = 1.5
    scaled = base * multipliers[..., None]
    torch.testing.assert_close(batch, scaled * (base.mean() / scaled.mean()), **EXACT)
    alone = encode_weighted(encoder, tokenizer, "a (cat:1.5)", **RAW).prompt_embeds
    assert not torch.allclose(batch[:1], alone)


def test_break_starts_a_new_chunk(sd15):
    encoder, tokenizer = sd15
    got = encode_weighted(encoder, tokenizer, "a cat BREAK a dog on a mat")
    assert got.prompt_embeds.shape[1] == 2 * 77
    expected = torch.cat([hand_encode(encoder, tokenizer, ids_of(tokenizer, "a cat")),
                          hand_encode(encoder, tokenizer, ids_of(tokenizer, "a dog on a mat"))], dim=1)
    torch.testing.assert_close(got.prompt_embeds, expected, **EXACT)
    # a BREAK at the start gives an empty first chunk; "BREAK" inside a word is text
    assert len(tokenize_weighted(tokenizer, "BREAK a cat")[0]) == 2
    assert len(tokenize_weighted(tokenizer, "aBREAK cat")[0]) == 1


TOKENIZE_LINE = json.loads((Path(__file__).parent / "data" / "a1111_prompt_cases.json").read_text())["tokenize_line"]


@pytest.mark.parametrize(
    "case", TOKENIZE_LINE["cases"],
    ids=[f"{case['prompt'][:24]!r}-{case['comma_padding_backtrack']}" for case in TOKENIZE_LINE["cases"]],
)
def test_chunks_equal_a1111_tokenize_line(case):
    """Token ids, weights and token count as A1111's own tokenize_line gave them on the tiny tokenizer."""
    chunks, token_count = tokenize_weighted(build_clip_tokenizer(), case["prompt"],
                                            comma_padding_backtrack=case["comma_padding_backtrack"])
    assert [chunk.tokens for chunk in chunks] == case["tokens"]
    assert [chunk.multipliers for chunk in chunks] == case["multipliers"]
    assert token_count == case["token_count"]


def test_comma_backtrack_moves_the_words_after_a_near_comma(sd15):
    encoder, tokenizer = sd15
    comma = tokenizer.get_vocab()[",</w>"]
    head = ids_of(tokenizer, SENTENCE)  # 49 tokens
    filler = ids_of(tokenizer, "a cat on a mat")
    # 49 + 15 tokens, a comma at index 64, then 14 more: the chunk fills at 75 with the comma 11 tokens back.
    prompt = SENTENCE + "a cat on a mat " * 3 + ", " + "a cat on a mat " * 3
    ids = ids_of(tokenizer, prompt)
    at = ids.index(comma)
    assert at == len(head) + 3 * len(filler) and len(ids) > 75 and 75 - at <= 20
    chunks, _ = tokenize_weighted(tokenizer, prompt)
    assert [len(chunk.tokens) for chunk in chunks] == [77, 77]
    eos = tokenizer.eos_token_id
    assert chunks[0].tokens == [tokenizer.bos_token_id, *ids[:at + 1]] + [eos] * (76 - (at + 1))
    assert chunks[1].tokens[1:len(ids) - at] == ids[at + 1:]
    # without the backtrack the split is a plain 75
    chunks, _ = tokenize_weighted(tokenizer, prompt, comma_padding_backtrack=0)
    assert chunks[0].tokens[1:76] == ids[:75]
    got = encode_weighted(encoder, tokenizer, prompt, comma_padding_backtrack=0).prompt_embeds
    torch.testing.assert_close(got, hand_encode(encoder, tokenizer, ids), **EXACT)


def test_clip_skip_2_is_the_penultimate_layer_with_the_final_norm(sd15):
    encoder, tokenizer = sd15
    ids = ids_of(tokenizer, "a photo of a cat")
    got = encode_weighted(encoder, tokenizer, "a photo of a cat", clip_skip=2).prompt_embeds
    torch.testing.assert_close(got, hand_encode(encoder, tokenizer, ids, layer=-2), **EXACT)
    assert not torch.allclose(got, hand_encode(encoder, tokenizer, ids))
    with pytest.raises(InvalidArgument) as raised:
        encode_weighted(encoder, tokenizer, "a", clip_skip=encoder.config.num_hidden_layers + 1)
    assert raised.value.reason == "INVALID_CLIP_SKIP"


def test_pad_cond_uncond_as_a1111(sd15):
    encoder, tokenizer = sd15
    cond = encode_weighted(encoder, tokenizer, LONG_PROMPT).prompt_embeds  # 3 chunks
    uncond = encode_weighted(encoder, tokenizer, "blurry").prompt_embeds  # 1 chunk
    empty = empty_prompt_embeds(encoder, tokenizer)
    assert empty.shape == (1, 77, encoder.config.hidden_size)
    padded_cond, padded_uncond = pad_cond_uncond(cond, uncond, empty)
    assert padded_cond is cond and padded_uncond.shape == cond.shape
    assert torch.equal(padded_uncond[:, :77], uncond)
    assert torch.equal(padded_uncond[:, 77:154], empty[0][None]) and torch.equal(padded_uncond[:, 154:], empty)
    swapped_uncond, swapped_cond = pad_cond_uncond(uncond, cond, empty)
    assert torch.equal(swapped_uncond, padded_uncond) and swapped_cond is cond
    _, v0 = pad_cond_uncond_v0(cond, uncond)
    assert v0.shape == cond.shape and torch.equal(v0[:, 77:], uncond[:, -1:].expand(1, 154, -1))
    _, cut = pad_cond_uncond_v0(uncond, cond)
    assert torch.equal(cut, cond[:, :77])


def test_a_batch_is_filled_with_empty_chunks_and_limits_hold(sd15):
    encoder, tokenizer = sd15
    got = encode_weighted(encoder, tokenizer, [LONG_PROMPT, "a cat"])
    assert got.prompt_embeds.shape[:2] == (2, 3 * 77)
    assert got.chunks[1][1].tokens == [tokenizer.bos_token_id] + [tokenizer.eos_token_id] * 76
    with pytest.raises(InvalidArgument) as raised:
        encode_weighted(encoder, tokenizer, LONG_PROMPT, max_chunks=2)
    assert raised.value.reason == "PROMPT_TOO_LONG"
    with pytest.raises(InvalidArgument) as raised:
        encode_weighted(encoder, tokenizer, "a", emphasis="Loud")
    assert raised.value.reason == "UNKNOWN_EMPHASIS"

"""A small CLIP tokenizer built locally, with no model hub access.

The real SD 1.5 tokenizer has 49408 ids; our tiny text encoder only has 1000 embeddings, and
nothing may be downloaded. So we rebuild CLIP's tokenizer layout (byte alphabet, "</w>"
word-end suffix, BPE merges, start/end specials last) and learn the merges ourselves from a
fixed corpus. Everything is a pure function of the corpus below, so the tokenizer, and every
model folder that embeds it, is identical on every machine.
"""
from __future__ import annotations

import functools
from collections import Counter

from transformers import CLIPTokenizer

__all__ = ["VOCAB_LIMIT", "build_clip_tokenizer", "byte_alphabet"]

# The tiny CLIPTextConfig has vocab_size=1000: every id the tokenizer emits must be below it.
VOCAB_LIMIT = 1000

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77  # CLIP's context length, as in SD 1.5

# Fixed training text. Changing a single character changes the merges, hence the ids, hence
# every generated model folder: treat it as frozen. It is written to look like the prompts the
# services see, so common prompt words end up as one or two tokens instead of many bytes.
_CORPUS = """\
A photo of an astronaut riding a horse on the moon. A photograph of an astronaut in a white
space suit, floating above the earth, high quality, highly detailed, sharp focus, 4k, 8k.
The astronaut is riding a brown horse across a red desert on mars, cinematic lighting.

A landscape photo of snowy mountains at sunset, with a calm blue lake and a green pine forest
in the foreground. Golden hour light over rolling hills, a river winding through a valley,
clouds in the sky, a waterfall in the distance. A beautiful landscape, wide angle, trending.

A cute cat sitting on a windowsill, a fluffy orange cat sleeping in the sun, a black cat with
green eyes, a portrait of a cat wearing a tiny hat. Two cats playing with a ball of red yarn.
A photo of a dog and a cat on a sofa, soft light, shallow depth of field.

Colors: red, orange, yellow, green, blue, purple, pink, black, white, gray, brown, gold and
silver. A vibrant, colorful painting with bright colors; a dark, moody image with muted colors.

Art styles: an oil painting in the style of the impressionists, a watercolor painting, a pencil
sketch, a charcoal drawing, digital art, concept art, pixel art, an anime illustration, a 3d
render, a cyberpunk city at night with neon lights, a fantasy castle, a surreal painting, a
still life, a studio portrait, a black and white photo, a vintage photograph, a masterpiece.
"""


def byte_alphabet() -> list[str]:
    """CLIP's 256 byte tokens in id order (the values of the byte-to-unicode table)."""
    return list(_bytes_to_unicode().values())


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters.

    Byte-level BPE needs every byte to be a visible, non-space character; this is the exact
    table the ByteLevel pre-tokenizer uses, so our base alphabet matches what it emits.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, codes)))


def _pretokenize(text: str, tokenizer: CLIPTokenizer) -> list[str]:
    """Split text into byte-level words exactly as the final tokenizer will.

    Reusing the tokenizer's own normalizer and pre-tokenizer (rather than a copy of CLIP's
    regex) guarantees the merges are learned on the same units they are later applied to.
    """
    backend = tokenizer.backend_tokenizer
    normalized = backend.normalizer.normalize_str(text)
    return [word for word, _span in backend.pre_tokenizer.pre_tokenize_str(normalized)]


def _learn_merges(words: Counter[str], max_merges: int) -> list[tuple[str, str]]:
    """Learn BPE merges: repeatedly merge the most frequent adjacent pair.

    Ties are broken by the lexicographically smallest pair so the result does not depend on
    dict ordering. Stops early once no pair occurs twice: merging a one-off pair would only
    memorize the corpus and spend ids for nothing.
    """
    # Each word is a tuple of symbols; the last one carries the word-end marker, as CLIP's BPE
    # model (end_of_word_suffix="</w>") expects.
    corpus: dict[tuple[str, ...], int] = {}
    for word, count in words.items():
        symbols = tuple(word[:-1]) + (word[-1] + END_OF_WORD,)
        corpus[symbols] = corpus.get(symbols, 0) + count

    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in corpus.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < 2:
            break
        merges.append(best)
        corpus = {_merge_pair(symbols, best): count for symbols, count in corpus.items()}
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Build (and cache) the vocabulary and merge list; immutable so the cache is safe to share."""
    alphabet = list(_bytes_to_unicode().values())
    base = alphabet + [char + END_OF_WORD for char in alphabet]
    vocab: dict[str, int] = {token: i for i, token in enumerate(base)}

    # A throwaway tokenizer with no merges, only to reuse its normalizer and pre-tokenizer.
    # Its unk token must exist in the vocab, hence the temporary specials.
    scaffold = CLIPTokenizer(
        vocab={**vocab, BOS_TOKEN: len(vocab), EOS_TOKEN: len(vocab) + 1}, merges=[]
    )
    words = Counter(_pretokenize(_CORPUS, scaffold))

    # Two ids are reserved for the specials, which CLIP puts last.
    merges = _learn_merges(words, max_merges=VOCAB_LIMIT - len(vocab) - 2)
    for left, right in merges:
        # Different merge paths can spell the same token ("ab"+"c", "a"+"bc"); one id suffices.
        vocab.setdefault(left + right, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    assert len(vocab) <= VOCAB_LIMIT, len(vocab)
    return tuple(vocab.items()), tuple(merges)


def build_clip_tokenizer() -> CLIPTokenizer:
    """Return a deterministic byte-level BPE CLIP tokenizer with fewer than 1000 ids.

    Layout follows CLIP: the 256 byte characters, the same with "</w>", merges learned from a
    fixed embedded corpus, then "<|startoftext|>" and "<|endoftext|>" as the last two ids.
    Padding uses "<|endoftext|>" and model_max_length is 77, as in SD 1.5. Any text can be
    encoded (unknown words fall back to byte tokens). A fresh instance is returned each call,
    so callers may mutate it freely.
    """
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        # The tokenizers backend wants merges as (left, right) pairs, not "left right" strings.
        merges=list(merges),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
    )

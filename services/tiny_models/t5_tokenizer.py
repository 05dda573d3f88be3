"""A small T5 tokenizer built locally, with no model hub access.

SD3 and Flux encode prompts with T5 as well as CLIP. Their tiny test models in diffusers use the
hub's hf-internal-testing/tiny-random-t5 tokenizer, which cannot be downloaded here, so we build
an equivalent one: T5's layout (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, then a SentencePiece
unigram vocabulary whose word-initial pieces start with "▁") with the pieces and their scores
computed from the same fixed corpus the CLIP tokenizer learns from. No training loop, no
threads: the vocabulary is a pure function of the corpus, so every model folder that embeds it
is identical on every machine.
"""
from __future__ import annotations

import functools
import math
from collections import Counter

from transformers import T5Tokenizer

# The same frozen prompt-like text the CLIP tokenizer learns its merges from.
from .tokenizer import _CORPUS

__all__ = ["T5_VOCAB_SIZE", "build_t5_tokenizer"]

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPACE = "▁"  # SentencePiece's word-start marker
# Flux's max_sequence_length defaults to 512 (SD3's to 256); T5's relative positions accept any.
MODEL_MAX_LENGTH = 512

# Printable ASCII: every such character is a piece on its own, so any ASCII prompt encodes
# without <unk>; other characters become <unk>, as with T5's own vocabulary.
_ALPHABET = [chr(code) for code in range(ord("!"), ord("~") + 1)]

# The tiny T5EncoderModel's vocab_size: every id the tokenizer emits must be below it.
T5_VOCAB_SIZE = 512


@functools.lru_cache(maxsize=1)
def _vocab_scores() -> tuple[tuple[str, float], ...]:
    """T5-ordered (piece, log-probability) pairs, specials first; immutable so the cache is safe."""
    words = Counter(SPACE + word for word in _CORPUS.split())
    chars = Counter(char for word in words.elements() for char in word)
    pieces: Counter[str] = Counter()
    for char in [SPACE, *_ALPHABET]:
        pieces[char] = chars[char] + 1  # +1: unseen characters stay encodable
    for char in _ALPHABET:
        pieces[SPACE + char] += 1
    # Whole words seen at least twice; ordered by count, then text, so ties cannot reorder ids.
    budget = T5_VOCAB_SIZE - 3 - len(pieces)
    frequent = sorted((w for w, n in words.items() if n >= 2), key=lambda w: (-words[w], w))
    for word in frequent[:budget]:
        pieces[word] += words[word]
    total = sum(pieces.values())
    scored = [(piece, math.log(count / total)) for piece, count in pieces.items()]
    scored.sort(key=lambda item: (-item[1], item[0]))
    vocab = [(PAD_TOKEN, 0.0), (EOS_TOKEN, 0.0), (UNK_TOKEN, 0.0), *scored]
    assert len(vocab) <= T5_VOCAB_SIZE, len(vocab)
    return tuple(vocab)


def build_t5_tokenizer() -> T5Tokenizer:
    """Return a deterministic unigram T5 tokenizer with fewer than :data:`T5_VOCAB_SIZE` ids.

    Specials as in T5 (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2; ``</s>`` appended to every text),
    no ``<extra_id_*>`` sentinels (encoders never use them), model_max_length 512. A fresh
    instance is returned each call, so callers may mutate it freely.
    """
    return T5Tokenizer(
        vocab=list(_vocab_scores()),
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_ids=0,
        model_max_length=MODEL_MAX_LENGTH,
    )

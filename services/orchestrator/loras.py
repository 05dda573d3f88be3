"""A Generate request's LoRAs: the ``loras`` field merged with the prompt's A1111 ``<lora:name:weight>`` tags,
checked, pinned to registry versions at acceptance, and the tags taken out of the text that is encoded; and its
textual-inversion embeddings (the ``embeddings`` field), checked and pinned likewise.

A1111 (extensions-builtin/Lora/extra_networks_lora.py) reads ``<lora:name>`` (multiplier 1),
``<lora:name:w>`` (text encoders and UNet), ``<lora:name:te:unet>`` and ``te=`` / ``unet=`` named arguments, from
the positive prompt only; the infotext keeps the tags in the prompt. Here a field entry and a tag naming the same
LoRA (same name before any '@') are one LoRA, the field entry's weights counting; so the request the job store
keeps (every LoRA in the field, pinned, the prompt unchanged) resolves to the same LoRAs, in the same order (the
deltas are added in that order: a float sum depends on it).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Awaitable, Callable

from latentwire.common.v1 import lora_pb2
from services.runtime.errors import QUOTE_LIMIT, InvalidArgument, NotFound, quote
from services.runtime.limits import check_lora_weights
from services.runtime.prompt_syntax import parse_extra_networks, split_extra_network_args


def _number(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InvalidArgument(f"prompt tag {quote(tag)} has {quote(text)} where a number (the weight) belongs",
                              reason="INVALID_LORA_TAG", metadata={"field": "prompt"})
    return value


def prompt_loras(prompt: str) -> list[lora_pb2.LoraWeight]:
    """The ``<lora:...>`` tags of a prompt as LoraWeight messages, in prompt order (A1111's reading)."""
    _, found = parse_extra_networks(prompt)
    result = []
    for name, args in found.get("lora", []):
        tag = f"<lora:{':'.join([name, *args])}>"
        positional, named = split_extra_network_args(args)
        te = _number(positional[0], tag) if positional else 1.0
        te = _number(named["te"], tag) if "te" in named else te
        unet = _number(positional[1], tag) if len(positional) > 1 else te
        unet = _number(named["unet"], tag) if "unet" in named else unet
        entry = lora_pb2.LoraWeight(weight=te)
        entry.model.name = name
        if unet != te:
            entry.unet_weight = unet
        result.append(entry)
    return result


def _base_name(reference: str) -> str:
    return reference.partition("@")[0]


def resolve_loras(loras, prompt: str) -> tuple[lora_pb2.LoraWeight, ...]:
    """The request's LoRAs in the order they are added: the prompt's tags in prompt order (a tag the field also
    names takes the field entry's weights), then the field's other entries; checked (count, weights, the same LoRA
    twice in the field). This order survives the infotext (the field's LoRAs written as tags after the prompt's)
    and the job store (every LoRA in the field, in this order)."""
    fields = list(loras)
    by_name: dict[str, lora_pb2.LoraWeight] = {}
    for i, entry in enumerate(fields):
        name = _base_name(entry.model.name)
        if name in by_name:
            raise InvalidArgument(f"loras names {quote(name)} twice; send each LoRA once",
                                  reason="DUPLICATE_LORA", metadata={"field": f"loras[{i}]"})
        by_name[name] = entry
    merged, seen = [], set()
    for entry in prompt_loras(prompt):
        name = _base_name(entry.model.name)
        if name not in seen:  # a LoRA tagged twice counts once
            seen.add(name)
            merged.append(by_name.get(name, entry))
    merged += [entry for name, entry in by_name.items() if name not in seen]
    check_lora_weights(merged)
    return tuple(merged)


async def pin_loras(loras: tuple[lora_pb2.LoraWeight, ...],
                    resolve_model: Callable[[str], Awaitable[str]]) -> tuple[lora_pb2.LoraWeight, ...]:
    """Each LoRA's reference pinned to the version it names now ("name@VERSION")."""
    pinned = []
    for entry in loras:
        copy = lora_pb2.LoraWeight()
        copy.CopyFrom(entry)
        try:
            copy.model.name = await resolve_model(entry.model.name)
        except NotFound as error:
            raise NotFound(f"LoRA {quote(entry.model.name)} is not in the model registry; import it first "
                           f"(`latentwire models import FILE.safetensors`): {error.message}", reason="LORA_NOT_FOUND",
                           metadata={"lora": entry.model.name[:QUOTE_LIMIT]}) from None
        pinned.append(copy)
    return tuple(pinned)


def encoded_prompt(prompt: str) -> str:
    """The text the text encoder reads: the prompt without its extra-network tags (A1111 takes them out)."""
    return parse_extra_networks(prompt)[0] if "<" in prompt else prompt


def for_encoding(params):
    """``params`` as the Encode of the job reads them: the prompt without its tags."""
    stripped = encoded_prompt(params.prompt)
    return params if stripped == params.prompt else dataclasses.replace(params, prompt=stripped)


def _weight_text(value: float) -> str:
    return f"{value:g}"


def infotext_prompt(prompt: str, loras) -> str:
    """The prompt as the infotext writes it: A1111 keeps the tags in the prompt; LoRAs only the field named are
    added as tags at its end (``<lora:name@VERSION:w>``, or ``:te:unet``), so png-info / ``generate --from`` applies
    every LoRA again."""
    in_prompt = {_base_name(e.model.name) for e in prompt_loras(prompt)} if "<" in prompt else set()
    tags = []
    for entry in loras:
        if _base_name(entry.model.name) in in_prompt:
            continue
        weights = [_weight_text(entry.weight)]
        unet = entry.unet_weight if entry.HasField("unet_weight") else entry.weight
        if entry.HasField("text_encoder_weight") or unet != entry.weight:
            te = entry.text_encoder_weight if entry.HasField("text_encoder_weight") else entry.weight
            weights = [_weight_text(te), _weight_text(unet)]
        tags.append(f"<lora:{':'.join([entry.model.name, *weights])}>")
    return " ".join([prompt, *tags]) if tags else prompt


# ----------------------------------------------------------------------------------------------
# Textual-inversion embeddings: the request's list, pinned like the LoRAs (the text encoder applies them).

#: Most embeddings one request names (the text encoder's bound, services/text_encoder/textual_inversion.py).
MAX_EMBEDDINGS = 16


def resolve_embeddings(references) -> tuple[str, ...]:
    """The request's embedding references, each once; at most MAX_EMBEDDINGS."""
    names = [reference.name for reference in references]
    if len(names) > MAX_EMBEDDINGS:
        raise InvalidArgument(f"embeddings has {len(names)} entries; at most {MAX_EMBEDDINGS}",
                              reason="TOO_MANY_EMBEDDINGS", metadata={"field": "embeddings"})
    for i, name in enumerate(names):
        if not name or _base_name(name) in [_base_name(n) for n in names[:i]]:
            raise InvalidArgument(f"embeddings[{i}] is empty or names an embedding twice; name each once",
                                  reason="INVALID_EMBEDDINGS", metadata={"field": f"embeddings[{i}]"})
    return tuple(names)


async def pin_embeddings(names: tuple[str, ...], resolve_model: Callable[[str], Awaitable[str]]) -> tuple[str, ...]:
    """Each embedding pinned to the version it names now ("name@VERSION")."""
    pinned = []
    for name in names:
        try:
            pinned.append(await resolve_model(name))
        except NotFound as error:
            raise NotFound(f"embedding {quote(name)} is not in the model registry; import it first "
                           f"(`latentwire models import FILE.safetensors`): {error.message}",
                           reason="EMBEDDING_NOT_FOUND", metadata={"embedding": name[:QUOTE_LIMIT]}) from None
    return tuple(pinned)

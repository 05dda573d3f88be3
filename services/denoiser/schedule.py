"""Per-step text conditioning: AUTOMATIC1111's prompt editing ``[from:to:when]`` and alternation ``[a|b]``.

The orchestrator computes the prompt schedules (services/orchestrator/prompts.py), has each distinct text encoded
once and sends the segments in DenoiseRequest.conditioning_schedule: each segment's end step and its embeddings, in
the shapes of the request's own prompt_embeds / text_embeddings (which hold the first segment's). The loops
(model.py for SD 1.x/2.x and SDXL, flow.py for SD3 and Flux) prepare each segment's network inputs once, as they
prepare the request's, and take the one for each loop iteration from here.

Which segment a loop iteration takes is A1111's ``reconstruct_cond_batch`` rule
(services.runtime.prompt_syntax.schedule_index_at): iteration ``i`` (0-based, the number of network evaluations
before it) takes the first segment whose end_at_step >= i. Since the loop index counts from the run's first
iteration, a resumed run (resume_from) picks the same segments as an uninterrupted one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from services.runtime.errors import InvalidArgument
from services.runtime.prompt_syntax import schedule_index_at

from .conditioning import TextConditioning

#: Reason of every refusal of a conditioning schedule.
INVALID_CONDITIONING_SCHEDULE = "INVALID_CONDITIONING_SCHEDULE"
#: Most segments a schedule may have (alternation makes one per step).
MAX_SEGMENTS = 1000

Prepared = TypeVar("Prepared")


@dataclass(frozen=True)
class ConditioningSchedule:
    """A run's text conditioning per span of steps: ``texts[j]`` for the iterations up to ``end_at_steps[j]``."""

    end_at_steps: tuple[int, ...]
    texts: tuple[TextConditioning, ...]

    def index_at(self, iteration: int) -> int:
        """The segment loop iteration ``iteration`` (0-based) takes."""
        return schedule_index_at([(end, None) for end in self.end_at_steps], iteration)

    def prepare(self, inputs_of: Callable[[TextConditioning], Prepared]) -> "PerStep[Prepared]":
        """Each segment's network inputs, computed once (``inputs_of``: the loop's own preparation)."""
        return PerStep(self, tuple(inputs_of(text) for text in self.texts))


@dataclass(frozen=True)
class PerStep(Generic[Prepared]):
    """Prepared network inputs per segment, picked by loop iteration."""

    schedule: ConditioningSchedule
    inputs: tuple[Prepared, ...]

    def at(self, iteration: int) -> Prepared:
        return self.inputs[self.schedule.index_at(iteration)]


def _refuse(message: str, field: str = "conditioning_schedule") -> InvalidArgument:
    return InvalidArgument(message, reason=INVALID_CONDITIONING_SCHEDULE, metadata={"field": field})


def _shapes(text: TextConditioning) -> list:
    return [None if t is None else list(t.shape) for t in (
        text.prompt_embeds, text.negative_prompt_embeds, text.pooled_prompt_embeds, text.negative_pooled_prompt_embeds)]


def from_segments(segments: Sequence, decode: Callable[[object], TextConditioning],
                  first: TextConditioning) -> ConditioningSchedule | None:
    """The schedule of DenoiseRequest.conditioning_schedule (None when empty): each segment decoded by ``decode``
    (the servicer's own decoding of a request's embeddings), its end steps at least 1 and increasing, its
    embeddings of the same shapes as the request's ``first``."""
    if not segments:
        return None
    if len(segments) > MAX_SEGMENTS:
        raise _refuse(f"conditioning_schedule has {len(segments)} segments; send at most {MAX_SEGMENTS}")
    ends, texts, previous = [], [], 0
    for j, segment in enumerate(segments):
        if segment.end_at_step <= previous:
            raise _refuse(f"conditioning_schedule[{j}].end_at_step is {segment.end_at_step}; end steps must be at "
                          f"least 1 and increase (the previous one is {previous})",
                          f"conditioning_schedule[{j}].end_at_step")
        previous = segment.end_at_step
        text = decode(segment)
        if _shapes(text) != _shapes(first):
            raise _refuse(f"conditioning_schedule[{j}] has embeddings of shapes {_shapes(text)}, the request's "
                          f"prompt embeddings {_shapes(first)}; every segment must have the same shapes (pad the "
                          "prompts to the same chunk count)", f"conditioning_schedule[{j}]")
        ends.append(segment.end_at_step)
        texts.append(text)
    return ConditioningSchedule(tuple(ends), tuple(texts))


def flow_inputs(text: TextConditioning, device, dtype, do_cfg: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled_prompt_embeds) as flow.py's loop prepares them (negative rows first with guidance)."""
    prompt_embeds = text.prompt_embeds.to(device=device, dtype=dtype)
    pooled_prompt_embeds = text.pooled_prompt_embeds.to(device=device, dtype=dtype)
    if do_cfg:
        prompt_embeds = torch.cat([text.negative_prompt_embeds.to(device=device, dtype=dtype), prompt_embeds])
        pooled_prompt_embeds = torch.cat(
            [text.negative_pooled_prompt_embeds.to(device=device, dtype=dtype), pooled_prompt_embeds])
    return prompt_embeds, pooled_prompt_embeds

"""A job's prompt schedule: AUTOMATIC1111's prompt editing ``[from:to:when]`` and alternation ``[a|b]``.

The orchestrator (torch-free) computes the schedules of the prompt and the negative prompt with
``get_learned_conditioning_prompt_schedules`` over the steps the denoiser runs (text-to-image: the steps;
image-to-image: the share of them its strength runs, as the family's pipeline counts them), merges the two into one
list of segments (each with its end step and the texts of both prompts there), has each distinct (prompt, negative
prompt) pair encoded once in one Encode call (one image each; the rows are repeated per image here) and sends the
denoiser the segments in DenoiseRequest.conditioning_schedule (services/denoiser/schedule.py picks each step's).

A prompt with no editing or alternation (no ``[`` enclosing a ``:`` or ``|``) has no schedule: its job sends exactly
the requests it sent before. The schedule grammar's Earley parse costs seconds on long prompts with many brackets,
so a prompt that needs it may hold at most MAX_SCHEDULE_BRACKETS ``[``: more is refused at acceptance
(PROMPT_TOO_COMPLEX), and the parse runs off the event loop. An SDXL refiner has no schedule: it takes the texts of
the last segment (what the prompt says at the end of the run).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from latentwire.common.v1 import embeddings_pb2, tensor_pb2
from latentwire.denoiser.v1 import denoiser_pb2
from latentwire.text_encoder.v1 import text_encoder_pb2
from services.runtime.errors import InvalidArgument
from services.runtime.prompt_syntax import get_learned_conditioning_prompt_schedules

#: Most "[" in a prompt whose schedule must be parsed: the Earley parse grows faster than linearly with them (on a
#: shared CPU core: 0.5-0.7 s at 16, 1.0-1.1 s at 24, 1.3-1.6 s at 32, 2 s at 40 edits or alternations).
MAX_SCHEDULE_BRACKETS = 24
#: A1111's "Clip skip" range (its UI's slider: 1 to 12); 0 means 1.
MAX_CLIP_SKIP = 12
_TENSOR_FIELDS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def needs_schedule(text: str) -> bool:
    """Whether a prompt may edit or alternate: an unescaped ``[`` whose span holds a ``:`` or ``|``."""
    if "[" not in text:
        return False
    depth, escaped = 0, False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "[":
            depth += 1
        elif char == "]":
            depth = max(depth - 1, 0)
        elif char in ":|" and depth:
            return True
    return False


def check_prompts(prompt: str, negative_prompt: str, clip_skip: int) -> None:
    """Acceptance checks: the schedule parse's cost bound and the clip skip range."""
    for field, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        brackets = text.count("[")
        if brackets > MAX_SCHEDULE_BRACKETS and needs_schedule(text):
            raise InvalidArgument(
                f"{field} has {brackets} '[' with prompt editing or alternation; use at most "
                f"{MAX_SCHEDULE_BRACKETS} (parsing more takes seconds)", reason="PROMPT_TOO_COMPLEX",
                metadata={"field": field, "brackets": str(brackets), "max_brackets": str(MAX_SCHEDULE_BRACKETS)})
    if not 0 <= clip_skip <= MAX_CLIP_SKIP:
        raise InvalidArgument(f"clip_skip is {clip_skip}; use 1 (the last layer) to {MAX_CLIP_SKIP}, or 0 for 1",
                              reason="INVALID_CLIP_SKIP", metadata={"field": "clip_skip"})


def steps_run(num_inference_steps: int, strength: float, image_to_image: bool, family: str) -> int:
    """Denoising steps a run takes, as the family's pipeline counts them (first-order schedulers)."""
    if not image_to_image:
        return num_inference_steps
    if family in ("sd3", "flux"):  # StableDiffusion3Img2ImgPipeline / FluxImg2ImgPipeline.get_timesteps
        init_timestep = min(num_inference_steps * strength, num_inference_steps)
        return num_inference_steps - int(max(num_inference_steps - init_timestep, 0))
    return min(int(num_inference_steps * strength), num_inference_steps)


@dataclass(frozen=True)
class PromptPlan:
    """The merged schedule of a prompt and a negative prompt."""

    #: Each segment's last step (A1111's count), increasing; the last is the step count.
    end_at_steps: tuple[int, ...]
    #: Distinct (prompt, negative prompt) texts, in order of first use.
    pairs: tuple[tuple[str, str], ...]
    #: Per segment: its pair's index.
    segment_pairs: tuple[int, ...]

    def final(self) -> tuple[str, str]:
        """The texts at the end of the run."""
        return self.pairs[self.segment_pairs[-1]]


def plan(prompt: str, negative_prompt: str, steps: int, hires_steps: int | None = None) -> PromptPlan | None:
    """The merged schedule over ``steps`` (with ``hires_steps``: over a hires fix's second pass of so many steps,
    after a first pass of ``steps``, as A1111 schedules it), or None when the texts are the same at every step and
    are the prompts as written (no editing or alternation)."""
    if not (needs_schedule(prompt) or needs_schedule(negative_prompt)):
        return None
    total = hires_steps or steps

    def schedule_of(text: str) -> list[list[int | str]]:
        if not needs_schedule(text):
            return [[total, text]]
        return get_learned_conditioning_prompt_schedules([text], steps, hires_steps)[0]

    positive, negative = schedule_of(prompt), schedule_of(negative_prompt)

    def text_at(schedule: list[list[int | str]], end: int) -> str:
        return next(text for end_at, text in schedule if end_at >= end)

    ends = sorted({end for end, _ in positive} | {end for end, _ in negative})
    pairs: dict[tuple[str, str], int] = {}
    merged_ends: list[int] = []
    segment_pairs: list[int] = []
    for end in ends:
        pair = pairs.setdefault((text_at(positive, end), text_at(negative, end)), len(pairs))
        if segment_pairs and segment_pairs[-1] == pair:  # the same texts go on: one segment
            merged_ends[-1] = end
        else:
            merged_ends.append(end)
            segment_pairs.append(pair)
    if len(segment_pairs) == 1 and (prompt, negative_prompt) in pairs:  # "[a:b:0]" is "b" throughout: a plan
        return None
    return PromptPlan(tuple(merged_ends), tuple(pairs), tuple(segment_pairs))


def has_schedule(params) -> bool:
    """Whether a job's prompt or negative prompt may edit or alternate."""
    return needs_schedule(params.prompt) or needs_schedule(params.negative_prompt)


async def plan_for(params, model: str, family: str, hires_steps: int | None = None) -> PromptPlan | None:
    """The job's plan for ``model``'s Encode (None: no schedule, today's request), parsed off the event loop. The
    refiner's (``model`` is the job's refiner) is the last segment's texts alone; ``hires_steps``: the plan of a
    hires fix's second pass running so many steps."""
    if not has_schedule(params):
        return None
    steps = steps_run(params.num_inference_steps, params.strength, bool(params.init_image), family)
    if hires_steps:
        steps = params.num_inference_steps  # A1111 offsets the second pass by the first pass's steps
    found = await asyncio.to_thread(plan, params.prompt, params.negative_prompt, steps, hires_steps)
    if found is None or not (params.refiner and model == params.refiner):
        return found
    return PromptPlan((found.end_at_steps[-1],), (found.final(),), (0,))


def set_texts(request: text_encoder_pb2.EncodeRequest, plan: PromptPlan) -> None:
    """An Encode of the plan's distinct pairs, one image each (the rows are repeated per image afterwards)."""
    request.prompts[:] = [p for p, _ in plan.pairs]
    # No negative prompt anywhere: none sent, so the text encoder does what it does without one.
    request.negative_prompts[:] = [n for _, n in plan.pairs] if any(n for _, n in plan.pairs) else []
    request.num_images_per_prompt = 1


@dataclass(frozen=True)
class ScheduledEncoding:
    """What _encode_text returns for a scheduled job: the plan, the encoding of its pairs, the images per prompt."""

    plan: PromptPlan
    #: An EncodeResponse (single-encoder model) or the EncoderEmbeddings per encoder.
    encoded: object
    num_images: int


def _rows(tensor: tensor_pb2.Tensor, row: int, copies: int) -> tensor_pb2.Tensor:
    """Row ``row`` of a tensor (batch first, raw row-major bytes), repeated ``copies`` times along the batch."""
    size = len(tensor.raw_contents) // tensor.shape[0]
    part = tensor.raw_contents[row * size:(row + 1) * size]
    return tensor_pb2.Tensor(name=tensor.name, dtype=tensor.dtype, shape=[copies, *tensor.shape[1:]],
                             raw_contents=part * copies)


def _segment(encoded, pair: int, copies: int, into) -> None:
    """Fill ``into`` (a DenoiseRequest or a ConditioningSegment) with one pair's embeddings, repeated per image."""
    if isinstance(encoded, text_encoder_pb2.EncodeResponse):
        into.prompt_embeds.CopyFrom(_rows(encoded.prompt_embeds, pair, copies))
        if encoded.HasField("negative_prompt_embeds"):
            into.negative_prompt_embeds.CopyFrom(_rows(encoded.negative_prompt_embeds, pair, copies))
        return
    for embeddings in encoded:
        part = embeddings_pb2.EncoderEmbeddings(encoder=embeddings.encoder)
        for field in _TENSOR_FIELDS:
            if embeddings.HasField(field):
                getattr(part, field).CopyFrom(_rows(getattr(embeddings, field), pair, copies))
        into.text_embeddings.append(part)


def fill_denoise_request(request: denoiser_pb2.DenoiseRequest, scheduled: ScheduledEncoding) -> None:
    """The request's own embeddings (the first segment's) and its conditioning_schedule."""
    plan = scheduled.plan
    _segment(scheduled.encoded, plan.segment_pairs[0], scheduled.num_images, request)
    for end, pair in zip(plan.end_at_steps, plan.segment_pairs):
        segment = request.conditioning_schedule.add(end_at_step=end)
        _segment(scheduled.encoded, pair, scheduled.num_images, segment)

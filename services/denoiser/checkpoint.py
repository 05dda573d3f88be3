"""Checkpoints of the denoising loop: taken after a step, restored on another replica, bit for bit.

A run takes one after the first step that ends at least ``interval_s`` after the last one (or the run's
start): the denoiser's --checkpoint-interval-s, 0 for every step. A failover re-runs at most that much work,
and a step that takes no checkpoint costs nothing for it (a checkpoint is a copy of the latents on the loop's
thread plus a message of their size on the event loop's).

A run's state splits in two. What follows from the request and the seed (timesteps, initial
noise, init-image latents, mask, ControlNet inputs) a replica rebuilds exactly as the original
did. What the steps change is small and is the checkpoint: the latents, the CPU generator's
state (ancestral and SDE schedulers draw from it) and the scheduler instance's attributes that
differ from the freshly prepared scheduler (step index, model-output history, previous sample,
...). Those attributes are found generically, by comparing the scheduler's ``vars()`` with a
snapshot taken before the first step, so every diffusers scheduler whose state is tensors,
numpy arrays, numbers, strings and lists of them is covered without per-class code. They travel
as JSON plus tensors, never pickle; restoring only sets plain data attributes.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from latentwire.denoiser.v1 import denoiser_pb2
from services.runtime import tensors as codec
from services.runtime.errors import InvalidArgument, quote

log = logging.getLogger(__name__)

#: Scheduler attributes never captured: the frozen config is rebuilt from the model on every replica.
_FIXED_ATTRIBUTES = frozenset({"config", "_internal_dict"})
#: Element types a captured tensor or array may have (those the tensor codec carries).
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64, torch.uint8,
           torch.bool)
#: Largest scheduler_state.attributes_json accepted, in characters. A real one refers to its tensors by index
#: and is a few hundred characters; the bound keeps a forged one from costing the parser time and memory.
MAX_ATTRIBUTES_JSON_CHARS = 64 * 1024
#: Deepest nesting of JSON arrays and objects accepted in attributes_json (a real one nests 3 deep). Checked
#: before parsing: Python's parser and the decoder recurse, and deep nesting would exhaust the stack.
MAX_ATTRIBUTES_JSON_DEPTH = 16


class CheckpointUnsupported(Exception):
    """The scheduler holds state that cannot travel as JSON and tensors (for example a torchsde noise sampler)."""


@dataclass(frozen=True)
class Checkpoint:
    """The loop's mutable state after ``completed_steps`` steps of a ``total_steps`` run."""

    completed_steps: int
    total_steps: int
    latents: torch.Tensor
    scheduler: str
    #: JSON object: attribute name -> encoded value (see SchedulerState in denoiser.proto).
    attributes_json: str
    #: The tensors attributes_json refers to, as (attribute name, tensor) in index order.
    tensors: tuple[tuple[str, torch.Tensor], ...]
    generator_state: bytes


class CheckpointWriter:
    """Captures checkpoints of one run: remembers the prepared scheduler, then records what the steps changed,
    at most once per ``interval_s`` seconds (0: after every step)."""

    def __init__(self, scheduler, generator: torch.Generator, interval_s: float = 0.0):
        self._scheduler = scheduler
        self._generator = generator
        self._baseline = {name: _copy(value) for name, value in vars(scheduler).items()
                          if name not in _FIXED_ATTRIBUTES}
        self._unsupported = False
        self._interval_s = interval_s
        self._last = time.monotonic()  # the run's start: a failover before the first checkpoint starts over

    def capture(self, completed_steps: int, total_steps: int,
                latents: torch.Tensor | Callable[[], torch.Tensor]) -> Checkpoint | None:
        """A checkpoint after ``completed_steps`` steps; None when the last one is more recent than the
        interval, or when this scheduler's state cannot be captured. ``latents`` may be a function returning them,
        called only when a checkpoint is taken (Flux's unpacking copies the latents: 1 ms a step at 1024x1024)."""
        if self._unsupported or time.monotonic() - self._last < self._interval_s:
            return None
        if callable(latents):
            latents = latents()
        tensors: list[tuple[str, torch.Tensor]] = []
        try:
            attributes = {
                name: _encode(value, name, tensors)
                for name, value in vars(self._scheduler).items()
                if name not in _FIXED_ATTRIBUTES and not _same(value, self._baseline.get(name, _ABSENT))
            }
        except CheckpointUnsupported as error:
            self._unsupported = True
            log.warning("no checkpoints for this run: %s; a failover restarts it from the first step", error)
            return None
        self._last = time.monotonic()
        return Checkpoint(
            completed_steps=completed_steps,
            total_steps=total_steps,
            latents=latents.detach().clone(),
            scheduler=type(self._scheduler).__name__,
            attributes_json=json.dumps(attributes, separators=(",", ":")),
            tensors=tuple(tensors),
            generator_state=self._generator.get_state().numpy().tobytes(),
        )


def restore(checkpoint: Checkpoint, *, scheduler, generator: torch.Generator, latents_like: torch.Tensor,
            total_steps: int, device: torch.device) -> torch.Tensor:
    """Put a freshly prepared ``scheduler`` and ``generator`` into the checkpoint's state; return its latents.

    ``latents_like`` is the run's own starting latents: the checkpoint's must have their shape and dtype.
    Refuses, with INVALID_ARGUMENT, a checkpoint that belongs to a different run.
    """
    name = type(scheduler).__name__

    def mismatch(message: str) -> InvalidArgument:
        return InvalidArgument(f"resume_from {message}; resume with the request the checkpoint was taken from",
                               reason="CHECKPOINT_MISMATCH", metadata={"field": "resume_from"})

    if checkpoint.scheduler != name:
        raise mismatch(f"is a {checkpoint.scheduler} checkpoint but this run uses {name}")
    if checkpoint.total_steps != total_steps:
        raise mismatch(f"has {checkpoint.total_steps} steps in all but this run has {total_steps}")
    if not 0 <= checkpoint.completed_steps <= total_steps:
        raise mismatch(f"says {checkpoint.completed_steps} steps completed, outside 0 to {total_steps}")
    if checkpoint.latents.shape != latents_like.shape or checkpoint.latents.dtype != latents_like.dtype:
        raise mismatch(f"latents are {list(checkpoint.latents.shape)} {checkpoint.latents.dtype} but this run's are "
                       f"{list(latents_like.shape)} {latents_like.dtype}")
    text = checkpoint.attributes_json
    if len(text) > MAX_ATTRIBUTES_JSON_CHARS:
        raise mismatch(f"scheduler_state.attributes_json has {len(text)} characters, more than the "
                       f"{MAX_ATTRIBUTES_JSON_CHARS} allowed")
    if _json_depth(text) > MAX_ATTRIBUTES_JSON_DEPTH:
        raise mismatch(f"scheduler_state.attributes_json nests arrays and objects more than "
                       f"{MAX_ATTRIBUTES_JSON_DEPTH} deep")
    try:
        attributes = json.loads(text)
    except (ValueError, RecursionError):
        raise mismatch("scheduler_state.attributes_json is not valid JSON") from None
    if not isinstance(attributes, dict):
        raise mismatch("scheduler_state.attributes_json is not a JSON object")
    # What this run's freshly prepared scheduler holds: a restored value must have the same form.
    fresh = vars(scheduler)
    values = {}
    for attribute, encoded in attributes.items():
        _check_attribute(scheduler, attribute)
        values[attribute] = _decode(encoded, checkpoint.tensors, device)
        _check_value(attribute, values[attribute], fresh.get(attribute, _ABSENT), len(scheduler.timesteps),
                     latents_like.shape, mismatch)
    try:
        generator.set_state(torch.frombuffer(bytearray(checkpoint.generator_state), dtype=torch.uint8))
    except (RuntimeError, ValueError):
        raise mismatch("generator_state is not a torch CPU generator state") from None
    for attribute, value in values.items():
        setattr(scheduler, attribute, value)
    return checkpoint.latents.to(device=latents_like.device)


def to_proto(checkpoint: Checkpoint, into: denoiser_pb2.DenoiseCheckpoint | None = None
             ) -> denoiser_pb2.DenoiseCheckpoint:
    """The wire form of a checkpoint; with ``into`` (the checkpoint field of a step message being built), filled
    in place, so that its latents are not copied again into the message (see tensors.to_proto)."""
    message = denoiser_pb2.DenoiseCheckpoint() if into is None else into
    message.completed_steps = checkpoint.completed_steps
    message.total_steps = checkpoint.total_steps
    codec.to_proto(checkpoint.latents, "latents", into=message.latents)
    state = message.scheduler_state
    state.scheduler = checkpoint.scheduler
    state.attributes_json = checkpoint.attributes_json
    for name, tensor in checkpoint.tensors:
        codec.to_proto(tensor, name, into=state.tensors.add())
    message.generator_state = checkpoint.generator_state
    return message


def from_proto(message: denoiser_pb2.DenoiseCheckpoint) -> Checkpoint:
    """Decode a resume_from checkpoint; malformed tensors are INVALID_ARGUMENT naming the field."""
    state = message.scheduler_state
    return Checkpoint(
        completed_steps=message.completed_steps,
        total_steps=message.total_steps,
        latents=codec.from_proto(message.latents, field="resume_from.latents", rank=4),
        scheduler=state.scheduler,
        attributes_json=state.attributes_json or "{}",
        tensors=tuple((t.name, codec.from_proto(t, field=f"resume_from.scheduler_state.tensors[{i}]",
                                                   allow_nonfinite=True))
                      for i, t in enumerate(state.tensors)),
        generator_state=message.generator_state,
    )


_ABSENT = object()


def _copy(value: Any) -> Any:
    """A snapshot that later in-place changes (list items replaced, arrays written) cannot alter."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(item) for item in value)
    return value


def _same(a: Any, b: Any) -> bool:
    """Whether an attribute still holds its value from before the first step."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.device == b.device and torch.equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and np.array_equal(a, b))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - an object without a usable ==: treat as changed
        return False


def _encode(value: Any, name: str, tensors: list[tuple[str, torch.Tensor]]) -> Any:
    """JSON for one attribute value; tensors and arrays go to ``tensors`` and are referred to by index."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        if value.dtype not in _DTYPES:
            raise CheckpointUnsupported(f"scheduler attribute {name} is a tensor of {value.dtype}")
        tensors.append((name, value.detach().clone()))
        return {"tensor": len(tensors) - 1, "on_model_device": value.device.type != "cpu"}
    if isinstance(value, np.ndarray):
        array = torch.from_numpy(np.array(value)) if value.dtype.kind in "fiub" else None
        if array is None or array.dtype not in _DTYPES:
            raise CheckpointUnsupported(f"scheduler attribute {name} is a numpy array of {value.dtype}")
        tensors.append((name, array))
        return {"ndarray": len(tensors) - 1}
    if isinstance(value, np.generic):
        return {"numpy": value.dtype.str, "value": value.item()}
    if isinstance(value, list):
        return [_encode(item, name, tensors) for item in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(item, name, tensors) for item in value]}
    raise CheckpointUnsupported(f"scheduler attribute {name} holds a {type(value).__name__}")


def _decode(encoded: Any, tensors: tuple[tuple[str, torch.Tensor], ...], device: torch.device) -> Any:
    if encoded is None or isinstance(encoded, (bool, int, float, str)):
        return encoded
    if isinstance(encoded, list):
        return [_decode(item, tensors, device) for item in encoded]
    if isinstance(encoded, dict):
        if set(encoded) == {"tuple"} and isinstance(encoded["tuple"], list):
            return tuple(_decode(item, tensors, device) for item in encoded["tuple"])
        if set(encoded) == {"numpy", "value"}:
            try:
                return np.dtype(encoded["numpy"]).type(encoded["value"])
            except (TypeError, ValueError):
                pass
        index = encoded.get("tensor", encoded.get("ndarray"))
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(tensors):
            tensor = tensors[index][1]
            if "ndarray" in encoded:
                return tensor.numpy().copy()
            return tensor.to(device) if encoded.get("on_model_device") else tensor
    raise InvalidArgument(f"resume_from.scheduler_state.attributes_json holds a value it cannot restore: "
                          f"{json.dumps(encoded)[:100]}", reason="CHECKPOINT_MISMATCH",
                          metadata={"field": "resume_from.scheduler_state"})


def _check_attribute(scheduler, name: str) -> None:
    """Only plain data attributes may be set: no config, no dunder, nothing that shadows a method or property."""
    declared = getattr(type(scheduler), name, None)
    if (not isinstance(name, str) or not name.isidentifier() or name.startswith("__") or name in _FIXED_ATTRIBUTES
            or callable(declared) or isinstance(declared, property)):
        raise InvalidArgument(f"resume_from.scheduler_state names attribute {quote(name)}, which a checkpoint may not set",
                              reason="CHECKPOINT_MISMATCH", metadata={"field": "resume_from.scheduler_state"})


def _json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON ``text``, brackets inside strings not counted."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _check_value(name: str, value: Any, fresh: Any, steps: int, latents_shape: torch.Size, mismatch) -> None:
    """A restored attribute must fit this run's scheduler, else the next step fails deep inside diffusers.

    Tensors and arrays the fresh scheduler already holds (``sigmas``, ``timesteps``, ...) keep their shape
    and dtype; tensors the steps add (model outputs, previous samples, timesteps) are the latents' shape or
    scalars; step indexes and the other counters of steps are whole numbers from 0 to the run's timesteps.
    """
    where = f"scheduler_state attribute {quote(name)}"

    def form(tensor) -> str:
        return f"{list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"

    if isinstance(fresh, torch.Tensor):
        if not (isinstance(value, torch.Tensor) and value.shape == fresh.shape and value.dtype == fresh.dtype):
            got = form(value) if isinstance(value, (torch.Tensor, np.ndarray)) else "not a tensor"
            raise mismatch(f"{where} is {got} but this run's scheduler has a {form(fresh)} tensor")
        return
    if isinstance(fresh, np.ndarray):
        if not (isinstance(value, np.ndarray) and value.shape == fresh.shape and value.dtype == fresh.dtype):
            got = form(value) if isinstance(value, (torch.Tensor, np.ndarray)) else "not an array"
            raise mismatch(f"{where} is {got} but this run's scheduler has a {form(fresh)} array")
        return
    if name.endswith("index") and not (value is None or (isinstance(value, int) and not isinstance(value, bool))):
        raise mismatch(f"{where} is not a whole number")
    if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= steps:
        raise mismatch(f"{where} is {quote(value)}, outside 0 to {steps}")
    if isinstance(value, torch.Tensor) and value.shape not in (torch.Size([]), latents_shape):
        raise mismatch(f"{where} holds a {form(value)} tensor; step state is the latents' shape "
                       f"{list(latents_shape)} or a single number")
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_value(name, item, _ABSENT, steps, latents_shape, mismatch)

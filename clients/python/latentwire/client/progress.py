"""Readable lines for Generate's progress events.

    from latentwire.client import Client, print_progress

    with Client() as client:
        client.generate("a cabin in the woods", steps=25, on_event=print_progress)

prints ``job 3f2a... accepted (seed 42)``, ``text encoded in 0.05 s``, ``step 12/25 3.1 s, ETA 3.4 s``, ...
"""
from __future__ import annotations

import sys

from latentwire.orchestrator.v1 import orchestrator_pb2


def eta_seconds(step: orchestrator_pb2.DenoisingStep) -> float:
    """Seconds of denoising left, at the mean pace of the steps so far (0 before the first step)."""
    if step.step <= 0:
        return 0.0
    return step.elapsed_seconds / step.step * max(step.total_steps - step.step, 0)


def describe_step(step: orchestrator_pb2.DenoisingStep) -> str:
    """``12/25 3.1 s, ETA 3.4 s`` (no ETA once the last step is done)."""
    text = f"{step.step}/{step.total_steps} {step.elapsed_seconds:.1f} s"
    if 0 < step.step < step.total_steps:
        text += f", ETA {eta_seconds(step):.1f} s"
    return text


def describe(event: orchestrator_pb2.GenerateResponse) -> str:
    """One readable line for a progress event of Generate (or WatchJob)."""
    kind = event.WhichOneof("event")
    if kind == "accepted":
        return f"job {event.accepted.job_id} accepted (seed {event.accepted.seed})"
    if kind == "queued":
        return f"queued: position {event.queued.position} of {event.queued.queue_length}"
    if kind == "text_encoded":
        return f"text encoded in {event.text_encoded.elapsed_seconds:.2f} s"
    if kind == "image_encoded":
        return f"init image encoded in {event.image_encoded.elapsed_seconds:.2f} s"
    if kind == "step":
        return f"step {describe_step(event.step)}"
    if kind == "model_loading":
        loading = event.model_loading
        if loading.done:
            return f"{loading.stage} loaded {loading.model} in {loading.elapsed_seconds:.2f} s"
        return f"{loading.stage} loading {loading.model} ..."
    if kind == "decoded":
        return f"decoded in {event.decoded.elapsed_seconds:.2f} s"
    if kind == "grid_cell":
        cell = event.grid_cell.cell
        labels = ", ".join(label for label in (cell.x_label, cell.y_label, cell.z_label) if label)
        return f"grid cell {cell.index + 1}/{event.grid_cell.cell_count}: {labels} (seed {cell.seed})"
    if kind == "result":
        images = len(event.result.images)
        return f"done: {images} image{'s' if images != 1 else ''} in {event.result.total_seconds:.2f} s"
    return kind or "(empty event)"


def print_progress(event: orchestrator_pb2.GenerateResponse) -> None:
    """An ``on_event`` for Client.generate that prints each event as one line on stderr."""
    print(describe(event), file=sys.stderr, flush=True)

"""What /sdapi/v1/progress reports: the live state of the REST generations this gateway runs, per user.

Each txt2img/img2img call registers a ``LiveGeneration`` and feeds it the Generate stream's events
(queue position, steps, live previews); /progress reads the caller's newest unfinished one (by user
under ``--api-auth``; the newest of all when callers cannot be told apart, as A1111 does). Everything
here runs on the event loop, so no lock is needed and /progress never waits on a generation.
"""
from __future__ import annotations

import base64
import itertools
import time
from dataclasses import dataclass, field

from latentwire.orchestrator.v1 import orchestrator_pb2

from .a1111 import ProgressResponse, ProgressState


@dataclass
class LiveGeneration:
    """One REST generation as /progress sees it."""

    user: str
    job_timestamp: str
    #: A1111's job_count: the batches of the call (n_iter).
    job_count: int = 1
    job_id: str = ""
    seq: int = 0
    started: float = field(default_factory=time.monotonic)
    sampling_step: int = 0
    sampling_steps: int = 0
    queue_position: int = 0
    preview: bytes = b""
    preview_format: str = "jpeg"
    interrupted: bool = False
    skipped: bool = False
    finished: bool = False
    #: The Generate call (grpc.aio), so interrupt can end it.
    call: object = None

    def observe(self, event: orchestrator_pb2.GenerateResponse) -> None:
        """Take in one event of the job's Generate stream."""
        kind = event.WhichOneof("event")
        if kind == "accepted":
            self.job_id = event.accepted.job_id
        elif kind == "queued":
            self.queue_position = event.queued.position
        elif kind == "step":
            self.queue_position = 0
            self.sampling_step, self.sampling_steps = event.step.step, event.step.total_steps
            if event.step.preview_image:
                self.preview, self.preview_format = event.step.preview_image, event.step.preview_format or "jpeg"

    @property
    def progress(self) -> float:
        return min(1.0, self.sampling_step / self.sampling_steps) if self.sampling_steps else 0.0


class ProgressTracker:
    """The unfinished REST generations, newest last."""

    def __init__(self):
        self._live: list[LiveGeneration] = []
        self._seq = itertools.count(1)

    def start(self, user: str, *, job_count: int, job_timestamp: str) -> LiveGeneration:
        generation = LiveGeneration(user=user, job_count=job_count, job_timestamp=job_timestamp, seq=next(self._seq))
        self._live.append(generation)
        return generation

    def finish(self, generation: LiveGeneration) -> None:
        generation.finished = True
        if generation in self._live:
            self._live.remove(generation)

    def current(self, user: str | None) -> LiveGeneration | None:
        """The newest sampling generation of ``user`` (None: of anyone), else the newest waiting one: A1111 reports
        the one it runs, and here several may run while newer ones wait in the queue."""
        mine = self.running(user)
        sampling = [generation for generation in mine if generation.sampling_steps]
        return (sampling or mine or [None])[-1]

    def running(self, user: str | None) -> list[LiveGeneration]:
        return [g for g in self._live if user is None or g.user == user]

    def report(self, user: str | None, *, skip_current_image: bool = False) -> ProgressResponse:
        """A1111's ProgressResponse for ``user``'s newest generation (idle: progress 0 and job_count 0)."""
        generation = self.current(user)
        if generation is None:
            return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState())
        progress = generation.progress
        elapsed = time.monotonic() - generation.started
        eta = elapsed / progress - elapsed if progress > 0 else 0.0
        state = ProgressState(
            skipped=generation.skipped, interrupted=generation.interrupted, job=generation.job_id,
            job_count=generation.job_count, job_timestamp=generation.job_timestamp, job_no=0,
            sampling_step=generation.sampling_step, sampling_steps=generation.sampling_steps)
        image = None
        if generation.preview and not skip_current_image:
            image = base64.b64encode(generation.preview).decode()
        if generation.queue_position:
            text = f"In queue: position {generation.queue_position}"
        elif generation.sampling_steps:
            text = f"Sampling step {generation.sampling_step}/{generation.sampling_steps}"
        else:
            text = "Waiting..."
        return ProgressResponse(progress=progress, eta_relative=eta, state=state, current_image=image, textinfo=text,
                                current_task=generation.job_id or None)

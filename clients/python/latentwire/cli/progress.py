"""A one-line progress bar on stderr, fed by the server's progress stream."""
from __future__ import annotations

import sys

from latentwire.orchestrator.v1 import orchestrator_pb2


class ProgressBar:
    """Renders Generate events; quiet when stderr is not a terminal except for a final line."""

    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()

    def __call__(self, event: orchestrator_pb2.GenerateResponse) -> None:
        kind = event.WhichOneof("event")
        if kind == "accepted":
            self._line(f"job {event.accepted.job_id} accepted (seed {event.accepted.seed})", end="\n")
        elif kind == "queued":
            self._line(f"queued: position {event.queued.position} of {event.queued.queue_length}", end="\n")
        elif kind == "text_encoded":
            self._line(f"text encoded in {event.text_encoded.elapsed_seconds:.2f} s", end="\n")
        elif kind == "image_encoded":
            self._line(f"init image encoded in {event.image_encoded.elapsed_seconds:.2f} s", end="\n")
        elif kind == "step":
            step = event.step
            done = int(self.width * step.step / max(step.total_steps, 1))
            bar = "#" * done + "." * (self.width - done)
            text = f"denoising [{bar}] {step.step}/{step.total_steps} {step.elapsed_seconds:.2f} s"
            if self.tty:
                self._line("\r" + text, end="\n" if step.step == step.total_steps else "")
            elif step.step == step.total_steps:
                self._line(text, end="\n")
        elif kind == "decoded":
            self._line(f"decoded in {event.decoded.elapsed_seconds:.2f} s", end="\n")

    def _line(self, text: str, end: str) -> None:
        self.stream.write(text + end)
        self.stream.flush()

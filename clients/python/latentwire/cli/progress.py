"""A one-line progress bar on stderr, fed by the server's progress stream."""
from __future__ import annotations

import sys

from latentwire.client.progress import describe, describe_step
from latentwire.orchestrator.v1 import orchestrator_pb2

#: Without a terminal (a log, a pipe), a step line is written at the first step, then about every this share
#: of the steps, and at the last: enough to follow a long run without a line per step.
LOG_EVERY_FRACTION = 0.1


class ProgressBar:
    """Renders Generate events: a bar redrawn in place on a terminal; plain lines otherwise.

    The bar shows the time since denoising started and, from the first step on, an ETA:
    ``denoising [#####.....] 12/25 3.1 s, ETA 3.4 s``.
    """

    def __init__(self, stream=None, width: int = 30):
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self._next_logged_step = 1

    def __call__(self, event: orchestrator_pb2.GenerateResponse) -> None:
        kind = event.WhichOneof("event")
        if kind == "step":
            self._step(event.step)
        elif kind not in ("result", None):  # the command reports the result itself
            self._line(describe(event), end="\n")

    def _step(self, step: orchestrator_pb2.DenoisingStep) -> None:
        done = int(self.width * step.step / max(step.total_steps, 1))
        text = f"denoising [{'#' * done}{'.' * (self.width - done)}] {describe_step(step)}"
        last = step.step >= step.total_steps
        if self.tty:
            # Pad so a shorter line (the ETA dropped at the end) leaves nothing of the longer one behind.
            self._line("\r" + text.ljust(len(text) + 12), end="\n" if last else "")
        elif last or step.step >= self._next_logged_step:
            self._line(text, end="\n")
            self._next_logged_step = step.step + max(1, round(step.total_steps * LOG_EVERY_FRACTION))

    def _line(self, text: str, end: str) -> None:
        self.stream.write(text + end)
        self.stream.flush()

"""Which denoising steps become DenoiseStep messages (DenoiseRequest.step_message_interval_ms).

Each step message costs CPU at both ends: here the servicer's event-loop thread, which shares the interpreter lock
and the cores with the denoising loop, wakes, builds the message and hands it to gRPC; the orchestrator parses and
relays it. At a small model's 15 to 25 ms a step on two cores that comes out of every step (docs/benchmarks.md,
"Step messages at most every 100 ms"). With an interval, a step that ends sooner than that after the last step
sent is not handed on at all (not even queued for the event loop), unless it carries a checkpoint or a preview;
the next step sent counts it, since its step number says how far the loop got, and the run's last step is always
sent before the result (``flush``). The orchestrator turns the steps it gets back into one DenoisingStep per step
for its caller.

Runs on the loop's thread, between the loop and the worker's ``emit``; the step-duration metric is observed here,
for every step, sent or not.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from services.runtime.telemetry import metrics

from .model import StepEvent


class StepMessages:
    """``emit`` for the denoising loop's events, passing on a step only when ``interval_s`` has passed since the
    last step passed on (0: every step), or when it carries a checkpoint or a preview; other events pass as they
    are. Call ``flush()`` when the loop has returned, before its result is emitted."""

    def __init__(self, emit: Callable[[Any], None], interval_s: float):
        self._emit = emit
        self._interval_s = interval_s
        self._last_sent = float("-inf")
        self._held: StepEvent | None = None
        self._previous_elapsed = 0.0

    def __call__(self, event: Any) -> None:
        if not isinstance(event, StepEvent):
            self._emit(event)
            return
        # elapsed_seconds counts from the run's start.
        metrics.denoise_step.observe(event.elapsed_seconds - self._previous_elapsed)
        self._previous_elapsed = event.elapsed_seconds
        now = time.monotonic()
        if (self._interval_s and event.checkpoint is None and not event.preview
                and now - self._last_sent < self._interval_s):
            self._held = event  # counted by the next step sent, or sent by flush() if it is the last
            return
        self._held = None
        self._last_sent = now
        self._emit(event)

    def flush(self) -> None:
        """Send the latest step if it was held back: the caller sees how far the run got before its result."""
        if self._held is not None:
            event, self._held = self._held, None
            self._emit(event)

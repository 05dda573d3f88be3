"""A job's deadline: when its caller stops waiting for the result.

gRPC Python does not pass a caller's deadline on to the calls a server makes, and a job outlives
the call that submitted it (it waits in the queue, survives a restart). So the deadline is taken
from the call once, when the job is accepted, stored with the job, and every stage call and
replica wait is given what is left of it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Deadline:
    """An absolute point in time, in epoch seconds (``at``), or None for no deadline.

    Epoch rather than monotonic seconds because the deadline is stored in the job store and must
    still mean the same instant after the orchestrator restarts.
    """

    at: float | None = None

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        """The deadline ``seconds`` from now (None: none)."""
        return cls(None if seconds is None else time.time() + seconds)

    @classmethod
    def of_call(cls, context) -> Deadline:
        """The deadline of the gRPC call being served (its ``time_remaining()``, None without one)."""
        return cls.after(context.time_remaining())

    def remaining(self) -> float | None:
        """Seconds left, never negative (the ``timeout`` for a stage call); None without a deadline."""
        if self.at is None:
            return None
        return max(0.0, self.at - time.time())

    @property
    def passed(self) -> bool:
        """Whether the caller has stopped waiting."""
        return self.at is not None and self.at <= time.time()


#: A job nobody waits on with a deadline.
NO_DEADLINE = Deadline()

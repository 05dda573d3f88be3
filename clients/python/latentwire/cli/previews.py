"""`generate --preview-dir DIR`: the live previews of a run's step events written as files."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from latentwire.orchestrator.v1 import orchestrator_pb2

#: File suffix of each preview format.
SUFFIXES = {"jpeg": ".jpg", "webp": ".webp"}


class PreviewWriter:
    """Writes each step event's preview image to DIR/step-NNNN.jpg (or .webp), then passes the event on to
    ``then`` (the progress bar, or None)."""

    def __init__(self, directory: Path, then: Callable[[orchestrator_pb2.GenerateResponse], None] | None = None):
        self.directory = Path(directory)
        self.then = then
        #: The files written, in step order.
        self.written: list[Path] = []

    def __call__(self, event: orchestrator_pb2.GenerateResponse) -> None:
        if event.WhichOneof("event") == "step" and event.step.preview_image:
            step = event.step
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"step-{step.step:04d}{SUFFIXES.get(step.preview_format, '.img')}"
            path.write_bytes(step.preview_image)
            self.written.append(path)
        if self.then is not None:
            self.then(event)

"""Large Generate results in chunks: the orchestrator's split and the client's reassembly, one rule on both sides.

gRPC clients refuse messages over 4 MiB unless they raise ``max_receive_message_length``; a batch of large PNGs (or
the float pixels of ``include_pixels``) easily exceeds that. So a result whose serialized size is over
``INLINE_RESULT_BYTES`` is sent as ``ResultChunk`` events (every PNG, grid PNG and the pixels' raw bytes, at most
``CHUNK_BYTES`` each) right before a result event that has those parts empty and flagged. Results up to 1 MiB (the
usual ones) stay one message, exactly as before, so callers that read ``result.images[i].png`` from a raw stub keep
working for them.

``ResultAssembler`` puts a result back together from the events, whichever way it came; the client library, the
CLI and the gateway read every stream through it. Only protobuf is needed here (the client package stays light).
"""
from __future__ import annotations

from typing import AsyncIterator, Iterable, Iterator

from latentwire.orchestrator.v1 import orchestrator_pb2

#: A result up to this many serialized bytes is sent as one message; a larger one has its binary parts chunked.
INLINE_RESULT_BYTES = 1 << 20
#: Bytes of data per ResultChunk event: with the chunk's few header bytes, each message stays under 1 MiB.
CHUNK_BYTES = (1 << 20) - 1024

IMAGE = orchestrator_pb2.RESULT_PART_IMAGE
GRID_IMAGE = orchestrator_pb2.RESULT_PART_GRID_IMAGE
PIXELS = orchestrator_pb2.RESULT_PART_PIXELS


class ResultChunkError(ValueError):
    """The chunk events before a result do not add up to its flagged parts (a lost, repeated or stray chunk)."""


def needs_chunks(result: orchestrator_pb2.GenerateResult) -> bool:
    """Whether ``result`` is too large to send as one message."""
    return result.ByteSize() > INLINE_RESULT_BYTES


def _parts(result: orchestrator_pb2.GenerateResult) -> Iterator[tuple[int, int, bytes]]:
    """(part, index, bytes) of every binary part of ``result``, in the order they are sent."""
    for index, image in enumerate(result.images):
        yield IMAGE, index, image.png
    for index, grid in enumerate(result.grid_images):
        yield GRID_IMAGE, index, grid.png
    if result.HasField("pixels"):
        yield PIXELS, 0, result.pixels.raw_contents


def strip_result(result: orchestrator_pb2.GenerateResult) -> orchestrator_pb2.GenerateResult:
    """A copy of a large ``result`` with every binary part emptied and flagged (sizes kept in ``png_size``); a
    result small enough to send whole is returned unchanged. What GetJob answers, and the result event after the
    chunks."""
    if not needs_chunks(result):
        return result
    stripped = orchestrator_pb2.GenerateResult()
    stripped.CopyFrom(result)
    for image in stripped.images:
        image.png_size = len(image.png)
        image.png, image.png_chunked = b"", True
    for grid in stripped.grid_images:
        grid.png, grid.png_chunked = b"", True
    if stripped.HasField("pixels"):
        stripped.pixels.raw_contents, stripped.pixels_chunked = b"", True
    return stripped


def split_result(result: orchestrator_pb2.GenerateResult) -> Iterator[orchestrator_pb2.GenerateResponse]:
    """The events that carry ``result``: just the result event when it fits in 1 MiB; otherwise one ResultChunk
    event per CHUNK_BYTES of every PNG, grid PNG and the pixels, then the stripped result (``chunk_count`` set)."""
    if not needs_chunks(result):
        yield orchestrator_pb2.GenerateResponse(result=result)
        return
    count = 0
    for part, index, data in _parts(result):
        view = memoryview(data)
        for offset in range(0, len(data), CHUNK_BYTES):
            count += 1
            yield orchestrator_pb2.GenerateResponse(result_chunk=orchestrator_pb2.ResultChunk(
                part=part, index=index, offset=offset, total_size=len(data),
                data=bytes(view[offset:offset + CHUNK_BYTES])))
    stripped = strip_result(result)
    stripped.chunk_count = count
    yield orchestrator_pb2.GenerateResponse(result=stripped)


def split_events(events: Iterable[orchestrator_pb2.GenerateResponse]) -> Iterator[orchestrator_pb2.GenerateResponse]:
    """``events`` with the result event (if any) split as ``split_result`` does."""
    for event in events:
        if event.WhichOneof("event") == "result":
            yield from split_result(event.result)
        else:
            yield event


def is_chunked(result: orchestrator_pb2.GenerateResult) -> bool:
    """Whether any part of ``result`` was left out for ResultChunk events (a GetJob of a large result)."""
    return (result.pixels_chunked or any(image.png_chunked for image in result.images)
            or any(grid.png_chunked for grid in result.grid_images))


class ResultAssembler:
    """Reassembles results from a Generate or WatchJob stream: ``feed`` every event; it returns None for a chunk
    event (kept until its result arrives), the event itself for any other, and for the result event one with
    every chunked part filled in and the flags cleared, as if it had come in one message."""

    def __init__(self) -> None:
        self._parts: dict[tuple[int, int], bytearray] = {}
        self._sizes: dict[tuple[int, int], int] = {}
        self._chunks = 0

    def feed(self, event: orchestrator_pb2.GenerateResponse) -> orchestrator_pb2.GenerateResponse | None:
        kind = event.WhichOneof("event")
        if kind == "result_chunk":
            self._add(event.result_chunk)
            return None
        if kind == "result":
            return orchestrator_pb2.GenerateResponse(result=self.complete(event.result))
        return event

    def _add(self, chunk: orchestrator_pb2.ResultChunk) -> None:
        key = (chunk.part, chunk.index)
        buffer = self._parts.setdefault(key, bytearray())
        self._sizes[key] = chunk.total_size
        if chunk.offset != len(buffer) or len(buffer) + len(chunk.data) > chunk.total_size:
            raise ResultChunkError(f"result chunk of part {chunk.part} index {chunk.index} at offset {chunk.offset} "
                                   f"does not follow the {len(buffer)} bytes received")
        buffer += chunk.data
        self._chunks += 1

    def _take(self, part: int, index: int) -> bytes:
        key = (part, index)
        data = self._parts.pop(key, None)
        if data is None or len(data) != self._sizes.pop(key):
            raise ResultChunkError(f"the result's part {part} index {index} was not received whole")
        return bytes(data)

    def complete(self, result: orchestrator_pb2.GenerateResult) -> orchestrator_pb2.GenerateResult:
        """``result`` with its chunked parts filled in from the chunks fed so far (unchanged when none were)."""
        if not result.chunk_count and not is_chunked(result):
            return result
        if result.chunk_count != self._chunks:
            raise ResultChunkError(f"the result was sent in {result.chunk_count} chunks but {self._chunks} arrived")
        whole = orchestrator_pb2.GenerateResult()
        whole.CopyFrom(result)
        for index, image in enumerate(whole.images):
            if image.png_chunked:
                image.png, image.png_chunked, image.png_size = self._take(IMAGE, index), False, 0
        for index, grid in enumerate(whole.grid_images):
            if grid.png_chunked:
                grid.png, grid.png_chunked = self._take(GRID_IMAGE, index), False
        if whole.pixels_chunked:
            whole.pixels.raw_contents, whole.pixels_chunked = self._take(PIXELS, 0), False
        if self._parts:
            raise ResultChunkError(f"{len(self._parts)} chunked part(s) belong to no part of the result")
        whole.chunk_count, self._chunks = 0, 0
        return whole


def assemble(events: Iterable[orchestrator_pb2.GenerateResponse]) -> Iterator[orchestrator_pb2.GenerateResponse]:
    """``events`` without chunk events and with the result complete."""
    assembler = ResultAssembler()
    for event in events:
        event = assembler.feed(event)
        if event is not None:
            yield event


async def assemble_async(events: AsyncIterator[orchestrator_pb2.GenerateResponse]
                         ) -> AsyncIterator[orchestrator_pb2.GenerateResponse]:
    """``assemble`` for an async stream (grpc.aio)."""
    assembler = ResultAssembler()
    async for event in events:
        event = assembler.feed(event)
        if event is not None:
            yield event

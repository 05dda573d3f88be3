"""Large Generate results reach clients that keep gRPC's default 4 MiB receive limit.

A result over 1 MiB goes out as ResultChunk events (every PNG and the pixels' bytes, at most 1 MiB each) before a
result with those parts empty and flagged; GetJob answers such a result without them; WatchJob replays the chunks.
Here a raw channel with grpc's default options (nothing raised) gets 8 noise PNGs at 256x256 (about 1.5 MB) and their
float pixels (6.3 MB; together far over 4 MiB) from the session suite, and the Python client library, which
reassembles, gets the same bytes. (512x512 PNGs would pass 4 MiB on their own, but a denoising step of 6 of them takes
minutes on a loaded 2-core CI machine; the chunking does not care which part is large.)
"""
from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from latentwire.client import Client
from latentwire.client.client import pixels_from_tensor
from latentwire.client.result_chunks import (CHUNK_BYTES, INLINE_RESULT_BYTES, ResultAssembler, ResultChunkError,
                                             assemble, split_result)
from latentwire.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

DEFAULT_LIMIT = 4 * 1024 * 1024  # grpc's default max_receive_message_length
SIZE, IMAGES = 256, 8
SETTINGS = dict(seed=5, steps=1, guidance_scale=1.0, width=SIZE, height=SIZE, num_images=IMAGES, include_pixels=True)


def _default_stub(channel: grpc.Channel) -> orchestrator_pb2_grpc.OrchestratorServiceStub:
    return orchestrator_pb2_grpc.OrchestratorServiceStub(channel)


@pytest.fixture(scope="module")
def raw_job(suite):
    """One large job over a channel with grpc's default options: (job id, every event as it came)."""
    request = Client.build_request("a lighthouse", **SETTINGS)
    with grpc.insecure_channel(suite.address) as channel:  # default options: 4 MiB receive limit
        events = list(_default_stub(channel).Generate(request, timeout=300))
    return events[0].accepted.job_id, events


def _decode(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (SIZE, SIZE)
    return np.asarray(image.convert("RGB"))


def test_a_large_result_reaches_a_default_client_in_chunks(raw_job, suite):
    job_id, events = raw_job
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[-1] == "result"
    chunks = [event.result_chunk for event in events if event.WhichOneof("event") == "result_chunk"]
    # The chunks come together, right before the result, and the result counts them.
    assert kinds[-1 - len(chunks):-1] == ["result_chunk"] * len(chunks)
    stripped = events[-1].result
    assert stripped.chunk_count == len(chunks) > 0
    assert all(image.png_chunked and not image.png for image in stripped.images)
    assert stripped.pixels_chunked and not stripped.pixels.raw_contents
    assert list(stripped.pixels.shape) == [IMAGES, SIZE, SIZE, 3]
    # Guard: every message for the job stays under 1 MiB (plus a chunk's few header bytes), far below 4 MiB.
    assert max(event.ByteSize() for event in events) <= INLINE_RESULT_BYTES + 1024
    assert max(len(chunk.data) for chunk in chunks) <= CHUNK_BYTES

    result = list(assemble(events))[-1].result
    pngs = [image.png for image in result.images]
    assert [len(png) for png in pngs] == [image.png_size for image in stripped.images]
    # The point of the test: the result would not have fit in one default message, and its PNGs alone exceed the
    # 1 MiB that is sent inline.
    assert sum(len(png) for png in pngs) > INLINE_RESULT_BYTES, [len(png) for png in pngs]
    assert result.ByteSize() > DEFAULT_LIMIT
    pixels = pixels_from_tensor(result.pixels)
    assert pixels.shape == (IMAGES, SIZE, SIZE, 3) and pixels.dtype == np.float32
    for index, png in enumerate(pngs):
        # The reassembled PNG decodes, and is the job's pixels in 8 bits (both halves survived the chunking).
        decoded = _decode(png).astype(np.float32) / 255
        assert np.abs(decoded - pixels[index]).max() <= 1 / 255 + 1e-6, index
    assert not np.array_equal(pixels[0], pixels[1])

    # The client library (which reassembles) gets the same bytes for the same request.
    with Client(suite.address, timeout=300) as client:
        again = client.generate("a lighthouse", **SETTINGS)
    assert again.images == pngs
    assert np.array_equal(again.pixels, pixels)


def test_watch_job_replays_a_large_result_in_chunks(raw_job, suite):
    job_id, events = raw_job
    expected = list(assemble(events))[-1].result
    with grpc.insecure_channel(suite.address) as channel:
        watched = [response.event for response in _default_stub(channel).WatchJob(
            orchestrator_pb2.WatchJobRequest(name=f"jobs/{job_id}"), timeout=120)]
    assert any(event.WhichOneof("event") == "result_chunk" for event in watched)
    assert max(event.ByteSize() for event in watched) <= INLINE_RESULT_BYTES + 1024
    replayed = list(assemble(watched))[-1].result
    assert [i.png for i in replayed.images] == [i.png for i in expected.images]
    assert replayed.pixels.raw_contents == expected.pixels.raw_contents
    with Client(suite.address, timeout=120) as client:
        assert [e for e in client.watch_job(job_id) if e.WhichOneof("event") == "result"][0].result == expected


def test_get_job_of_a_large_result_stays_small(raw_job, suite):
    job_id, events = raw_job
    expected = list(assemble(events))[-1].result
    with grpc.insecure_channel(suite.address) as channel:
        job = _default_stub(channel).GetJob(orchestrator_pb2.GetJobRequest(name=f"jobs/{job_id}"), timeout=60).job
    assert job.ByteSize() <= INLINE_RESULT_BYTES
    assert all(image.png_chunked and not image.png for image in job.result.images)
    assert [image.png_size for image in job.result.images] == [len(image.png) for image in expected.images]
    assert job.result.pixels_chunked and list(job.result.pixels.shape) == [IMAGES, SIZE, SIZE, 3]
    # The client library fills them in (through WatchJob).
    with Client(suite.address, timeout=120) as client:
        full = client.get_job(job_id)
    assert full.result == expected


def test_the_gateway_serves_a_large_results_images(raw_job, gateway):
    """The web page's job view reads GetJob, which leaves a large result's PNGs out; the gateway fetches them."""
    import requests

    job_id, events = raw_job
    expected = list(assemble(events))[-1].result
    summary = requests.get(f"{gateway.url}/ui/api/jobs/{job_id}", timeout=60)
    assert summary.status_code == 200, summary.text
    assert len(summary.json()["images"]) == IMAGES and summary.json()["parameters"]
    last = requests.get(f"{gateway.url}/ui/api/jobs/{job_id}/images/{IMAGES - 1}", timeout=60)
    assert last.status_code == 200 and last.content == expected.images[IMAGES - 1].png


def test_a_small_result_stays_one_message(suite):
    request = Client.build_request("a lighthouse", seed=5, steps=2, guidance_scale=1.0, width=64, height=64,
                                   num_images=2, include_pixels=True)
    with grpc.insecure_channel(suite.address) as channel:
        events = list(_default_stub(channel).Generate(request, timeout=120))
    assert not any(event.WhichOneof("event") == "result_chunk" for event in events)
    result = events[-1].result
    assert result.chunk_count == 0 and not result.pixels_chunked
    assert all(image.png and not image.png_chunked for image in result.images)
    assert len(result.pixels.raw_contents) == 2 * 64 * 64 * 3 * 4


def _big_result() -> orchestrator_pb2.GenerateResult:
    rng = np.random.default_rng(0)
    result = orchestrator_pb2.GenerateResult(seed=1)
    for index in range(3):
        result.images.add(png=rng.bytes(700_000 + index), index=index)
    result.grid_images.add(png=rng.bytes(1_500_000), z_index=0)
    result.pixels.raw_contents = rng.bytes(CHUNK_BYTES * 2)
    result.pixels.shape.extend([len(result.pixels.raw_contents) // 4])
    return result


def test_split_and_assemble_round_trip_grid_images_too():
    result = _big_result()
    events = list(split_result(result))
    assert all(event.ByteSize() <= INLINE_RESULT_BYTES + 1024 for event in events)
    assert events[-1].result.grid_images[0].png_chunked
    assert list(assemble(events))[-1].result == result


def test_assemble_async_for_grpc_aio_streams():
    import asyncio

    from latentwire.client.result_chunks import assemble_async

    result = _big_result()

    async def events():
        for event in split_result(result):
            yield event

    async def collect():
        return [event async for event in assemble_async(events())]

    assembled = asyncio.run(collect())
    assert len(assembled) == 1 and assembled[0].result == result


@pytest.mark.parametrize("damage", ["drop", "repeat", "stray"])
def test_a_broken_chunk_sequence_is_refused(damage):
    events = list(split_result(_big_result()))
    chunk = events[1]
    if damage == "drop":
        events.remove(chunk)
    elif damage == "repeat":
        events.insert(1, chunk)
    else:
        stray = orchestrator_pb2.GenerateResponse()
        stray.CopyFrom(chunk)
        stray.result_chunk.index = 9
        stray.result_chunk.offset = 0
        events.insert(len(events) - 1, stray)
    assembler = ResultAssembler()
    with pytest.raises(ResultChunkError):
        for event in events:
            assembler.feed(event)

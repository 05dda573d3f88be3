"""A dynamic batcher, as Triton's: images of concurrent calls merged into one model execution.

Each image waits in a per-model queue. A model instance takes the oldest image and every
queued image it can batch with (same tensor shape) up to ``max_batch_size``; while the batch is
not full it waits for more, but never longer than ``max_queue_delay_s`` after the oldest image
arrived. Images that queue while a batch runs are merged into the next one anyway, so under
load batches fill without any delay. With dynamic batching off, a batch holds images of one
call only (up to ``max_batch_size`` of them), which is the comparison Triton makes.

Everything but the forward pass runs on the event loop (no locks); the forward pass runs on the
batcher's own threads, one per model instance, so preprocessing on the service's worker pool
never delays a batch.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from services.runtime import telemetry
from services.runtime.errors import ResourceExhausted


@dataclass
class _Item:
    tensor: torch.Tensor
    group: int
    future: asyncio.Future
    enqueued: float


@dataclass
class BatchStatistics:
    """Counters since the batcher started."""

    image_count: int = 0
    execution_count: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    #: Batch size -> seconds its executions took (the Open Inference Protocol's per-batch-size statistics).
    batch_compute_seconds: collections.Counter = field(default_factory=collections.Counter)
    #: time.time() when the last batch finished; 0 before the first.
    last_execution_time: float = 0.0


class DynamicBatcher:
    """Queues single images and runs them through ``execute`` in batches.

    ``execute`` takes a float tensor [batch, ...] and returns one output row per image; it is
    called on the batcher's threads.
    """

    def __init__(self, execute: Callable[[torch.Tensor], torch.Tensor], *, max_batch_size: int,
                 max_queue_delay_s: float, dynamic: bool = True, instances: int = 1, max_queued: int = 1024,
                 name: str = ""):
        self.execute = execute
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.dynamic = dynamic
        self.instances = instances
        self.max_queued = max_queued
        self.name = name
        self.statistics = BatchStatistics()
        self._pending: collections.deque[_Item] = collections.deque()
        self._changed = asyncio.Event()
        self._groups = itertools.count()
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix="batch")
        self._consumers: list[asyncio.Task] = []

    @property
    def queued(self) -> int:
        """Images waiting for a model execution."""
        return len(self._pending)

    def submit(self, tensors: list[torch.Tensor]) -> list[asyncio.Future]:
        """Queue one call's images; returns one future per image, resolved with its output row.

        Raises RESOURCE_EXHAUSTED when the queue would hold more than ``max_queued`` images.
        Cancelling a future drops its image from the queue if it has not run yet.
        """
        if len(self._pending) + len(tensors) > self.max_queued:
            telemetry.metrics.classifier_rejected.labels(model=self.name).inc()
            raise ResourceExhausted(
                f"{len(self._pending)} images are queued for model {self.name!r} and this call adds "
                f"{len(tensors)}; the queue holds at most {self.max_queued}: retry later",
                reason="QUEUE_FULL", metadata={"model": self.name, "max_queued_images": str(self.max_queued)})
        loop = asyncio.get_running_loop()
        if not self._consumers:
            self._consumers = [loop.create_task(self._consume(), name=f"batcher-{self.name}-{i}")
                               for i in range(self.instances)]
        group, now = next(self._groups), loop.time()
        items = [_Item(tensor, group, loop.create_future(), now) for tensor in tensors]
        self._pending.extend(items)
        self._queued_changed()
        self._changed.set()
        return [item.future for item in items]

    async def close(self) -> None:
        """Stop the model instances; queued images are cancelled."""
        for task in self._consumers:
            task.cancel()
        for task in self._consumers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._pending:
            self._pending.popleft().future.cancel()
        self._queued_changed()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- metrics (services/runtime/telemetry.py: latentwire_classifier_*) ------------------------

    def _queued_changed(self) -> None:
        telemetry.metrics.classifier_queued.labels(model=self.name).set(len(self._pending))

    def _export(self, batch: list[_Item], started: float, seconds: float) -> None:
        """One executed batch into the Prometheus series, the same figures ``statistics`` keeps."""
        metrics = telemetry.metrics
        metrics.classifier_batches.labels(model=self.name).inc()
        metrics.classifier_images.labels(model=self.name).inc(len(batch))
        metrics.classifier_batch_size.labels(model=self.name).observe(len(batch))
        metrics.classifier_batch_compute.labels(model=self.name).observe(seconds)
        wait = metrics.classifier_queue_wait.labels(model=self.name)
        for item in batch:
            wait.observe(max(0.0, started - item.enqueued))

    # -- the model instances -------------------------------------------------------------------

    def _fits(self, first: _Item, item: _Item) -> bool:
        if not self.dynamic and item.group != first.group:
            return False
        return item.tensor.shape == first.tensor.shape and item.tensor.dtype == first.tensor.dtype

    def _batchable(self, first: _Item) -> int:
        return sum(1 for item in self._pending if self._fits(first, item))

    def _take(self, first: _Item) -> list[_Item]:
        batch, rest = [], collections.deque()
        for item in self._pending:
            if len(batch) < self.max_batch_size and self._fits(first, item):
                batch.append(item)
            else:
                rest.append(item)
        self._pending = rest
        self._queued_changed()
        return batch

    async def _wait(self, timeout: float | None) -> None:
        self._changed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self._pending and self._pending[0].future.done():  # its caller went away
                self._pending.popleft()
                self._queued_changed()
            if not self._pending:
                await self._wait(None)
                continue
            first = self._pending[0]
            if self.dynamic:
                # Wait for a full batch, but not beyond the oldest image's queue delay.
                while self._batchable(first) < self.max_batch_size:
                    remaining = first.enqueued + self.max_queue_delay_s - loop.time()
                    if remaining <= 0:
                        break
                    await self._wait(remaining)
                    if not self._pending or self._pending[0] is not first:
                        break  # another instance took it, or its caller went away
                if not self._pending or self._pending[0] is not first:
                    continue
            batch = [item for item in self._take(first) if not item.future.done()]
            if batch:
                await self._run(batch, loop)

    async def _run(self, batch: list[_Item], loop: asyncio.AbstractEventLoop) -> None:
        started = loop.time()

        def work() -> tuple[torch.Tensor, float]:
            t0 = time.perf_counter()
            # Stacked here, not on the event loop: torch ops there would start a second OpenMP team.
            outputs = self.execute(torch.stack([item.tensor for item in batch]))
            return outputs, time.perf_counter() - t0

        try:
            outputs, seconds = await loop.run_in_executor(self._executor, work)
        except asyncio.CancelledError:
            for item in batch:
                item.future.cancel()
            raise
        except Exception as error:  # noqa: BLE001 - every caller in the batch gets it
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        stats = self.statistics
        stats.execution_count += 1
        stats.image_count += len(batch)
        stats.batch_sizes[len(batch)] += 1
        stats.compute_seconds += seconds
        stats.batch_compute_seconds[len(batch)] += seconds
        stats.last_execution_time = time.time()
        stats.queue_seconds += sum(started - item.enqueued for item in batch)
        self._export(batch, started, seconds)
        for row, item in enumerate(batch):
            if not item.future.done():
                item.future.set_result(outputs[row])

"""gRPC servicer for latentwire.registry.v1.RegistryService: proto <-> domain, nothing else.

Every call's disk and SQLite work runs on the worker pool (``self.worker.run``) so the event loop
keeps serving health, status and other transfers. The registry holds no model, so it is a plain
``Service`` and never imports torch.

A WriteBlob holds its blob's lock under a lease: each chunk must arrive within
--upload-lease-seconds of the last (or of taking the lock), else the stream ends with ABORTED
(UPLOAD_LEASE_EXPIRED), the lock passes to the next writer and the committed prefix stays for a
resume. Garbage collection runs once before the registry reports SERVING, every
--gc-interval-seconds, and on CollectGarbage. The scrub (``BlobStore.scrub``) re-hashes, hourly,
the blobs not verified within --scrub-interval-seconds.
--read-verification says what ReadBlob checks before it sends (``blobs``, ``integrity``).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from pathlib import Path

import grpc

from latentwire.registry.v1 import registry_pb2, registry_pb2_grpc
from services.runtime.errors import Aborted, FailedPrecondition, InvalidArgument
from services.runtime.server import Service
from services.runtime.timestamps import to_timestamp

from .blobs import Upload
from .metadata import FileEntry, ModelInfo, VersionInfo
from .store import RegistryStore
from .validation import DEFAULT_CHUNK_BYTES, check_wire_chunk_size, check_write_chunk_followed
from .wire import PreEncodedServer, encode_read_blob_response

log = logging.getLogger(__name__)

#: Longest wait between two scrub rounds, in seconds.
_SCRUB_WAKE_S = 3600.0
#: Bytes of ReadBlob chunks read (and checked and encoded) per hop to a worker thread; most bytes of WriteBlob
#: chunks gathered while a write is on a worker before the stream waits for it. Each hop to a worker and back
#: costs the event loop a wake-up and a thread switch: per 1 MiB chunk that was a fifth of the registry's CPU
#: for a download on a busy 2-core machine.
_READ_BATCH_BYTES = 4 * 1024 * 1024
_WRITE_BATCH_BYTES = 4 * 1024 * 1024


def _model_pb(model: ModelInfo) -> registry_pb2.Model:
    return registry_pb2.Model(
        name=f"models/{model.model_id}",
        model_id=model.model_id,
        description=model.description,
        tags=model.tags,
        aliases=model.aliases,
        latest_version=model.latest_version,
        create_time=to_timestamp(model.create_time),
    )


def _version_pb(version: VersionInfo) -> registry_pb2.ModelVersion:
    return registry_pb2.ModelVersion(
        name=f"models/{version.model_id}/versions/{version.version}",
        model_id=version.model_id,
        version=version.version,
        kind=registry_pb2.ModelKind.Value(version.kind),
        source=version.source,
        status=registry_pb2.ModelVersionStatus.Value(version.status),
        components=version.components,
        files=[registry_pb2.ModelFile(path=f.path, size_bytes=f.size_bytes, sha256=f.sha256, component=f.component)
               for f in version.files],
        tags=version.tags,
        create_time=to_timestamp(version.create_time),
        description=version.description,
    )


def _kind_name(kind: int) -> str:
    """The enum value's name; "" for a number the contract does not define (the store refuses it)."""
    try:
        return registry_pb2.ModelKind.Name(kind)
    except ValueError:
        return ""


def _write_chunks(upload: Upload, chunks: list) -> None:
    """Write received WriteBlob chunks in order (on a worker); chunks after the one finishing the blob are ignored."""
    for chunk in chunks:
        if upload.complete:
            return
        upload.write(chunk.sha256, chunk.size_bytes, chunk.offset, chunk.data, chunk.finish_write)


async def _settle(upload: Upload, worker, writing, pending) -> None:
    """Before an upload that ended early closes (the stream broke, lost its lease or failed a check): let the write
    still on a worker finish, then write the chunks received meanwhile, so the committed prefix holds every chunk
    that arrived, as when each chunk went to the worker as it came. ``writing`` and ``pending`` are read now."""
    future = writing()
    if future is not None:
        if not future.done():
            with contextlib.suppress(BaseException):
                await future
        if future.cancelled() or future.exception() is not None:
            return  # the file no longer follows the chunks: the resume re-reads what is committed
    chunks = pending()
    if chunks and not upload.complete:
        with contextlib.suppress(BaseException):
            await worker.run(_write_chunks, upload, chunks)


class RegistryService(Service, registry_pb2_grpc.RegistryServiceServicer):
    """Models, versions, aliases and tags, and the blobs holding every version's files."""

    service_name = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name

    def __init__(self, config):
        super().__init__(config)
        self._store: RegistryStore | None = None
        # One upload per blob at a time: a second WriteBlob of the same sha256 waits for the first
        # (and then usually finds the blob stored) - at most until the first goes a lease without a
        # chunk. sha256 -> [lock, waiters].
        self._upload_locks: dict[str, list] = {}
        self._upload_lease_s = float(config.extra.upload_lease_seconds)
        self._gc_task: asyncio.Task | None = None
        self._scrub_task: asyncio.Task | None = None

    def register(self, server: grpc.aio.Server) -> list[str]:
        # ReadBlob yields wire bytes encoded on the worker thread, passed through to gRPC; WriteBlob's chunks
        # arrive with ``data`` a view of the received bytes (wire.py).
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(self, PreEncodedServer(server))
        return [self.service_name]

    async def load(self) -> None:
        """Open the database and the blob store (creating them on first start)."""
        extra = self.config.extra
        self._store = await self.worker.run(functools.partial(
            RegistryStore, Path(extra.data_dir), extra.max_blob_bytes, allow_pickle=self.config.allow_pickle,
            quota_bytes=extra.quota_bytes, min_free_bytes=extra.min_free_disk_bytes,
            upload_lease_s=self._upload_lease_s, gc_grace_s=extra.gc_grace_seconds,
            read_verification=extra.read_verification))
        # Uploads killed with the last process left .partial files: collect them (and unlisted blobs) now.
        await self.worker.run(self._store.collect_garbage)
        if extra.gc_interval_seconds > 0:
            self._gc_task = asyncio.create_task(self._collect_periodically(extra.gc_interval_seconds))
        if extra.scrub_interval_seconds > 0:
            self._scrub_task = asyncio.create_task(self._scrub_periodically(extra.scrub_interval_seconds))

    async def _scrub_periodically(self, interval_s: float) -> None:
        """Every hour (or ``interval_s``, if shorter) re-hash the blobs last verified over ``interval_s`` ago."""
        while True:
            await asyncio.sleep(min(interval_s, _SCRUB_WAKE_S))
            try:
                checked, corrupt = await self.worker.run(self.store.blobs.scrub, time.time() - interval_s)
                if checked:
                    log.info("scrub: re-hashed %d blob(s), %d corrupt", checked, corrupt)
            except Exception:  # noqa: BLE001 - logged; the next round tries again
                log.exception("scrub failed")

    async def _collect_periodically(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.worker.run(self.store.collect_garbage)
            except Exception:  # noqa: BLE001 - logged; the next round tries again
                log.exception("garbage collection failed")

    async def close(self) -> None:
        for task in (self._gc_task, self._scrub_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._store is not None:
            self._store.close()
        await super().close()

    @property
    def store(self) -> RegistryStore:
        if self._store is None:
            raise FailedPrecondition("the registry is still opening its store; retry shortly", reason="REGISTRY_LOADING")
        return self._store

    # -- models ------------------------------------------------------------------------------

    async def CreateModel(self, request, context):
        """Register a new model name."""
        model = await self.worker.run(self.store.create_model, request.model_id, request.description,
                                      dict(request.tags))
        return registry_pb2.CreateModelResponse(model=_model_pb(model))

    async def GetModel(self, request, context):
        """Return one model with its aliases and tags."""
        return registry_pb2.GetModelResponse(model=_model_pb(await self.worker.run(self.store.get_model, request.name)))

    async def ListModels(self, request, context):
        """Return one page of models, ordered by name."""
        models, token = await self.worker.run(self.store.list_models, request.page_size, request.page_token)
        return registry_pb2.ListModelsResponse(models=[_model_pb(m) for m in models], next_page_token=token)

    async def DeleteModel(self, request, context):
        """Remove a model with all its versions, aliases and tags."""
        await self.worker.run(self.store.delete_model, request.name)
        return registry_pb2.DeleteModelResponse()

    async def SetModelTag(self, request, context):
        """Set one tag on a model."""
        model = await self.worker.run(self.store.set_model_tag, request.name, request.key, request.value)
        return registry_pb2.SetModelTagResponse(model=_model_pb(model))

    async def DeleteModelTag(self, request, context):
        """Remove one tag from a model."""
        model = await self.worker.run(self.store.delete_model_tag, request.name, request.key)
        return registry_pb2.DeleteModelTagResponse(model=_model_pb(model))

    async def SetAlias(self, request, context):
        """Point an alias at a version, replacing its previous target atomically."""
        model = await self.worker.run(self.store.set_alias, request.name, request.alias, request.version)
        return registry_pb2.SetAliasResponse(model=_model_pb(model))

    async def DeleteAlias(self, request, context):
        """Remove an alias from a model."""
        model = await self.worker.run(self.store.delete_alias, request.name, request.alias)
        return registry_pb2.DeleteAliasResponse(model=_model_pb(model))

    # -- versions ----------------------------------------------------------------------------

    async def CreateModelVersion(self, request, context):
        """Record a version from stored blobs, in one transaction; nothing is recorded if a blob is missing."""
        files = [FileEntry(f.path, f.size_bytes, f.sha256, f.component) for f in request.files]
        version = await self.worker.run(
            self.store.create_version, request.name, _kind_name(request.kind), request.source, files,
            dict(request.tags), request.description, list(request.aliases),
        )
        return registry_pb2.CreateModelVersionResponse(model_version=_version_pb(version))

    async def GetModelVersion(self, request, context):
        """Return one version with its file manifest."""
        version = await self.worker.run(self.store.get_version, request.name)
        return registry_pb2.GetModelVersionResponse(model_version=_version_pb(version))

    async def ListModelVersions(self, request, context):
        """Return one page of a model's versions, newest first."""
        versions, token = await self.worker.run(self.store.list_versions, request.parent, request.page_size,
                                                request.page_token)
        return registry_pb2.ListModelVersionsResponse(model_versions=[_version_pb(v) for v in versions],
                                                      next_page_token=token)

    async def DeleteModelVersion(self, request, context):
        """Remove one version and the aliases pointing at it (its blobs stay: other versions may share them)."""
        await self.worker.run(self.store.delete_version, request.name)
        return registry_pb2.DeleteModelVersionResponse()

    async def SetModelVersionTag(self, request, context):
        """Set one tag on a version."""
        version = await self.worker.run(self.store.set_version_tag, request.name, request.key, request.value)
        return registry_pb2.SetModelVersionTagResponse(model_version=_version_pb(version))

    async def ResolveModel(self, request, context):
        """Turn "name", "name@3" or "name@alias" into one version."""
        version = await self.worker.run(self.store.resolve, request.reference)
        return registry_pb2.ResolveModelResponse(model_version=_version_pb(version))

    # -- blobs -------------------------------------------------------------------------------

    async def QueryBlob(self, request, context):
        """Say whether a blob is stored, or how much of a pending upload is committed."""
        committed, complete = await self.worker.run(self.store.query_blob, request.sha256)
        return registry_pb2.QueryBlobResponse(committed_size=committed, complete=complete)

    async def WriteBlob(self, request_iterator, context):
        """Store one blob from a stream of chunks; it is kept only once its sha256 matches."""
        return await self._write_blob(request_iterator)

    async def _next_chunk(self, chunks, upload: Upload | None):
        """The stream's next chunk, or None at its end; ABORTED when none arrives within the upload lease."""
        try:
            return await asyncio.wait_for(anext(chunks), self._upload_lease_s)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            raise Aborted(
                f"no WriteBlob chunk arrived for {self._upload_lease_s:g} s, so this upload lost its lease on the "
                "blob; the bytes it sent are kept: resume from QueryBlob's committed_size",
                reason="UPLOAD_LEASE_EXPIRED",
                metadata={"sha256": "" if upload is None else upload.sha256,
                          "lease_seconds": f"{self._upload_lease_s:g}"}) from None

    async def _write_blob(self, requests) -> registry_pb2.WriteBlobResponse:
        chunks = aiter(requests)
        async with contextlib.AsyncExitStack() as stack:
            upload, writing, previous = None, None, None
            pending, pending_bytes = [], 0  # chunks received while a write was on the worker
            # The lease: every read, the first included, waits at most the lease (waiting for the lock does not count).
            while (chunk := await self._next_chunk(chunks, upload)) is not None:
                if previous is not None:  # a chunk follows ``previous``, so it was not the stream's last
                    check_write_chunk_followed(previous.offset, len(previous.data))
                previous = chunk
                if upload is None:
                    await stack.enter_async_context(self._blob_lock(chunk.sha256))
                    upload = await self.worker.run(self.store.begin_upload, chunk.sha256, chunk.size_bytes, chunk.offset)
                    stack.callback(upload.close)
                    stack.push_async_callback(_settle, upload, self.worker, lambda: writing, lambda: pending)
                    if upload.complete:  # stored already (by an earlier or a concurrent upload): done
                        return registry_pb2.WriteBlobResponse(committed_size=upload.position, complete=True)
                pending.append(chunk)
                pending_bytes += len(chunk.data)
                if writing is not None and not writing.done() and pending_bytes < _WRITE_BATCH_BYTES:
                    continue  # gather what arrives while the worker writes: one hop to it per batch, not per chunk
                if writing is not None:
                    await writing
                if upload.complete:
                    return registry_pb2.WriteBlobResponse(committed_size=upload.position, complete=True)
                # Write and hash these chunks on a worker while the next ones arrive.
                writing = asyncio.ensure_future(self.worker.run(_write_chunks, upload, pending))
                pending, pending_bytes = [], 0
            if upload is None:
                raise InvalidArgument("WriteBlob received no chunk", reason="EMPTY_UPLOAD")
            if writing is not None:
                await writing
            if pending:
                chunks, pending = pending, []
                await self.worker.run(_write_chunks, upload, chunks)
            return registry_pb2.WriteBlobResponse(committed_size=upload.position, complete=upload.complete)

    async def CollectGarbage(self, request, context):
        """Remove (or, dry, count) abandoned uploads and blobs no version lists."""
        garbage = await self.worker.run(self.store.collect_garbage, request.dry_run)
        return registry_pb2.CollectGarbageResponse(
            partial_uploads_removed=garbage.partial_uploads, partial_upload_bytes=garbage.partial_upload_bytes,
            blobs_removed=garbage.blobs, blob_bytes=garbage.blob_bytes, dry_run=request.dry_run)

    @contextlib.asynccontextmanager
    async def _blob_lock(self, sha256: str):
        entry = self._upload_locks.setdefault(sha256, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._upload_locks[sha256]

    async def ReadBlob(self, request, context):
        """Stream a blob's bytes from an offset, each chunk checked first as --read-verification says (blocks:
        against the blob's block checksums, or the whole blob hashed before the last chunk; digest: as stored)."""
        check_wire_chunk_size(request.chunk_size)
        reader = await self.worker.run(self.store.open_blob, request.sha256, request.offset, request.limit,
                                       request.chunk_size)

        batch = max(1, _READ_BATCH_BYTES // (request.chunk_size or DEFAULT_CHUNK_BYTES))

        def next_responses() -> tuple[list[bytes], BaseException | None]:
            # Read, verify and encode the next chunks on the worker: the event loop only hands them to gRPC. A few
            # chunks per hop to the worker and back (each costs the loop a wake-up); an error after the first
            # chunk is raised once the chunks before it went out, as it would be one chunk at a time.
            responses = []
            try:
                while len(responses) < batch and (chunk := reader.next()) is not None:
                    responses.append(encode_read_blob_response(chunk.offset, chunk.data, reader.size))
            except Exception as error:  # noqa: BLE001 - raised by the handler after the chunks read before it
                if not responses:
                    raise
                return responses, error
            return responses, None

        # Read the next chunks from disk while these are on the wire.
        ahead = asyncio.ensure_future(self.worker.run(next_responses))
        try:
            while True:
                responses, error = await ahead
                if not responses:
                    return
                if error is None:
                    ahead = asyncio.ensure_future(self.worker.run(next_responses))
                for response in responses:
                    yield response
                if error is not None:
                    raise error
        finally:
            # The read in flight (if the caller went away) finishes on its thread; close after it.
            ahead.add_done_callback(lambda done: (done.cancelled() or done.exception(), reader.close()))

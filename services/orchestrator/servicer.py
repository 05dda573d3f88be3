"""gRPC servicer for latentwire.orchestrator.v1.OrchestratorService."""
from __future__ import annotations

import uuid

import grpc

from latentwire.denoiser.v1 import denoiser_pb2
from latentwire.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from latentwire.services.runtime.channels import aio_channel
from latentwire.services.runtime.errors import Cancelled, from_rpc_error
from latentwire.services.runtime.jobs import JobState
from latentwire.services.runtime.server import Service

from .pipeline import Stages, resolve_request, run_text_to_image


class OrchestratorService(Service, orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """Client-facing service: runs generations across the stage services."""

    service_name = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name

    def __init__(self, config):
        super().__init__(config)
        self._channels: list[grpc.aio.Channel] = []
        self.stages: Stages | None = None

    async def load(self) -> None:
        """Open channels to the stages (inside the event loop, which grpc.aio channels belong to)."""
        config, extra = self.config, self.config.extra
        options = dict(
            max_message_bytes=config.max_message_bytes,
            keepalive_time_s=config.keepalive_time_s,
            keepalive_timeout_s=config.keepalive_timeout_s,
        )
        self._channels = [
            aio_channel(extra.text_encoder_address, **options),
            aio_channel(extra.denoiser_address, **options),
            aio_channel(extra.vae_address, **options),
        ]
        if config.registry:
            self._channels.append(aio_channel(config.registry, **options))
        self.stages = Stages(*self._channels)

    def register(self, server: grpc.aio.Server) -> list[str]:
        orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(self, server)
        return [self.service_name]

    async def Generate(self, request: orchestrator_pb2.GenerateRequest, context):
        """Run one text-to-image job across the stages, streaming its progress."""
        params = resolve_request(request, self.config.extra)
        job = self.tracker.start(uuid.uuid4().hex, total_steps=params.num_inference_steps)
        state = JobState.JOB_STATE_FAILED
        try:
            async for event in run_text_to_image(self.stages, params, job, context):
                yield event
            state = JobState.JOB_STATE_SUCCEEDED
        except Cancelled:
            state = JobState.JOB_STATE_CANCELLED
            raise
        except BaseException as exc:
            # asyncio.CancelledError: the caller cancelled or its deadline passed.
            if not isinstance(exc, Exception):
                state = JobState.JOB_STATE_CANCELLED
                job.cancel()
            raise
        finally:
            self.tracker.finish(job, state)

    async def ListSchedulers(self, request: orchestrator_pb2.ListSchedulersRequest, context):
        """Ask the denoiser which schedulers the model accepts."""
        try:
            response = await self.stages.denoiser.ListSchedulers(
                denoiser_pb2.ListSchedulersRequest(model=request.model), timeout=context.time_remaining()
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error, "denoiser") from None
        return orchestrator_pb2.ListSchedulersResponse(
            default_scheduler=response.default_scheduler, schedulers=response.schedulers
        )

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        await super().close()

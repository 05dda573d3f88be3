"""The gateway's gRPC clients of the suite: one grpc.aio channel to the orchestrator, one to the registry.

Every REST call becomes calls on these stubs with the calling user's suite token in the metadata
(``call_metadata``), so the orchestrator sees the user's principal and queues the user's jobs as its own.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from latentwire.classifier.v1 import classifier_pb2_grpc
from latentwire.client.security import AUTHORIZATION
from latentwire.orchestrator.v1 import orchestrator_pb2_grpc
from latentwire.registry.v1 import registry_pb2_grpc
from services.runtime.channels import aio_channel

if TYPE_CHECKING:
    from .auth import User
    from .config import GatewaySettings


class SuiteClients:
    """Stubs on grpc.aio channels: ``orchestrator`` (OrchestratorService), ``classifier`` (ClassifierService on the
    orchestrator's channel: the orchestrator forwards it to the classifier service) and ``registry``
    (RegistryService, None without ``--registry``)."""

    def __init__(self, settings: GatewaySettings):
        self._settings = settings
        limits = {"max_message_bytes": settings.max_message_bytes, "keepalive_time_s": settings.keepalive_time_s,
                  "keepalive_timeout_s": settings.keepalive_timeout_s}
        self._orchestrator_channel = aio_channel(settings.orchestrator, **limits)
        self.orchestrator = orchestrator_pb2_grpc.OrchestratorServiceStub(self._orchestrator_channel)
        self.classifier = classifier_pb2_grpc.ClassifierServiceStub(self._orchestrator_channel)
        self._registry_channel = aio_channel(settings.registry, **limits) if settings.registry else None
        self.registry = (registry_pb2_grpc.RegistryServiceStub(self._registry_channel)
                         if self._registry_channel is not None else None)

    def call_metadata(self, user: User) -> list[tuple[str, str]]:
        """Metadata for a gRPC call made for ``user``: ``authorization: Bearer TOKEN`` with the user's suite token
        (or the gateway's own ``--suite-token`` for users without one; nothing when neither is set)."""
        token = self._settings.user_tokens.get(user.name) or self._settings.suite_token
        return [(AUTHORIZATION, f"Bearer {token}")] if token else []

    async def close(self) -> None:
        await self._orchestrator_channel.close()
        if self._registry_channel is not None:
            await self._registry_channel.close()

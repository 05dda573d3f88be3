"""Classification through the orchestrator, so a client needs one address.

The orchestrator forwards latentwire.classifier.v1.ClassifierService and the Open Inference
Protocol (inference.GRPCInferenceService, Triton's extensions and the ModelStreamInfer stream included)
unchanged to the classifier service given by
``--classifier-address``: the caller's remaining deadline goes along, and the classifier's
status code and ErrorInfo reason come back with ``metadata.stage = "classifier"``. Without the
flag every call answers FAILED_PRECONDITION (reason CLASSIFIER_NOT_CONFIGURED).
"""
from __future__ import annotations

import asyncio

import grpc

from latentwire.classifier.v1 import classifier_pb2, classifier_pb2_grpc
from latentwire.inference.v2 import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from services.runtime.channels import aio_channel
from services.runtime.errors import FailedPrecondition, from_rpc_error

STAGE = "classifier"


class ClassificationRouter:
    """Holds the channel to the classifier and registers the two forwarding servicers."""

    def __init__(self, address: str | None):
        self.address = address
        self._classifier: classifier_pb2_grpc.ClassifierServiceStub | None = None
        self._inference: grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub | None = None

    def connect(self, **options) -> list[grpc.aio.Channel]:
        """Open the channel (inside the event loop); returns the channels to close at shutdown."""
        if not self.address:
            return []
        channel = aio_channel(self.address, **options)
        self._classifier = classifier_pb2_grpc.ClassifierServiceStub(channel)
        self._inference = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
        return [channel]

    def register(self, server: grpc.aio.Server) -> list[str]:
        """Add ClassifierService and GRPCInferenceService; return their full names."""
        classifier_pb2_grpc.add_ClassifierServiceServicer_to_server(ClassifierProxy(self), server)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceProxy(self), server)
        return [classifier_pb2.DESCRIPTOR.services_by_name["ClassifierService"].full_name,
                grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name]

    def stub(self, kind: str):
        stub = self._classifier if kind == "classifier" else self._inference
        if stub is None:
            raise FailedPrecondition("classification is not configured on this orchestrator; start it with "
                                     "--classifier-address HOST:PORT", reason="CLASSIFIER_NOT_CONFIGURED")
        return stub

    async def unary(self, kind: str, method: str, request, context):
        """Forward one unary call with the caller's remaining deadline; map the classifier's errors."""
        try:
            return await getattr(self.stub(kind), method)(request, timeout=context.time_remaining())
        except grpc.RpcError as error:
            raise from_rpc_error(error, STAGE) from None

    async def bidi(self, kind: str, method: str, request_iterator, context):
        """Forward one bidirectional stream. This handler reads the caller's requests itself and writes them on, so
        a request that cannot be read (a malformed message) ends the call with that error at once, as on the
        classifier, instead of leaving the classifier's call waiting until the deadline."""
        call = getattr(self.stub(kind), method)(timeout=context.time_remaining())
        failure: list[BaseException] = []

        async def pump() -> None:
            try:
                async for request in request_iterator:
                    await call.write(request)
                await call.done_writing()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - reported by the handler below
                failure.append(error)
                call.cancel()

        writer = asyncio.create_task(pump())
        try:
            async for response in call:
                yield response
        except (grpc.RpcError, asyncio.CancelledError) as error:
            if failure:
                raise failure[0] from None
            if isinstance(error, asyncio.CancelledError):
                raise
            raise from_rpc_error(error, STAGE) from None
        finally:
            writer.cancel()
            call.cancel()
        if failure:
            raise failure[0]

    async def stream(self, kind: str, method: str, request, context):
        """Forward one server- or bidi-streaming call (``request``: a message or the caller's request iterator),
        relaying each answer as it arrives; when the caller goes away the classifier's call is cancelled, so it
        drops the caller's queued images."""
        call = getattr(self.stub(kind), method)(request, timeout=context.time_remaining())
        try:
            async for response in call:
                yield response
        except grpc.RpcError as error:
            raise from_rpc_error(error, STAGE) from None
        finally:
            call.cancel()


class ClassifierProxy(classifier_pb2_grpc.ClassifierServiceServicer):
    """latentwire.classifier.v1.ClassifierService, forwarded."""

    def __init__(self, router: ClassificationRouter):
        self._router = router

    async def Classify(self, request, context):
        """Forward Classify to the classifier."""
        return await self._router.unary("classifier", "Classify", request, context)

    async def StreamClassify(self, request, context):
        """Forward StreamClassify, relaying each result as it arrives."""
        async for response in self._router.stream("classifier", "StreamClassify", request, context):
            yield response

    async def GetStatistics(self, request, context):
        """Forward GetStatistics to the classifier."""
        return await self._router.unary("classifier", "GetStatistics", request, context)


class InferenceProxy(grpc_predict_v2_pb2_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService (Open Inference Protocol v2), forwarded."""

    def __init__(self, router: ClassificationRouter):
        self._router = router

    async def ServerLive(self, request, context):
        """Forward ServerLive (the classifier's liveness)."""
        return await self._router.unary("inference", "ServerLive", request, context)

    async def ServerReady(self, request, context):
        """Forward ServerReady."""
        return await self._router.unary("inference", "ServerReady", request, context)

    async def ModelReady(self, request, context):
        """Forward ModelReady."""
        return await self._router.unary("inference", "ModelReady", request, context)

    async def ServerMetadata(self, request, context):
        """Forward ServerMetadata."""
        return await self._router.unary("inference", "ServerMetadata", request, context)

    async def ModelMetadata(self, request, context):
        """Forward ModelMetadata."""
        return await self._router.unary("inference", "ModelMetadata", request, context)

    async def ModelInfer(self, request, context):
        """Forward ModelInfer."""
        return await self._router.unary("inference", "ModelInfer", request, context)

    async def ModelStreamInfer(self, request_iterator, context):
        """Forward ModelStreamInfer: requests go on as they arrive, answers come back as the classifier sends them."""
        async for response in self._router.bidi("inference", "ModelStreamInfer", request_iterator, context):
            yield response

    async def ModelConfig(self, request, context):
        """Forward ModelConfig."""
        return await self._router.unary("inference", "ModelConfig", request, context)

    async def ModelStatistics(self, request, context):
        """Forward ModelStatistics."""
        return await self._router.unary("inference", "ModelStatistics", request, context)

    async def RepositoryIndex(self, request, context):
        """Forward RepositoryIndex."""
        return await self._router.unary("inference", "RepositoryIndex", request, context)

    async def RepositoryModelLoad(self, request, context):
        """Forward RepositoryModelLoad."""
        return await self._router.unary("inference", "RepositoryModelLoad", request, context)

    async def RepositoryModelUnload(self, request, context):
        """Forward RepositoryModelUnload."""
        return await self._router.unary("inference", "RepositoryModelUnload", request, context)

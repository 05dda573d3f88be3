"""gRPC servicer for latentwire.classifier.v1.ClassifierService: proto <-> domain, nothing else.

The same service object also backs the Open Inference Protocol servicer (inference.py); both
share the loaded models and their dynamic batchers.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
import torch

from latentwire.classifier.v1 import classifier_pb2, classifier_pb2_grpc
from latentwire.common.v1 import model_pb2
from services.runtime import tensors
from services.runtime.errors import Internal, InvalidArgument, LatentwireError
from services.runtime.server import ModelService

from .batcher import DynamicBatcher
from .config import check_limits, parse_model_backends
from .images import decode_image, image_from_pixels
from .model import ClassifierModel

log = logging.getLogger(__name__)

DataType = tensors.DataType
BACKEND_ENUM = {"torch": classifier_pb2.BACKEND_TORCH, "int8": classifier_pb2.BACKEND_TORCH_INT8,
                "onnx": classifier_pb2.BACKEND_ONNXRUNTIME,
                "onnx-int8": classifier_pb2.BACKEND_ONNXRUNTIME_INT8,
                "tflite": classifier_pb2.BACKEND_LITERT}
#: Images preprocessed per worker call in StreamClassify (results start flowing after the first chunk).
STREAM_CHUNK = 16


class ClassifierService(ModelService, classifier_pb2_grpc.ClassifierServiceServicer):
    """Labels images; serves ClassifierService and inference.GRPCInferenceService."""

    service_name = classifier_pb2.DESCRIPTOR.services_by_name["ClassifierService"].full_name

    #: Classifier folders are flat (config.json, weights, preprocessor_config.json, model.onnx at the top level).
    components = ()

    def __init__(self, config):
        check_limits(config.extra)
        self.backends = parse_model_backends(config.extra.model_backend, config.models, registry=config.registry)
        super().__init__(config)
        if config.extra.intra_op_threads:
            torch.set_num_threads(config.extra.intra_op_threads)
        self.ready = False
        self._batchers: dict[str, tuple[ClassifierModel, DynamicBatcher]] = {}

    def register(self, server: grpc.aio.Server) -> list[str]:
        from .inference import register_inference

        classifier_pb2_grpc.add_ClassifierServiceServicer_to_server(self, server)
        return [self.service_name, register_inference(server, self), self.register_loader(server)]

    def backend_for(self, name: str) -> str:
        """The backend of a model key ("name" or "name@VERSION"): its --model-backend entry, else --backend."""
        return self.backends.get(name) or self.backends.get(name.split("@")[0]) or self.config.extra.backend

    def load_model(self, spec) -> ClassifierModel:
        # A folder it cannot use raises ModelFolderError: the process refuses to start with it, a request
        # loading the model gets FAILED_PRECONDITION (services/runtime/models.py).
        return ClassifierModel(spec.path, backend=self.backend_for(spec.name), device=self.device, dtype=self.dtype,
                               allow_pickle=self.config.allow_pickle, threads=self.config.extra.intra_op_threads)

    async def load(self) -> None:
        await super().load()
        for loaded in self.models.describe():  # the start-up models get their batchers now
            await self.classifier_for(model_pb2.ModelReference(name=loaded.name))
        self.ready = True

    async def close(self) -> None:
        for _, batcher in self._batchers.values():
            await batcher.close()
        await super().close()

    # -- shared with the Open Inference Protocol servicer -----------------------------------------

    async def classifier_for(self, ref: model_pb2.ModelReference | None) -> tuple[str, ClassifierModel, DynamicBatcher]:
        """The model a request names (loaded on first use) with its batcher: (model key, model, batcher)."""
        loaded = await self.model_for(ref)
        key, model = loaded.spec.name, loaded.model
        entry = self._batchers.get(key)
        if entry is None or entry[0] is not model:
            extra = self.config.extra
            batcher = DynamicBatcher(
                model.forward, max_batch_size=extra.max_batch_size, max_queue_delay_s=extra.max_queue_delay_ms / 1000,
                dynamic=not extra.no_dynamic_batching, instances=extra.model_instances,
                max_queued=extra.max_queued_images, name=key)
            self._batchers[key] = (model, batcher)
            if entry is not None and entry[1].queued == 0:
                await entry[1].close()
            await self._forget_unloaded()
        return key, model, self._batchers[key][1]

    async def _forget_unloaded(self) -> None:
        """Close the idle batchers of models the store has unloaded (their memory goes with them)."""
        loaded = {m.name for m in self.models.describe()}
        for key in [k for k, (_, b) in self._batchers.items() if k not in loaded and b.queued == 0]:
            await self._batchers.pop(key)[1].close()

    def check_image_count(self, count: int, *, stream: bool = False) -> None:
        limit, flag = ((self.config.extra.max_stream_images, "--max-stream-images") if stream
                       else (self.config.extra.max_images, "--max-images"))
        if count < 1:
            raise InvalidArgument("images is empty; send at least one image", reason="NO_IMAGES")
        if count > limit:
            hint = "split it into several requests" if stream else "use StreamClassify for long batches"
            raise InvalidArgument(f"images holds {count} images; at most {limit} per request ({flag}); {hint}",
                                  reason="TOO_MANY_IMAGES", metadata={"max_images": str(limit)})

    def preprocess_encoded(self, model: ClassifierModel, data: bytes, field: str) -> torch.Tensor:
        """Encoded image bytes -> model input (blocking; run on the worker pool)."""
        return model.preprocess(decode_image(data, field=field, max_pixels=self.config.extra.max_image_pixels))

    def check_pixel_values(self, model: ClassifierModel, values: torch.Tensor, field: str) -> torch.Tensor:
        """A preprocessed model input [3, height, width] of the size the model's processor makes."""
        expected = [3, *model.input_size] if model.input_size else None
        if (expected and list(values.shape) != expected) or values.shape[0] != 3 or values.numel() == 0:
            raise InvalidArgument(f"{field} has shape {list(values.shape)}; this model takes "
                                  f"{expected or '[3, height, width]'} (send pixels or encoded_image to have it "
                                  "preprocessed)", reason="INVALID_TENSOR", metadata={"field": field})
        return values

    # -- ClassifierService ------------------------------------------------------------------------

    def _model_input(self, model: ClassifierModel, image: classifier_pb2.ImageInput, index: int) -> torch.Tensor:
        field = f"images[{index}]"
        kind = image.WhichOneof("source")
        if kind is None:
            raise InvalidArgument(f"{field} is not set: give encoded_image, pixels or pixel_values",
                                  reason="IMAGE_MISSING", metadata={"field": field})
        field = f"{field}.{kind}"
        if kind == "encoded_image":
            return self.preprocess_encoded(model, image.encoded_image, field)
        wanted = DataType.DATA_TYPE_UINT8 if kind == "pixels" else DataType.DATA_TYPE_FLOAT32
        message = getattr(image, kind)
        if message.dtype != wanted:
            shown = DataType.Name(message.dtype) if message.dtype in DataType.values() else str(message.dtype)
            raise InvalidArgument(f"{field} has dtype {shown}; {kind} must be {DataType.Name(wanted)}",
                                  reason="INVALID_TENSOR", metadata={"field": field})
        tensor = tensors.from_proto(message, field=field, rank=3, dtypes=(wanted,))
        if kind == "pixels":
            pil = image_from_pixels(tensor.numpy(), field=field, max_pixels=self.config.extra.max_image_pixels)
            return model.preprocess(pil)
        return self.check_pixel_values(model, tensor, field)

    def _prepare(self, model: ClassifierModel, images: list, offset: int) -> list[torch.Tensor | LatentwireError]:
        """Decode and preprocess images (blocking; on the worker pool); a failed image becomes its error."""
        prepared: list[torch.Tensor | LatentwireError] = []
        for index, image in enumerate(images, start=offset):
            try:
                prepared.append(self._model_input(model, image, index))
            except LatentwireError as error:
                prepared.append(error)
            except Exception:  # noqa: BLE001 - one image's surprise must not sink the others
                log.exception("images[%d] could not be preprocessed", index)
                prepared.append(Internal(f"images[{index}] could not be preprocessed; see the service log",
                                         reason="PREPROCESSING_FAILED"))
        return prepared

    @staticmethod
    def _result(model: ClassifierModel, index: int, outcome, top_k: int, include_logits: bool
                ) -> classifier_pb2.ImageResult:
        if isinstance(outcome, LatentwireError):
            return classifier_pb2.ImageResult(index=index, error=classifier_pb2.ImageError(
                code=outcome.code.value[0], reason=outcome.reason, message=outcome.message))
        logits = outcome.numpy()
        result = classifier_pb2.ImageResult(index=index, classes=[
            classifier_pb2.ClassScore(label=label, class_index=i, score=score)
            for i, label, score in model.top_k(logits, top_k)])
        if include_logits:
            result.logits.CopyFrom(tensors.to_proto(outcome, "logits"))
        return result

    def _submit(self, batcher: DynamicBatcher, prepared: list) -> list:
        """Queue the images that preprocessed; each entry becomes a future or stays its error."""
        ok = [p for p in prepared if not isinstance(p, LatentwireError)]
        futures = iter(batcher.submit(ok)) if ok else iter(())
        return [p if isinstance(p, LatentwireError) else next(futures) for p in prepared]

    async def Classify(self, request: classifier_pb2.ClassifyRequest, context) -> classifier_pb2.ClassifyResponse:
        """Label a batch of images; per-image errors travel in each result."""
        key, model, batcher = await self.classifier_for(request.model)
        top_k = model.check_top_k(request.top_k)
        self.check_image_count(len(request.images))
        prepared = await self.worker.run(self._prepare, model, list(request.images), 0)
        pending = self._submit(batcher, prepared)
        futures = [p for p in pending if isinstance(p, asyncio.Future)]
        try:
            await asyncio.gather(*futures)
        finally:
            for future in futures:
                future.cancel()  # no-op when done; drops queued images when the caller went away
        results = [self._result(model, index, p if isinstance(p, LatentwireError) else p.result(), top_k,
                                request.include_logits) for index, p in enumerate(pending)]
        return classifier_pb2.ClassifyResponse(model=key, results=results)

    async def StreamClassify(self, request: classifier_pb2.StreamClassifyRequest, context):
        """Label a long batch, streaming each image's result as soon as its model batch has run."""
        key, model, batcher = await self.classifier_for(request.model)
        top_k = model.check_top_k(request.top_k)
        images = list(request.images)
        self.check_image_count(len(images), stream=True)
        results: asyncio.Queue = asyncio.Queue()
        futures: list[asyncio.Future] = []

        async def produce() -> None:
            # Preprocess chunk by chunk, so the first results flow while later images are decoded.
            try:
                for start in range(0, len(images), STREAM_CHUNK):
                    prepared = await self.worker.run(self._prepare, model, images[start:start + STREAM_CHUNK], start)
                    for index, p in enumerate(self._submit(batcher, prepared), start=start):
                        if isinstance(p, LatentwireError):
                            results.put_nowait((index, p))
                        else:
                            futures.append(p)
                            p.add_done_callback(lambda f, i=index: results.put_nowait((i, f)))
            except Exception as error:  # noqa: BLE001 - handed to the stream (queue full, ...)
                results.put_nowait((None, error))

        producer = asyncio.create_task(produce())
        try:
            for _ in range(len(images)):
                index, outcome = await results.get()
                if index is None:
                    raise outcome
                if isinstance(outcome, asyncio.Future):
                    if outcome.cancelled():
                        raise asyncio.CancelledError()
                    outcome = outcome.result()  # a failed model execution raises here
                yield classifier_pb2.StreamClassifyResponse(
                    model=key, result=self._result(model, index, outcome, top_k, request.include_logits))
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
            for future in futures:
                future.cancel()

    async def GetStatistics(self, request: classifier_pb2.GetStatisticsRequest, context
                            ) -> classifier_pb2.GetStatisticsResponse:
        """The dynamic batcher's counters of every loaded model (or of the one named)."""
        name = request.model.name
        models = []
        for key, (model, batcher) in sorted(self._batchers.items()):
            if name and name not in (key, key.split("@")[0]):
                continue
            stats = batcher.statistics
            models.append(classifier_pb2.ModelStatistics(
                model=key, backend=BACKEND_ENUM[model.backend], dynamic_batching=batcher.dynamic,
                max_batch_size=batcher.max_batch_size, max_queue_delay_seconds=batcher.max_queue_delay_s,
                image_count=stats.image_count, execution_count=stats.execution_count,
                batch_sizes=[classifier_pb2.BatchSizeCount(batch_size=size, execution_count=count)
                             for size, count in sorted(stats.batch_sizes.items())],
                queue_seconds=stats.queue_seconds, compute_seconds=stats.compute_seconds))
        return classifier_pb2.GetStatisticsResponse(models=models)


"""The Open Inference Protocol v2 (inference.GRPCInferenceService) on the classifier's models.

What a model looks like through the protocol:

- inputs, exactly one per request: ``pixel_values`` FP32 [batch, 3, height, width] (already
  preprocessed, as a Triton ONNX/TorchScript model takes it), or ``images`` BYTES [batch] (or
  [batch, 1]) of encoded PNG/JPEG/WebP files, preprocessed by the model's image processor;
- outputs: ``logits`` FP32 [batch, labels] and ``probabilities`` FP32 [batch, labels] (the
  pipeline's scores). Asking for an output with the parameter ``classification`` = k (what
  tritonclient's InferRequestedOutput(name, class_count=k) sends) returns Triton's
  classification extension instead: BYTES [batch, k] of "value:index:label", best first.

Images go through the same dynamic batcher as ClassifierService calls. The protocol has no
per-image errors, so one bad image fails the request with INVALID_ARGUMENT naming its index.
Model names: a local model's name (its only version is "1"), or a registry model's name with
model_version the registry version.

Triton's extensions that tritonclient calls are served too (repository.py holds the work):
ModelStreamInfer (requests on one bidi stream, answered as each finishes, errors in error_message),
ModelConfig (the batcher's max batch size and queue delay, instances, inputs and outputs, without the
batch dimension as Triton writes them), ModelStatistics (success/fail counts of protocol requests;
inferences, executions, queue and compute time and per-batch-size figures from the batcher, which counts
every caller; queue and compute counts are per image and per batch), RepositoryIndex, RepositoryModelLoad
and RepositoryModelUnload (registry models through ``--registry``; the default model is never unloaded).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time

import grpc
import numpy as np
import torch

from latentwire.common.v1 import model_pb2
from latentwire.inference.v2 import grpc_predict_v2_pb2 as pb
from latentwire.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from latentwire.inference.v2 import model_config_pb2 as config_pb
from services.runtime.errors import InvalidArgument, LatentwireError, NotFound, quote

from .repository import ModelRepository, check_repository, split_key

log = logging.getLogger(__name__)

#: Triton's platform and backend names, per backend (another backend is named as it is).
PLATFORMS = {"torch": "pytorch_libtorch", "int8": "pytorch_libtorch", "onnx": "onnxruntime_onnx",
             "onnx-int8": "onnxruntime_onnx", "tflite": "tflite"}
BACKENDS = {"torch": "pytorch", "int8": "pytorch", "onnx": "onnxruntime", "onnx-int8": "onnxruntime", "tflite": "tflite"}
#: The protocol extensions served (Triton's names, as ServerMetadata lists them).
EXTENSIONS = ["classification", "model_configuration", "statistics", "model_repository",
              "model_repository(unload_dependents)"]
OUTPUTS = ("logits", "probabilities")
#: Version of the server reported by ServerMetadata.
SERVER_VERSION = "0.1.0"


def register_inference(server: grpc.aio.Server, service) -> str:
    """Serve inference.GRPCInferenceService for ``service`` (a ClassifierService); returns its full name."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service), server)
    return pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def model_key(name: str, version: str, local_names: set[str]) -> str:
    """A protocol (name, version) as a model reference: "name", or "name@version" for registry models."""
    if not version:
        return name
    if name in local_names:
        if version != "1":
            raise NotFound(f"model {quote(name)} has only version 1 here, not {quote(version)}", reason="MODEL_NOT_FOUND",
                           metadata={"model": name, "version": version})
        return name
    if not version.isdigit():
        raise InvalidArgument(f"model_version {quote(version)} is not a version number", reason="INVALID_MODEL_VERSION")
    return f"{name}@{version}"


def decode_bytes_tensor(raw: bytes, count: int, field: str) -> list[bytes]:
    """A raw BYTES tensor (4-byte little-endian length, then the bytes, per element) -> its elements."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            break
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument(f"{field}: element {len(elements)} claims {length} bytes past the end of the "
                                  "raw contents", reason="INVALID_TENSOR", metadata={"field": field})
        elements.append(bytes(raw[offset:offset + length]))
        offset += length
    if offset != len(raw) or len(elements) != count:
        raise InvalidArgument(f"{field}: raw contents hold {len(elements)} length-prefixed elements, shape says "
                              f"{count}", reason="INVALID_TENSOR", metadata={"field": field})
    return elements


def encode_bytes_tensor(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol front of a ClassifierService."""

    def __init__(self, service):
        self._service = service
        self._repository = ModelRepository(service)

    def _local_names(self) -> set[str]:
        return {s.name for s in self._service.config.models if s.path is not None}

    def _reference(self, name: str, version: str) -> model_pb2.ModelReference:
        return model_pb2.ModelReference(name=model_key(name, version, self._local_names()))

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        """Live as soon as the port is open."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        """Ready once the start-up models are loaded."""
        return pb.ServerReadyResponse(ready=self._service.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        """Whether the model (any version when none is given) is in memory; never loads anything."""
        key = model_key(request.name or self._service.models.default_name, request.version, self._local_names())
        loaded = {m.name for m in self._service.models.describe()}
        ready = key in loaded or (not request.version and any(n.split("@")[0] == key for n in loaded))
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        """Name, version and the protocol extensions served (EXTENSIONS)."""
        return pb.ServerMetadataResponse(name="latentwire", version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        """A model's inputs and outputs (loads the model when it is not in memory)."""
        key, model, _ = await self._service.classifier_for(self._reference(request.name, request.version))
        height, width = model.input_size or (-1, -1)
        name, _, version = key.partition("@")
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=name, versions=[version or "1"], platform=PLATFORMS.get(model.backend, model.backend),
            inputs=[tensor(name="pixel_values", datatype="FP32", shape=[-1, 3, height, width]),
                    tensor(name="images", datatype="BYTES", shape=[-1])],
            outputs=[tensor(name=o, datatype="FP32", shape=[-1, model.num_labels]) for o in OUTPUTS])

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        """Classify a batch through the dynamic batcher; raw or typed contents in, raw contents out."""
        return await self._infer(request)

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """One inference request, counted in the model's request statistics once the model is known."""
        started = time.monotonic_ns()
        key, model, batcher = await self._service.classifier_for(
            self._reference(request.model_name, request.model_version))
        ok = False
        try:
            response = await self._run(request, key, model, batcher)
            ok = True
            return response
        finally:
            self._repository.record(key, started, ok)

    async def _run(self, request: pb.ModelInferRequest, key: str, model, batcher) -> pb.ModelInferResponse:
        service = self._service
        if len(request.inputs) != 1 or request.inputs[0].name not in ("pixel_values", "images"):
            names = quote(", ".join(i.name for i in request.inputs))
            raise InvalidArgument(f"inputs are {names}; send exactly one input, pixel_values (FP32) or images (BYTES)",
                                  reason="INVALID_INPUTS")
        if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
            raise InvalidArgument("raw_input_contents needs one entry per input", reason="INVALID_INPUTS")
        wanted = self._requested_outputs(request, model.num_labels)
        tensor = request.inputs[0]
        raw = request.raw_input_contents[0] if request.raw_input_contents else None
        if tensor.name == "pixel_values":
            batch = self._pixel_values(model, tensor, raw)
        else:
            batch = await self._images(model, tensor, raw)
        service.check_image_count(len(batch))
        futures = batcher.submit(batch)
        try:
            rows = await asyncio.gather(*futures)
        finally:
            for future in futures:
                future.cancel()
        logits = np.stack([row.numpy() for row in rows]).astype(np.float32, copy=False)
        values = {"logits": logits, "probabilities": np.stack([np.asarray(model.scores(r), np.float32) for r in logits])}
        name, _, version = key.partition("@")
        response = pb.ModelInferResponse(model_name=name, model_version=version or "1", id=request.id)
        for output, class_count in wanted:
            array = values[output]
            if class_count:
                cells = [f"{row[i]:f}:{i}:{model.labels[i]}".encode()
                         for row in array for i in np.argsort(-row, kind="stable")[:class_count]]
                response.outputs.add(name=output, datatype="BYTES", shape=[len(array), class_count])
                response.raw_output_contents.append(encode_bytes_tensor(cells))
            else:
                response.outputs.add(name=output, datatype="FP32", shape=list(array.shape))
                response.raw_output_contents.append(np.ascontiguousarray(array, dtype="<f4").tobytes())
        return response

    async def ModelStreamInfer(self, request_iterator, context):
        """Run each request of the stream as it arrives; answer each as soon as it is done (errors in
        error_message, the stream stays open). The call ends once the client half-closes and every answer is out."""
        answers: asyncio.Queue = asyncio.Queue()
        running: set[asyncio.Task] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                answers.put_nowait(pb.ModelStreamInferResponse(infer_response=await self._infer(request)))
            except LatentwireError as error:
                answers.put_nowait(self._stream_error(request, f"{error.code.name} ({error.reason}): {error.message}"))
            except Exception:  # noqa: BLE001 - one request's bug must not end the others
                log.exception("stream request %r failed", request.id[:64])
                answers.put_nowait(self._stream_error(request, "INTERNAL: the request failed; see the service log"))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.gather(*list(running))
                answers.put_nowait(None)
            except Exception as error:  # noqa: BLE001 - a malformed message on the stream ends the call with it
                answers.put_nowait(error)

        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    @staticmethod
    def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
        return pb.ModelStreamInferResponse(error_message=message, infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        """A model's configuration as Triton writes it (loads the model when it is not in memory)."""
        key, model, batcher = await self._service.classifier_for(self._reference(request.name, request.version))
        name, _ = split_key(key)
        height, width = model.input_size or (-1, -1)
        config = config_pb.ModelConfig(
            name=name, platform=PLATFORMS.get(model.backend, model.backend),
            backend=BACKENDS.get(model.backend, model.backend), max_batch_size=batcher.max_batch_size,
            # Exactly one of the two inputs per request, so each is optional; dims leave out the batch dimension.
            input=[config_pb.ModelInput(name="pixel_values", data_type=config_pb.TYPE_FP32, dims=[3, height, width],
                                        format=config_pb.ModelInput.FORMAT_NCHW, optional=True),
                   config_pb.ModelInput(name="images", data_type=config_pb.TYPE_STRING, dims=[1], optional=True)],
            output=[config_pb.ModelOutput(name=o, data_type=config_pb.TYPE_FP32, dims=[model.num_labels])
                    for o in OUTPUTS],
            instance_group=[self._instances(key, batcher)],
            parameters={"labels": config_pb.ModelParameter(string_value=",".join(model.labels))})
        if batcher.dynamic:
            config.dynamic_batching.CopyFrom(config_pb.ModelDynamicBatching(
                preferred_batch_size=[batcher.max_batch_size],
                max_queue_delay_microseconds=round(batcher.max_queue_delay_s * 1_000_000)))
        return pb.ModelConfigResponse(config=config)

    def _instances(self, key: str, batcher) -> config_pb.ModelInstanceGroup:
        device = self._service.device
        group = config_pb.ModelInstanceGroup(name=key, count=batcher.instances, kind=(
            config_pb.ModelInstanceGroup.KIND_GPU if device.type == "cuda" else config_pb.ModelInstanceGroup.KIND_CPU))
        if device.type == "cuda":
            group.gpus.append(device.index or 0)
        return group

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context) -> pb.ModelStatisticsResponse:
        """Statistics of the loaded versions of one model, or of every loaded model when no name is given."""
        name, version = request.name, request.version
        if version and not name:
            raise InvalidArgument("version is set but name is empty; name the model", reason="MODEL_NAME_MISSING")
        if name:
            key = model_key(name, version, self._local_names())  # NOT_FOUND / INVALID_ARGUMENT for a bad version
            version = split_key(key)[1] if version else ""
        matches = self._repository.loaded(name, version)
        if name and not matches:
            await self._service.worker.run(self._repository.check_known, name)
            raise NotFound(f"model {quote(name)}{' version ' + quote(version) if version else ''} is not loaded; "
                           "load it (RepositoryModelLoad) or send it a request first", reason="MODEL_NOT_LOADED",
                           metadata={"model": name})
        duration = pb.StatisticDuration
        response = pb.ModelStatisticsResponse()
        for key, _, batcher in matches:
            stats, requests = batcher.statistics, self._repository.requests(key)
            key_name, key_version = split_key(key)
            last = max(requests.last_ms, int(stats.last_execution_time * 1000))
            response.model_stats.append(pb.ModelStatistics(
                name=key_name, version=key_version, last_inference=last, inference_count=stats.image_count,
                execution_count=stats.execution_count,
                inference_stats=pb.InferStatistics(
                    success=duration(count=requests.success_count, ns=requests.success_ns),
                    fail=duration(count=requests.fail_count, ns=requests.fail_ns),
                    queue=duration(count=stats.image_count, ns=round(stats.queue_seconds * 1e9)),
                    compute_infer=duration(count=stats.execution_count, ns=round(stats.compute_seconds * 1e9))),
                batch_stats=[pb.InferBatchStatistics(batch_size=size, compute_infer=duration(
                    count=count, ns=round(stats.batch_compute_seconds[size] * 1e9)))
                    for size, count in sorted(stats.batch_sizes.items())]))
        return response

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context) -> pb.RepositoryIndexResponse:
        """The models given at start and the registry's image classifiers, READY when in memory."""
        check_repository(request.repository_name)
        entries = await self._service.worker.run(self._repository.index)
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[
            index(name=e.name, version=e.version, state="READY" if e.ready else "UNAVAILABLE",
                  reason="" if e.ready else "unloaded")
            for e in entries if e.ready or not request.ready])

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context
                                  ) -> pb.RepositoryModelLoadResponse:
        """Load a model (fetched from the registry when it is not one given at start); answers once it is ready."""
        check_repository(request.repository_name)
        await self._repository.load(request.model_name, list(request.parameters))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context
                                    ) -> pb.RepositoryModelUnloadResponse:
        """Drop a model from memory (every loaded version of the name); refuses the default and the last model."""
        check_repository(request.repository_name)
        unknown = set(request.parameters) - {"unload_dependents"}
        if unknown:
            raise InvalidArgument(f"unload parameters {quote(', '.join(sorted(unknown)))} are not supported; "
                                  "the only one is unload_dependents", reason="UNLOAD_PARAMETERS_UNSUPPORTED")
        await self._repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @staticmethod
    def _requested_outputs(request: pb.ModelInferRequest, num_labels: int) -> list[tuple[str, int]]:
        """[(output name, classification top-k or 0)] in the order asked; every output when none is named."""
        if not request.outputs:
            return [(name, 0) for name in OUTPUTS]
        wanted = []
        for output in request.outputs:
            if output.name not in OUTPUTS:
                raise InvalidArgument(f"output {quote(output.name)} does not exist; outputs are {', '.join(OUTPUTS)}",
                                      reason="INVALID_OUTPUT")
            count = 0
            if "classification" in output.parameters:
                parameter = output.parameters["classification"]
                count = getattr(parameter, parameter.WhichOneof("parameter_choice") or "int64_param")
                if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= num_labels:
                    raise InvalidArgument(f"output {quote(output.name)}: classification asks for {quote(count)} classes; "
                                          f"use 1 to {num_labels}", reason="TOP_K_OUT_OF_RANGE")
            wanted.append((output.name, count))
        return wanted

    def _pixel_values(self, model, tensor, raw: bytes | None) -> list[torch.Tensor]:
        field = "inputs[pixel_values]"
        shape = list(tensor.shape)
        expected = [3, *model.input_size] if model.input_size else None
        if tensor.datatype != "FP32" or len(shape) != 4 or shape[0] < 1 or (expected and shape[1:] != expected):
            raise InvalidArgument(f"{field} is {tensor.datatype} {shape}; this model takes FP32 "
                                  f"[batch, {', '.join(map(str, expected or ['3', 'height', 'width']))}]",
                                  reason="INVALID_TENSOR", metadata={"field": field})
        count = int(np.prod(shape))
        if raw is not None:
            if len(raw) != count * 4:
                raise InvalidArgument(f"{field}: raw contents hold {len(raw)} bytes; shape {shape} of FP32 needs "
                                      f"{count * 4}", reason="INVALID_TENSOR", metadata={"field": field})
            array = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        else:
            array = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
            if array.size != count:
                raise InvalidArgument(f"{field}: {array.size} fp32_contents for shape {shape}",
                                      reason="INVALID_TENSOR", metadata={"field": field})
        if not np.isfinite(array).all():
            raise InvalidArgument(f"{field} contains NaN or infinite values", reason="INVALID_TENSOR",
                                  metadata={"field": field})
        return list(torch.from_numpy(array.reshape(shape)))

    async def _images(self, model, tensor, raw: bytes | None) -> list[torch.Tensor]:
        field = "inputs[images]"
        shape = list(tensor.shape)
        if tensor.datatype != "BYTES" or not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
            raise InvalidArgument(f"{field} is {tensor.datatype} {shape}; send BYTES [batch] (or [batch, 1]) of "
                                  "encoded images", reason="INVALID_TENSOR", metadata={"field": field})
        if raw is not None:
            elements = decode_bytes_tensor(raw, shape[0], field)
        else:
            elements = list(tensor.contents.bytes_contents)
            if len(elements) != shape[0]:
                raise InvalidArgument(f"{field}: {len(elements)} bytes_contents for shape {shape}",
                                      reason="INVALID_TENSOR", metadata={"field": field})
        self._service.check_image_count(len(elements))

        def preprocess() -> list[torch.Tensor]:
            batch = []
            for index, data in enumerate(elements):
                try:
                    batch.append(self._service.preprocess_encoded(model, data, f"images[{index}]"))
                except LatentwireError as error:
                    # The protocol has no per-image results: the first bad image fails the request.
                    raise InvalidArgument(error.message, reason=error.reason, metadata=error.metadata) from None
            return batch

        return await self._service.worker.run(preprocess)

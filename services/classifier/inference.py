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
"""
from __future__ import annotations

import asyncio
import struct

import grpc
import numpy as np
import torch

from latentwire.common.v1 import model_pb2
from latentwire.inference.v2 import grpc_predict_v2_pb2 as pb
from latentwire.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from services.runtime.errors import InvalidArgument, LatentwireError, NotFound, quote

#: Triton's platform names, per backend.
PLATFORMS = {"torch": "pytorch_libtorch", "int8": "pytorch_libtorch", "onnx": "onnxruntime_onnx"}
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
        """Name, version and the one protocol extension served (classification)."""
        return pb.ServerMetadataResponse(name="latentwire", version=SERVER_VERSION, extensions=["classification"])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        """A model's inputs and outputs (loads the model when it is not in memory)."""
        key, model, _ = await self._service.classifier_for(self._reference(request.name, request.version))
        height, width = model.input_size or (-1, -1)
        name, _, version = key.partition("@")
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=name, versions=[version or "1"], platform=PLATFORMS[model.backend],
            inputs=[tensor(name="pixel_values", datatype="FP32", shape=[-1, 3, height, width]),
                    tensor(name="images", datatype="BYTES", shape=[-1])],
            outputs=[tensor(name=o, datatype="FP32", shape=[-1, model.num_labels]) for o in OUTPUTS])

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        """Classify a batch through the dynamic batcher; raw or typed contents in, raw contents out."""
        service = self._service
        key, model, batcher = await service.classifier_for(self._reference(request.model_name, request.model_version))
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

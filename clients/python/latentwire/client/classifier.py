"""A small synchronous client for latentwire.classifier.v1.ClassifierService.

    from latentwire.client.classifier import ClassifierClient

    with ClassifierClient("localhost:50051") as client:        # the orchestrator routes it
        for result in client.classify([open("cat.png", "rb").read()], top_k=3).results:
            print(result.index, [(c.label, c.score) for c in result.classes], result.error.reason)

The orchestrator forwards ClassifierService to the classifier, so the suite's one address works;
the classifier's own address (default port 50056) works as well.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from latentwire.classifier.v1 import classifier_pb2, classifier_pb2_grpc
from latentwire.common.v1 import model_pb2, tensor_pb2

from .base import BaseClient


def image_input(image: bytes | np.ndarray) -> classifier_pb2.ImageInput:
    """Encoded file bytes, uint8 RGB pixels [height, width, 3], or float32 model input [3, height, width]."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return classifier_pb2.ImageInput(encoded_image=bytes(image))
    array = np.ascontiguousarray(image)
    if array.dtype == np.uint8:
        dtype, field = tensor_pb2.DataType.DATA_TYPE_UINT8, "pixels"
    elif array.dtype == np.float32:
        dtype, field = tensor_pb2.DataType.DATA_TYPE_FLOAT32, "pixel_values"
    else:
        raise ValueError(f"pixels must be uint8 [height, width, 3] or float32 [3, height, width], not {array.dtype}")
    tensor = tensor_pb2.Tensor(name=field, dtype=dtype, shape=list(array.shape),
                               raw_contents=array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return classifier_pb2.ImageInput(**{field: tensor})


def logits_of(result: classifier_pb2.ImageResult) -> np.ndarray:
    """The float32 logits [labels] of a result asked with include_logits."""
    return np.frombuffer(result.logits.raw_contents, dtype="<f4").astype(np.float32)


class ClassifierClient(BaseClient):
    """Talks to ClassifierService at ``address`` (the orchestrator or the classifier itself; default
    $LATENTWIRE_SERVER, else localhost:50051). ``timeout``: deadline of each call, 60 s by default;
    ``token`` (scope ``classify``), TLS and ``security`` as in :class:`~latentwire.client.base.BaseClient`.
    Every failed call raises LatentwireError."""

    stub_class = classifier_pb2_grpc.ClassifierServiceStub

    def __init__(self, address: str | None = None, *, timeout: float | None = 60.0, **connection):
        super().__init__(address, timeout=timeout, **connection)

    @staticmethod
    def build_request(images: Iterable[bytes | np.ndarray], *, model: str = "", top_k: int = 0,
                      include_logits: bool = False, stream: bool = False):
        cls = classifier_pb2.StreamClassifyRequest if stream else classifier_pb2.ClassifyRequest
        return cls(model=model_pb2.ModelReference(name=model), images=[image_input(i) for i in images],
                   top_k=top_k, include_logits=include_logits)

    def classify(self, images: Iterable[bytes | np.ndarray], *, model: str = "", top_k: int = 0,
                 include_logits: bool = False) -> classifier_pb2.ClassifyResponse:
        """Classify images in one call; per-image failures are in each result's ``error``. Raises LatentwireError."""
        request = self.build_request(images, model=model, top_k=top_k, include_logits=include_logits)
        return self._call(self._stub.Classify, request)

    def stream_classify(self, images: Iterable[bytes | np.ndarray], *, model: str = "", top_k: int = 0,
                        include_logits: bool = False) -> Iterator[classifier_pb2.StreamClassifyResponse]:
        """Classify a long batch, yielding each image's result as it is ready (any order; see result.index)."""
        request = self.build_request(images, model=model, top_k=top_k, include_logits=include_logits, stream=True)
        return self._stream(self._stub.StreamClassify, request)

    def statistics(self, model: str = "") -> classifier_pb2.GetStatisticsResponse:
        """The dynamic batcher's counters (batch-size histogram, queue and compute time) per loaded model."""
        return self._call(self._stub.GetStatistics,
                          classifier_pb2.GetStatisticsRequest(model=model_pb2.ModelReference(name=model)))

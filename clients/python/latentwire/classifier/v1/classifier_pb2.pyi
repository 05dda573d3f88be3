from google.api import annotations_pb2 as _annotations_pb2
from latentwire.common.v1 import model_pb2 as _model_pb2
from latentwire.common.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Backend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_UNSPECIFIED: _ClassVar[Backend]
    BACKEND_TORCH: _ClassVar[Backend]
    BACKEND_TORCH_INT8: _ClassVar[Backend]
    BACKEND_ONNXRUNTIME: _ClassVar[Backend]
    BACKEND_ONNXRUNTIME_INT8: _ClassVar[Backend]
    BACKEND_LITERT: _ClassVar[Backend]
BACKEND_UNSPECIFIED: Backend
BACKEND_TORCH: Backend
BACKEND_TORCH_INT8: Backend
BACKEND_ONNXRUNTIME: Backend
BACKEND_ONNXRUNTIME_INT8: Backend
BACKEND_LITERT: Backend

class ImageInput(_message.Message):
    __slots__ = ("encoded_image", "pixels", "pixel_values")
    ENCODED_IMAGE_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    PIXEL_VALUES_FIELD_NUMBER: _ClassVar[int]
    encoded_image: bytes
    pixels: _tensor_pb2.Tensor
    pixel_values: _tensor_pb2.Tensor
    def __init__(self, encoded_image: _Optional[bytes] = ..., pixels: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., pixel_values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "images", "top_k", "include_logits")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_LOGITS_FIELD_NUMBER: _ClassVar[int]
    model: _model_pb2.ModelReference
    images: _containers.RepeatedCompositeFieldContainer[ImageInput]
    top_k: int
    include_logits: bool
    def __init__(self, model: _Optional[_Union[_model_pb2.ModelReference, _Mapping]] = ..., images: _Optional[_Iterable[_Union[ImageInput, _Mapping]]] = ..., top_k: _Optional[int] = ..., include_logits: _Optional[bool] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("label", "class_index", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    class_index: int
    score: float
    def __init__(self, label: _Optional[str] = ..., class_index: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class ImageError(_message.Message):
    __slots__ = ("code", "reason", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    message: str
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ImageResult(_message.Message):
    __slots__ = ("index", "classes", "logits", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    classes: _containers.RepeatedCompositeFieldContainer[ClassScore]
    logits: _tensor_pb2.Tensor
    error: ImageError
    def __init__(self, index: _Optional[int] = ..., classes: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., logits: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., error: _Optional[_Union[ImageError, _Mapping]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("model", "results")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    results: _containers.RepeatedCompositeFieldContainer[ImageResult]
    def __init__(self, model: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ImageResult, _Mapping]]] = ...) -> None: ...

class StreamClassifyRequest(_message.Message):
    __slots__ = ("model", "images", "top_k", "include_logits")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_LOGITS_FIELD_NUMBER: _ClassVar[int]
    model: _model_pb2.ModelReference
    images: _containers.RepeatedCompositeFieldContainer[ImageInput]
    top_k: int
    include_logits: bool
    def __init__(self, model: _Optional[_Union[_model_pb2.ModelReference, _Mapping]] = ..., images: _Optional[_Iterable[_Union[ImageInput, _Mapping]]] = ..., top_k: _Optional[int] = ..., include_logits: _Optional[bool] = ...) -> None: ...

class StreamClassifyResponse(_message.Message):
    __slots__ = ("model", "result")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    model: str
    result: ImageResult
    def __init__(self, model: _Optional[str] = ..., result: _Optional[_Union[ImageResult, _Mapping]] = ...) -> None: ...

class GetStatisticsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _model_pb2.ModelReference
    def __init__(self, model: _Optional[_Union[_model_pb2.ModelReference, _Mapping]] = ...) -> None: ...

class BatchSizeCount(_message.Message):
    __slots__ = ("batch_size", "execution_count")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    execution_count: int
    def __init__(self, batch_size: _Optional[int] = ..., execution_count: _Optional[int] = ...) -> None: ...

class ModelStatistics(_message.Message):
    __slots__ = ("model", "backend", "dynamic_batching", "max_batch_size", "max_queue_delay_seconds", "image_count", "execution_count", "batch_sizes", "queue_seconds", "compute_seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_BATCHING_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    backend: Backend
    dynamic_batching: bool
    max_batch_size: int
    max_queue_delay_seconds: float
    image_count: int
    execution_count: int
    batch_sizes: _containers.RepeatedCompositeFieldContainer[BatchSizeCount]
    queue_seconds: float
    compute_seconds: float
    def __init__(self, model: _Optional[str] = ..., backend: _Optional[_Union[Backend, str]] = ..., dynamic_batching: _Optional[bool] = ..., max_batch_size: _Optional[int] = ..., max_queue_delay_seconds: _Optional[float] = ..., image_count: _Optional[int] = ..., execution_count: _Optional[int] = ..., batch_sizes: _Optional[_Iterable[_Union[BatchSizeCount, _Mapping]]] = ..., queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class GetStatisticsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatistics]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatistics, _Mapping]]] = ...) -> None: ...

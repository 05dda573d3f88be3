from latentwire.common.v1 import model_pb2 as _model_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoraWeight(_message.Message):
    __slots__ = ("model", "weight", "text_encoder_weight", "unet_weight")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODER_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    UNET_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    model: _model_pb2.ModelReference
    weight: float
    text_encoder_weight: float
    unet_weight: float
    def __init__(self, model: _Optional[_Union[_model_pb2.ModelReference, _Mapping]] = ..., weight: _Optional[float] = ..., text_encoder_weight: _Optional[float] = ..., unet_weight: _Optional[float] = ...) -> None: ...

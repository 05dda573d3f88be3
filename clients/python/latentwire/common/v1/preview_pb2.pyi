from latentwire.common.v1 import model_pb2 as _model_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VaeTiling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VAE_TILING_UNSPECIFIED: _ClassVar[VaeTiling]
    VAE_TILING_ON: _ClassVar[VaeTiling]
    VAE_TILING_OFF: _ClassVar[VaeTiling]
VAE_TILING_UNSPECIFIED: VaeTiling
VAE_TILING_ON: VaeTiling
VAE_TILING_OFF: VaeTiling

class PreviewOptions(_message.Message):
    __slots__ = ("interval", "format", "method", "preview_vae")
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_VAE_FIELD_NUMBER: _ClassVar[int]
    interval: int
    format: str
    method: str
    preview_vae: _model_pb2.ModelReference
    def __init__(self, interval: _Optional[int] = ..., format: _Optional[str] = ..., method: _Optional[str] = ..., preview_vae: _Optional[_Union[_model_pb2.ModelReference, _Mapping]] = ...) -> None: ...

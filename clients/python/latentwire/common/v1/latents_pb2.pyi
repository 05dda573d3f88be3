from latentwire.common.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LatentDistribution(_message.Message):
    __slots__ = ("mean", "std", "scaling_factor", "shift_factor")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    SCALING_FACTOR_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FACTOR_FIELD_NUMBER: _ClassVar[int]
    mean: _tensor_pb2.Tensor
    std: _tensor_pb2.Tensor
    scaling_factor: float
    shift_factor: float
    def __init__(self, mean: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., std: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., scaling_factor: _Optional[float] = ..., shift_factor: _Optional[float] = ...) -> None: ...

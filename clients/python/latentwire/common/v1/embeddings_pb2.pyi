from latentwire.common.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncoderEmbeddings(_message.Message):
    __slots__ = ("encoder", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    POOLED_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_POOLED_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    encoder: str
    prompt_embeds: _tensor_pb2.Tensor
    negative_prompt_embeds: _tensor_pb2.Tensor
    pooled_prompt_embeds: _tensor_pb2.Tensor
    negative_pooled_prompt_embeds: _tensor_pb2.Tensor
    def __init__(self, encoder: _Optional[str] = ..., prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., negative_prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., pooled_prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., negative_pooled_prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

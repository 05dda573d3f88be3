from latentwire.common.v1 import embeddings_pb2 as _embeddings_pb2
from latentwire.common.v1 import lora_pb2 as _lora_pb2
from latentwire.common.v1 import model_pb2 as _model_pb2
from latentwire.common.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PromptSyntax(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROMPT_SYNTAX_UNSPECIFIED: _ClassVar[PromptSyntax]
    PROMPT_SYNTAX_PLAIN: _ClassVar[PromptSyntax]
    PROMPT_SYNTAX_A1111: _ClassVar[PromptSyntax]
PROMPT_SYNTAX_UNSPECIFIED: PromptSyntax
PROMPT_SYNTAX_PLAIN: PromptSyntax
PROMPT_SYNTAX_A1111: PromptSyntax

class EncodeRequest(_message.Message):
    __slots__ = ("model", "prompts", "negative_prompts", "num_images_per_prompt", "do_classifier_free_guidance", "job_id", "encoders", "max_sequence_length", "clip_skip", "prompt_syntax", "loras", "embeddings")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_PER_PROMPT_FIELD_NUMBER: _ClassVar[int]
    DO_CLASSIFIER_FREE_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ENCODERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CLIP_SKIP_FIELD_NUMBER: _ClassVar[int]
    PROMPT_SYNTAX_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    model: _model_pb2.ModelReference
    prompts: _containers.RepeatedScalarFieldContainer[str]
    negative_prompts: _containers.RepeatedScalarFieldContainer[str]
    num_images_per_prompt: int
    do_classifier_free_guidance: bool
    job_id: str
    encoders: _containers.RepeatedScalarFieldContainer[str]
    max_sequence_length: int
    clip_skip: int
    prompt_syntax: PromptSyntax
    loras: _containers.RepeatedCompositeFieldContainer[_lora_pb2.LoraWeight]
    embeddings: _containers.RepeatedCompositeFieldContainer[_model_pb2.ModelReference]
    def __init__(self, model: _Optional[_Union[_model_pb2.ModelReference, _Mapping]] = ..., prompts: _Optional[_Iterable[str]] = ..., negative_prompts: _Optional[_Iterable[str]] = ..., num_images_per_prompt: _Optional[int] = ..., do_classifier_free_guidance: _Optional[bool] = ..., job_id: _Optional[str] = ..., encoders: _Optional[_Iterable[str]] = ..., max_sequence_length: _Optional[int] = ..., clip_skip: _Optional[int] = ..., prompt_syntax: _Optional[_Union[PromptSyntax, str]] = ..., loras: _Optional[_Iterable[_Union[_lora_pb2.LoraWeight, _Mapping]]] = ..., embeddings: _Optional[_Iterable[_Union[_model_pb2.ModelReference, _Mapping]]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("prompt_embeds", "negative_prompt_embeds", "encoders", "missing_encoders")
    PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    ENCODERS_FIELD_NUMBER: _ClassVar[int]
    MISSING_ENCODERS_FIELD_NUMBER: _ClassVar[int]
    prompt_embeds: _tensor_pb2.Tensor
    negative_prompt_embeds: _tensor_pb2.Tensor
    encoders: _containers.RepeatedCompositeFieldContainer[_embeddings_pb2.EncoderEmbeddings]
    missing_encoders: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., negative_prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., encoders: _Optional[_Iterable[_Union[_embeddings_pb2.EncoderEmbeddings, _Mapping]]] = ..., missing_encoders: _Optional[_Iterable[str]] = ...) -> None: ...

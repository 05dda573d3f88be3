from latentwire.common.v1 import model_pb2 as _model_pb2
from latentwire.common.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ControlNetUnit(_message.Message):
    __slots__ = ("model", "image", "preprocessor", "preprocessor_options", "conditioning_scale", "guidance_start", "guidance_end")
    class PreprocessorOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSOR_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSOR_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CONDITIONING_SCALE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_START_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_END_FIELD_NUMBER: _ClassVar[int]
    model: _model_pb2.ModelReference
    image: bytes
    preprocessor: str
    preprocessor_options: _containers.ScalarMap[str, float]
    conditioning_scale: float
    guidance_start: float
    guidance_end: float
    def __init__(self, model: _Optional[_Union[_model_pb2.ModelReference, _Mapping]] = ..., image: _Optional[bytes] = ..., preprocessor: _Optional[str] = ..., preprocessor_options: _Optional[_Mapping[str, float]] = ..., conditioning_scale: _Optional[float] = ..., guidance_start: _Optional[float] = ..., guidance_end: _Optional[float] = ...) -> None: ...

class ControlNetSetup(_message.Message):
    __slots__ = ("job_id", "units", "width", "height", "batch_size", "classifier_free_guidance", "guess_mode", "prompt_embeds", "total_steps", "add_text_embeds", "add_time_ids")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_FREE_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    GUESS_MODE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ADD_TEXT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    ADD_TIME_IDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    units: _containers.RepeatedCompositeFieldContainer[ControlNetUnit]
    width: int
    height: int
    batch_size: int
    classifier_free_guidance: bool
    guess_mode: bool
    prompt_embeds: _tensor_pb2.Tensor
    total_steps: int
    add_text_embeds: _tensor_pb2.Tensor
    add_time_ids: _tensor_pb2.Tensor
    def __init__(self, job_id: _Optional[str] = ..., units: _Optional[_Iterable[_Union[ControlNetUnit, _Mapping]]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., batch_size: _Optional[int] = ..., classifier_free_guidance: _Optional[bool] = ..., guess_mode: _Optional[bool] = ..., prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., total_steps: _Optional[int] = ..., add_text_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., add_time_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ControlNetStepInput(_message.Message):
    __slots__ = ("step_index", "timestep", "sample")
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    step_index: int
    timestep: float
    sample: _tensor_pb2.Tensor
    def __init__(self, step_index: _Optional[int] = ..., timestep: _Optional[float] = ..., sample: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ComputeResidualsRequest(_message.Message):
    __slots__ = ("setup", "step")
    SETUP_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    setup: ControlNetSetup
    step: ControlNetStepInput
    def __init__(self, setup: _Optional[_Union[ControlNetSetup, _Mapping]] = ..., step: _Optional[_Union[ControlNetStepInput, _Mapping]] = ...) -> None: ...

class ControlNetReady(_message.Message):
    __slots__ = ("guess_mode", "models")
    GUESS_MODE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    guess_mode: bool
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, guess_mode: _Optional[bool] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

class ControlNetResiduals(_message.Message):
    __slots__ = ("step_index", "active", "down_block_residuals", "mid_block_residual", "compute_seconds")
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    DOWN_BLOCK_RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    MID_BLOCK_RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step_index: int
    active: bool
    down_block_residuals: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    mid_block_residual: _tensor_pb2.Tensor
    compute_seconds: float
    def __init__(self, step_index: _Optional[int] = ..., active: _Optional[bool] = ..., down_block_residuals: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., mid_block_residual: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class ComputeResidualsResponse(_message.Message):
    __slots__ = ("ready", "residuals")
    READY_FIELD_NUMBER: _ClassVar[int]
    RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    ready: ControlNetReady
    residuals: ControlNetResiduals
    def __init__(self, ready: _Optional[_Union[ControlNetReady, _Mapping]] = ..., residuals: _Optional[_Union[ControlNetResiduals, _Mapping]] = ...) -> None: ...

class PreprocessRequest(_message.Message):
    __slots__ = ("unit", "width", "height")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    unit: ControlNetUnit
    width: int
    height: int
    def __init__(self, unit: _Optional[_Union[ControlNetUnit, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class PreprocessResponse(_message.Message):
    __slots__ = ("png",)
    PNG_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    def __init__(self, png: _Optional[bytes] = ...) -> None: ...

class ListPreprocessorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PreprocessorOption(_message.Message):
    __slots__ = ("name", "default_value", "min_value", "max_value", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    MIN_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    default_value: float
    min_value: float
    max_value: float
    description: str
    def __init__(self, name: _Optional[str] = ..., default_value: _Optional[float] = ..., min_value: _Optional[float] = ..., max_value: _Optional[float] = ..., description: _Optional[str] = ...) -> None: ...

class Preprocessor(_message.Message):
    __slots__ = ("name", "description", "options")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    options: _containers.RepeatedCompositeFieldContainer[PreprocessorOption]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., options: _Optional[_Iterable[_Union[PreprocessorOption, _Mapping]]] = ...) -> None: ...

class ListPreprocessorsResponse(_message.Message):
    __slots__ = ("preprocessors",)
    PREPROCESSORS_FIELD_NUMBER: _ClassVar[int]
    preprocessors: _containers.RepeatedCompositeFieldContainer[Preprocessor]
    def __init__(self, preprocessors: _Optional[_Iterable[_Union[Preprocessor, _Mapping]]] = ...) -> None: ...

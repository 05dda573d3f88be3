import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from latentwire.common.v1 import lora_pb2 as _lora_pb2
from latentwire.common.v1 import model_pb2 as _model_pb2
from latentwire.common.v1 import preview_pb2 as _preview_pb2
from latentwire.common.v1 import status_pb2 as _status_pb2
from latentwire.common.v1 import tensor_pb2 as _tensor_pb2
from latentwire.controlnet.v1 import controlnet_pb2 as _controlnet_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CancelMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CANCEL_MODE_UNSPECIFIED: _ClassVar[CancelMode]
    CANCEL_MODE_CANCEL: _ClassVar[CancelMode]
    CANCEL_MODE_INTERRUPT: _ClassVar[CancelMode]
    CANCEL_MODE_SKIP: _ClassVar[CancelMode]

class HiresRefinerPass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HIRES_REFINER_PASS_UNSPECIFIED: _ClassVar[HiresRefinerPass]
    HIRES_REFINER_PASS_FIRST: _ClassVar[HiresRefinerPass]
    HIRES_REFINER_PASS_SECOND: _ClassVar[HiresRefinerPass]
    HIRES_REFINER_PASS_BOTH: _ClassVar[HiresRefinerPass]

class ResultPart(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESULT_PART_UNSPECIFIED: _ClassVar[ResultPart]
    RESULT_PART_IMAGE: _ClassVar[ResultPart]
    RESULT_PART_GRID_IMAGE: _ClassVar[ResultPart]
    RESULT_PART_PIXELS: _ClassVar[ResultPart]
CANCEL_MODE_UNSPECIFIED: CancelMode
CANCEL_MODE_CANCEL: CancelMode
CANCEL_MODE_INTERRUPT: CancelMode
CANCEL_MODE_SKIP: CancelMode
HIRES_REFINER_PASS_UNSPECIFIED: HiresRefinerPass
HIRES_REFINER_PASS_FIRST: HiresRefinerPass
HIRES_REFINER_PASS_SECOND: HiresRefinerPass
HIRES_REFINER_PASS_BOTH: HiresRefinerPass
RESULT_PART_UNSPECIFIED: ResultPart
RESULT_PART_IMAGE: ResultPart
RESULT_PART_GRID_IMAGE: ResultPart
RESULT_PART_PIXELS: ResultPart

class Job(_message.Message):
    __slots__ = ("name", "job_id", "state", "priority", "queue_position", "completed_steps", "total_steps", "seed", "model", "prompt", "create_time", "start_time", "end_time", "result", "error", "attempts", "owner", "finish_mode", "finish_at_step")
    NAME_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_STEPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    FINISH_MODE_FIELD_NUMBER: _ClassVar[int]
    FINISH_AT_STEP_FIELD_NUMBER: _ClassVar[int]
    name: str
    job_id: str
    state: _status_pb2.JobState
    priority: int
    queue_position: int
    completed_steps: int
    total_steps: int
    seed: int
    model: str
    prompt: str
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    result: GenerateResult
    error: JobError
    attempts: int
    owner: str
    finish_mode: CancelMode
    finish_at_step: int
    def __init__(self, name: _Optional[str] = ..., job_id: _Optional[str] = ..., state: _Optional[_Union[_status_pb2.JobState, str]] = ..., priority: _Optional[int] = ..., queue_position: _Optional[int] = ..., completed_steps: _Optional[int] = ..., total_steps: _Optional[int] = ..., seed: _Optional[int] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., result: _Optional[_Union[GenerateResult, _Mapping]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ..., attempts: _Optional[int] = ..., owner: _Optional[str] = ..., finish_mode: _Optional[_Union[CancelMode, str]] = ..., finish_at_step: _Optional[int] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("code", "message", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    reason: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: _status_pb2.JobState
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[_status_pb2.JobState, str]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("name", "mode", "at_step")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    AT_STEP_FIELD_NUMBER: _ClassVar[int]
    name: str
    mode: CancelMode
    at_step: int
    def __init__(self, name: _Optional[str] = ..., mode: _Optional[_Union[CancelMode, str]] = ..., at_step: _Optional[int] = ...) -> None: ...

class FinishRequested(_message.Message):
    __slots__ = ("mode", "at_step")
    MODE_FIELD_NUMBER: _ClassVar[int]
    AT_STEP_FIELD_NUMBER: _ClassVar[int]
    mode: CancelMode
    at_step: int
    def __init__(self, mode: _Optional[_Union[CancelMode, str]] = ..., at_step: _Optional[int] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "width", "height", "num_images", "scheduler", "guidance_rescale", "eta", "include_pixels", "init_image", "strength", "mask_image", "controlnets", "guess_mode", "stage_devices", "priority", "cancel_on_disconnect", "refiner", "refiner_switch_at", "sampler", "schedule_type", "clip_skip", "loras", "embeddings", "previews", "tiling", "vae_tiling", "subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h", "batch_count", "hires", "grid", "step_event_interval_ms")
    class StageDevicesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_RESCALE_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    MASK_IMAGE_FIELD_NUMBER: _ClassVar[int]
    CONTROLNETS_FIELD_NUMBER: _ClassVar[int]
    GUESS_MODE_FIELD_NUMBER: _ClassVar[int]
    STAGE_DEVICES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CANCEL_ON_DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    REFINER_FIELD_NUMBER: _ClassVar[int]
    REFINER_SWITCH_AT_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_TYPE_FIELD_NUMBER: _ClassVar[int]
    CLIP_SKIP_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    TILING_FIELD_NUMBER: _ClassVar[int]
    VAE_TILING_FIELD_NUMBER: _ClassVar[int]
    SUBSEED_FIELD_NUMBER: _ClassVar[int]
    SUBSEED_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    SEED_RESIZE_FROM_W_FIELD_NUMBER: _ClassVar[int]
    SEED_RESIZE_FROM_H_FIELD_NUMBER: _ClassVar[int]
    BATCH_COUNT_FIELD_NUMBER: _ClassVar[int]
    HIRES_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    STEP_EVENT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    model: _model_pb2.ModelReference
    prompt: str
    negative_prompt: str
    seed: int
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    num_images: int
    scheduler: str
    guidance_rescale: float
    eta: float
    include_pixels: bool
    init_image: bytes
    strength: float
    mask_image: bytes
    controlnets: _containers.RepeatedCompositeFieldContainer[_controlnet_pb2.ControlNetUnit]
    guess_mode: bool
    stage_devices: _containers.ScalarMap[str, str]
    priority: int
    cancel_on_disconnect: bool
    refiner: _model_pb2.ModelReference
    refiner_switch_at: float
    sampler: str
    schedule_type: str
    clip_skip: int
    loras: _containers.RepeatedCompositeFieldContainer[_lora_pb2.LoraWeight]
    embeddings: _containers.RepeatedCompositeFieldContainer[_model_pb2.ModelReference]
    previews: _preview_pb2.PreviewOptions
    tiling: bool
    vae_tiling: _preview_pb2.VaeTiling
    subseed: int
    subseed_strength: float
    seed_resize_from_w: int
    seed_resize_from_h: int
    batch_count: int
    hires: HiresFix
    grid: GridSweep
    step_event_interval_ms: int
    def __init__(self, model: _Optional[_Union[_model_pb2.ModelReference, _Mapping]] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., seed: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_images: _Optional[int] = ..., scheduler: _Optional[str] = ..., guidance_rescale: _Optional[float] = ..., eta: _Optional[float] = ..., include_pixels: _Optional[bool] = ..., init_image: _Optional[bytes] = ..., strength: _Optional[float] = ..., mask_image: _Optional[bytes] = ..., controlnets: _Optional[_Iterable[_Union[_controlnet_pb2.ControlNetUnit, _Mapping]]] = ..., guess_mode: _Optional[bool] = ..., stage_devices: _Optional[_Mapping[str, str]] = ..., priority: _Optional[int] = ..., cancel_on_disconnect: _Optional[bool] = ..., refiner: _Optional[_Union[_model_pb2.ModelReference, _Mapping]] = ..., refiner_switch_at: _Optional[float] = ..., sampler: _Optional[str] = ..., schedule_type: _Optional[str] = ..., clip_skip: _Optional[int] = ..., loras: _Optional[_Iterable[_Union[_lora_pb2.LoraWeight, _Mapping]]] = ..., embeddings: _Optional[_Iterable[_Union[_model_pb2.ModelReference, _Mapping]]] = ..., previews: _Optional[_Union[_preview_pb2.PreviewOptions, _Mapping]] = ..., tiling: _Optional[bool] = ..., vae_tiling: _Optional[_Union[_preview_pb2.VaeTiling, str]] = ..., subseed: _Optional[int] = ..., subseed_strength: _Optional[float] = ..., seed_resize_from_w: _Optional[int] = ..., seed_resize_from_h: _Optional[int] = ..., batch_count: _Optional[int] = ..., hires: _Optional[_Union[HiresFix, _Mapping]] = ..., grid: _Optional[_Union[GridSweep, _Mapping]] = ..., step_event_interval_ms: _Optional[int] = ...) -> None: ...

class GridSweep(_message.Message):
    __slots__ = ("x", "y", "z", "no_legend")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    NO_LEGEND_FIELD_NUMBER: _ClassVar[int]
    x: GridAxis
    y: GridAxis
    z: GridAxis
    no_legend: bool
    def __init__(self, x: _Optional[_Union[GridAxis, _Mapping]] = ..., y: _Optional[_Union[GridAxis, _Mapping]] = ..., z: _Optional[_Union[GridAxis, _Mapping]] = ..., no_legend: _Optional[bool] = ...) -> None: ...

class GridAxis(_message.Message):
    __slots__ = ("type", "values")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    type: str
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, type: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class HiresFix(_message.Message):
    __slots__ = ("upscaler", "scale", "resize_width", "resize_height", "steps", "denoising_strength", "sampler", "refiner_pass")
    UPSCALER_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    RESIZE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    DENOISING_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    REFINER_PASS_FIELD_NUMBER: _ClassVar[int]
    upscaler: str
    scale: float
    resize_width: int
    resize_height: int
    steps: int
    denoising_strength: float
    sampler: str
    refiner_pass: HiresRefinerPass
    def __init__(self, upscaler: _Optional[str] = ..., scale: _Optional[float] = ..., resize_width: _Optional[int] = ..., resize_height: _Optional[int] = ..., steps: _Optional[int] = ..., denoising_strength: _Optional[float] = ..., sampler: _Optional[str] = ..., refiner_pass: _Optional[_Union[HiresRefinerPass, str]] = ...) -> None: ...

class JobAccepted(_message.Message):
    __slots__ = ("job_id", "seed", "model")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    seed: int
    model: str
    def __init__(self, job_id: _Optional[str] = ..., seed: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class ModelLoading(_message.Message):
    __slots__ = ("stage", "model", "done", "elapsed_seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    model: str
    done: bool
    elapsed_seconds: float
    def __init__(self, stage: _Optional[str] = ..., model: _Optional[str] = ..., done: _Optional[bool] = ..., elapsed_seconds: _Optional[float] = ...) -> None: ...

class TextEncoded(_message.Message):
    __slots__ = ("elapsed_seconds",)
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    elapsed_seconds: float
    def __init__(self, elapsed_seconds: _Optional[float] = ...) -> None: ...

class DenoisingStep(_message.Message):
    __slots__ = ("step", "total_steps", "elapsed_seconds", "preview_image", "preview_format")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_IMAGE_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FORMAT_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    elapsed_seconds: float
    preview_image: bytes
    preview_format: str
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., preview_image: _Optional[bytes] = ..., preview_format: _Optional[str] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position", "queue_length")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    position: int
    queue_length: int
    def __init__(self, position: _Optional[int] = ..., queue_length: _Optional[int] = ...) -> None: ...

class ImageEncoded(_message.Message):
    __slots__ = ("elapsed_seconds",)
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    elapsed_seconds: float
    def __init__(self, elapsed_seconds: _Optional[float] = ...) -> None: ...

class Decoded(_message.Message):
    __slots__ = ("elapsed_seconds",)
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    elapsed_seconds: float
    def __init__(self, elapsed_seconds: _Optional[float] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    seconds: float
    def __init__(self, stage: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("png", "index", "png_size", "png_chunked")
    PNG_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PNG_SIZE_FIELD_NUMBER: _ClassVar[int]
    PNG_CHUNKED_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    index: int
    png_size: int
    png_chunked: bool
    def __init__(self, png: _Optional[bytes] = ..., index: _Optional[int] = ..., png_size: _Optional[int] = ..., png_chunked: _Optional[bool] = ...) -> None: ...

class GenerateResult(_message.Message):
    __slots__ = ("images", "seed", "timings", "pixels", "total_seconds", "model", "image_seeds", "grid_images", "grid_cells", "pixels_chunked", "chunk_count", "finished_early", "steps_run")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SEEDS_FIELD_NUMBER: _ClassVar[int]
    GRID_IMAGES_FIELD_NUMBER: _ClassVar[int]
    GRID_CELLS_FIELD_NUMBER: _ClassVar[int]
    PIXELS_CHUNKED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_EARLY_FIELD_NUMBER: _ClassVar[int]
    STEPS_RUN_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[GeneratedImage]
    seed: int
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    pixels: _tensor_pb2.Tensor
    total_seconds: float
    model: str
    image_seeds: _containers.RepeatedScalarFieldContainer[int]
    grid_images: _containers.RepeatedCompositeFieldContainer[GridImage]
    grid_cells: _containers.RepeatedCompositeFieldContainer[GridCell]
    pixels_chunked: bool
    chunk_count: int
    finished_early: bool
    steps_run: int
    def __init__(self, images: _Optional[_Iterable[_Union[GeneratedImage, _Mapping]]] = ..., seed: _Optional[int] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., pixels: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., total_seconds: _Optional[float] = ..., model: _Optional[str] = ..., image_seeds: _Optional[_Iterable[int]] = ..., grid_images: _Optional[_Iterable[_Union[GridImage, _Mapping]]] = ..., grid_cells: _Optional[_Iterable[_Union[GridCell, _Mapping]]] = ..., pixels_chunked: _Optional[bool] = ..., chunk_count: _Optional[int] = ..., finished_early: _Optional[bool] = ..., steps_run: _Optional[int] = ...) -> None: ...

class GridCell(_message.Message):
    __slots__ = ("index", "x_index", "y_index", "z_index", "x_label", "y_label", "z_label", "seed")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    X_INDEX_FIELD_NUMBER: _ClassVar[int]
    Y_INDEX_FIELD_NUMBER: _ClassVar[int]
    Z_INDEX_FIELD_NUMBER: _ClassVar[int]
    X_LABEL_FIELD_NUMBER: _ClassVar[int]
    Y_LABEL_FIELD_NUMBER: _ClassVar[int]
    Z_LABEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    index: int
    x_index: int
    y_index: int
    z_index: int
    x_label: str
    y_label: str
    z_label: str
    seed: int
    def __init__(self, index: _Optional[int] = ..., x_index: _Optional[int] = ..., y_index: _Optional[int] = ..., z_index: _Optional[int] = ..., x_label: _Optional[str] = ..., y_label: _Optional[str] = ..., z_label: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class GridImage(_message.Message):
    __slots__ = ("png", "z_index", "z_label", "png_chunked")
    PNG_FIELD_NUMBER: _ClassVar[int]
    Z_INDEX_FIELD_NUMBER: _ClassVar[int]
    Z_LABEL_FIELD_NUMBER: _ClassVar[int]
    PNG_CHUNKED_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    z_index: int
    z_label: str
    png_chunked: bool
    def __init__(self, png: _Optional[bytes] = ..., z_index: _Optional[int] = ..., z_label: _Optional[str] = ..., png_chunked: _Optional[bool] = ...) -> None: ...

class ResultChunk(_message.Message):
    __slots__ = ("part", "index", "offset", "total_size", "data")
    PART_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    part: ResultPart
    index: int
    offset: int
    total_size: int
    data: bytes
    def __init__(self, part: _Optional[_Union[ResultPart, str]] = ..., index: _Optional[int] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class GridCellStarted(_message.Message):
    __slots__ = ("cell", "cell_count")
    CELL_FIELD_NUMBER: _ClassVar[int]
    CELL_COUNT_FIELD_NUMBER: _ClassVar[int]
    cell: GridCell
    cell_count: int
    def __init__(self, cell: _Optional[_Union[GridCell, _Mapping]] = ..., cell_count: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("accepted", "text_encoded", "step", "decoded", "result", "model_loading", "image_encoded", "queued", "grid_cell", "result_chunk", "finish_requested")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DECODED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOADING_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ENCODED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    GRID_CELL_FIELD_NUMBER: _ClassVar[int]
    RESULT_CHUNK_FIELD_NUMBER: _ClassVar[int]
    FINISH_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    accepted: JobAccepted
    text_encoded: TextEncoded
    step: DenoisingStep
    decoded: Decoded
    result: GenerateResult
    model_loading: ModelLoading
    image_encoded: ImageEncoded
    queued: Queued
    grid_cell: GridCellStarted
    result_chunk: ResultChunk
    finish_requested: FinishRequested
    def __init__(self, accepted: _Optional[_Union[JobAccepted, _Mapping]] = ..., text_encoded: _Optional[_Union[TextEncoded, _Mapping]] = ..., step: _Optional[_Union[DenoisingStep, _Mapping]] = ..., decoded: _Optional[_Union[Decoded, _Mapping]] = ..., result: _Optional[_Union[GenerateResult, _Mapping]] = ..., model_loading: _Optional[_Union[ModelLoading, _Mapping]] = ..., image_encoded: _Optional[_Union[ImageEncoded, _Mapping]] = ..., queued: _Optional[_Union[Queued, _Mapping]] = ..., grid_cell: _Optional[_Union[GridCellStarted, _Mapping]] = ..., result_chunk: _Optional[_Union[ResultChunk, _Mapping]] = ..., finish_requested: _Optional[_Union[FinishRequested, _Mapping]] = ...) -> None: ...

class ListSchedulersRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _model_pb2.ModelReference
    def __init__(self, model: _Optional[_Union[_model_pb2.ModelReference, _Mapping]] = ...) -> None: ...

class ListSchedulersResponse(_message.Message):
    __slots__ = ("default_scheduler", "schedulers")
    DEFAULT_SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    SCHEDULERS_FIELD_NUMBER: _ClassVar[int]
    default_scheduler: str
    schedulers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, default_scheduler: _Optional[str] = ..., schedulers: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: GenerateResponse
    def __init__(self, event: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

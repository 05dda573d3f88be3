from latentwire.common.v1 import embeddings_pb2 as _embeddings_pb2
from latentwire.common.v1 import latents_pb2 as _latents_pb2
from latentwire.common.v1 import lora_pb2 as _lora_pb2
from latentwire.common.v1 import model_pb2 as _model_pb2
from latentwire.common.v1 import preview_pb2 as _preview_pb2
from latentwire.common.v1 import tensor_pb2 as _tensor_pb2
from latentwire.controlnet.v1 import controlnet_pb2 as _controlnet_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishRequest(_message.Message):
    __slots__ = ("job_id", "after_step")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_STEP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_step: int
    def __init__(self, job_id: _Optional[str] = ..., after_step: _Optional[int] = ...) -> None: ...

class FinishResponse(_message.Message):
    __slots__ = ("completed_steps", "after_step")
    COMPLETED_STEPS_FIELD_NUMBER: _ClassVar[int]
    AFTER_STEP_FIELD_NUMBER: _ClassVar[int]
    completed_steps: int
    after_step: int
    def __init__(self, completed_steps: _Optional[int] = ..., after_step: _Optional[int] = ...) -> None: ...

class DenoiseRequest(_message.Message):
    __slots__ = ("model", "job_id", "prompt_embeds", "negative_prompt_embeds", "height", "width", "num_inference_steps", "guidance_scale", "guidance_rescale", "eta", "seed", "scheduler", "image", "strength", "controlnet", "include_checkpoints", "resume_from", "text_embeddings", "denoising_start", "denoising_end", "micro_conditioning", "scheduler_options", "conditioning_schedule", "subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h", "init_latents", "latent_upscaler", "loras", "previews", "tiling", "finish_after_step", "step_message_interval_ms")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_RESCALE_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    CONTROLNET_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    TEXT_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DENOISING_START_FIELD_NUMBER: _ClassVar[int]
    DENOISING_END_FIELD_NUMBER: _ClassVar[int]
    MICRO_CONDITIONING_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CONDITIONING_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    SUBSEED_FIELD_NUMBER: _ClassVar[int]
    SUBSEED_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    SEED_RESIZE_FROM_W_FIELD_NUMBER: _ClassVar[int]
    SEED_RESIZE_FROM_H_FIELD_NUMBER: _ClassVar[int]
    INIT_LATENTS_FIELD_NUMBER: _ClassVar[int]
    LATENT_UPSCALER_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    TILING_FIELD_NUMBER: _ClassVar[int]
    FINISH_AFTER_STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_MESSAGE_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    model: _model_pb2.ModelReference
    job_id: str
    prompt_embeds: _tensor_pb2.Tensor
    negative_prompt_embeds: _tensor_pb2.Tensor
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    guidance_rescale: float
    eta: float
    seed: int
    scheduler: str
    image: ImageConditioning
    strength: float
    controlnet: ControlNetConditioning
    include_checkpoints: bool
    resume_from: DenoiseCheckpoint
    text_embeddings: _containers.RepeatedCompositeFieldContainer[_embeddings_pb2.EncoderEmbeddings]
    denoising_start: float
    denoising_end: float
    micro_conditioning: MicroConditioning
    scheduler_options: SchedulerOptions
    conditioning_schedule: _containers.RepeatedCompositeFieldContainer[ConditioningSegment]
    subseed: int
    subseed_strength: float
    seed_resize_from_w: int
    seed_resize_from_h: int
    init_latents: _tensor_pb2.Tensor
    latent_upscaler: str
    loras: _containers.RepeatedCompositeFieldContainer[_lora_pb2.LoraWeight]
    previews: _preview_pb2.PreviewOptions
    tiling: bool
    finish_after_step: int
    step_message_interval_ms: int
    def __init__(self, model: _Optional[_Union[_model_pb2.ModelReference, _Mapping]] = ..., job_id: _Optional[str] = ..., prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., negative_prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., guidance_rescale: _Optional[float] = ..., eta: _Optional[float] = ..., seed: _Optional[int] = ..., scheduler: _Optional[str] = ..., image: _Optional[_Union[ImageConditioning, _Mapping]] = ..., strength: _Optional[float] = ..., controlnet: _Optional[_Union[ControlNetConditioning, _Mapping]] = ..., include_checkpoints: _Optional[bool] = ..., resume_from: _Optional[_Union[DenoiseCheckpoint, _Mapping]] = ..., text_embeddings: _Optional[_Iterable[_Union[_embeddings_pb2.EncoderEmbeddings, _Mapping]]] = ..., denoising_start: _Optional[float] = ..., denoising_end: _Optional[float] = ..., micro_conditioning: _Optional[_Union[MicroConditioning, _Mapping]] = ..., scheduler_options: _Optional[_Union[SchedulerOptions, _Mapping]] = ..., conditioning_schedule: _Optional[_Iterable[_Union[ConditioningSegment, _Mapping]]] = ..., subseed: _Optional[int] = ..., subseed_strength: _Optional[float] = ..., seed_resize_from_w: _Optional[int] = ..., seed_resize_from_h: _Optional[int] = ..., init_latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., latent_upscaler: _Optional[str] = ..., loras: _Optional[_Iterable[_Union[_lora_pb2.LoraWeight, _Mapping]]] = ..., previews: _Optional[_Union[_preview_pb2.PreviewOptions, _Mapping]] = ..., tiling: _Optional[bool] = ..., finish_after_step: _Optional[int] = ..., step_message_interval_ms: _Optional[int] = ...) -> None: ...

class ConditioningSegment(_message.Message):
    __slots__ = ("end_at_step", "prompt_embeds", "negative_prompt_embeds", "text_embeddings")
    END_AT_STEP_FIELD_NUMBER: _ClassVar[int]
    PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    end_at_step: int
    prompt_embeds: _tensor_pb2.Tensor
    negative_prompt_embeds: _tensor_pb2.Tensor
    text_embeddings: _containers.RepeatedCompositeFieldContainer[_embeddings_pb2.EncoderEmbeddings]
    def __init__(self, end_at_step: _Optional[int] = ..., prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., negative_prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., text_embeddings: _Optional[_Iterable[_Union[_embeddings_pb2.EncoderEmbeddings, _Mapping]]] = ...) -> None: ...

class SchedulerOptions(_message.Message):
    __slots__ = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "timestep_spacing", "algorithm_type", "solver_order", "skip_prk_steps", "noise_sampler_seed", "solver_type")
    USE_KARRAS_SIGMAS_FIELD_NUMBER: _ClassVar[int]
    USE_EXPONENTIAL_SIGMAS_FIELD_NUMBER: _ClassVar[int]
    USE_BETA_SIGMAS_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_SPACING_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_TYPE_FIELD_NUMBER: _ClassVar[int]
    SOLVER_ORDER_FIELD_NUMBER: _ClassVar[int]
    SKIP_PRK_STEPS_FIELD_NUMBER: _ClassVar[int]
    NOISE_SAMPLER_SEED_FIELD_NUMBER: _ClassVar[int]
    SOLVER_TYPE_FIELD_NUMBER: _ClassVar[int]
    use_karras_sigmas: bool
    use_exponential_sigmas: bool
    use_beta_sigmas: bool
    timestep_spacing: str
    algorithm_type: str
    solver_order: int
    skip_prk_steps: bool
    noise_sampler_seed: int
    solver_type: str
    def __init__(self, use_karras_sigmas: _Optional[bool] = ..., use_exponential_sigmas: _Optional[bool] = ..., use_beta_sigmas: _Optional[bool] = ..., timestep_spacing: _Optional[str] = ..., algorithm_type: _Optional[str] = ..., solver_order: _Optional[int] = ..., skip_prk_steps: _Optional[bool] = ..., noise_sampler_seed: _Optional[int] = ..., solver_type: _Optional[str] = ...) -> None: ...

class MicroConditioning(_message.Message):
    __slots__ = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width", "aesthetic_score", "negative_aesthetic_score")
    ORIGINAL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    CROP_TOP_FIELD_NUMBER: _ClassVar[int]
    CROP_LEFT_FIELD_NUMBER: _ClassVar[int]
    TARGET_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    TARGET_WIDTH_FIELD_NUMBER: _ClassVar[int]
    AESTHETIC_SCORE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_AESTHETIC_SCORE_FIELD_NUMBER: _ClassVar[int]
    original_height: int
    original_width: int
    crop_top: int
    crop_left: int
    target_height: int
    target_width: int
    aesthetic_score: float
    negative_aesthetic_score: float
    def __init__(self, original_height: _Optional[int] = ..., original_width: _Optional[int] = ..., crop_top: _Optional[int] = ..., crop_left: _Optional[int] = ..., target_height: _Optional[int] = ..., target_width: _Optional[int] = ..., aesthetic_score: _Optional[float] = ..., negative_aesthetic_score: _Optional[float] = ...) -> None: ...

class DenoiseCheckpoint(_message.Message):
    __slots__ = ("completed_steps", "total_steps", "latents", "scheduler_state", "generator_state")
    COMPLETED_STEPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_STATE_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_STATE_FIELD_NUMBER: _ClassVar[int]
    completed_steps: int
    total_steps: int
    latents: _tensor_pb2.Tensor
    scheduler_state: SchedulerState
    generator_state: bytes
    def __init__(self, completed_steps: _Optional[int] = ..., total_steps: _Optional[int] = ..., latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., scheduler_state: _Optional[_Union[SchedulerState, _Mapping]] = ..., generator_state: _Optional[bytes] = ...) -> None: ...

class SchedulerState(_message.Message):
    __slots__ = ("scheduler", "attributes_json", "tensors")
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_JSON_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    scheduler: str
    attributes_json: str
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    def __init__(self, scheduler: _Optional[str] = ..., attributes_json: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ...) -> None: ...

class ImageConditioning(_message.Message):
    __slots__ = ("image_latents", "masked_image_latents", "mask", "latents")
    IMAGE_LATENTS_FIELD_NUMBER: _ClassVar[int]
    MASKED_IMAGE_LATENTS_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    image_latents: _latents_pb2.LatentDistribution
    masked_image_latents: _latents_pb2.LatentDistribution
    mask: _tensor_pb2.Tensor
    latents: _tensor_pb2.Tensor
    def __init__(self, image_latents: _Optional[_Union[_latents_pb2.LatentDistribution, _Mapping]] = ..., masked_image_latents: _Optional[_Union[_latents_pb2.LatentDistribution, _Mapping]] = ..., mask: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ControlNetConditioning(_message.Message):
    __slots__ = ("address", "units", "guess_mode", "replica")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    GUESS_MODE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    address: str
    units: _containers.RepeatedCompositeFieldContainer[_controlnet_pb2.ControlNetUnit]
    guess_mode: bool
    replica: str
    def __init__(self, address: _Optional[str] = ..., units: _Optional[_Iterable[_Union[_controlnet_pb2.ControlNetUnit, _Mapping]]] = ..., guess_mode: _Optional[bool] = ..., replica: _Optional[str] = ...) -> None: ...

class DenoiseStep(_message.Message):
    __slots__ = ("step", "total_steps", "timestep", "elapsed_seconds", "checkpoint", "preview_image", "preview_format")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_IMAGE_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FORMAT_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    timestep: float
    elapsed_seconds: float
    checkpoint: DenoiseCheckpoint
    preview_image: bytes
    preview_format: str
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., timestep: _Optional[float] = ..., elapsed_seconds: _Optional[float] = ..., checkpoint: _Optional[_Union[DenoiseCheckpoint, _Mapping]] = ..., preview_image: _Optional[bytes] = ..., preview_format: _Optional[str] = ...) -> None: ...

class DenoiseResult(_message.Message):
    __slots__ = ("latents", "elapsed_seconds", "height", "width", "scheduler")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    latents: _tensor_pb2.Tensor
    elapsed_seconds: float
    height: int
    width: int
    scheduler: str
    def __init__(self, latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., elapsed_seconds: _Optional[float] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., scheduler: _Optional[str] = ...) -> None: ...

class DenoiseResponse(_message.Message):
    __slots__ = ("step", "result")
    STEP_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    step: DenoiseStep
    result: DenoiseResult
    def __init__(self, step: _Optional[_Union[DenoiseStep, _Mapping]] = ..., result: _Optional[_Union[DenoiseResult, _Mapping]] = ...) -> None: ...

class ListSchedulersRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _model_pb2.ModelReference
    def __init__(self, model: _Optional[_Union[_model_pb2.ModelReference, _Mapping]] = ...) -> None: ...

class DescribeModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _model_pb2.ModelReference
    def __init__(self, model: _Optional[_Union[_model_pb2.ModelReference, _Mapping]] = ...) -> None: ...

class DescribeModelResponse(_message.Message):
    __slots__ = ("family", "text_encoders", "default_width", "default_height", "default_guidance_scale", "guidance_distilled", "default_scheduler", "schedulers", "latent_channels", "requires_aesthetics_score")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_DISTILLED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    SCHEDULERS_FIELD_NUMBER: _ClassVar[int]
    LATENT_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_AESTHETICS_SCORE_FIELD_NUMBER: _ClassVar[int]
    family: str
    text_encoders: _containers.RepeatedScalarFieldContainer[str]
    default_width: int
    default_height: int
    default_guidance_scale: float
    guidance_distilled: bool
    default_scheduler: str
    schedulers: _containers.RepeatedScalarFieldContainer[str]
    latent_channels: int
    requires_aesthetics_score: bool
    def __init__(self, family: _Optional[str] = ..., text_encoders: _Optional[_Iterable[str]] = ..., default_width: _Optional[int] = ..., default_height: _Optional[int] = ..., default_guidance_scale: _Optional[float] = ..., guidance_distilled: _Optional[bool] = ..., default_scheduler: _Optional[str] = ..., schedulers: _Optional[_Iterable[str]] = ..., latent_channels: _Optional[int] = ..., requires_aesthetics_score: _Optional[bool] = ...) -> None: ...

class ListSchedulersResponse(_message.Message):
    __slots__ = ("default_scheduler", "schedulers")
    DEFAULT_SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    SCHEDULERS_FIELD_NUMBER: _ClassVar[int]
    default_scheduler: str
    schedulers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, default_scheduler: _Optional[str] = ..., schedulers: _Optional[_Iterable[str]] = ...) -> None: ...

from latentwire.common.v1 import latents_pb2 as _latents_pb2
from latentwire.common.v1 import model_pb2 as _model_pb2
from latentwire.common.v1 import preview_pb2 as _preview_pb2
from latentwire.common.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeRequest(_message.Message):
    __slots__ = ("model", "latents", "include_pixels", "png_texts", "job_id", "tiling", "vae_tiling")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    PNG_TEXTS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TILING_FIELD_NUMBER: _ClassVar[int]
    VAE_TILING_FIELD_NUMBER: _ClassVar[int]
    model: _model_pb2.ModelReference
    latents: _tensor_pb2.Tensor
    include_pixels: bool
    png_texts: _containers.RepeatedCompositeFieldContainer[PngText]
    job_id: str
    tiling: bool
    vae_tiling: _preview_pb2.VaeTiling
    def __init__(self, model: _Optional[_Union[_model_pb2.ModelReference, _Mapping]] = ..., latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., include_pixels: _Optional[bool] = ..., png_texts: _Optional[_Iterable[_Union[PngText, _Mapping]]] = ..., job_id: _Optional[str] = ..., tiling: _Optional[bool] = ..., vae_tiling: _Optional[_Union[_preview_pb2.VaeTiling, str]] = ...) -> None: ...

class PngText(_message.Message):
    __slots__ = ("entries",)
    class EntriesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.ScalarMap[str, str]
    def __init__(self, entries: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("png_images", "pixels")
    PNG_IMAGES_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    png_images: _containers.RepeatedScalarFieldContainer[bytes]
    pixels: _tensor_pb2.Tensor
    def __init__(self, png_images: _Optional[_Iterable[bytes]] = ..., pixels: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("model", "image", "mask_image", "width", "height", "job_id", "tiling", "vae_tiling")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_IMAGE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TILING_FIELD_NUMBER: _ClassVar[int]
    VAE_TILING_FIELD_NUMBER: _ClassVar[int]
    model: _model_pb2.ModelReference
    image: bytes
    mask_image: bytes
    width: int
    height: int
    job_id: str
    tiling: bool
    vae_tiling: _preview_pb2.VaeTiling
    def __init__(self, model: _Optional[_Union[_model_pb2.ModelReference, _Mapping]] = ..., image: _Optional[bytes] = ..., mask_image: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., job_id: _Optional[str] = ..., tiling: _Optional[bool] = ..., vae_tiling: _Optional[_Union[_preview_pb2.VaeTiling, str]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("image_latents", "masked_image_latents", "mask", "width", "height")
    IMAGE_LATENTS_FIELD_NUMBER: _ClassVar[int]
    MASKED_IMAGE_LATENTS_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    image_latents: _latents_pb2.LatentDistribution
    masked_image_latents: _latents_pb2.LatentDistribution
    mask: _tensor_pb2.Tensor
    width: int
    height: int
    def __init__(self, image_latents: _Optional[_Union[_latents_pb2.LatentDistribution, _Mapping]] = ..., masked_image_latents: _Optional[_Union[_latents_pb2.LatentDistribution, _Mapping]] = ..., mask: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class UpscaleRequest(_message.Message):
    __slots__ = ("upscaler", "images", "job_id", "tile_size", "tile_overlap")
    UPSCALER_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TILE_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    upscaler: _model_pb2.ModelReference
    images: _containers.RepeatedScalarFieldContainer[bytes]
    job_id: str
    tile_size: int
    tile_overlap: int
    def __init__(self, upscaler: _Optional[_Union[_model_pb2.ModelReference, _Mapping]] = ..., images: _Optional[_Iterable[bytes]] = ..., job_id: _Optional[str] = ..., tile_size: _Optional[int] = ..., tile_overlap: _Optional[int] = ...) -> None: ...

class UpscaleResponse(_message.Message):
    __slots__ = ("png_images", "scale", "upscaler")
    PNG_IMAGES_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    UPSCALER_FIELD_NUMBER: _ClassVar[int]
    png_images: _containers.RepeatedScalarFieldContainer[bytes]
    scale: int
    upscaler: str
    def __init__(self, png_images: _Optional[_Iterable[bytes]] = ..., scale: _Optional[int] = ..., upscaler: _Optional[str] = ...) -> None: ...

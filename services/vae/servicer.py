"""gRPC servicer for latentwire.vae.v1.VaeService: proto <-> domain, nothing else."""
from __future__ import annotations

import collections

import grpc
import torch

from latentwire.common.v1 import latents_pb2, preview_pb2
from services.runtime import circular, images, tensors
from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.runtime.jobs import StepTimes, Work
from services.runtime.limits import check_job_id
from services.runtime.server import ModelService
from latentwire.vae.v1 import vae_pb2, vae_pb2_grpc

from . import tiled, upscaling
from .model import VaeModel, check_png_texts, encode_png

_FLOATS = (tensors.DataType.DATA_TYPE_FLOAT32, tensors.DataType.DATA_TYPE_FLOAT16, tensors.DataType.DATA_TYPE_BFLOAT16)


class VaeService(ModelService, vae_pb2_grpc.VaeServiceServicer):
    """Decodes latents into PNG images and encodes init images for image-to-image and inpainting."""

    service_name = vae_pb2.DESCRIPTOR.services_by_name["VaeService"].full_name

    components = ("vae",)

    def __init__(self, config):
        super().__init__(config)
        #: Loaded upscaler models (Upscale) and, per upscaler version, how long its upscales took by input pixels.
        self._upscalers = upscaling.UpscalerCache()
        self._upscale_times: collections.defaultdict[str, StepTimes] = collections.defaultdict(StepTimes)

    def register(self, server: grpc.aio.Server) -> list[str]:
        vae_pb2_grpc.add_VaeServiceServicer_to_server(self, server)
        return [self.service_name, self.register_loader(server)]

    def load_model(self, spec) -> VaeModel:
        return VaeModel(spec, self.device, self.dtype, self.config.allow_pickle)

    async def Decode(self, request: vae_pb2.DecodeRequest, context) -> vae_pb2.DecodeResponse:
        """Decode a batch of latents into PNGs (and float pixels when asked)."""
        check_job_id(request.job_id)
        model = (await self.model_for(request.model)).model
        latents = tensors.from_proto(request.latents, field="latents", rank=4, dtypes=_FLOATS)
        model.check_latents(
            latents, max_image_size=self.config.extra.max_image_size, max_batch=self.config.extra.max_batch
        )
        texts = [dict(t.entries) for t in request.png_texts]
        if texts and len(texts) != latents.shape[0]:
            raise InvalidArgument(
                f"png_texts has {len(texts)} entries for {latents.shape[0]} latents; send none or one per latent"
            )
        check_png_texts(texts)
        texts = texts or [{}] * latents.shape[0]

        tile_size = self._tile_size(model, request.vae_tiling, latents.shape[3] * model.scale_factor,
                                    latents.shape[2] * model.scale_factor)

        def decode(job):
            with circular.tiling(request.tiling, model.decoder):
                pixels = model.decode(latents, tile_size)
            return pixels, [encode_png(image, text) for image, text in zip(pixels, texts)]

        pixels, pngs = await self.run_job(request.job_id, decode, work=model.decode_work(latents))
        response = vae_pb2.DecodeResponse(png_images=pngs)
        if request.include_pixels:
            response.pixels.CopyFrom(tensors.to_proto(torch.from_numpy(pixels), "pixels"))
        return response

    async def Encode(self, request: vae_pb2.EncodeRequest, context) -> vae_pb2.EncodeResponse:
        """Prepare an init image (and inpainting mask) and return its latent distribution unsampled."""
        check_job_id(request.job_id)
        model = (await self.model_for(request.model)).model
        limits = self.config.extra
        image = images.decode_image(request.image, "image", max_pixels=limits.max_input_pixels)
        mask = None
        if request.mask_image:
            mask = images.decode_image(request.mask_image, "mask_image", max_pixels=limits.max_input_pixels)
        width, height = model.check_size(image, mask, request.width, request.height,
                                         max_image_size=limits.max_image_size)

        tile_size = self._tile_size(model, request.vae_tiling, width, height)

        def encode(job):
            with circular.tiling(request.tiling, model.encoder):
                return model.encode(image, mask, width, height, tile_size)

        encoded = await self.run_job(request.job_id, encode, work=model.encode_work(width, height, mask is not None))
        response = vae_pb2.EncodeResponse(
            image_latents=_distribution(encoded.image_mean, encoded.image_std, model),
            width=encoded.width,
            height=encoded.height,
        )
        if encoded.mask is not None:
            response.masked_image_latents.CopyFrom(_distribution(encoded.masked_mean, encoded.masked_std, model))
            response.mask.CopyFrom(tensors.to_proto(encoded.mask, "mask"))
        return response

    async def Upscale(self, request: vae_pb2.UpscaleRequest, context) -> vae_pb2.UpscaleResponse:
        """Enlarge images with a registry upscaler model (ESRGAN-type), in tiles above the tile size."""
        check_job_id(request.job_id)
        limits = self.config.extra
        name, tile, overlap = upscaling.check_request(request, max_batch=limits.max_batch)
        pictures = [images.decode_image(data, f"images[{i}]", max_pixels=limits.max_input_pixels)
                    for i, data in enumerate(request.images)]
        key, upscaler = await upscaling.upscaler_for(self, self._upscalers, name)
        upscaling.check_output(pictures, upscaler.scale, limits.max_image_size)

        def upscale(job):
            return [upscaling.png_bytes(upscaler.upscale(p, tile, overlap)) for p in pictures]

        pixels = sum(p.width * p.height for p in pictures)
        pngs = await self.run_job(request.job_id, upscale, work=Work(self._upscale_times[key], pixels))
        return vae_pb2.UpscaleResponse(png_images=pngs, scale=upscaler.scale, upscaler=key)

    def _tile_size(self, model: VaeModel, mode: int, width: int, height: int) -> int | None:
        """The tile side a request's decode or encode of a ``width`` x ``height`` image runs with (0: the VAE's own),
        or None to run whole (VaeTiling ``mode``; automatic: above --vae-tile-above pixels)."""
        if not tiled.use_tiles(mode, width, height, self.config.extra.vae_tile_above):
            return None
        if not tiled.supports_tiling(model.vae):
            if mode == preview_pb2.VAE_TILING_ON:
                raise FailedPrecondition("this model's VAE has no tiled decode; set vae_tiling to automatic or off",
                                         reason="VAE_TILING_NOT_SUPPORTED", metadata={"field": "vae_tiling"})
            return None
        return self.config.extra.vae_tile_size


def _distribution(mean: torch.Tensor, std: torch.Tensor, model: VaeModel) -> latents_pb2.LatentDistribution:
    return latents_pb2.LatentDistribution(
        mean=tensors.to_proto(mean, "mean"),
        std=tensors.to_proto(std, "std"),
        scaling_factor=model.scaling_factor,
        shift_factor=model.shift_factor,
    )

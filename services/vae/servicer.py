"""gRPC servicer for latentwire.vae.v1.VaeService: proto <-> domain, nothing else."""
from __future__ import annotations

import grpc
import torch

from latentwire.services.runtime import tensors
from latentwire.services.runtime.errors import InvalidArgument
from latentwire.services.runtime.server import ModelService
from latentwire.vae.v1 import vae_pb2, vae_pb2_grpc

from .model import VaeModel, encode_png

_FLOATS = (tensors.DataType.DATA_TYPE_FLOAT32, tensors.DataType.DATA_TYPE_FLOAT16, tensors.DataType.DATA_TYPE_BFLOAT16)


class VaeService(ModelService, vae_pb2_grpc.VaeServiceServicer):
    """Decodes latents into PNG images."""

    service_name = vae_pb2.DESCRIPTOR.services_by_name["VaeService"].full_name

    components = ("vae",)

    def register(self, server: grpc.aio.Server) -> list[str]:
        vae_pb2_grpc.add_VaeServiceServicer_to_server(self, server)
        return [self.service_name, self.register_loader(server)]

    def load_model(self, spec) -> VaeModel:
        return VaeModel(spec, self.device, self.dtype, self.config.allow_pickle)

    async def Decode(self, request: vae_pb2.DecodeRequest, context) -> vae_pb2.DecodeResponse:
        """Decode a batch of latents into PNGs (and float pixels when asked)."""
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
        texts = texts or [{}] * latents.shape[0]

        def work(job):
            pixels = model.decode(latents)
            return pixels, [encode_png(image, text) for image, text in zip(pixels, texts)]

        pixels, pngs = await self.run_job(request.job_id, work)
        response = vae_pb2.DecodeResponse(png_images=pngs)
        if request.include_pixels:
            response.pixels.CopyFrom(tensors.to_proto(torch.from_numpy(pixels), "pixels"))
        return response

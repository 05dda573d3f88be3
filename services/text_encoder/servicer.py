"""gRPC servicer for latentwire.text_encoder.v1.TextEncoderService: proto <-> domain, nothing else."""
from __future__ import annotations

import grpc

from services.runtime import limits, lora, tensors
from services.runtime.config import ServiceConfig
from services.runtime.errors import InvalidArgument
from services.runtime.server import ModelService
from latentwire.common.v1 import embeddings_pb2
from latentwire.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc

from . import a1111, textual_inversion
from .config import parse_encoders
from .model import EncoderEmbeddings, TextEncoderModel, components_for

#: EncoderEmbeddings tensor fields, in proto order.
_EMBEDDING_FIELDS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                     "negative_pooled_prompt_embeds")


class TextEncoderService(ModelService, text_encoder_pb2_grpc.TextEncoderServiceServicer):
    """Turns prompts into embeddings."""

    service_name = text_encoder_pb2.DESCRIPTOR.services_by_name["TextEncoderService"].full_name

    #: Every text encoder and tokenizer a model may have; narrowed to the hosted ones by --encoders.
    components = components_for(None)

    def __init__(self, config: ServiceConfig):
        #: Text encoder components this replica hosts (--encoders); None: all of each model's.
        self.encoders = parse_encoders(config.extra.encoders)
        self.components = components_for(self.encoders)  # what the model store fetches from the registry
        super().__init__(config)

    def register(self, server: grpc.aio.Server) -> list[str]:
        text_encoder_pb2_grpc.add_TextEncoderServiceServicer_to_server(self, server)
        return [self.service_name, self.register_loader(server)]

    def load_model(self, spec) -> TextEncoderModel:
        return TextEncoderModel(spec, self.device, self.dtype, self.config.allow_pickle, self.encoders)

    async def Encode(self, request: text_encoder_pb2.EncodeRequest, context) -> text_encoder_pb2.EncodeResponse:
        """Encode the prompts (and negative prompts when guidance is on) of one request: one pair of tensors for
        a single-encoder model, one EncoderEmbeddings per encoder run for the others."""
        limits.check_job_id(request.job_id)
        model = (await self.model_for(request.model)).model
        prompts = list(request.prompts)
        negatives = list(request.negative_prompts)
        if not prompts:
            raise InvalidArgument("prompts is empty; send at least one prompt", reason="EMPTY_PROMPT")
        if negatives and len(negatives) != len(prompts):
            raise InvalidArgument(
                f"negative_prompts has {len(negatives)} entries for {len(prompts)} prompts; send none or one per prompt"
            )
        max_prompts = self.config.extra.max_prompts
        limits.check_batch(request.num_images_per_prompt, max_prompts, "num_images_per_prompt")
        limits.check_batch(len(prompts) * request.num_images_per_prompt, max_prompts, "prompts x num_images_per_prompt")
        max_sequence_length = model.max_sequence_length(request.max_sequence_length)
        encoders, missing = model.select_encoders(list(request.encoders))
        # A1111's weighted, chunked reading (a1111.py says when), else the family's diffusers path.
        syntax = a1111.reading(model, request, prompts, negatives, encoders)
        embeddings = await textual_inversion.uses_of(self, model, request.embeddings)
        if embeddings:  # active for this call's context only (its own task; the job's thread gets a copy)
            textual_inversion.activate(model, embeddings)
            syntax = syntax or a1111.A1111Reading(model, request.clip_skip, "Original")
        if syntax is not None:
            syntax.check(prompts, negatives, encoders, max_sequence_length)
        for i, prompt in enumerate(prompts if syntax is None else ()):
            model.check_prompt(prompt, f"prompts[{i}]", allow_empty=False, encoders=encoders,
                               max_sequence_length=max_sequence_length)
        for i, prompt in enumerate(negatives if syntax is None else ()):
            model.check_prompt(prompt, f"negative_prompts[{i}]", allow_empty=True, encoders=encoders,
                               max_sequence_length=max_sequence_length)
        runner = model if syntax is None else syntax
        loras = await lora.uses_of(self, model, request.loras, "text_encoder")
        encoder_modules = dict(model.text_encoders.items())

        if model.family.multi_encoder:
            parts = await self.run_job(
                request.job_id,
                lambda job: lora.call(
                    encoder_modules, loras, runner.encode_per_encoder, encoders, prompts, negatives,
                    request.num_images_per_prompt, request.do_classifier_free_guidance, max_sequence_length),
            )
            return text_encoder_pb2.EncodeResponse(encoders=[_embeddings_to_proto(p) for p in parts],
                                                   missing_encoders=missing)
        positive, negative = await self.run_job(
            request.job_id,
            lambda job: lora.call(
                encoder_modules, loras, runner.encode, prompts, negatives, request.num_images_per_prompt,
                request.do_classifier_free_guidance),
        )
        response = text_encoder_pb2.EncodeResponse(prompt_embeds=tensors.to_proto(positive, "prompt_embeds"))
        if negative is not None:
            response.negative_prompt_embeds.CopyFrom(tensors.to_proto(negative, "negative_prompt_embeds"))
        return response


def _embeddings_to_proto(parts: EncoderEmbeddings) -> embeddings_pb2.EncoderEmbeddings:
    message = embeddings_pb2.EncoderEmbeddings(encoder=parts.encoder)
    for field in _EMBEDDING_FIELDS:
        tensor = getattr(parts, field)
        if tensor is not None:
            getattr(message, field).CopyFrom(tensors.to_proto(tensor, field))
    return message

"""The text encoder service on every model family: per-encoder embeddings over real gRPC equal what each family's
diffusers pipeline computes in-process (float32 on CPU, max abs difference <= 1e-5), combined as the denoiser
combines them; encoders split over replicas (--encoders); the encoder and max_sequence_length refusals.

The family suite's text encoder (tests/family_suite.py: every family's tiny model, fetched from the registry)
hosts every encoder; the second orchestrator's "te-t5" replica hosts only SD3's T5.
"""
from __future__ import annotations


import grpc
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from latentwire.common.v1 import model_pb2
from latentwire.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc
from services.runtime import tensors
from services.runtime.errors import error_info_of
from services.runtime.config import ModelSpec
from services.text_encoder.model import TextEncoderModel, components_for

from family_suite import NAMES

TOLERANCE = 1e-5
PROMPTS = ["a red cat on a sofa", "a blue dog"]
NEGATIVES = ["blurry", "low quality, ugly"]
FAMILIES = ("sdxl", "sdxl-refiner", "sd3", "flux", "sd15")
PIPELINES = {"sdxl": StableDiffusionXLPipeline, "sdxl-refiner": StableDiffusionXLImg2ImgPipeline,
             "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline, "sd15": StableDiffusionPipeline}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folders(tiny_family_models):
    return {family: tiny_family_models[family] for family in FAMILIES}


@pytest.fixture(scope="module")
def services(family_suite, second_orchestrator):
    """{"all": the family suite's text encoder (every family's model, fetched from the registry, every encoder);
    "t5": the second orchestrator's replica hosting only SD3's T5 (--encoders text_encoder_3), fed by the same
    registry into an empty cache, "t5_cache" (tests/family_suite.py)}."""
    return {"all": family_suite.services["text_encoder"].address, "t5": second_orchestrator["te-t5"].address,
            "t5_cache": family_suite.root / "second" / "cache" / "te-t5"}


@pytest.fixture(scope="module")
def stubs(services):
    channels = {name: grpc.insecure_channel(services[name]) for name in ("all", "t5")}
    yield {name: text_encoder_pb2_grpc.TextEncoderServiceStub(channel) for name, channel in channels.items()}
    for channel in channels.values():
        channel.close()


@pytest.fixture(scope="module")
def pipelines(folders):
    """Each family's own diffusers pipeline, in process, on the same folders (float32, CPU)."""
    return {f: PIPELINES[f].from_pretrained(folders[f], dtype=torch.float32) for f in FAMILIES}


@pytest.fixture(autouse=True)
def _no_grad():
    """References run as the pipelines' __call__ runs them (@torch.no_grad(): SDPA picks another kernel with
    autograd on, about 1e-5 off for T5)."""
    with torch.no_grad():
        yield


def encode(stub, model: str, *, negatives=(), images: int = 2, cfg: bool = True, **fields):
    """Encode PROMPTS with ``model`` (a family key: its registry name is NAMES[model])."""
    return stub.Encode(text_encoder_pb2.EncodeRequest(
        model=model_pb2.ModelReference(name=NAMES[model]), prompts=PROMPTS, negative_prompts=list(negatives),
        num_images_per_prompt=images, do_classifier_free_guidance=cfg, **fields), timeout=120)


def parts_of(response) -> dict[str, dict[str, torch.Tensor]]:
    """{encoder: {field: tensor}} of the fields an EncoderEmbeddings carries."""
    fields = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    return {p.encoder: {f: tensors.from_proto(getattr(p, f), field=f) for f in fields if p.HasField(f)}
            for p in response.encoders}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    difference = (actual.float() - expected.float()).abs().max().item()
    assert difference <= TOLERANCE, f"{what}: max abs difference {difference}"


def refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), error_info_of(raised.value).reason


@pytest.mark.parametrize("negatives", [(), NEGATIVES], ids=["no-negative", "negative"])
def test_sdxl_encoders_match_the_pipeline(stubs, pipelines, negatives):
    response = encode(stubs["all"], "sdxl", negatives=negatives)
    assert [p.encoder for p in response.encoders] == ["text_encoder", "text_encoder_2"]
    assert not response.missing_encoders and not response.HasField("prompt_embeds")
    parts = parts_of(response)
    assert set(parts["text_encoder"]) == {"prompt_embeds", "negative_prompt_embeds"}  # CLIP-L: no pooled output
    expected = pipelines["sdxl"].encode_prompt(PROMPTS, device=CPU, num_images_per_prompt=2,
                                               do_classifier_free_guidance=True,
                                               negative_prompt=list(negatives) or None)
    te1, te2 = parts["text_encoder"], parts["text_encoder_2"]
    combined = (torch.cat([te1["prompt_embeds"], te2["prompt_embeds"]], -1),
                torch.cat([te1["negative_prompt_embeds"], te2["negative_prompt_embeds"]], -1),
                te2["pooled_prompt_embeds"], te2["negative_pooled_prompt_embeds"])
    for name, actual, reference in zip(("prompt", "negative", "pooled", "negative pooled"), combined, expected):
        assert_close(actual, reference, name)
    # force_zeros_for_empty_prompt: zeros without a negative prompt, the negative's own embeddings with one.
    assert (combined[1].abs().max().item() == 0) == (not negatives)


def test_sdxl_refiner_runs_only_its_second_encoder(stubs, pipelines):
    response = encode(stubs["all"], "sdxl-refiner", negatives=NEGATIVES)
    assert [p.encoder for p in response.encoders] == ["text_encoder_2"] and not response.missing_encoders
    te2 = parts_of(response)["text_encoder_2"]
    expected = pipelines["sdxl-refiner"].encode_prompt(PROMPTS, device=CPU, num_images_per_prompt=2,
                                                       do_classifier_free_guidance=True, negative_prompt=NEGATIVES)
    fields = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    for field, reference in zip(fields, expected):
        assert_close(te2[field], reference, field)


def test_sd3_encoders_match_the_pipeline(stubs, pipelines):
    pipeline = pipelines["sd3"]
    response = encode(stubs["all"], "sd3", negatives=NEGATIVES)
    parts = parts_of(response)
    assert list(parts) == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    # Per encoder, against the pipeline's own per-encoder methods.
    for index, encoder in enumerate(("text_encoder", "text_encoder_2")):
        embeds, pooled = pipeline._get_clip_prompt_embeds(PROMPTS, num_images_per_prompt=2, device=CPU,
                                                          clip_model_index=index)
        assert_close(parts[encoder]["prompt_embeds"], embeds, f"{encoder} prompt")
        assert_close(parts[encoder]["pooled_prompt_embeds"], pooled, f"{encoder} pooled")
    t5 = pipeline._get_t5_prompt_embeds(PROMPTS, num_images_per_prompt=2, max_sequence_length=256, device=CPU)
    assert_close(parts["text_encoder_3"]["prompt_embeds"], t5, "T5 prompt")
    assert set(parts["text_encoder_3"]) == {"prompt_embeds", "negative_prompt_embeds"}
    # Combined as the denoiser does (design step 3), against encode_prompt.
    expected = pipeline.encode_prompt(PROMPTS, None, None, device=CPU, num_images_per_prompt=2,
                                      do_classifier_free_guidance=True, negative_prompt=NEGATIVES)
    for i, (sequence, pooled) in enumerate((("prompt_embeds", "pooled_prompt_embeds"),
                                            ("negative_prompt_embeds", "negative_pooled_prompt_embeds"))):
        clip = torch.cat([parts["text_encoder"][sequence], parts["text_encoder_2"][sequence]], -1)
        t5 = parts["text_encoder_3"][sequence]
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        assert_close(torch.cat([clip, t5], -2), expected[i], sequence)
        combined_pooled = torch.cat([parts["text_encoder"][pooled], parts["text_encoder_2"][pooled]], -1)
        assert_close(combined_pooled, expected[2 + i], pooled)


def test_sd3_max_sequence_length_sets_the_t5_tokens(stubs, pipelines):
    response = encode(stubs["all"], "sd3", encoders=["text_encoder_3"], max_sequence_length=16, images=1)
    assert [p.encoder for p in response.encoders] == ["text_encoder_3"] and not response.missing_encoders
    t5 = parts_of(response)["text_encoder_3"]["prompt_embeds"]
    expected = pipelines["sd3"]._get_t5_prompt_embeds(PROMPTS, max_sequence_length=16, device=CPU)
    assert t5.shape[1] == 16
    assert_close(t5, expected, "T5 prompt, 16 tokens")


def test_flux_encoders_match_the_pipeline(stubs, pipelines):
    response = encode(stubs["all"], "flux", cfg=False)
    parts = parts_of(response)
    # CLIP gives only its pooled output, T5 only the sequence; no negatives without guidance.
    assert {e: set(p) for e, p in parts.items()} == {"text_encoder": {"pooled_prompt_embeds"},
                                                     "text_encoder_2": {"prompt_embeds"}}
    prompt_embeds, pooled, _ = pipelines["flux"].encode_prompt(PROMPTS, None, device=CPU, num_images_per_prompt=2)
    assert prompt_embeds.shape[1] == 512  # Flux's default max_sequence_length
    assert_close(parts["text_encoder_2"]["prompt_embeds"], prompt_embeds, "T5 prompt")
    assert_close(parts["text_encoder"]["pooled_prompt_embeds"], pooled, "CLIP pooled")


def test_sd15_response_is_unchanged(stubs, pipelines):
    response = encode(stubs["all"], "sd15", negatives=NEGATIVES)
    assert not response.encoders and not response.missing_encoders
    expected = pipelines["sd15"].encode_prompt(PROMPTS, CPU, 2, True, NEGATIVES)
    for field, reference in zip(("prompt_embeds", "negative_prompt_embeds"), expected):
        assert_close(tensors.from_proto(getattr(response, field), field=field), reference, field)


def test_a_t5_only_replica_returns_t5_and_names_the_missing_clip_encoders(stubs):
    response = encode(stubs["t5"], "sd3", negatives=NEGATIVES)
    assert [p.encoder for p in response.encoders] == ["text_encoder_3"]
    assert list(response.missing_encoders) == ["text_encoder", "text_encoder_2"]
    full = parts_of(encode(stubs["all"], "sd3", negatives=NEGATIVES, encoders=["text_encoder_3"]))
    for field, tensor in parts_of(response)["text_encoder_3"].items():
        assert torch.equal(tensor, full["text_encoder_3"][field]), field
    # Only T5 counts: a prompt over CLIP's 77 tokens but within max_sequence_length is encoded here.
    long_prompt = " ".join(["cat"] * 100)
    stubs["t5"].Encode(text_encoder_pb2.EncodeRequest(
        model=model_pb2.ModelReference(name=NAMES["sd3"]), prompts=[long_prompt], num_images_per_prompt=1), timeout=60)


@pytest.mark.parametrize("family, hosted", [("sdxl", "text_encoder"), ("sd3", "text_encoder_2")])
def test_one_encoder_alone_gives_the_same_numbers(stubs, folders, family, hosted):
    """A replica holding one CLIP of a model (SDXL's CLIP-L: no text_encoder_2 to take the dtype from; SD3's
    CLIP-G: no text_encoder for _get_clip_prompt_embeds) computes what the replica holding all of them does."""
    alone = TextEncoderModel(ModelSpec(name=family, path=folders[family]), CPU, torch.float32, False, (hosted,))
    assert alone.select_encoders([]) == ((hosted,), tuple(e for e in alone.model_encoders if e != hosted))
    [parts] = alone.encode_per_encoder((hosted,), PROMPTS, NEGATIVES, 2, True, alone.max_sequence_length(0))
    full = parts_of(encode(stubs["all"], family, negatives=NEGATIVES, encoders=[hosted]))[hosted]
    assert {f: getattr(parts, f) is not None for f in full} == dict.fromkeys(full, True)
    for field, tensor in full.items():
        assert torch.equal(getattr(parts, field), tensor), field


def test_encoder_refusals(stubs):
    assert refused(lambda: encode(stubs["all"], "sdxl", encoders=["text_encoder_3"])) == \
        (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_ENCODER")
    assert refused(lambda: encode(stubs["t5"], "sd3", encoders=["text_encoder", "text_encoder_3"])) == \
        (grpc.StatusCode.FAILED_PRECONDITION, "ENCODER_NOT_HOSTED")
    for value in (-1, 513):
        assert refused(lambda: encode(stubs["all"], "flux", max_sequence_length=value)) == \
            (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MAX_SEQUENCE_LENGTH")


def test_prompts_longer_than_an_encoder_reads_are_refused(stubs):
    long_prompt = " ".join(["cat"] * 100)
    # SDXL: the plain reading (A1111's chunked one takes longer prompts: tests/test_prompt_wiring.py).
    plain = {"prompt_syntax": text_encoder_pb2.PROMPT_SYNTAX_PLAIN}
    for stub, model, fields in ((stubs["all"], "sdxl", plain), (stubs["t5"], "sd3", {"max_sequence_length": 8})):
        with pytest.raises(grpc.RpcError) as raised:
            stub.Encode(text_encoder_pb2.EncodeRequest(model=model_pb2.ModelReference(name=NAMES[model]),
                                                       prompts=[long_prompt], num_images_per_prompt=1, **fields),
                        timeout=60)
        info = error_info_of(raised.value)
        assert (raised.value.code(), info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "PROMPT_TOO_LONG")
        assert info.metadata["max_tokens"] == ("77" if model == "sdxl" else "8")


def test_a_replica_fetches_only_the_encoders_it_hosts(stubs, services):
    encode(stubs["t5"], "sd3", images=1)  # the model is in memory, fetched from the registry
    version = services["t5_cache"] / "models" / NAMES["sd3"] / "1"
    fetched = [p.relative_to(version) for p in version.rglob("*") if p.is_file()]
    # Other components send only their small JSON configs (registry.select_files), no weights.
    assert {p.parts[0] for p in fetched if p.suffix == ".safetensors"} == {"text_encoder_3"}, sorted(map(str, fetched))
    assert components_for(None) == ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                    "text_encoder_3", "tokenizer_3")

"""A1111 prompt syntax wired through the stages: weighted, chunked encoding in Encode (services/text_encoder/
a1111.py), prompt editing / alternation schedules from the orchestrator (services/orchestrator/prompts.py) picked per
step by the denoiser (services/denoiser/schedule.py), and clip skip.

The session's family suite (tests/family_suite.py: tiny SDXL by default, tiny SD 1.5 as "tiny-sd15", named in
every SD 1.5 request) for the service cases; SD3 and Flux in process. References
are diffusers' own pipelines, their prompt embeddings swapped by hand between steps (callback_on_step_end), and
weighted.py (A1111's chunking, itself checked against A1111's algorithm in tests/test_weighted_encoding.py).
Which segment a step takes is A1111's rule (prompt_syntax.schedule_index_at): loop iteration i (0-based) takes the
first segment whose end step is >= i, so "[a cat:a dog:2]" conditions iterations 0-2 on "a cat" and 3 on "a dog".
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from latentwire.client import Client, infotext
from latentwire.client.errors import LatentwireError
from latentwire.common.v1 import model_pb2
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from latentwire.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc
from services.denoiser import checkpoint as checkpoints
from services.denoiser.conditioning import TextConditioning
from services.denoiser.model import DenoiseParams, load_denoiser
from services.denoiser.schedule import ConditioningSchedule
from services.orchestrator import prompts
from services.runtime import tensors
from services.runtime.config import ModelSpec
from services.runtime.jobs import Job
from services.runtime.prompt_syntax import get_learned_conditioning_prompt_schedules, schedule_index_at
from services.text_encoder.weighted import encode_weighted

CPU = torch.device("cpu")
TOLERANCE = 1e-5
SEED = 11
# 49 tokens of the tiny tokenizer, no commas: four make a 196-token prompt (three chunks of 75).
SENTENCE = ("a photo of an astronaut riding a horse on the moon in a white space suit floating above the earth "
            "with high quality and sharp focus ")
LONG_PROMPT = (SENTENCE * 4).strip()
#: A text far from "a cat" for the tiny encoder, so that switching to it shows in the last step.
OTHER = "a red brick house on a hill at night with many windows"
#: The family suite's registry names (tests/family_suite.py NAMES).
SD15, SDXL = "tiny-sd15", "tiny-sdxl"


@pytest.fixture(scope="module")
def tiny_model(tiny_family_models):
    """The folder the family suite's tiny SD 1.5 was imported from (conftest's tiny_model has the same bytes)."""
    return tiny_family_models["sd15"]


@pytest.fixture(scope="module")
def tiny_sdxl(tiny_family_models):
    return tiny_family_models["sdxl"]


@pytest.fixture(scope="module")
def wiring(family_suite):
    """Orchestrator, text encoder, denoiser and VAE serving tiny SD 1.5 (SD15) and tiny SDXL (SDXL)."""
    return family_suite


@pytest.fixture(scope="module")
def client(wiring):
    with Client(wiring.address, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def sd_pipe(tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(client, prompt, model: str = SD15, **settings) -> np.ndarray:
    return client.generate(prompt, seed=SEED, include_pixels=True, model=model, **settings).pixels


def _per_iteration(prompt: str, steps: int) -> list[str]:
    """The text each loop iteration is conditioned on, by A1111's schedule and its picking rule."""
    schedule = get_learned_conditioning_prompt_schedules([prompt], steps)[0]
    return [schedule[schedule_index_at(schedule, i)][1] for i in range(steps)]


def _sd_swapped(pipe, texts: list[str], *, guidance: float = 7.5, steps: int) -> np.ndarray:
    """StableDiffusionPipeline whose prompt embeddings are swapped by hand before each iteration (texts[i])."""
    embeds = {t: pipe.encode_prompt(t, CPU, 1, True, None)[0] for t in set(texts)}
    negative = pipe.encode_prompt(texts[0], CPU, 1, True, None)[1]

    def swap(_, i, t, kwargs):
        if i + 1 < steps:
            return {"prompt_embeds": torch.cat([negative, embeds[texts[i + 1]]])}  # the pipeline's CFG batch
        return {}

    return pipe(prompt_embeds=embeds[texts[0]], negative_prompt_embeds=negative, num_inference_steps=steps,
                guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
                callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["prompt_embeds"]).images


def test_unit_weight_gives_the_same_image_as_the_plain_word(client, tiny_model):
    """"(a cat:1.0)" takes the A1111 path, "a cat" diffusers' own: same pixels, SD 1.5 and SDXL; a real weight
    changes the image."""
    for model in (SD15, SDXL):
        plain = _pixels(client, "a cat", model=model, steps=2)
        weighted = _pixels(client, "(a cat:1.0)", model=model, steps=2)
        np.testing.assert_array_equal(weighted, plain)
    heavier = _pixels(client, "(a cat:1.3)", steps=2)
    assert np.abs(heavier - _pixels(client, "a cat", steps=2)).max() > 1e-4


def test_a_200_token_prompt_is_encoded_in_chunks_as_a1111(wiring, tiny_model, tiny_sdxl):
    """Encode takes a 196-token prompt (no longer PROMPT_TOO_LONG) and returns weighted.py's three chunks, for SD 1.5
    and for each SDXL encoder (penultimate layer, no final layer norm, pooled from text_encoder_2's first chunk)."""
    channel = grpc.insecure_channel(wiring.services["text_encoder"].address)
    stub = text_encoder_pb2_grpc.TextEncoderServiceStub(channel)
    sd15 = model_pb2.ModelReference(name=SD15)
    response = stub.Encode(text_encoder_pb2.EncodeRequest(model=sd15, prompts=[LONG_PROMPT], num_images_per_prompt=1))
    got = tensors.from_proto(response.prompt_embeds, field="prompt_embeds")
    encoder = CLIPTextModel.from_pretrained(tiny_model / "text_encoder").eval()
    expected = encode_weighted(encoder, CLIPTokenizer.from_pretrained(tiny_model / "tokenizer"), [LONG_PROMPT])
    assert got.shape[1] == 3 * 77
    assert (got - expected.prompt_embeds).abs().max().item() <= TOLERANCE
    # Unbalanced brackets are not refused: as in A1111, "(" left open weights everything after it by 1.1.
    response = stub.Encode(text_encoder_pb2.EncodeRequest(model=sd15, prompts=["a (red cat"], num_images_per_prompt=1))
    got = tensors.from_proto(response.prompt_embeds, field="prompt_embeds")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    expected = encode_weighted(encoder, tokenizer, ["a (red cat"]).prompt_embeds
    assert (got - expected).abs().max().item() <= TOLERANCE
    assert (got - encode_weighted(encoder, tokenizer, ["a red cat"]).prompt_embeds).abs().max().item() > TOLERANCE

    response = stub.Encode(text_encoder_pb2.EncodeRequest(
        model=model_pb2.ModelReference(name=SDXL), prompts=[LONG_PROMPT], num_images_per_prompt=1))
    parts = {e.encoder: e for e in response.encoders}
    for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        tokenizer = CLIPTokenizer.from_pretrained(tiny_sdxl / name.replace("text_encoder", "tokenizer"))
        ref = encode_weighted(cls.from_pretrained(tiny_sdxl / name).eval(), tokenizer, [LONG_PROMPT], clip_skip=2,
                              final_layer_norm=False)
        got = tensors.from_proto(parts[name].prompt_embeds, field="prompt_embeds")
        assert got.shape[1] == 3 * 77
        assert (got - ref.prompt_embeds).abs().max().item() <= TOLERANCE
    pooled = tensors.from_proto(parts["text_encoder_2"].pooled_prompt_embeds, field="pooled")
    assert (pooled - ref.pooled_prompt_embeds).abs().max().item() <= TOLERANCE
    channel.close()


def test_prompt_editing_switches_at_the_a1111_step(client, sd_pipe):
    """"[a cat:OTHER:2]", 4 steps: the suite equals diffusers with the embeddings swapped by hand before iteration
    3, and differs from the run that never swaps."""
    texts = _per_iteration(f"[a cat:{OTHER}:2]", 4)
    assert texts == ["a cat", "a cat", "a cat", OTHER]
    got = _pixels(client, f"[a cat:{OTHER}:2]", steps=4)
    assert np.abs(got - _sd_swapped(sd_pipe, texts, steps=4)).max() <= TOLERANCE
    # The last step's conditioning moves the tiny model's pixels little, but well beyond the tolerance.
    assert np.abs(got - _sd_swapped(sd_pipe, ["a cat"] * 4, steps=4)).max() > 2 * TOLERANCE


def test_alternation_alternates(client, sd_pipe):
    texts = _per_iteration("[a cat|a dog]", 3)
    assert texts == ["a cat", "a cat", "a dog"]  # A1111: entry "step 1" also serves the second call
    got = _pixels(client, "[a cat|a dog]", steps=3)
    assert np.abs(got - _sd_swapped(sd_pipe, texts, steps=3)).max() <= TOLERANCE


def test_sdxl_prompt_editing_swaps_both_encoders_and_pooled(client, sdxl_pipe):
    texts = _per_iteration("[a cat:a dog:1]", 3)
    assert texts == ["a cat", "a cat", "a dog"]
    encoded = {t: sdxl_pipe.encode_prompt(t, device=CPU, do_classifier_free_guidance=True) for t in set(texts)}
    first = encoded[texts[0]]

    def swap(_, i, t, kwargs):
        if i + 1 < 3:
            embeds, negative, pooled, negative_pooled = encoded[texts[i + 1]]
            return {"prompt_embeds": torch.cat([first[1], embeds]),
                    "add_text_embeds": torch.cat([first[3], pooled])}
        return {}

    expected = sdxl_pipe(prompt_embeds=first[0], negative_prompt_embeds=first[1], pooled_prompt_embeds=first[2],
                         negative_pooled_prompt_embeds=first[3], num_inference_steps=3, guidance_scale=5.0,
                         generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
                         callback_on_step_end=swap,
                         callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"]).images
    got = _pixels(client, "[a cat:a dog:1]", model=SDXL, steps=3)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_clip_skip_equals_the_layer_by_hand_and_round_trips_in_the_infotext(client, sd_pipe):
    """A1111's Clip skip 2: the penultimate layer then the final layer norm, for prompt and negative prompt alike
    (diffusers' clip_skip=1 skips it for the negative prompt only, and needs a text_model attribute this transformers
    lacks, so the reference embeddings are made by hand); "Clip skip: 2" is written and read back."""
    encoder, tokenizer = sd_pipe.text_encoder, sd_pipe.tokenizer
    norm = getattr(encoder, "text_model", encoder).final_layer_norm

    def skipped(text):
        ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return norm(encoder(ids, output_hidden_states=True).hidden_states[-2])

    with torch.no_grad():
        embeds, negative = skipped("a cat"), skipped("")
    result = client.generate("a cat", seed=SEED, steps=2, clip_skip=2, include_pixels=True, model=SD15)
    expected = sd_pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2,
                       generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images
    assert np.abs(result.pixels - expected).max() <= TOLERANCE
    assert np.abs(result.pixels - _pixels(client, "a cat", steps=2)).max() > TOLERANCE
    params = infotext.parse_parameters(infotext.png_parameters(result.images[0]))
    assert params["Clip skip"] == "2"
    assert infotext.request_kwargs(params)["clip_skip"] == 2


def test_bad_prompts_are_refused_with_reasons(wiring, client):
    """Too many brackets to parse, clip skip out of range, a weight that is no number, over 750 tokens, a schedule
    whose end steps do not increase: INVALID_ARGUMENT with a reason (unbalanced brackets are accepted, as in
    A1111: see the 200-token test)."""
    def reason_of(call) -> tuple[grpc.StatusCode, str]:
        with pytest.raises((grpc.RpcError, LatentwireError)) as caught:
            call()
        error = caught.value
        if isinstance(error, LatentwireError):
            return error.code, error.reason
        return error.code(), LatentwireError.from_rpc(error).reason

    too_complex = " ".join("[a:b:1]" for _ in range(prompts.MAX_SCHEDULE_BRACKETS + 1))
    assert reason_of(lambda: client.generate(too_complex, steps=2, model=SD15)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "PROMPT_TOO_COMPLEX")
    assert reason_of(lambda: client.generate("a cat", steps=2, clip_skip=13, model=SD15)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CLIP_SKIP")
    assert reason_of(lambda: client.generate("(a cat:1.2.3)", steps=2, model=SD15)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PROMPT_WEIGHT")
    sd15 = model_pb2.ModelReference(name=SD15)
    channel = grpc.insecure_channel(wiring.services["text_encoder"].address)
    stub = text_encoder_pb2_grpc.TextEncoderServiceStub(channel)
    assert reason_of(lambda: stub.Encode(text_encoder_pb2.EncodeRequest(
        model=sd15, prompts=[SENTENCE * 20], num_images_per_prompt=1))) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                           "PROMPT_TOO_LONG")
    assert reason_of(lambda: stub.Encode(text_encoder_pb2.EncodeRequest(
        model=sd15, prompts=["a cat"], num_images_per_prompt=1, clip_skip=12))) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                                    "INVALID_CLIP_SKIP")
    # Plain syntax: the 196 tokens are refused as before.
    assert reason_of(lambda: stub.Encode(text_encoder_pb2.EncodeRequest(
        model=sd15, prompts=[LONG_PROMPT], num_images_per_prompt=1,
        prompt_syntax=text_encoder_pb2.PROMPT_SYNTAX_PLAIN))) == (grpc.StatusCode.INVALID_ARGUMENT, "PROMPT_TOO_LONG")
    encoded = stub.Encode(text_encoder_pb2.EncodeRequest(model=sd15, prompts=["a cat"], num_images_per_prompt=1))
    channel.close()
    channel = grpc.insecure_channel(wiring.services["denoiser"].address)
    request = denoiser_pb2.DenoiseRequest(model=sd15, prompt_embeds=encoded.prompt_embeds, num_inference_steps=2,
                                          seed=1)
    for end in (2, 1):  # end steps must increase
        request.conditioning_schedule.add(end_at_step=end, prompt_embeds=encoded.prompt_embeds)
    stub = denoiser_pb2_grpc.DenoiserServiceStub(channel)
    assert reason_of(lambda: list(stub.Denoise(request))) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                              "INVALID_CONDITIONING_SCHEDULE")
    channel.close()


def test_plan_merges_prompt_and_negative_schedules():
    plan = prompts.plan("[a cat:a dog:2]", "[blurry|ugly]", 4)
    assert plan.end_at_steps == (1, 2, 3, 4)
    assert [plan.pairs[p] for p in plan.segment_pairs] == [
        ("a cat", "blurry"), ("a cat", "ugly"), ("a dog", "blurry"), ("a dog", "ugly")]
    assert prompts.plan("(a cat:1.2) [dog]", "", 4) is None  # no editing: today's request
    # Edited away before the first step: one segment, but not the text as written.
    assert prompts.plan("[a cat:a dog:0]", "", 4).pairs == (("a dog", ""),)
    # A hires fix's second pass (4 steps after 4): a fraction above 1 reaches into it, one below 1 does not.
    assert prompts.plan("[a cat:a dog:1.5]", "", 4, hires_steps=4).end_at_steps == (2, 4)
    assert prompts.plan("[a cat:a dog:0.5]", "", 4, hires_steps=4).pairs == (("a dog", ""),)
    assert not prompts.needs_schedule(r"a \[b:c\]") and prompts.needs_schedule("a [b|c]")


def _sd_text(pipe, text: str) -> TextConditioning:
    embeds, negative = pipe.encode_prompt(text, CPU, 1, True, None)
    return TextConditioning(embeds, negative)


def test_a_resumed_run_picks_the_same_segments(tiny_model, sd_pipe):
    """Failover: a run resumed from its checkpoint after iteration 2 continues on the schedule's later segment and
    ends bit-identical to the uninterrupted run (which differs from a run without the switch)."""
    model = load_denoiser(ModelSpec("tiny", tiny_model), CPU, torch.float32, False)
    cat, dog = _sd_text(sd_pipe, "a cat"), _sd_text(sd_pipe, "a dog")
    schedule = ConditioningSchedule((2, 4), (cat, dog))
    params = DenoiseParams(height=64, width=64, num_inference_steps=4, guidance_scale=7.5, guidance_rescale=0.0,
                           eta=0.0, seed=SEED, scheduler="")
    events = []
    full = model.denoise(Job("a", 1), cat, params, events.append, include_checkpoints=True, schedule=schedule)
    taken = checkpoints.from_proto(checkpoints.to_proto(events[1].checkpoint))
    resumed = model.denoise(Job("b", 1), cat, params, lambda e: None, resume_from=taken, schedule=schedule)
    assert torch.equal(resumed.latents, full.latents)
    unswitched = model.denoise(Job("c", 1), cat, params, lambda e: None)
    assert not torch.equal(unswitched.latents, full.latents)


def test_flux_and_sd3_loops_follow_the_schedule(tiny_family_models):
    """One short case per flow family, in process: the loop with a two-segment schedule equals the pipeline with the
    embeddings swapped by hand (Flux swaps the T5 sequence only: its callback cannot swap the pooled CLIP output)."""
    for family, size in (("flux", 32), ("sd3", 32)):
        folder = tiny_family_models[family]
        model = load_denoiser(ModelSpec(family, folder), CPU, torch.float32, False)
        params = DenoiseParams(height=size, width=size, num_inference_steps=3,
                               guidance_scale=3.5 if family == "flux" else 7.0, guidance_rescale=0.0, eta=0.0,
                               seed=SEED, scheduler="")
        generator = torch.Generator("cpu").manual_seed(SEED)
        if family == "flux":
            pipe = FluxPipeline.from_pretrained(folder).to(torch.float32)
            pipe.set_progress_bar_config(disable=True)
            cat, pooled, _ = pipe.encode_prompt("a cat", prompt_2=None, device=CPU)
            dog, _, _ = pipe.encode_prompt("a dog", prompt_2=None, device=CPU)
            first, second = TextConditioning(cat, pooled_prompt_embeds=pooled), TextConditioning(
                dog, pooled_prompt_embeds=pooled)
            swap = {"prompt_embeds": dog}
            packed = pipe(prompt_embeds=cat, pooled_prompt_embeds=pooled, height=size, width=size,
                          num_inference_steps=3, guidance_scale=3.5, generator=generator, output_type="latent",
                          callback_on_step_end=lambda _, i, t, kw: swap if i == 1 else {},
                          callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
            expected = FluxPipeline._unpack_latents(packed, size, size, pipe.vae_scale_factor)
        else:
            pipe = StableDiffusion3Pipeline.from_pretrained(folder).to(torch.float32)
            pipe.set_progress_bar_config(disable=True)
            texts = [pipe.encode_prompt(t, prompt_2=None, prompt_3=None, device=CPU, do_classifier_free_guidance=True)
                     for t in ("a cat", "a dog")]
            first, second = (TextConditioning(*t) for t in texts)
            swap = {"prompt_embeds": torch.cat([texts[0][1], texts[1][0]]),
                    "pooled_prompt_embeds": torch.cat([texts[0][3], texts[1][2]])}
            expected = pipe(prompt_embeds=texts[0][0], negative_prompt_embeds=texts[0][1],
                            pooled_prompt_embeds=texts[0][2], negative_pooled_prompt_embeds=texts[0][3], height=size,
                            width=size, num_inference_steps=3, guidance_scale=7.0, generator=generator,
                            output_type="latent", callback_on_step_end=lambda _, i, t, kw: swap if i == 1 else {},
                            callback_on_step_end_tensor_inputs=["prompt_embeds", "pooled_prompt_embeds"]).images
        # A1111's rule: iterations 0 and 1 take the segment ending at step 1, iteration 2 the next one.
        schedule = ConditioningSchedule((1, 3), (first, second))
        output = model.denoise(Job(family, 1), first, params, lambda e: None, schedule=schedule)
        assert (output.latents - expected).abs().max().item() <= TOLERANCE, family


def test_cli_clip_skip_flag_reaches_the_request():
    from latentwire.cli.main import build_parser

    args = build_parser().parse_args(["generate", "a cat", "--clip-skip", "2"])
    assert args.clip_skip == 2 and "clip_skip" in args.explicit
    assert Client("127.0.0.1:1").build_request("a cat", clip_skip=args.clip_skip).clip_skip == 2


def test_sd3_weights_its_clip_encoders_and_strips_them_for_t5(tiny_family_models):
    """SD3: "(a cat:1.0)" equals diffusers' "a cat" on every encoder; "(a cat:1.3)" changes the CLIP sequences only
    (T5 reads "a cat"). Flux: its encoders read the text without the weights."""
    from services.text_encoder.a1111 import reading
    from services.text_encoder.model import TextEncoderModel

    for family in ("sd3", "flux"):
        model = TextEncoderModel(ModelSpec(family, tiny_family_models[family]), CPU, torch.float32, False)
        encoders, length = model.hosted, model.max_sequence_length(0)
        plain = model.encode_per_encoder(encoders, ["a cat"], [], 1, True, length)
        syntax = reading(model, text_encoder_pb2.EncodeRequest(), ["(a cat:1.3)"], [], encoders)
        for weight, changed in (("1.0", ()), ("1.3", ("text_encoder", "text_encoder_2") if family == "sd3" else ())):
            weighted = syntax.encode_per_encoder(encoders, [f"(a cat:{weight})"], [], 1, True, length)
            for a, b in zip(plain, weighted):
                for field in ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds"):
                    x, y = getattr(a, field), getattr(b, field)
                    if x is None:
                        continue
                    same = torch.equal(x, y)
                    assert same != (a.encoder in changed and field == "prompt_embeds"), (family, weight, a.encoder,
                                                                                         field)


def test_hires_second_pass_takes_its_own_schedule(client):
    """A hires fix re-plans the schedule for its second pass (A1111's hires steps): "[a cat:a dog:1.5]" is "a cat"
    for all of a 4-step first pass and switches to "a dog" half-way through the 4-step second pass, so it equals
    "a cat" before the hires fix and differs from it after."""
    from latentwire.client.hires import hires_fix

    np.testing.assert_array_equal(_pixels(client, "[a cat:a dog:1.5]", steps=2), _pixels(client, "a cat", steps=2))
    fix = hires_fix("Latent", scale=1.5, steps=4, denoising_strength=1.0)
    late = _pixels(client, "[a cat:a dog:1.5]", steps=4, hires=fix)
    plain = _pixels(client, "a cat", steps=4, hires=fix)
    assert late.shape == plain.shape == (1, 96, 96, 3)
    assert np.abs(late - plain).max() > TOLERANCE

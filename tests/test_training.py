"""The training package (issue 17): the procedural data set, one step of each trainer, the saved folders.

No long training here: each trainer runs one or two steps on a tiny batch, which is enough to show that the
loss is finite, the weights move, and the folders it writes load through diffusers' / transformers' own
from_pretrained.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from services.training import dataset
from services.training.dataset import COLOURS, HELD_OUT, SHAPES, draw_batch, parse_caption


def test_dataset_is_deterministic_and_seed_dependent():
    images_a, samples_a = draw_batch([3, 1], 32)
    images_b, samples_b = draw_batch([3, 1], 32)
    images_c, _ = draw_batch([3, 2], 32)
    assert images_a.shape == (32, 64, 64, 3) and images_a.dtype == np.uint8
    assert np.array_equal(images_a, images_b) and samples_a == samples_b
    assert not np.array_equal(images_a, images_c)


def test_captions_parse_back_to_their_labels():
    _, samples = draw_batch(0, 400)
    for sample in samples:
        labels = parse_caption(sample.caption)
        assert (labels["shape"], labels["colour"], labels["background"]) == (sample.shape, sample.colour,
                                                                             sample.background)
        assert labels["size"] == (sample.size if sample.name_size else None)
        assert labels["position"] == (sample.position if sample.name_position else None)
    # every optional part occurs, named and unnamed
    assert {s.name_size for s in samples} == {True, False} and {s.name_position for s in samples} == {True, False}
    with pytest.raises(ValueError):
        parse_caption("a red hexagon on a blue background")
    with pytest.raises(ValueError):
        parse_caption("a photo of a cat")


def test_images_show_their_labels():
    images, samples = draw_batch(5, 64)
    for image, sample in zip(images, samples):
        assert tuple(image[0, 0]) == COLOURS[sample.background]  # the margin is pure background
        colours = {tuple(p) for p in image.reshape(-1, 3)}
        assert COLOURS[sample.colour] in colours  # the shape's colour is drawn


def test_held_out_combinations_never_appear_in_training_draws():
    assert len(HELD_OUT) == 48
    # every shape, colour and background still occurs in training, and no held-out triple does
    _, samples = draw_batch(11, 3000)
    triples = {(s.colour, s.shape, s.background) for s in samples}
    assert not triples & HELD_OUT
    assert {t[1] for t in triples} == set(SHAPES) and {t[0] for t in triples} == set(COLOURS)
    assert all(s.colour != s.background for s in samples)
    _, held = draw_batch(11, 200, held_out=True)
    assert {(s.colour, s.shape, s.background) for s in held} <= HELD_OUT
    prompts = [p for p, _ in dataset.held_out_prompts(48)]
    assert {tuple(parse_caption(p)[k] for k in ("colour", "shape", "background")) for p in prompts} == set(HELD_OUT)


def test_tokenizer_encodes_every_caption_word():
    from services.tiny_models.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    words = ["a", "small", "large", "on", "background", "in", "the", "top", "bottom", "left", "right", "centre",
             *SHAPES, *COLOURS]
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert ids and tokenizer.unk_token_id not in ids or word == tokenizer.unk_token
        assert tokenizer.decode(ids) == word
    longest = "a large purple triangle on a yellow background in the bottom right"
    assert len(tokenizer(longest).input_ids) < tokenizer.model_max_length


def test_evaluation_pixel_statistics_name_the_colours():
    from services.training.evaluate import background_colour, foreground_colour

    images, samples = draw_batch(2, 48, held_out=True)
    for image, sample in zip(images, samples):
        assert background_colour(image)[0] == sample.background
        assert foreground_colour(image) == sample.colour
    plain = np.full((64, 64, 3), COLOURS["blue"], dtype=np.uint8)
    assert foreground_colour(plain) == "none"


def _finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


def test_classifier_trains_one_step_and_loads(tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from services.training.classifier import train_classifier
    from services.training.evaluate import classify_shapes

    result = train_classifier(tmp_path, steps=2, batch_size=4, progress=False)
    assert 0.0 <= result["classifier_held_out_accuracy"] <= 1.0
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "classifier")
    assert _finite(model) and model.config.id2label[0] == SHAPES[0] and model.config.num_labels == len(SHAPES)
    AutoImageProcessor.from_pretrained(tmp_path / "classifier")
    assert list((tmp_path / "classifier").glob("*.safetensors")) and not list((tmp_path / "classifier").glob("*.bin"))
    from PIL import Image

    images, _ = draw_batch(0, 3)
    assert set(classify_shapes([Image.fromarray(i) for i in images], tmp_path / "classifier")) <= set(SHAPES)


def test_vae_and_unet_train_one_step_and_the_pipeline_loads(tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from services.training.unet import train_unet
    from services.training.vae import build_vae, train_vae

    untrained = build_vae()
    torch.manual_seed(0)
    result = train_vae(tmp_path, steps=2, batch_size=2, progress=False)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae", use_safetensors=True)
    assert _finite(vae) and np.isfinite(result["vae_mae_255"]) and result["vae_scaling_factor"] > 0
    assert vae.config.scaling_factor == pytest.approx(result["vae_scaling_factor"])
    assert any(not torch.equal(a, b) for a, b in zip(vae.state_dict().values(), untrained.state_dict().values()))

    result = train_unet(tmp_path, steps=2, batch_size=2, progress=False)
    assert result["unet_steps"] == 2
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline", safety_checker=None,
                                                       use_safetensors=True)
    assert _finite(pipeline.unet) and _finite(pipeline.text_encoder)
    index = json.loads((tmp_path / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert not list((tmp_path / "pipeline").rglob("*.bin"))
    image = pipeline("a red circle on a white background", num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()

    # resumable: a finished checkpoint is picked up, not retrained from step 0
    again = train_unet(tmp_path, steps=3, batch_size=2, progress=False)
    assert again["unet_steps"] == 3


def test_shipped_default_models_load_and_say_how_they_were_made():
    from diffusers import StableDiffusionPipeline
    from transformers import AutoModelForImageClassification

    from services import default_models

    record = default_models.record()
    assert record["seed"] == 0 and record["commands"] and record["commit"]
    assert record["stages"]["classifier"]["classifier_held_out_accuracy"] >= 0.95
    weights = [*default_models.pipeline_path().rglob("*"), *default_models.classifier_path().rglob("*")]
    assert not [p for p in weights if p.suffix in (".bin", ".pt", ".ckpt")]
    assert sum(p.stat().st_size for p in weights if p.suffix == ".safetensors") < 20 * 2**20
    pipeline = StableDiffusionPipeline.from_pretrained(default_models.pipeline_path(), safety_checker=None,
                                                       use_safetensors=True)
    assert pipeline.vae.config.scaling_factor == pytest.approx(record["stages"]["vae"]["vae_scaling_factor"])
    classifier = AutoModelForImageClassification.from_pretrained(default_models.classifier_path())
    assert set(classifier.config.id2label.values()) == set(SHAPES)


def test_shipped_classifier_names_held_out_shapes():
    from PIL import Image

    from services import default_models
    from services.training.evaluate import classify_shapes

    images, samples = draw_batch([0, 4242], 96, held_out=True)
    names = classify_shapes([Image.fromarray(image) for image in images], default_models.classifier_path())
    assert sum(n == s.shape for n, s in zip(names, samples)) / len(samples) >= 0.95


def test_lora_data_shows_the_chosen_colour_and_names_the_drawn_one():
    from services.training.lora import recoloured

    _, samples = draw_batch(7, 64)
    pairs = recoloured(samples, "purple")
    for sample, (named, shown) in zip(samples, pairs):
        assert shown.colour == "purple" and named.colour == sample.colour and named.shape == shown.shape
        assert named.background == shown.background != "purple" and named.background != named.colour
        assert (named.background == sample.background) == (sample.background != "purple")
    assert any(s.background == "purple" for s in samples)  # the case that needs another background occurred
    with pytest.raises(ValueError, match="pink"):
        recoloured(samples, "pink")


def test_lora_trains_one_step_saves_what_diffusers_and_the_stages_load_and_resumes(tmp_path):
    from diffusers import StableDiffusionPipeline

    from services import default_models
    from services.runtime.lora import load_lora
    from services.training.lora import RANK, lora_file, train_lora

    result = train_lora(tmp_path, steps=1, batch_size=2, pipeline=default_models.pipeline_path(), progress=False)
    assert result["lora_steps"] == 1 and result["lora_rank"] == RANK
    file = lora_file(tmp_path)
    assert file.is_file() and not list(file.parent.glob("*.bin"))
    pipeline = StableDiffusionPipeline.from_pretrained(default_models.pipeline_path(), safety_checker=None,
                                                       use_safetensors=True)
    torch.manual_seed(0)
    latents, hidden = torch.randn(1, 4, 16, 16), torch.randn(1, 77, pipeline.unet.config.cross_attention_dim)
    with torch.no_grad():
        before = pipeline.unet(latents, 500, hidden).sample
        pipeline.load_lora_weights(file.parent, weight_name=file.name)
        assert pipeline.get_list_adapters() == {"unet": ["default_0"]}
        assert not torch.equal(pipeline.unet(latents, 500, hidden).sample, before)  # one step moved it
    loaded = load_lora(file, "sd", "purple-shapes")
    assert "unet" in loaded.components and len(loaded.components["unet"]) > 0
    again = train_lora(tmp_path, steps=2, batch_size=2, pipeline=default_models.pipeline_path(), progress=False)
    assert again["lora_steps"] == 2  # resumed from the step-1 checkpoint


def test_shipped_lora_was_trained_for_the_shipped_unet():
    from safetensors import safe_open

    from services import default_models
    from services.training.common import base_unet_sha256

    file = default_models.lora_path()
    assert file.suffix == ".safetensors" and file.stat().st_size < 1 << 20
    with safe_open(file, "pt") as weights:
        assert all(key.startswith("unet.") for key in weights.keys())
    stage = default_models.record()["stages"]["lora"]
    assert stage["lora_colour"] == "purple" and stage["lora_steps"] > 0 and stage["seed"] == 0
    assert stage["base_unet_sha256"] == base_unet_sha256(default_models.pipeline_path())

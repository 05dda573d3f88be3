"""Tests for the locally built tokenizer and tiny Stable Diffusion folders (CPU, seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from services import tiny_models
from services.tiny_models import stable_diffusion
from services.tiny_models import (
    build_clip_tokenizer,
    create_tiny_sd,
    default_model_path,
    ensure_default_model,
)

PROMPT = "a photo of an astronaut riding a horse"
COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "unet", "vae")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_sd(tmp_path_factory.mktemp("shared") / "tiny-sd")


# --- tokenizer ----------------------------------------------------------------------------


def test_tokenizer_layout() -> None:
    tokenizer = build_clip_tokenizer()
    vocab = tokenizer.get_vocab()
    assert len(vocab) < 1000
    assert sorted(vocab.values()) == list(range(len(vocab)))
    # CLIP's layout: byte alphabet, the same with "</w>", merges, then the two specials last.
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|startoftext|>"] == len(vocab) - 2
    assert vocab["<|endoftext|>"] == len(vocab) - 1
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.model_max_length == 77


def test_tokenizer_encodes_prompt() -> None:
    tokenizer = build_clip_tokenizer()
    ids = tokenizer(PROMPT).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    # Learned merges keep common prompt words whole: far fewer ids than characters.
    assert 3 <= len(ids) - 2 <= 12
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT


def test_tokenizer_pads_and_truncates() -> None:
    tokenizer = build_clip_tokenizer()
    for text in (PROMPT, " ".join(["astronaut"] * 200), "Ünïcode 🦘 zebra!"):
        ids = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(ids) == 77
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.eos_token_id in ids
        assert max(ids) < 1000


def test_tokenizer_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    first, second = build_clip_tokenizer(), build_clip_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    first.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    for text in (PROMPT, "Ünïcode 🦘 zebra!"):
        kwargs = dict(padding="max_length", max_length=77, truncation=True)
        assert reloaded(text, **kwargs).input_ids == first(text, **kwargs).input_ids
    assert reloaded.model_max_length == 77 and reloaded.pad_token == "<|endoftext|>"


# --- Stable Diffusion folder --------------------------------------------------------------


def test_folder_layout(tiny_sd: Path) -> None:
    index = json.loads((tiny_sd / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    assert index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    for name in COMPONENTS:
        assert (tiny_sd / name).is_dir()
    weights = sorted(p.relative_to(tiny_sd).as_posix() for p in tiny_sd.rglob("*.safetensors"))
    assert weights == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert not list(tiny_sd.rglob("*.bin")) and not list(tiny_sd.rglob("*.pt*"))
    # No staging leftovers next to the model.
    assert _siblings(tiny_sd) == ["tiny-sd"]


def test_pipeline_runs(tiny_sd: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, use_safetensors=True)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()


def test_same_seed_same_bytes(tmp_path: Path, tiny_sd: Path) -> None:
    again = create_tiny_sd(tmp_path / "again")
    assert _files(again) == _files(tiny_sd)
    other = _files(create_tiny_sd(tmp_path / "other", seed=1))
    assert other["unet/diffusion_pytorch_model.safetensors"] != _files(again)[
        "unet/diffusion_pytorch_model.safetensors"
    ]


def test_build_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    create_tiny_sd(tmp_path / "model", seed=7)
    assert torch.equal(torch.rand(4), expected)


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        create_tiny_sd(target)
    assert _files(target) == {"keep.txt": b"mine"}


def test_empty_target_folder_is_filled(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    create_tiny_sd(target)
    assert (target / "model_index.json").is_file()


def test_interrupted_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import StableDiffusionPipeline

    real_save = StableDiffusionPipeline.save_pretrained

    def save_then_die(self, save_directory, **kwargs):
        real_save(self, save_directory, **kwargs)  # leave a full folder behind, then fail
        raise KeyboardInterrupt

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        create_tiny_sd(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


# --- default model ------------------------------------------------------------------------


def test_default_model_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LATENTWIRE_HOME", str(tmp_path / "home"))
    assert default_model_path() == tmp_path / "home" / "models" / "tiny-sd"
    monkeypatch.delenv("LATENTWIRE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_model_path() == tmp_path / ".cache" / "latentwire" / "models" / "tiny-sd"


def test_ensure_default_model_builds_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LATENTWIRE_HOME", str(tmp_path))
    path = ensure_default_model()
    assert path == default_model_path()
    assert (path / "model_index.json").is_file()

    def must_not_build(*args, **kwargs):
        raise AssertionError("rebuilt an existing model")

    monkeypatch.setattr(stable_diffusion, "_build_pipeline", must_not_build)
    assert ensure_default_model() == path


def test_ensure_default_model_loses_race_gracefully(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LATENTWIRE_HOME", str(tmp_path))
    target = default_model_path()
    real_build = stable_diffusion._build_pipeline

    def build_while_another_process_wins(full_size: bool, seed: int, inpainting: bool = False):
        pipe = real_build(full_size, seed, inpainting)
        # The "other process" finishes first, between our check and our rename.
        monkeypatch.setattr(stable_diffusion, "_build_pipeline", real_build)
        create_tiny_sd(target, seed=seed)
        (target / "winner").write_text("")
        return pipe

    monkeypatch.setattr(stable_diffusion, "_build_pipeline", build_while_another_process_wins)
    assert ensure_default_model() == target
    assert (target / "winner").exists()  # theirs was kept, not replaced
    assert _siblings(target) == ["tiny-sd"]  # and our staging folder was cleaned up


def test_public_api() -> None:
    assert set(tiny_models.__all__) == {
        "build_clip_tokenizer",
        "build_t5_tokenizer",
        "create_tiny_sd",
        "FAMILIES",
        "create_tiny_model",
        "create_tiny_sdxl",
        "create_tiny_sd3",
        "create_tiny_flux",
        "default_model_path",
        "ensure_default_model",
        "create_tiny_classifier",
        "default_classifier_path",
        "ensure_default_classifier",
        "create_tiny_controlnet",
        "default_controlnet_path",
        "ensure_default_controlnet",
        "create_tiny_preview_vae",
        "create_tiny_upscaler",
    }

"""LoRAs per request: registry kind, import of one .safetensors file, applied on the text encoder and denoiser
stages by per-job hooks, equal to diffusers' load_lora_weights + set_adapters on tiny SD 1.5 and SDXL.

The LoRA files are built here with fixed seeds: random PEFT adapters on the UNet and text encoders saved with the
pipeline's own save_lora_weights (diffusers / PEFT keys), and a kohya-format file written from one of them by key
renaming, with alphas (scale alpha / r differs from 1). They are imported into the registry of the session's family
suite (tests/family_suite.py), whose stages serve the tiny SD 1.5 ("tiny-sd15", named in every SD 1.5 request: the
suite's default is the tiny SDXL) and the tiny SDXL ("tiny-sdxl").
"""
from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from latentwire.client import Client
from latentwire.client.errors import LatentwireError
from latentwire.client.registry import ModelFilesError, RegistryClient, scan_folder
from latentwire.registry.v1 import registry_pb2
from services.orchestrator.loras import encoded_prompt, resolve_loras

#: Starts service processes: left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow

#: The family suite's registry names of the models (tests/family_suite.py NAMES): requests name each one.
MODELS = {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl"}
SIZE, STEPS, GUIDANCE = 64, 3, 7.5
#: LoRA results against diffusers' (issue 13's bound).
TOLERANCE = 1e-4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _pipeline(family: str, folder: Path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        return StableDiffusionXLPipeline.from_pretrained(folder)
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def make_lora(family: str, model: Path, out: Path, seed: int, *, conv: bool = False) -> Path:
    """A random LoRA (rank 4 UNet, rank 2 text encoders; lora_B random too) saved as diffusers does."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = _pipeline(family, model)
    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=UNET_TARGETS + (["conv1"] if conv else [])), pipe.unet)
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
    encoders = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    for encoder in encoders:
        module = getattr(pipe, encoder)
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=TEXT_TARGETS),
                                module)
        layers[f"{encoder}_lora_layers"] = get_peft_model_state_dict(module)
    out.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(out, safe_serialization=True, weight_name="lora.safetensors", **layers)
    return out / "lora.safetensors"


def make_kohya(source: Path, out: Path, alpha: float) -> Path:
    """The same LoRA under kohya's names (lora_unet_* / lora_te_*, lora_down / lora_up) with an alpha per module."""
    from safetensors.torch import load_file, save_file

    renamed = {}
    for key, value in load_file(source).items():
        component, rest = key.split(".", 1)
        module, _, tail = rest.partition(".lora_")
        if component == "text_encoder":
            module = "text_model." + module  # kohya's names are transformers 4's
        name = ("lora_unet_" if component == "unet" else "lora_te_") + module.replace(".", "_")
        renamed[f"{name}.{'lora_down' if tail.startswith('A') else 'lora_up'}.weight"] = value
        renamed[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(renamed, out)
    return out


def reference(family: str, model: Path, prompt: str, seed: int, loras: list[tuple[Path, float]] = ()) -> np.ndarray:
    """diffusers' pipeline with load_lora_weights + set_adapters (the prompt without its tags)."""
    pipe = _pipeline(family, model)
    for i, (file, _) in enumerate(loras):
        pipe.load_lora_weights(str(file), adapter_name=f"l{i}")
    if loras:
        pipe.set_adapters([f"l{i}" for i in range(len(loras))], [w for _, w in loras])
    return pipe(encoded_prompt(prompt), num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=SIZE, height=SIZE,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images


@pytest.fixture(scope="module")
def models(tiny_family_models):
    """The folders the family suite's tiny SD 1.5 and SDXL were imported from (the references load them)."""
    return {family: tiny_family_models[family] for family in MODELS}


@pytest.fixture(scope="module")
def lora_files(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    sd_a = make_lora("sd15", models["sd15"], root / "sd-a", seed=1, conv=True)
    return {
        "sd-a": sd_a,
        "sd-b": make_lora("sd15", models["sd15"], root / "sd-b", seed=2),
        "sd-kohya": make_kohya(sd_a, root / "sd-kohya.safetensors", alpha=3.0),
        "xl-a": make_lora("sdxl", models["sdxl"], root / "xl-a", seed=3),
    }


def make_embedding(family: str, model: Path, out: Path, seed: int, vectors: int = 2) -> Path:
    """A random A1111 embedding: emb_params (SD 1.x), or clip_l and clip_g (SDXL), ``vectors`` tokens long."""
    from safetensors.torch import save_file

    pipe = _pipeline(family, model)
    generator = torch.Generator().manual_seed(seed)
    if family == "sdxl":
        tensors = {"clip_l": torch.randn(vectors, pipe.text_encoder.config.hidden_size, generator=generator),
                   "clip_g": torch.randn(vectors, pipe.text_encoder_2.config.hidden_size, generator=generator)}
    else:
        tensors = {"emb_params": torch.randn(vectors, pipe.text_encoder.config.hidden_size, generator=generator)}
    save_file(tensors, out)
    return out


@pytest.fixture(scope="module")
def embedding_files(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    return {"mystyle": make_embedding("sd15", models["sd15"], root / "mystyle.safetensors", seed=11),
            "xlstyle": make_embedding("sdxl", models["sdxl"], root / "xlstyle.safetensors", seed=12, vectors=3)}


@pytest.fixture(scope="module")
def lora_suite(family_suite, lora_files, embedding_files):
    """The session's family suite, its registry holding this module's LoRAs and embeddings too."""
    with RegistryClient(family_suite.services["registry"].address, timeout=120) as registry:
        for name, file in lora_files.items():
            version = registry.import_folder(file, name).model_version
            assert registry_pb2.ModelKind.Name(version.kind) == "MODEL_KIND_LORA"
            assert [f.path for f in version.files] == ["lora.safetensors"]
        for name, file in embedding_files.items():
            version = registry.import_folder(file, name).model_version
            assert registry_pb2.ModelKind.Name(version.kind) == "MODEL_KIND_TEXTUAL_INVERSION"
    return family_suite


def _generate(suite, prompt: str, seed: int, model: str = MODELS["sd15"], **settings) -> np.ndarray:
    with Client(suite.address, timeout=300) as client:
        result = client.generate(prompt, seed=seed, steps=STEPS, guidance_scale=GUIDANCE, width=SIZE, height=SIZE,
                                 include_pixels=True, model=model, **settings)
    return result.pixels


def _close(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max())


# ----------------------------------------------------------------------------------------------
# Without services


def test_single_files_are_recognised(lora_files, tmp_path):
    from safetensors.torch import save_file

    assert scan_folder(lora_files["sd-kohya"]).kind == registry_pb2.MODEL_KIND_LORA
    manifest = scan_folder(lora_files["xl-a"])
    assert manifest.kind == registry_pb2.MODEL_KIND_LORA and manifest.default_name == "lora"
    save_file({"emb_params": torch.zeros(2, 32)}, tmp_path / "style.safetensors")
    embedding = scan_folder(tmp_path / "style.safetensors")
    assert embedding.kind == registry_pb2.MODEL_KIND_TEXTUAL_INVERSION
    assert [f.path for f in embedding.files] == ["embedding.safetensors"] and embedding.default_name == "style"
    (tmp_path / "lora.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelFilesError, match="pickle|single-file"):
        scan_folder(tmp_path / "lora.pt")


def test_prompt_tags_merge_with_the_field():
    from latentwire.client.loras import lora_weight

    merged = resolve_loras([lora_weight("a@2:0.5")], "x <lora:a:0.9> <lora:b:0.3:0.7> <lora:c>")
    assert [(e.model.name, e.weight, e.HasField("unet_weight") and e.unet_weight) for e in merged] == [
        ("a@2", 0.5, False), ("b", 0.3, 0.7), ("c", 1.0, False)]
    assert encoded_prompt("x <lora:a:0.9>, y") == "x , y"


# ----------------------------------------------------------------------------------------------
# Through the registry and the suite


def test_sd15_lora_tag_equals_diffusers(lora_suite, models, lora_files):
    prompt = "a red house <lora:sd-a:0.7>"
    got = _generate(lora_suite, prompt, seed=5)
    expected = reference("sd15", models["sd15"], prompt, 5, [(lora_files["sd-a"], 0.7)])
    plain = reference("sd15", models["sd15"], prompt, 5)
    assert _close(got, expected) <= TOLERANCE
    assert _close(got, plain) > 100 * TOLERANCE  # the LoRA changes the image


def test_two_loras_and_kohya_equal_diffusers(lora_suite, models, lora_files):
    got = _generate(lora_suite, "a boat", seed=6, loras=["sd-kohya:0.8", "sd-b:-0.5"])
    expected = reference("sd15", models["sd15"], "a boat", 6,
                         [(lora_files["sd-kohya"], 0.8), (lora_files["sd-b"], -0.5)])
    assert _close(got, expected) <= TOLERANCE


def test_sdxl_lora_equals_diffusers(lora_suite, models, lora_files):
    got = _generate(lora_suite, "a tree", seed=7, model=MODELS["sdxl"], loras=["xl-a:1.2"])
    expected = reference("sdxl", models["sdxl"], "a tree", 7, [(lora_files["xl-a"], 1.2)])
    assert _close(got, expected) <= TOLERANCE


def test_concurrent_jobs_with_and_without_a_lora(lora_suite, models, lora_files):
    results: dict[str, np.ndarray] = {}

    def run(key: str, loras: list[str]) -> None:
        results[key] = _generate(lora_suite, "a cat", seed=8, loras=loras)

    threads = [threading.Thread(target=run, args=(key, loras))
               for key, loras in (("lora", ["sd-a:1.0"]), ("plain", []), ("lora2", ["sd-b:0.6"]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _close(results["lora"], reference("sd15", models["sd15"], "a cat", 8, [(lora_files["sd-a"], 1.0)])) \
        <= TOLERANCE
    assert _close(results["lora2"], reference("sd15", models["sd15"], "a cat", 8, [(lora_files["sd-b"], 0.6)])) \
        <= TOLERANCE
    assert _close(results["plain"], reference("sd15", models["sd15"], "a cat", 8)) <= 1e-5


@pytest.mark.parametrize("settings, code, reason", [
    ({"loras": ["no-such-lora"]}, grpc.StatusCode.NOT_FOUND, "LORA_NOT_FOUND"),
    ({"loras": ["xl-a"]}, grpc.StatusCode.INVALID_ARGUMENT, "LORA_MODEL_MISMATCH"),
    ({"loras": ["sd-a"], "model": MODELS["sdxl"]}, grpc.StatusCode.INVALID_ARGUMENT, "LORA_MODEL_MISMATCH"),
    ({"loras": [MODELS["sdxl"]]}, grpc.StatusCode.INVALID_ARGUMENT, "NOT_A_LORA"),
    ({"loras": ["sd-a:11"]}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_LORA_WEIGHT"),
    ({"loras": ["sd-a", "sd-a@1"]}, grpc.StatusCode.INVALID_ARGUMENT, "DUPLICATE_LORA"),
])
def test_bad_loras_are_refused_with_reasons(lora_suite, settings, code, reason):
    with pytest.raises(LatentwireError) as caught:
        _generate(lora_suite, "a cat", seed=1, **settings)
    assert (caught.value.code, caught.value.reason) == (code, reason), caught.value.message
    assert "/tmp" not in caught.value.message


def test_hooks_are_scoped_to_the_calling_thread(models, lora_files):
    """Two forwards inside one UNet at the same moment (a barrier in its middle block holds both): the thread with
    the LoRA gets it, the other does not; each equals its own run alone."""
    from services.runtime import lora

    unet = _pipeline("sd15", models["sd15"]).unet
    loaded = lora.load_lora(lora_files["sd-a"], "sd", "sd-a")
    inputs = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(10),
              torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1)))

    def forward(uses):
        with torch.no_grad(), lora.applied({"unet": unet}, uses):
            return unet(*inputs).sample

    alone = {"lora": forward([lora.LoraUse(loaded, 0.9)]), "plain": forward([])}
    barrier = threading.Barrier(2, timeout=30)
    handle = unet.mid_block.register_forward_pre_hook(lambda module, args: (barrier.wait(), None)[1])
    together: dict[str, torch.Tensor] = {}
    try:
        threads = [threading.Thread(target=lambda k=key, u=uses: together.__setitem__(k, forward(u)))
                   for key, uses in (("lora", [lora.LoraUse(loaded, 0.9)]), ("plain", []))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        handle.remove()
    assert torch.equal(together["lora"], alone["lora"]) and torch.equal(together["plain"], alone["plain"])
    assert float((alone["lora"] - alone["plain"]).abs().max()) > 1e-3


@pytest.mark.parametrize("family, size", [("sd3", 32), ("flux", 128)])
def test_transformer_lora_equals_diffusers_in_process(tiny_family_models, family, size, tmp_path):
    """SD3 / Flux transformer LoRAs: the hooks on diffusers' own pipeline equal its load_lora_weights +
    set_adapters (the stages apply the same hooks to family.denoiser, "transformer")."""
    import diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from services.runtime import lora

    folder = tiny_family_models[family]
    cls = diffusers.FluxPipeline if family == "flux" else diffusers.StableDiffusion3Pipeline
    pipe = cls.from_pretrained(folder)
    torch.manual_seed(4)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=UNET_TARGETS),
                            pipe.transformer)
    cls.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                          safe_serialization=True, weight_name="lora.safetensors")
    file = tmp_path / "lora" / "lora.safetensors"

    def run(p):
        return p("a cat", num_inference_steps=2, width=size, height=size, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(0)).images

    reference_pipe = cls.from_pretrained(folder)
    reference_pipe.load_lora_weights(str(file), adapter_name="a")
    reference_pipe.set_adapters(["a"], [0.7])
    expected = run(reference_pipe)
    base = cls.from_pretrained(folder)
    with lora.applied({"transformer": base.transformer}, [lora.LoraUse(lora.load_lora(file, family, "t"), 0.7)]):
        got = run(base)
    assert _close(got, expected) <= TOLERANCE
    assert _close(got, run(base)) > 10 * TOLERANCE


def _reference_with_embedding(family: str, model: Path, file: Path, token: str, prompt: str, seed: int) -> np.ndarray:
    """diffusers' load_textual_inversion (both encoders for SDXL), then the pipeline."""
    from safetensors.torch import load_file

    pipe = _pipeline(family, model)
    tensors = load_file(file)
    if family == "sdxl":
        pipe.load_textual_inversion(tensors["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(tensors["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        # The pooled output at the end token, as A1111 takes it: with the legacy eos_token_id 2 of CLIP configs,
        # transformers takes it at the largest token id, which is one of the tokens diffusers added for the embedding.
        pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id
    else:
        pipe.load_textual_inversion(tensors["emb_params"], token=token)
    return pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=SIZE, height=SIZE,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images


@pytest.mark.parametrize("family, name", [("sd15", "mystyle"), ("sdxl", "xlstyle")])
def test_textual_inversion_equals_diffusers(lora_suite, models, embedding_files, family, name):
    prompt = f"a {name} house"
    got = _generate(lora_suite, prompt, seed=9, model=MODELS[family], embeddings=[name])
    expected = _reference_with_embedding(family, models[family], embedding_files[name], name, prompt, 9)
    assert _close(got, expected) <= TOLERANCE
    plain = _generate(lora_suite, prompt, seed=9, model=MODELS[family])  # without: the name is plain text
    assert _close(got, plain) > 100 * TOLERANCE


def test_bad_embeddings_are_refused(lora_suite):
    for settings, code, reason in (
            ({"embeddings": ["nope"]}, grpc.StatusCode.NOT_FOUND, "EMBEDDING_NOT_FOUND"),
            ({"embeddings": ["sd-a"]}, grpc.StatusCode.INVALID_ARGUMENT, "NOT_AN_EMBEDDING"),
            ({"embeddings": ["xlstyle"]}, grpc.StatusCode.INVALID_ARGUMENT, "EMBEDDING_MODEL_MISMATCH")):
        with pytest.raises(LatentwireError) as caught:
            _generate(lora_suite, "a xlstyle cat", seed=1, **settings)
        assert (caught.value.code, caught.value.reason) == (code, reason), caught.value.message


def test_png_infotext_regenerates_loras_and_embeddings(lora_suite):
    """The infotext keeps the prompt's tags, adds the field's LoRAs as tags and the embeddings: regenerated from it
    (png-info / generate --from), the pixels are the same."""
    from latentwire.client.infotext import parse_parameters, png_parameters, request_kwargs

    with Client(lora_suite.address, timeout=300) as client:
        first = client.generate("a mystyle house <lora:sd-a:0.6>", seed=3, steps=STEPS, width=SIZE, height=SIZE,
                                include_pixels=True, model=MODELS["sd15"], loras=["sd-b:0.4:0.8"],
                                embeddings=["mystyle"])
        text = png_parameters(first.images[0])
        assert "<lora:sd-a:0.6>" in text and "<lora:sd-b@1:0.4:0.8>" in text and 'Embeddings: "mystyle@1"' in text
        kwargs = request_kwargs(parse_parameters(text))
        again = client.generate(kwargs.pop("prompt"), include_pixels=True, **kwargs)
    assert np.array_equal(first.pixels, again.pixels)

"""Single-file checkpoints (one original-layout ``.safetensors``) -> a diffusers pipeline folder, offline.

Most community models are shared as the one file the original (CompVis/LDM, SGM) code wrote. The
registry stores diffusers folders, so such a file is converted first, with diffusers' own
single-file loaders (``<Pipeline>.from_single_file(file, config=<local folder>)``). Those loaders
need the diffusers configs of the family (they are not in the file); with ``config=`` pointing at a
local folder and ``local_files_only=True`` nothing is fetched from a hub. The configs of SD 1.5, SDXL
base 1.0 and the SDXL refiner 1.0 ship in ``single_file_configs/{sd15,sdxl,sdxl-refiner}`` (a few KB
each). CLIP's tokenizer is built from CLIP's own BPE vocabulary, which ships as
``single_file_configs/clip/bpe_simple_vocab_16e6.txt.gz`` (1.3 MB, the file OpenAI's CLIP and OpenCLIP
tokenize with, MIT-licensed; vocab.json and merges.txt follow from it as OpenCLIP's SimpleTokenizer builds
them), unless ``--tokenizer`` names a tokenizer folder or ``--config`` has one. SDXL's two tokenizers share
CLIP's vocabulary (tokenizer_2 pads with "!"), so one vocabulary serves both.

Where: conversion needs torch and diffusers, which the light client distribution never imports, so
it runs as a server-side command (``latentwire models convert-single-file``) that writes a folder
``latentwire models import`` then uploads; the client's import recognises a single file and says so.

A family is recognised from the file's key names (read from the safetensors header, nothing
loaded); SDXL and others slot in as entries of ``FAMILIES`` plus a folder of shipped configs.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from latentwire.client.registry import PICKLE_SUFFIXES, safetensors_file_problem
from services.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, quote

logger = logging.getLogger(__name__)

__all__ = ["FAMILIES", "CONFIG_ROOT", "Family", "detect_family", "convert_single_file"]

#: Shipped diffusers configs, one folder per family (model_index.json and each component's config).
CONFIG_ROOT = Path(__file__).parent / "single_file_configs"


@dataclass(frozen=True)
class Family:
    """A checkpoint family: the diffusers pipeline it converts to and the keys that identify its file."""

    name: str
    pipeline: str
    #: Every one of these keys is in a file of this family (original layout).
    keys: tuple[str, ...]
    #: Input channels of the UNet's first convolution (9 for inpainting models).
    unet_in_channels: int | None = None


_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"

#: Most specific first: detect_family returns the first family whose keys are all present.
FAMILIES: tuple[Family, ...] = (
    Family("sdxl", "StableDiffusionXLPipeline",
           ("conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
            "conditioner.embedders.1.model.positional_embedding", _UNET_IN)),
    Family("sdxl-refiner", "StableDiffusionXLImg2ImgPipeline",
           ("conditioner.embedders.0.model.positional_embedding", _UNET_IN)),
    Family("sd2", "StableDiffusionPipeline", ("cond_stage_model.model.token_embedding.weight", _UNET_IN)),
    Family("sd15-inpainting", "StableDiffusionInpaintPipeline",
           ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight", _UNET_IN),
           unet_in_channels=9),
    Family("sd15", "StableDiffusionPipeline",
           ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight", _UNET_IN)),
)


#: safetensors dtype names -> torch dtype names, for the precisions checkpoints are shared in.
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _header(path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Key -> shape and key -> dtype, from the safetensors header alone (checked by safetensors_file_problem)."""
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    return ({k: v.get("shape", []) for k, v in tensors.items()},
            {k: _DTYPES.get(v.get("dtype"), "float32") for k, v in tensors.items()})


def detect_family(keys: dict[str, list[int]]) -> Family:
    """The family whose identifying keys (and UNet input channels) the file has; InvalidArgument if none."""
    for family in FAMILIES:
        if not all(k in keys for k in family.keys):
            continue
        in_channels = keys[_UNET_IN][1] if len(keys[_UNET_IN]) > 1 else None
        if family.unet_in_channels is not None and in_channels != family.unet_in_channels:
            continue
        return family
    raise InvalidArgument(
        f"the file's {len(keys)} tensors are not in a single-file layout this converter knows: expected an "
        "original (CompVis/SGM) Stable Diffusion checkpoint, with model.diffusion_model.* and "
        "cond_stage_model.* or conditioner.embedders.* keys; a diffusers folder imports as it is",
        reason="UNKNOWN_CHECKPOINT_LAYOUT", metadata={"field": "checkpoint"})


def _tokenizer_names(index: dict) -> list[str]:
    """The tokenizer components a model_index.json lists (the refiner lists ``tokenizer`` as null)."""
    return [name for name, value in index.items() if name.startswith("tokenizer") and _present(value)]


def _present(entry) -> bool:
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


#: Tokenizer settings that differ from the --tokenizer folder's: SDXL's tokenizer_2 (OpenCLIP bigG's) shares
#: CLIP's vocabulary but pads with "!" (stabilityai/stable-diffusion-xl-base-1.0 tokenizer_2/special_tokens_map).
_TOKENIZER_SETTINGS = {"tokenizer_2": {"pad_token": "!"}}


def convert_single_file(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                        family: str | None = None, config: str | os.PathLike[str] | None = None,
                        tokenizer: str | os.PathLike[str] | None = None, allow_pickle: bool = False) -> Path:
    """Convert one original-layout checkpoint into a diffusers pipeline folder at ``out_dir``; returns it.

    Args:
        checkpoint: the ``.safetensors`` file (a pickle ``.ckpt`` only with ``allow_pickle``).
        out_dir: folder to create; must not exist or be empty. Written in a sibling and renamed
            into place, so it holds either nothing or a complete folder.
        family: expected family name (``sd15``, ...); default: recognised from the keys.
        config: a diffusers folder whose configs to use (``model_index.json`` and the component
            configs), for checkpoints whose architecture differs from the family's full-size one;
            default: the shipped configs of the family.
        tokenizer: a folder holding the tokenizer files, when ``config`` has no ``tokenizer/``; default: CLIP's
            tokenizer built from the shipped vocabulary.
        allow_pickle: accept a pickle file (loaded with weights_only, as diffusers does; refused by
            default, as the registry refuses pickles).

    Raises InvalidArgument (the file: missing, not safetensors, unknown layout, wrong family, not
    fitting the configs), FailedPrecondition (pickle refused, configs or tokenizer missing) or
    AlreadyExists (``out_dir`` holds something).
    """
    source, target = Path(checkpoint), Path(out_dir)
    if not source.is_file():
        raise InvalidArgument(f"{quote(source.name)} is not a file", reason="CHECKPOINT_NOT_FOUND",
                              metadata={"field": "checkpoint"})
    suffix = source.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise FailedPrecondition(
                f"{quote(source.name)} is a pickle file: unpickling runs code, so it is refused; use the model's "
                ".safetensors file, or pass --allow-pickle for a file you trust",
                reason="PICKLE_REFUSED", metadata={"field": "checkpoint"})
        keys, dtypes = _pickle_keys(source)
    elif suffix == ".safetensors":
        problem = safetensors_file_problem(source)
        if problem is not None:
            raise InvalidArgument(f"{quote(source.name)} is not a safetensors file: {problem}",
                                  reason="INVALID_SAFETENSORS", metadata={"field": "checkpoint"})
        keys, dtypes = _header(source)
    else:
        raise InvalidArgument(f"{quote(source.name)}: a single-file checkpoint ends in .safetensors (or .ckpt)",
                              reason="UNKNOWN_CHECKPOINT_LAYOUT", metadata={"field": "checkpoint"})
    detected = detect_family(keys)
    if family is not None and family != detected.name:
        raise InvalidArgument(f"the file holds a {detected.name} checkpoint, not {quote(family)}",
                              reason="CHECKPOINT_FAMILY_MISMATCH", metadata={"field": "family"})
    config_dir = Path(config) if config is not None else CONFIG_ROOT / detected.name
    if not (config_dir / "model_index.json").is_file():
        hint = "the folder has no model_index.json" if config is not None else (
            f"no configs ship for {detected.name} yet (shipped: "
            f"{', '.join(sorted(p.name for p in CONFIG_ROOT.iterdir() if p.is_dir()))})")
        raise FailedPrecondition(f"cannot convert: {hint}; pass --config with a diffusers folder of this "
                                 "architecture", reason="SINGLE_FILE_CONFIG_MISSING", metadata={"field": "config"})
    index = json.loads((config_dir / "model_index.json").read_text())
    if _occupied(target):
        raise AlreadyExists("the output folder already exists and is not empty; choose a new one",
                            metadata={"field": "out_dir"})
    components = _tokenizers(index, config_dir, Path(tokenizer) if tokenizer is not None else None)
    # The folder keeps the checkpoint's precision (most are shared in float16): the UNet's decides.
    dtype = dtypes.get(_UNET_IN, "float32")
    if detected.name == "sdxl":
        components["text_encoder_2"] = _sdxl_open_clip(source, config_dir, index, dtype)
    return _convert(source, target, detected, config_dir, components, dtype)


#: Where an SDXL base file keeps OpenCLIP bigG (text_encoder_2).
_SDXL_OPEN_CLIP = "conditioner.embedders.1.model."


def _sdxl_open_clip(source: Path, config_dir: Path, index: dict, dtype: str):
    """text_encoder_2 of an SDXL base file, converted with diffusers' own OpenCLIP conversion.

    diffusers' pipeline loader tells SDXL's two towers apart by width alone (it reads a tower as CLIP-L
    when CLIP-L's width equals the model's): right for the real SDXL (768 vs 1280), wrong when both
    towers are equally wide, as in the tiny test models, where bigG would get CLIP-L's weights. Built
    here the way diffusers' create_diffusers_clip_model_from_ldm builds it, from the bigG keys only.
    """
    _choose_pil_image_processors()
    import torch
    import transformers
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from diffusers.models.model_loading_utils import load_model_dict_into_meta

    if not _present(index.get("text_encoder_2")):
        raise InvalidArgument("the configs' model_index.json lists no text_encoder_2, which an SDXL base file "
                              "holds: pass --config with an SDXL folder", reason="CHECKPOINT_CONFIG_MISMATCH",
                              metadata={"field": "config"})
    cls = getattr(transformers, index["text_encoder_2"][1])
    config = cls.config_class.from_pretrained(config_dir / "text_encoder_2", local_files_only=True)
    with init_empty_weights():
        model = cls(config)
    state_dict = convert_open_clip_checkpoint(model, _tensors(source, _SDXL_OPEN_CLIP), prefix=_SDXL_OPEN_CLIP)
    if not hasattr(model, "text_model"):  # as diffusers: transformers >= 5.6 may drop the wrapper
        state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    try:
        load_model_dict_into_meta(model, state_dict, dtype=getattr(torch, dtype))
    except (ValueError, RuntimeError) as error:  # a tensor's shape does not fit the config
        logger.warning("single-file text_encoder_2 conversion failed: %s", error)
        raise InvalidArgument("the checkpoint's text_encoder_2 does not fit the sdxl configs: pass --config with a "
                              "diffusers folder of this checkpoint's architecture",
                              reason="CHECKPOINT_CONFIG_MISMATCH", metadata={"field": "config"}) from error
    return model.eval()


def _tensors(source: Path, prefix: str) -> dict:
    """The tensors of a checkpoint whose keys start with ``prefix`` (a safetensors file reads only those)."""
    if source.suffix.lower() != ".safetensors":
        import torch

        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
        while isinstance(checkpoint, dict) and "state_dict" in checkpoint:
            checkpoint = checkpoint["state_dict"]
        return {k: v for k, v in checkpoint.items() if k.startswith(prefix)}
    from safetensors import safe_open

    with safe_open(source, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def _pickle_keys(source: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    import torch

    # weights_only: tensors and plain containers only, no arbitrary objects (the caller allowed pickles).
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle's errors have no common base; diffusers loads the same way below
        logger.warning("pickle checkpoint not loaded: %s", error)
        raise InvalidArgument("the pickle file is not a plain tensor checkpoint (it does not load with "
                              "weights_only: it holds other objects, or is no torch.save file)",
                              reason="UNKNOWN_CHECKPOINT_LAYOUT", metadata={"field": "checkpoint"}) from None
    if not isinstance(checkpoint, dict):
        raise InvalidArgument("the pickle file holds no tensor dictionary", reason="UNKNOWN_CHECKPOINT_LAYOUT",
                              metadata={"field": "checkpoint"})
    while isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    return ({k: list(v.shape) for k, v in tensors.items()},
            {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()})


def _tokenizers(index: dict, config_dir: Path, tokenizer: Path | None) -> dict:
    """Tokenizers to pass in explicitly: those the config folder lacks, loaded from ``tokenizer``."""
    missing = [name for name in _tokenizer_names(index) if not (config_dir / name).is_dir()]
    if not missing:
        return {}
    if tokenizer is None and SHIPPED_CLIP_VOCABULARY.is_file():
        return {name: shipped_clip_tokenizer(**_TOKENIZER_SETTINGS.get(name, {})) for name in missing}
    if tokenizer is None:
        raise FailedPrecondition(
            "CLIP's vocabulary that should ship with latentwire is missing (reinstall it): "
            "pass --tokenizer with a folder holding them (the tokenizer/ folder of any diffusers model of this "
            "family), or --config with a diffusers folder that has one",
            reason="TOKENIZER_MISSING", metadata={"field": "tokenizer"})
    _choose_pil_image_processors()
    import transformers

    return {name: getattr(transformers, index[name][1]).from_pretrained(
                tokenizer, local_files_only=True, **_TOKENIZER_SETTINGS.get(name, {}))
            for name in missing}


def _choose_pil_image_processors() -> None:
    # Before diffusers or transformers load: see services/runtime/image_processors.py. Not at module
    # import, as the registry service imports nothing of either.
    from services.runtime.image_processors import choose_pil_image_processors

    choose_pil_image_processors()


def _convert(source: Path, target: Path, family: Family, config_dir: Path, components: dict, dtype: str) -> Path:
    _choose_pil_image_processors()
    import diffusers
    import torch

    pipeline_class = getattr(diffusers, family.pipeline)
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: local_files_only already keeps hub calls out
    try:
        pipe = pipeline_class.from_single_file(str(source), config=str(config_dir), local_files_only=True,
                                               torch_dtype=getattr(torch, dtype), **components)
    except (ValueError, RuntimeError) as error:  # diffusers' shape and key checks
        logger.warning("single-file conversion failed: %s", error)  # which tensor: for the log, not the message
        raise InvalidArgument(
            f"the checkpoint does not fit the {family.name} configs: pass --config with a diffusers folder of this "
            "checkpoint's architecture",
            reason="CHECKPOINT_CONFIG_MISMATCH", metadata={"field": "config"}) from error
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    # A tensor the file lacked stays on the meta device (diffusers loads with strict=False): refuse it.
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            missing = [k for k, v in module.state_dict().items() if v.device.type == "meta"]
            if missing:
                raise InvalidArgument(
                    f"the checkpoint lacks {len(missing)} tensor(s) of the {name} the configs describe, first "
                    f"{quote(missing[0])}: do the configs (--config) match this checkpoint's architecture?",
                    reason="CHECKPOINT_CONFIG_MISMATCH", metadata={"field": "config"})
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _occupied(path: Path) -> bool:
    if not path.exists() and not path.is_symlink():
        return False
    return not (path.is_dir() and not path.is_symlink() and not any(path.iterdir()))


#: CLIP's BPE vocabulary (OpenAI CLIP's and OpenCLIP's bpe_simple_vocab_16e6.txt.gz): the merges, one a line.
SHIPPED_CLIP_VOCABULARY = Path(__file__).parent / "single_file_configs" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
#: Merges CLIP uses: its vocabulary has 49408 ids = 2 x 256 byte tokens + these merges + 2 specials.
_CLIP_MERGES = 49152 - 256 - 2


def shipped_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """CLIP's tokenizer (SD 1.x's and SDXL's, 49408 ids, 77 tokens) built from the shipped BPE vocabulary, the way
    OpenCLIP's SimpleTokenizer builds it: byte tokens, the same with "</w>", one token per merge, then the
    start and end specials. ``pad_token`` "!" gives SDXL's tokenizer_2."""
    import gzip

    import transformers

    from services.tiny_models.tokenizer import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, MODEL_MAX_LENGTH, byte_alphabet

    lines = gzip.open(SHIPPED_CLIP_VOCABULARY, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:_CLIP_MERGES + 1]]
    alphabet = byte_alphabet()
    tokens = [*alphabet, *(t + END_OF_WORD for t in alphabet), *("".join(m) for m in merges), BOS_TOKEN, EOS_TOKEN]
    return transformers.CLIPTokenizer(
        vocab={token: i for i, token in enumerate(tokens)}, merges=merges, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN, pad_token=pad_token, model_max_length=MODEL_MAX_LENGTH)

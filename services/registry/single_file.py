"""Single-file checkpoints (one original-layout ``.safetensors``) -> a diffusers pipeline folder, offline.

Most community models are shared as the one file the original (CompVis/LDM, SGM) code wrote. The
registry stores diffusers folders, so such a file is converted first, with diffusers' own
single-file loaders (``<Pipeline>.from_single_file(file, config=<local folder>)``). Those loaders
need the diffusers configs of the family (they are not in the file); with ``config=`` pointing at a
local folder and ``local_files_only=True`` nothing is fetched from a hub. The SD 1.5 configs ship in
``single_file_configs/sd15`` (a few KB); CLIP's tokenizer files (vocab.json + merges.txt, about
1.5 MB) do not ship, so the caller names a tokenizer folder (``--tokenizer``) unless ``--config``
has one.

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
    return [name for name in index if name.startswith("tokenizer")]


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
        tokenizer: a folder holding the tokenizer files, when ``config`` has no ``tokenizer/``.
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
    return _convert(source, target, detected, config_dir, components, dtype)


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
    if tokenizer is None:
        raise FailedPrecondition(
            "the checkpoint's tokenizer files are not shipped (CLIP's vocab.json and merges.txt, about 1.5 MB): "
            "pass --tokenizer with a folder holding them (the tokenizer/ folder of any diffusers model of this "
            "family), or --config with a diffusers folder that has one",
            reason="TOKENIZER_MISSING", metadata={"field": "tokenizer"})
    _choose_pil_image_processors()
    import transformers

    if len(missing) > 1:
        raise FailedPrecondition(f"this family has {len(missing)} tokenizers: pass --config with a diffusers "
                                 "folder that holds them", reason="TOKENIZER_MISSING", metadata={"field": "tokenizer"})
    name = missing[0]
    return {name: getattr(transformers, index[name][1]).from_pretrained(tokenizer, local_files_only=True)}


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

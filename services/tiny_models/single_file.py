"""Write a diffusers Stable Diffusion folder as one original-layout (CompVis/LDM) ``.safetensors`` file.

Most community models are shared as such a single file; tests need one written from a tiny model
so that converting it back (services/registry/single_file.py) can be checked tensor by tensor.
The key mapping is diffusers' own script, generalised from SD 1.5's fixed block counts to any
UNet/VAE config (the tiny models have 2 blocks and 1 layer per block, where SD 1.5 has 4 and 2).

Only SD 1.x (one CLIP text encoder under ``cond_stage_model.transformer.``) is written today;
SDXL (``conditioner.embedders.0/1``) slots in as another ``_TEXT_ENCODERS`` entry.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["write_original_single_file", "convert_unet_state_dict", "convert_vae_state_dict"]


# Copied from diffusers scripts/convert_diffusers_to_original_stable_diffusion.py (unet_conversion_map*),
# with the loops over SD 1.5's 4 blocks x 2 layers generalised to the UNet's own config.
unet_conversion_map = [
    # (stable-diffusion, HF Diffusers)
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"),
    ("time_embed.2.bias", "time_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"),
    ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"),
    ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"),
    ("out.2.bias", "conv_out.bias"),
]

unet_conversion_map_resnet = [
    # (stable-diffusion, HF Diffusers)
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]


def _unet_conversion_map_layer(config: dict) -> list[tuple[str, str]]:
    """diffusers' unet_conversion_map_layer for this UNet config (the script hardcodes SD 1.5's)."""
    layers = config["layers_per_block"]
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    blocks = len(down_types)
    mapping = []
    for i in range(blocks):
        for j in range(layers):
            mapping.append((f"input_blocks.{(layers + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if "CrossAttn" in down_types[i]:
                mapping.append((f"input_blocks.{(layers + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(layers + 1):
            mapping.append((f"output_blocks.{(layers + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if "CrossAttn" in up_types[i]:
                mapping.append((f"output_blocks.{(layers + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < blocks - 1:
            mapping.append((f"input_blocks.{(layers + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            # The upsampler follows the last resnet (and its attention, when the block has one).
            slot = 2 if "CrossAttn" in up_types[i] else 1
            mapping.append((f"output_blocks.{(layers + 1) * i + layers}.{slot}.", f"up_blocks.{i}.upsamplers.0."))
    mapping.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        mapping.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return mapping


# Copied from diffusers scripts/convert_diffusers_to_original_stable_diffusion.py (convert_unet_state_dict),
# taking the config for the generalised layer map.
def convert_unet_state_dict(unet_state_dict: dict, config: dict) -> dict:
    # buyer beware: this is a *brittle* function,
    # and correct output requires that all of these pieces interact in
    # the exact order in which I have arranged them.
    mapping = {k: k for k in unet_state_dict.keys()}
    for sd_name, hf_name in unet_conversion_map:
        mapping[hf_name] = sd_name
    for k, v in mapping.items():
        if "resnets" in k:
            for sd_part, hf_part in unet_conversion_map_resnet:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    for k, v in mapping.items():
        for sd_part, hf_part in _unet_conversion_map_layer(config):
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    return {v: unet_state_dict[k] for k, v in mapping.items()}


def _vae_conversion_map(config: dict) -> list[tuple[str, str]]:
    """diffusers' vae_conversion_map for this VAE config (the script hardcodes 4 blocks x 2 layers)."""
    blocks, layers = len(config["block_out_channels"]), config["layers_per_block"]
    mapping = [
        # (stable-diffusion, HF Diffusers)
        ("nin_shortcut", "conv_shortcut"),
        ("norm_out", "conv_norm_out"),
        ("mid.attn_1.", "mid_block.attentions.0."),
    ]
    for i in range(blocks):
        for j in range(layers):
            mapping.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < blocks - 1:
            mapping.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            mapping.append((f"up.{blocks - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        # up blocks have one more resnet, and are numbered in reverse from sd
        for j in range(layers + 1):
            mapping.append((f"decoder.up.{blocks - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        mapping.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    return mapping


vae_conversion_map_attn = [
    # (stable-diffusion, HF Diffusers)
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
]


def reshape_weight_for_sd(w: torch.Tensor) -> torch.Tensor:
    # convert HF linear weights to SD conv2d weights
    return w.reshape(*w.shape, 1, 1) if w.ndim != 1 else w


# Copied from diffusers scripts/convert_diffusers_to_original_stable_diffusion.py (convert_vae_state_dict),
# with the attention renames folded into one map (today's diffusers names them to_q/to_k/to_v/to_out.0).
def convert_vae_state_dict(vae_state_dict: dict, config: dict) -> dict:
    mapping = {k: k for k in vae_state_dict.keys()}
    for k, v in mapping.items():
        for sd_part, hf_part in _vae_conversion_map(config):
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    for k, v in mapping.items():
        if "attentions" in k:
            for sd_part, hf_part in vae_conversion_map_attn:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    new_state_dict = {v: vae_state_dict[k] for k, v in mapping.items()}
    for k, v in new_state_dict.items():
        if any(f"mid.attn_1.{name}.weight" in k for name in ("q", "k", "v", "proj_out")):
            new_state_dict[k] = reshape_weight_for_sd(v)
    return new_state_dict


def _text_encoder_state_dict(state_dict: dict) -> dict:
    # transformers >= 5.6 saves CLIPTextModel without its "text_model." wrapper; the original layout has it.
    return {"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in state_dict.items()}


def write_original_single_file(folder: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Write the UNet, VAE and text encoder of a diffusers SD 1.x folder as one original-layout safetensors file.

    Keys: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
    ``cond_stage_model.transformer.text_model.*`` (CLIP), as in ``v1-5-pruned-emaonly.safetensors``.
    The scheduler, tokenizer and configs are not in the file: that is what makes converting it back
    need config files. Returns ``path``.
    """
    folder, target = Path(folder), Path(path)
    index = json.loads((folder / "model_index.json").read_text())
    if "text_encoder_2" in index:
        raise ValueError("only SD 1.x folders (one text encoder) are written as single files so far")
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    unet = convert_unet_state_dict(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"), unet_config)
    vae = convert_vae_state_dict(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"), vae_config)
    text_encoder = _text_encoder_state_dict(load_file(folder / "text_encoder" / "model.safetensors"))
    state_dict = {
        **{"model.diffusion_model." + k: v for k, v in unet.items()},
        **{"first_stage_model." + k: v for k, v in vae.items()},
        **text_encoder,
    }
    # safetensors refuses tensors that share memory; the reshapes above are views.
    save_file({k: v.contiguous() for k, v in state_dict.items()}, target)
    return target

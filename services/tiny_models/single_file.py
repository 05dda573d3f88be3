"""Write a diffusers Stable Diffusion folder as one original-layout (CompVis/LDM) ``.safetensors`` file.

Most community models are shared as such a single file; tests need one written from a tiny model
so that converting it back (services/registry/single_file.py) can be checked tensor by tensor.
The key mapping is diffusers' own script, generalised from SD 1.5's fixed block counts to any
UNet/VAE config (the tiny models have 2 blocks and 1 layer per block, where SD 1.5 has 4 and 2).

SD 1.x (one CLIP text encoder under ``cond_stage_model.transformer.``) and SDXL are written: the SDXL
base's CLIP-L under ``conditioner.embedders.0.transformer.`` and its OpenCLIP bigG under
``conditioner.embedders.1.model.`` (the refiner's bigG under ``conditioner.embedders.0.model.``), as
diffusers' scripts/convert_diffusers_to_original_sdxl.py writes them.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["write_original_single_file", "convert_unet_state_dict", "convert_vae_state_dict",
           "convert_openclip_text_enc_state_dict"]


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
    # the following are for sdxl (from convert_diffusers_to_original_sdxl.py: SDXL's added conditioning)
    ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
    ("label_emb.0.0.bias", "add_embedding.linear_1.bias"),
    ("label_emb.0.2.weight", "add_embedding.linear_2.weight"),
    ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
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
        if hf_name in unet_state_dict:  # one map for SD 1.x and SDXL: only SDXL has add_embedding
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


def _text_encoder_state_dict(state_dict: dict, prefix: str = "cond_stage_model.transformer.") -> dict:
    # transformers >= 5.6 saves CLIPTextModel without its "text_model." wrapper; the original layout has it.
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state_dict.items()}


# Copied from diffusers scripts/convert_diffusers_to_original_sdxl.py (textenc_conversion_lst and
# convert_openclip_text_enc_state_dict), with one fix: the projection is written as OpenCLIP holds it,
# ``text_projection`` = the Linear's weight transposed (the key diffusers' loader reads and transposes back,
# and the one it tells the refiner by), where the script keeps diffusers' ``text_projection.weight``.
textenc_conversion_lst = [
    # (stable-diffusion, HF Diffusers)
    ("transformer.resblocks.", "text_model.encoder.layers."),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    (".c_fc.", ".fc1."),
    (".c_proj.", ".fc2."),
    (".attn", ".self_attn"),
    ("ln_final.", "text_model.final_layer_norm."),
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
]
protected = {re.escape(x[1]): x[0] for x in textenc_conversion_lst}
textenc_pattern = re.compile("|".join(protected.keys()))
# Ordering is from https://github.com/pytorch/pytorch/blob/master/test/cpp/api/modules.cpp
code2idx = {"q": 0, "k": 1, "v": 2}


def convert_openclip_text_enc_state_dict(text_enc_dict: dict) -> dict:
    new_state_dict = {}
    capture_qkv_weight: dict[str, list] = {}
    capture_qkv_bias: dict[str, list] = {}
    for k, v in text_enc_dict.items():
        if k == "text_projection.weight":
            new_state_dict["text_projection"] = v.T
            continue
        if k.endswith((".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight")):
            k_pre = k[: -len(".q_proj.weight")]
            k_code = k[-len("q_proj.weight")]
            capture_qkv_weight.setdefault(k_pre, [None, None, None])[code2idx[k_code]] = v
            continue
        if k.endswith((".self_attn.q_proj.bias", ".self_attn.k_proj.bias", ".self_attn.v_proj.bias")):
            k_pre = k[: -len(".q_proj.bias")]
            k_code = k[-len("q_proj.bias")]
            capture_qkv_bias.setdefault(k_pre, [None, None, None])[code2idx[k_code]] = v
            continue
        relabelled_key = textenc_pattern.sub(lambda m: protected[re.escape(m.group(0))], k)
        new_state_dict[relabelled_key] = v
    for suffix, captured in ((".in_proj_weight", capture_qkv_weight), (".in_proj_bias", capture_qkv_bias)):
        for k_pre, tensors in captured.items():
            if any(t is None for t in tensors):
                raise ValueError("one of the q-k-v values of the text encoder is missing")
            relabelled_key = textenc_pattern.sub(lambda m: protected[re.escape(m.group(0))], k_pre)
            new_state_dict[relabelled_key + suffix] = torch.cat(tensors)
    return new_state_dict


def _openclip_state_dict(state_dict: dict, prefix: str) -> dict:
    # CLIPTextModelWithProjection keeps its "text_model." wrapper; add it if a transformers version drops it.
    wrapped = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
               for k, v in state_dict.items()}
    return {prefix + k: v for k, v in convert_openclip_text_enc_state_dict(wrapped).items()}


def write_original_single_file(folder: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Write the UNet, VAE and text encoder(s) of a diffusers SD 1.x or SDXL (base or refiner) folder as one
    original-layout safetensors file.

    Keys: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and the text encoders:
    SD 1.x ``cond_stage_model.transformer.text_model.*`` (CLIP), as in ``v1-5-pruned-emaonly.safetensors``;
    SDXL base ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L) and
    ``conditioner.embedders.1.model.*`` (OpenCLIP bigG), as in ``sd_xl_base_1.0.safetensors``; the refiner
    ``conditioner.embedders.0.model.*`` (bigG only), as in ``sd_xl_refiner_1.0.safetensors``.
    The scheduler, tokenizers and configs are not in the file: that is what makes converting it back
    need config files. Returns ``path``.
    """
    folder, target = Path(folder), Path(path)
    index = json.loads((folder / "model_index.json").read_text())
    if _present(index, "text_encoder_3") or _present(index, "transformer"):
        raise ValueError("only SD 1.x and SDXL folders (a UNet and CLIP text encoders) are written as single files")
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    unet = convert_unet_state_dict(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"), unet_config)
    vae = convert_vae_state_dict(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"), vae_config)
    state_dict = {
        **{"model.diffusion_model." + k: v for k, v in unet.items()},
        **{"first_stage_model." + k: v for k, v in vae.items()},
    }
    if _present(index, "text_encoder_2"):
        bigg = load_file(folder / "text_encoder_2" / "model.safetensors")
        if _present(index, "text_encoder"):  # SDXL base: CLIP-L first, bigG second
            clip_l = load_file(folder / "text_encoder" / "model.safetensors")
            state_dict.update(_text_encoder_state_dict(clip_l, "conditioner.embedders.0.transformer."))
            state_dict.update(_openclip_state_dict(bigg, "conditioner.embedders.1.model."))
        else:  # the refiner: bigG only
            state_dict.update(_openclip_state_dict(bigg, "conditioner.embedders.0.model."))
    else:
        state_dict.update(_text_encoder_state_dict(load_file(folder / "text_encoder" / "model.safetensors")))
    # safetensors refuses tensors that share memory; the reshapes and transposes above are views.
    save_file({k: v.contiguous() for k, v in state_dict.items()}, target)
    return target


def _present(index: dict, component: str) -> bool:
    entry = index.get(component)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None

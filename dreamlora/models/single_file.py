"""Export a diffusers model as one original-layout .safetensors file (SD 1.x / 2.x: CompVis/LDM; SDXL: SGM).

`export_single_file` asks the model's family for the layout; the SD 1.x/2.x renames live here and SDXL's
(which reuse them) in sdxl_layout.py.

That single file is what AUTOMATIC1111, ComfyUI and `StableDiffusionPipeline.from_single_file` load.
The key mapping is the inverse of diffusers' single-file loader
(diffusers/loaders/single_file_utils.py) and follows the layout of diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py, written generically in the number of
blocks and layers so the tiny built-in models convert as well as full-size ones:

- UNet -> `model.diffusion_model.*` (input_blocks / middle_block / output_blocks);
- VAE -> `first_stage_model.*` (attention projections as 1x1 convolutions, as in LDM);
- SD 1 text encoder (OpenAI CLIP) -> `cond_stage_model.transformer.text_model.*`;
- SD 2 text encoder (OpenCLIP) -> `cond_stage_model.model.*` (fused in_proj q/k/v, resblocks).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..errors import ConfigError, ModelLoadError
from .loading import BaseModel, load_base_model

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."

_UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
# diffusers ResnetBlock2D -> LDM ResBlock (in_layers = norm, SiLU, conv; out_layers = norm, SiLU, dropout, conv).
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_FIXED = {"conv_norm_out.": "norm_out."}
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
_OPENCLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}


def export_single_file(
    model: BaseModel | str | os.PathLike,
    out_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `model` as one original-layout .safetensors checkpoint.

    Args:
        model: A loaded BaseModel, or anything `load_base_model` accepts (e.g. a diffusers folder).
        out_path: The file to write; must end in .safetensors. Written atomically.
        dtype: dtype of the stored weights.

    Returns:
        The path written.

    Raises:
        ConfigError: `out_path` does not end in .safetensors.
        ModelLoadError: the model cannot be loaded, or has a weight the original layout has no name for.
    """
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".safetensors":
        raise ConfigError(f"export file '{out_path}' must end in .safetensors (the only format written).")
    if not isinstance(model, BaseModel):
        model = load_base_model(str(model))
    state = {name: tensor.to(dtype).contiguous() for name, tensor in model.family.original_state_dict(model).items()}
    from safetensors.torch import save_file

    with atomic_path(out_path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return out_path


def original_state_dict(model: BaseModel) -> dict[str, torch.Tensor]:
    """All of `model`'s weights under their original single-file names (the family's layout)."""
    return model.family.original_state_dict(model)


def sd_original_state_dict(model: BaseModel) -> dict[str, torch.Tensor]:
    """All of an SD 1.x/2.x model's weights under their original (LDM) names."""
    text_state = model.text_encoders[0].state_dict()
    if model.family.v2:
        text = _prefixed(OPENCLIP_PREFIX, openclip_to_original(text_state))
    else:
        text = _prefixed(CLIP_PREFIX, clip_to_original(text_state))
    return {
        **_prefixed(UNET_PREFIX, unet_to_original(model.unet.state_dict(), dict(model.unet.config))),
        **_prefixed(VAE_PREFIX, vae_to_original(model.vae.state_dict(), dict(model.vae.config))),
        **text,
    }


# --- UNet ----------------------------------------------------------------------------------------


def unet_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel weights -> LDM UNetModel names (without `model.diffusion_model.`).

    LDM numbers its blocks flatly: input_blocks[0] is conv_in, then each level has `layers` resnet
    (+ attention) blocks and, except the last level, one downsampler; output_blocks has `layers + 1`
    blocks a level, the upsampler sitting beside the level's last block (index 1, or 2 after attention).
    """
    per_level = _layers_per_block(config)
    up_has_attention = {b for b in range(len(config["up_block_types"])) if f"up_blocks.{b}.attentions.0.norm.weight" in state}

    def down_index(block: int, layer: int) -> int:
        return 1 + block * (per_level + 1) + layer

    def up_index(block: int, layer: int) -> int:
        return block * (per_level + 1) + layer

    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"input_blocks.{down_index(int(m[1]), int(m[2]))}.0.{_rename(m[3], _UNET_RESNET)}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda m: f"input_blocks.{down_index(int(m[1]), int(m[2]))}.1.{m[3]}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda m: f"input_blocks.{down_index(int(m[1]), per_level)}.0.op.{m[2]}"),
        (r"mid_block\.resnets\.(\d+)\.(.+)",
         lambda m: f"middle_block.{2 * int(m[1])}.{_rename(m[2], _UNET_RESNET)}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda m: f"middle_block.1.{m[1]}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"output_blocks.{up_index(int(m[1]), int(m[2]))}.0.{_rename(m[3], _UNET_RESNET)}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda m: f"output_blocks.{up_index(int(m[1]), int(m[2]))}.1.{m[3]}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda m: f"output_blocks.{up_index(int(m[1]), per_level)}.{2 if int(m[1]) in up_has_attention else 1}"
         f".conv.{m[2]}"),
        (r"(.+)", lambda m: _rename(m[1], _UNET_FIXED, required=True)),
    ]
    return {_apply_rules(key, rules, "UNet"): value for key, value in state.items()}


def _layers_per_block(config: dict) -> int:
    layers = config["layers_per_block"]
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise ModelLoadError(f"cannot export a UNet with different layers per block ({layers}) to the original layout.")
        layers = layers[0]
    return int(layers)


# --- VAE -----------------------------------------------------------------------------------------


def vae_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL weights -> LDM AutoencoderKL names (without `first_stage_model.`).

    The decoder's levels are numbered from the lowest resolution in diffusers and from the highest
    in LDM, hence `last - i`; mid-block attention projections become 1x1 convolutions.
    """
    last = len(config["up_block_types"]) - 1
    shortcut = {"conv_shortcut.": "nin_shortcut."}
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_rename(m[3], shortcut)}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"decoder.up.{last - int(m[1])}.block.{m[2]}.{_rename(m[3], shortcut)}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda m: f"decoder.up.{last - int(m[1])}.upsample.conv.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
         lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename(m[3], shortcut)}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)",
         lambda m: f"{m[1]}.mid.attn_1.{_rename(m[2], _VAE_ATTENTION, required=True)}"),
        (r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(.+)",
         lambda m: f"{m[1]}.{_rename(m[2] + '.', _VAE_FIXED)}{m[3]}"),
        (r"((?:post_)?quant_conv\..+)", lambda m: m[1]),
    ]
    out = {}
    for key, value in state.items():
        name = _apply_rules(key, rules, "VAE")
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # Linear (out, in) -> Conv2d 1x1 (out, in, 1, 1)
        out[name] = value
    return out


# --- text encoders -------------------------------------------------------------------------------


def clip_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI CLIP (SD 1): the transformers names under `text_model.` (prefix added by the caller)."""
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); older versions keep it.
    return {key.removeprefix("text_model."): value for key, value in state.items()}


def openclip_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel weights -> OpenCLIP text tower names (SD 2, without `cond_stage_model.model.`).

    OpenCLIP keeps q, k and v in one `in_proj` matrix (rows q, then k, then v).

    Note: SD 2's original checkpoints hold all 24 OpenCLIP layers and use the penultimate one;
    diffusers' text encoder keeps only the 23 it uses. The export writes the layers the model has.
    """
    state = {key.removeprefix("text_model."): value for key, value in state.items()}
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}  # "resblocks.i.attn.in_proj_weight" -> {"q": ..., ...}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()  # OpenCLIP multiplies x @ P
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            fused.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
            out[f"transformer.resblocks.{m[1]}.{_rename(m[2], _OPENCLIP_LAYER, required=True)}"] = value
        else:
            raise ModelLoadError(f"cannot export text encoder weight '{key}': the OpenCLIP layout has no name for it.")
    for name, parts in fused.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# --- helpers -------------------------------------------------------------------------------------


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state.items()}


def _rename(name: str, table: dict[str, str], required: bool = False) -> str:
    """Replace the first matching leading part of `name` from `table`."""
    for old, new in table.items():
        if name.startswith(old):
            return new + name[len(old):]
    if required:
        raise KeyError(name)
    return name


def _apply_rules(key: str, rules: list[tuple[str, Callable[[re.Match], str]]], part: str) -> str:
    """The first rule whose pattern matches the whole key gives its new name."""
    for pattern, build in rules:
        if m := re.fullmatch(pattern, key):
            try:
                return build(m)
            except KeyError:
                break
    raise ModelLoadError(f"cannot export {part} weight '{key}': the original layout has no name for it.")

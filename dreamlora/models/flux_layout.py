"""Flux.1's transformer in Black Forest Labs' layout: module names both ways, and the weights as one BFL state dict.

BFL's own files (`flux1-dev.safetensors`, `flux1-schnell.safetensors`), ComfyUI and kohya's sd-scripts name the
transformer's modules by BFL's implementation, which fuses what diffusers' FluxTransformer2DModel splits:

| BFL (`double_blocks.N.` / `single_blocks.N.` + child) | diffusers (`transformer_blocks.N.` / `single_transformer_blocks.N.` + child) |
|---|---|
| `img_attn.qkv` / `txt_attn.qkv` | `attn.to_q`, `.to_k`, `.to_v` / `attn.add_q_proj`, `.add_k_proj`, `.add_v_proj` (stacked along the output) |
| `img_attn.proj` / `txt_attn.proj` | `attn.to_out.0` / `attn.to_add_out` |
| `img_mlp.0`, `.2` / `txt_mlp.0`, `.2` | `ff.net.0.proj`, `ff.net.2` / `ff_context.net.0.proj`, `ff_context.net.2` |
| `img_mod.lin` / `txt_mod.lin` | `norm1.linear` / `norm1_context.linear` |
| `img_attn.norm.query_norm.scale`, ... | `attn.norm_q.weight`, `norm_k`, `norm_added_q`, `norm_added_k` |
| `linear1` (single) | `attn.to_q`, `.to_k`, `.to_v`, `proj_mlp` (stacked) |
| `linear2` / `modulation.lin` (single) | `proj_out` / `norm.linear` |
| `img_in`, `txt_in`, `time_in.*`, `vector_in.*`, `guidance_in.*` | `x_embedder`, `context_embedder`, `time_text_embed.*` |
| `final_layer.linear`, `final_layer.adaLN_modulation.1` | `proj_out`, `norm_out.linear` (shift and scale halves swapped) |

`guidance_in` exists in [dev] only: [schnell] has no guidance embedding. Reading such a file is diffusers' job
(`FluxTransformer2DModel.from_single_file`, loading.py); `bfl_transformer_state_dict` writes one, the inverse of
diffusers' `convert_flux_transformer_checkpoint_to_diffusers`, for `dreamlora export`/`merge` and for tests.
interop/bfl.py uses the same tables for LoRA files.
"""

from __future__ import annotations

import re

import torch

from ..errors import ModelLoadError

MLP_RATIO = 4  # Flux's single blocks: linear1 = q, k, v (each the width) and the MLP's input (4 x the width)
# The prefix ComfyUI saves a diffusion model under (BFL's own files have none).
COMFY_PREFIX = "model.diffusion_model."

# diffusers child of transformer_blocks.N -> (BFL child of double_blocks.N, part of the fused output or None)
DOUBLE = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
          "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
          "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.to_out.0": ("img_attn.proj", None),
          "attn.to_add_out": ("txt_attn.proj", None), "ff.net.0.proj": ("img_mlp.0", None),
          "ff.net.2": ("img_mlp.2", None), "ff_context.net.0.proj": ("txt_mlp.0", None),
          "ff_context.net.2": ("txt_mlp.2", None), "norm1.linear": ("img_mod.lin", None),
          "norm1_context.linear": ("txt_mod.lin", None)}
SINGLE = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
          "proj_mlp": ("linear1", 3), "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None)}
BLOCKS = {"transformer_blocks": ("double_blocks", DOUBLE), "single_transformer_blocks": ("single_blocks", SINGLE)}
FUSED_PARTS = {"img_attn.qkv": 3, "txt_attn.qkv": 3, "linear1": 4}
# Linear modules outside the blocks: diffusers path -> BFL path.
OUTER = {"x_embedder": "img_in", "context_embedder": "txt_in",
         "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
         "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
         "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
         "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
         "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
         "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
         "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
# BFL's final modulation gives (shift, scale), diffusers' AdaLayerNormContinuous (scale, shift): its rows swap halves.
SWAPPED_HALVES = frozenset({"norm_out.linear"})
# q/k RMSNorm weights: diffusers child `<name>.weight` -> BFL's `.scale` parameter.
NORMS = {"transformer_blocks": {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                                "attn.norm_added_q": "txt_attn.norm.query_norm",
                                "attn.norm_added_k": "txt_attn.norm.key_norm"},
         "single_transformer_blocks": {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}}

_BLOCK_WEIGHT = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.(weight|bias)")


def bfl_module(diffusers_module: str) -> tuple[str, int | None] | None:
    """The BFL module holding a diffusers Linear module of the transformer, and its part of a fused output.

    `transformer_blocks.0.attn.to_k` -> (`double_blocks.0.img_attn.qkv`, 1); `proj_out` -> (`final_layer.linear`,
    None); None for a module BFL has no Linear for.
    """
    if diffusers_module in OUTER:
        return OUTER[diffusers_module], None
    match = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", diffusers_module)
    if match is None or match[3] not in BLOCKS[match[1]][1]:
        return None
    block, table = BLOCKS[match[1]]
    child, part = table[match[3]]
    return f"{block}.{match[2]}.{child}", part


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(a; b) -> (b; a) along the output rows: BFL's final modulation order <-> diffusers' (it is its own inverse)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def bfl_transformer_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel's weights under BFL's names (no prefix, as `flux1-dev.safetensors`).

    The inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`: q, k and v (and a single block's
    MLP input) are stacked into one weight, RMSNorm weights become `.scale`, the final modulation swaps its halves.

    Raises:
        ModelLoadError: a weight BFL's layout has no name for (not a Flux transformer).
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        match = _BLOCK_WEIGHT.fullmatch(key)
        if match and match[3] in NORMS[match[1]] and param == "weight":
            out[f"{BLOCKS[match[1]][0]}.{match[2]}.{NORMS[match[1]][match[3]]}.scale"] = tensor
            continue
        placed = bfl_module(module)
        if placed is None:
            raise ModelLoadError(f"cannot export transformer weight '{key}': BFL's Flux layout has no name for it.")
        name, part = placed
        if part is None:
            out[f"{name}.{param}"] = swap_halves(tensor) if module in SWAPPED_HALVES else tensor
        else:
            fused.setdefault(f"{name}.{param}", {})[part] = tensor
    for name, parts in fused.items():
        out[name] = torch.cat([parts[p] for p in sorted(parts)], dim=0)
    return out

"""Flux LoRA files in Black Forest Labs' module names (what kohya's sd-scripts writes and ComfyUI reads), both ways.

BFL's transformer fuses what diffusers splits (the table is in models/flux_layout.py, which names the weights of
single-file transformers the same way): kohya stems are `lora_unet_` + the BFL path with dots as `_`
(`lora_unet_double_blocks_0_img_attn_qkv` for `transformer.transformer_blocks.0.attn.to_q`, `.to_k`, `.to_v`).
CLIP-L is `lora_te1_text_model_encoder_layers_N_…` in BFL files and `text_encoder.text_model.encoder.layers.N.…` in
diffusers ones.

Fusing split adapters is exact: with parts (Aᵢ, Bᵢ) of rank rᵢ and one strength s = αᵢ/rᵢ, the fused adapter has
down = [A_q; A_k; A_v] (Σrᵢ rows), up = blockdiag(B_q, B_k, B_v) (zeros elsewhere, zero rows for a part that was not
adapted, e.g. proj_mlp) and alpha = s·Σrᵢ, so up @ down · alpha/rank is the split updates stacked. The parts' ranks
are kept in the header (`dreamlora.bfl_split`), so splitting back gives the very tensors that went in. A fused
adapter from elsewhere (trained fused, no such entry) splits into parts that share its down matrix: each part is
up's rows for it, at the fused rank and alpha, which is the same update exactly.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import torch

from ..errors import ModelLoadError
from ..models.flux_layout import BLOCKS, FUSED_PARTS, MLP_RATIO, bfl_module
from .formats import LoraModule
from .keymaps import UNET, ModelLayout, ModuleInfo, Style, Target, Tool

SPLIT_KEY = "dreamlora.bfl_split"  # {bfl stem: [[part, rank], ...]}: how a fused adapter was stacked
FLUX1_LINEAR1 = 3 * 3072 + MLP_RATIO * 3072  # outputs of FLUX.1's single-block linear1, where diffusers splits it
TEXT_PREFIX = ("text_encoder.", "lora_te1_")

_DIFFUSERS = re.compile(r"transformer\.(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")
_BFL = re.compile(r"lora_unet_(double_blocks|single_blocks)_(\d+)_(.+)")
_TEXT_WORDS = ("text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj")


def is_flux_file(stems: list[str], metadata: dict[str, str]) -> bool:
    """A Flux LoRA, by its header's architecture or by its module names (either naming)."""
    if metadata.get("modelspec.architecture", "").startswith("flux-1"):
        return True
    return any(_BFL.fullmatch(s) or s.startswith("transformer.single_transformer_blocks.") for s in stems)


def to_bfl(modules: dict[str, LoraModule]) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """diffusers stems -> BFL stems, fusing q/k/v (and a single block's proj_mlp) as BFL fuses them.

    Returns:
        The modules by BFL stem, and the header entries that record how fused ones were stacked.

    Raises:
        ModelLoadError: a module with no BFL name, or parts of one fused module with different strengths.
    """
    out: dict[str, LoraModule] = {}
    fused: dict[str, dict[int, LoraModule]] = {}
    for stem, module in modules.items():
        if stem.startswith(TEXT_PREFIX[0]):
            out[TEXT_PREFIX[1] + stem.removeprefix(TEXT_PREFIX[0]).replace(".", "_")] = module
            continue
        match = _DIFFUSERS.fullmatch(stem)
        table = BLOCKS.get(match.group(1)) if match else None
        if table is None or match.group(3) not in table[1]:
            raise ModelLoadError(f"'{stem}' has no name in BFL's Flux layout (double/single blocks); convert to "
                                 "diffusers keys instead.")
        child, part = table[1][match.group(3)]
        bfl = f"lora_unet_{table[0]}_{match.group(2)}_{child.replace('.', '_')}"
        if part is None:
            out[bfl] = module
        else:
            fused.setdefault(bfl, {})[part] = module
    split = {}
    for bfl, parts in fused.items():
        out[bfl], split[bfl] = _fuse(bfl, parts)
    return out, ({SPLIT_KEY: json.dumps(split, sort_keys=True)} if split else {})


def _fuse(stem: str, parts: dict[int, LoraModule]) -> tuple[LoraModule, list[list[int]]]:
    present = sorted(parts)
    first = parts[present[0]]
    if any(parts[p].magnitude is not None for p in present):
        raise ModelLoadError(f"'{stem}': DoRA adapters cannot be fused into BFL's layout; keep the diffusers keys.")
    if len({parts[p].scale for p in present}) > 1:
        raise ModelLoadError(f"'{stem}': its q/k/v adapters have different strengths (alpha / rank); BFL's fused "
                             "layout holds one. Keep the diffusers keys.")
    # q, k and v are each the model's width; a single block's MLP part 4x
    width = first.up.shape[0] // (MLP_RATIO if present[0] == 3 else 1)
    sizes = [width] * 3 + ([MLP_RATIO * width] if stem.endswith("linear1") else [])
    rank = sum(parts[p].rank for p in present)
    up = torch.zeros(sum(sizes), rank, dtype=first.up.dtype)
    column = 0
    for p in present:
        row = sum(sizes[:p])
        up[row:row + sizes[p], column:column + parts[p].rank] = parts[p].up
        column += parts[p].rank
    down = torch.cat([parts[p].down for p in present])
    alpha = None if first.alpha is None and len(present) == 1 else first.scale * rank
    return LoraModule(down=down, up=up, alpha=alpha), [[p, parts[p].rank] for p in present]


def _reverse_tables() -> tuple[dict, dict]:
    """(BFL block, flat child) -> diffusers child, and -> [diffusers child of each part] for fused ones."""
    plain, fused = {}, {}
    for block, (bfl_block, table) in BLOCKS.items():
        for name, (child, part) in table.items():
            key = (bfl_block, child.replace(".", "_"))
            if part is None:
                plain[key] = (block, name)
            else:
                names = fused.setdefault(key, (block, [None] * FUSED_PARTS[child]))[1]
                names[part] = name
    return plain, fused


PLAIN_NAMES, FUSED_NAMES = _reverse_tables()


def from_bfl(modules: dict[str, LoraModule], metadata: dict[str, str]) -> dict[str, LoraModule]:
    """BFL stems -> diffusers stems, splitting fused modules (exactly as they were fused, when the header says how).

    Raises:
        ModelLoadError: a module with no diffusers name.
    """
    try:
        split = json.loads(metadata.get(SPLIT_KEY, "{}"))
    except json.JSONDecodeError:
        split = {}
    out: dict[str, LoraModule] = {}
    for stem, module in modules.items():
        if stem.startswith(TEXT_PREFIX[1]):
            out[TEXT_PREFIX[0] + _text_path(stem.removeprefix(TEXT_PREFIX[1]))] = module
            continue
        match = _BFL.fullmatch(stem)
        key = (match.group(1), match.group(3)) if match else None
        if key in PLAIN_NAMES:
            block, name = PLAIN_NAMES[key]
            out[f"transformer.{block}.{match.group(2)}.{name}"] = module
        elif key in FUSED_NAMES:
            block, names = FUSED_NAMES[key]
            for part, piece in _split(module, len(names), split.get(stem)).items():
                out[f"transformer.{block}.{match.group(2)}.{names[part]}"] = piece
        else:
            raise ModelLoadError(f"'{stem}' is not a module of BFL's Flux layout that dreamlora converts.")
    return out


def _split(module: LoraModule, parts: int, recorded: list[list[int]] | None) -> dict[int, LoraModule]:
    """The parts of a fused adapter: q, k, v (and a single block's MLP input), by their rows of `up`."""
    width = module.up.shape[0] // (3 + (MLP_RATIO if parts == 4 else 0))
    sizes = [width] * 3 + ([MLP_RATIO * width] if parts == 4 else [])
    starts = [sum(sizes[:i]) for i in range(parts)]
    if recorded:  # stacked by to_bfl: each part's own rows and columns, its own rank and alpha
        out, column = {}, 0
        for part, rank in recorded:
            rows = slice(starts[part], starts[part] + sizes[part])
            alpha = None if module.alpha is None else module.alpha * rank / module.rank
            out[part] = LoraModule(down=module.down[column:column + rank].clone(),
                                   up=module.up[rows, column:column + rank].clone(), alpha=alpha)
            column += rank
        return out
    # Trained fused: every part shares the down matrix, at the fused rank and alpha.
    return {p: replace(module, down=module.down.clone(), up=module.up[starts[p]:starts[p] + sizes[p]].clone(),
                       alpha_dtype=None) for p in range(parts)}


def _text_path(flat: str) -> str:
    """`text_model_encoder_layers_0_self_attn_q_proj` -> `text_model.encoder.layers.0.self_attn.q_proj`."""
    for word in _TEXT_WORDS:
        flat = flat.replace(word, word.replace("_", "\0"))
    return flat.replace("_", ".").replace("\0", "_")


class BflLayout(ModelLayout):
    """A Flux model's modules as kohya files name them (sd-scripts, ComfyUI, `dreamlora convert --to kohya`).

    The transformer's Linear modules are BFL's, q/k/v fused: `Target("unet", "double_blocks.0.img_attn.qkv")` with
    the fused weight's shape (the parts' outputs stacked); the text encoders are the model's. What each tool does:

    - ComfyUI loads `lora_unet_` + any BFL weight path of the model (Forge too: its LoRA key maps are ComfyUI's);
    - diffusers' Flux reader (`_convert_kohya_flux_lora_to_diffusers`) takes the double and single blocks and
      CLIP-L (`lora_te_`, `lora_te1_`), each at its own alpha; the embedders and the final layer it names without
      `transformer.`, so its loader drops them, and T5 keys (`lora_te2_`) it leaves out. It splits a single block's
      linear1 at FLUX.1's widths: a file of other widths fails as a whole;
    - AUTOMATIC1111 runs no Flux model.
    """

    kohya_names = "Black Forest Labs' Flux module names"
    diffusers_reads_each_kohya_alpha = True

    @classmethod
    def of(cls, layout: ModelLayout) -> ModelLayout:
        """The layout kohya files of this model are read with: BFL's for a Flux transformer (it has single-stream
        blocks), `layout` itself for any other model."""
        if not any(t.component == UNET and t.module.startswith("single_transformer_blocks.") for t in layout.modules):
            return layout
        parts: dict[Target, dict[int, ModuleInfo]] = {}
        modules = {t: info for t, info in layout.modules.items() if t.component != UNET}
        for target, info in layout.modules.items():
            placed = bfl_module(target.module) if target.component == UNET else None
            if placed is not None:
                parts.setdefault(Target(UNET, placed[0]), {})[placed[1] or 0] = info
        for target, infos in parts.items():
            stacked = [infos[p] for p in sorted(infos)]
            modules[target] = ModuleInfo("linear", (sum(i.shape[0] for i in stacked), stacked[0].shape[1]))
        return cls(family=layout.family, unet_config=layout.unet_config, modules=modules, order=layout.order,
                   installed={t: name for t, name in layout.installed.items() if t.component != UNET})

    def resolve(self, tool: Tool, style: Style, stem: str) -> Target | None:
        if tool == "automatic1111":
            return None
        if tool == "diffusers" and style == "kohya":
            if stem.startswith("lora_unet_"):
                return self.read(style, stem) if _BFL.fullmatch(stem) else None
            if stem.startswith("lora_te2_"):
                return None
        return super().resolve(tool, style, stem)

    def unsupported(self, tool: Tool) -> str | None:
        if tool == "automatic1111":
            return ("runs no Flux model; Forge, which does, reads Flux LoRA keys with ComfyUI's rules (the ComfyUI "
                    "line)")
        return super().unsupported(tool)

    def file_refusal(self, tool: Tool, style: Style, modules: dict[str, LoraModule]) -> str | None:
        refusal = super().file_refusal(tool, style, modules)
        if refusal or tool != "diffusers" or style != "kohya":
            return refusal
        widths = sorted({int(m.up.shape[0]) for stem, m in modules.items()
                         if re.fullmatch(r"lora_unet_single_blocks_\d+_linear1", stem)} - {FLUX1_LINEAR1})
        if widths:
            return (f"splits single blocks' linear1 at FLUX.1's widths (3 x 3072 + 12288 = {FLUX1_LINEAR1} outputs); "
                    f"this file's have {widths[0]}, so it refuses the whole file")
        return None

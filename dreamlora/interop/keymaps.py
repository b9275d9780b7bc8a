"""Which module of a base model each tool patches with a LoRA file's key: AUTOMATIC1111/Forge, ComfyUI, diffusers.

A LoRA file names each adapted module by a *stem* (the key without `.lora_down.weight`, `.alpha`, ...). The three
tools spell stems differently and resolve them differently; `ModelLayout.resolve(tool, style, stem)` answers, for one
base model, which module a tool would patch (or None: the tool logs the key as not loaded and skips it). dreamlora's
own rules are written from the tools' public source (the table is in docs/interop.md):

AUTOMATIC1111 / Forge (`extensions-builtin/Lora/networks.py`): reads kohya keys only, the stem being everything
before the first dot. A stem is rewritten from diffusers to original (LDM) names by fixed rules (SD 1.x/2.x block
numbers, with two resnets a level), then looked up among the model's modules named by their original path with dots
as underscores (`diffusion_model_input_blocks_1_1_...`, `transformer_text_model_...` for SD 1's CLIP,
`model_transformer_resblocks_N_attn` for SD 2's OpenCLIP, where `_q_proj/_k_proj/_v_proj` select a slice of the fused
`in_proj`; SDXL's encoders are `0_transformer_...` and `1_model_...`). Failing that, `lora_unet_` becomes
`diffusion_model_` as it is (the SGM names SDXL files use) and `lora_te1_text_model` becomes `0_transformer_text_model`
or `transformer_text_model`. Only encoder layers of the text model are reachable.

ComfyUI (`comfy/lora.py`, `model_lora_keys_unet` / `model_lora_keys_clip`): builds a key map from the model. UNet:
`lora_unet_` + the module's original path or its diffusers path (dots as underscores), and the older diffusers
attention-processor names `unet.<attention>.processor.to_q` (with or without `unet.`). Text: the six layer modules
`self_attn.{q,k,v,out}_proj` and `mlp.fc1/fc2` of each encoder as `lora_te_`, `lora_te1_` (CLIP-L, or CLIP-H for SD 2),
`lora_te2_` (SDXL's CLIP-G) and diffusers' `text_encoder(_2).text_model.encoder.layers.N...`; `text_projection` as
`lora_te1_`/`lora_te2_text_projection`. It reads kohya, peft (`lora_A/lora_B`) and older diffusers parts, and alpha
only from `.alpha` tensors. So a peft UNet key (`unet.down_blocks...to_q.lora_A.weight`) is not loaded; SD3's and
Flux's `transformer.<diffusers path>` keys are (it maps them onto its own, BFL-style, modules). Flux's kohya files
name BFL's modules (interop/bfl.py's `BflLayout`).

diffusers (`loaders/lora_conversion_utils.py`, `loaders/lora_pipeline.py`): a file whose every key starts with
`lora_unet_`/`lora_te_`/`lora_te1_`/`lora_te2_` is kohya's: underscores become dots and known compound names are
joined again, SGM/LDM block names are renumbered by the UNet's config, `lora_te_`/`lora_te1_` go to `text_encoder`
and `lora_te2_` to `text_encoder_2`. Other files are peft keys under `unet.`/`text_encoder.`/`text_encoder_2.`, or the
older attention-processor keys, which it rewrites to peft's. It drops kohya `dora_scale` keys (with a warning).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    import torch

    from ..models.configs import ModelConfigs
    from ..models.family import ModelFamily, TextEncoderNaming
    from .formats import LoraModule

Tool = Literal["automatic1111", "comfyui", "diffusers"]
TOOLS: tuple[Tool, ...] = ("automatic1111", "comfyui", "diffusers")
TOOL_TITLES = {"automatic1111": "AUTOMATIC1111/Forge", "comfyui": "ComfyUI", "diffusers": "diffusers"}

# How a file spells its keys. "attn-procs": diffusers' LoRA layout before peft (0.14-0.21): `<attention>.processor.
# to_q_lora.down.weight`, text `<module>.lora_linear_layer.down.weight`, or `<module>.lora.down.weight`.
Style = Literal["kohya", "peft", "attn-procs", "cloneofsimo"]
# The tools each style is written for: a key one of them cannot place is an error, not a note.
READERS: dict[str, tuple[Tool, ...]] = {
    "kohya": TOOLS,
    "peft": ("diffusers",),
    "attn-procs": ("comfyui", "diffusers"),
    "cloneofsimo": (),
}

UNET = "unet"
# diffusers takes a file for kohya's only when every key starts with one of these.
DIFFUSERS_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")

# The six text-encoder layer modules ComfyUI maps (its LORA_CLIP_MAP).
_COMFY_CLIP_MODULES = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj",
                       "self_attn.out_proj")
# transformers CLIP layer module -> OpenCLIP resblock module, as AUTOMATIC1111 names them (q/k/v: in_proj slices).
_OPENCLIP_MODULES = {"self_attn.q_proj": "attn_q_proj", "self_attn.k_proj": "attn_k_proj",
                     "self_attn.v_proj": "attn_v_proj", "self_attn.out_proj": "attn_out_proj",
                     "mlp.fc1": "mlp_c_fc", "mlp.fc2": "mlp_c_proj"}
# AUTOMATIC1111's rewrite of a diffusers resnet child to its LDM name (its suffix_conversion table).
_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
# Words of diffusers module paths that contain an underscore: reading a kohya stem splits on "_" and joins these again
# (what diffusers' replace rules amount to for the modules LoRA files adapt).
_DIFFUSERS_COMPOUNDS = ("down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v",
                        "to_out", "proj_in", "proj_out", "conv_in", "conv_out", "conv_shortcut", "time_emb_proj",
                        "time_embedding", "add_embedding", "linear_1", "linear_2", "text_model", "self_attn",
                        "q_proj", "k_proj", "v_proj", "out_proj", "text_projection")


@dataclass(frozen=True, order=True)
class Target:
    """One LoRA-able module of a base model."""

    component: str  # "unet", "text_encoder", "text_encoder_2" (diffusers' names of the pipeline's parts)
    module: str  # its diffusers path; text encoders as transformers 4.x spells it (`text_model.encoder...`)


@dataclass(frozen=True)
class ModuleInfo:
    kind: Literal["linear", "conv"]
    shape: tuple[int, ...]  # the weight's shape: (out, in) or (out, in, kh, kw)


@dataclass
class ModelLayout:
    """A base model's LoRA-able modules (Linear and Conv2d weights) and every tool's names for them.

    Build it with `from_modules` (live models, adapters or not) or `from_configs` (meta device, no weights).
    """

    # How kohya files name this model's modules, when not as the family's own kohya keys do (shown by the check).
    kohya_names: ClassVar[str | None] = None
    # Whether diffusers applies each kohya module at its own alpha (its SD reader gives UNet modules the file's
    # most common one; see check._tool_notes).
    diffusers_reads_each_kohya_alpha: ClassVar[bool] = False

    family: ModelFamily
    unet_config: dict
    modules: dict[Target, ModuleInfo]
    # Every module of each component in named_modules() order, with its class name: cloneofsimo's files number
    # modules in that order.
    order: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    installed: dict[Target, str] = field(default_factory=dict)  # the module's name in the loaded model

    # --- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_modules(cls, family: ModelFamily, unet: torch.nn.Module, text_encoders: list) -> ModelLayout:
        """The layout of live (or meta) modules; peft's adapter layers count as the layer they wrap."""
        from ..lora import _text_role_name

        modules: dict[Target, ModuleInfo] = {}
        order: dict[str, list[tuple[str, str]]] = {}
        installed: dict[Target, str] = {}
        namings = family.text_encoder_naming
        parts = [(UNET, unet, False)] + [(namings[i].diffusers_prefix, te, True) for i, te in enumerate(text_encoders)]
        for component, model, is_text in parts:
            listed = order.setdefault(component, [])
            for name, module in model.named_modules():
                if _is_adapter_internal(name):
                    continue
                base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
                path = _text_role_name(name) if is_text and name else name
                listed.append((path, type(base).__name__))
                info = _module_info(base)
                if info is not None:
                    modules[Target(component, path)] = info
                    installed[Target(component, path)] = name
        return cls(family=family, unet_config=dict(unet.config), modules=modules, order=order, installed=installed)

    @classmethod
    def from_configs(cls, configs: ModelConfigs) -> ModelLayout:
        """The layout of a model known by its configs alone, built on the meta device (no weights are read).

        Raises:
            ModelLoadError: the configs describe a model dreamlora does not support.
        """
        from ..memory.meta import meta_text_encoder, meta_unet
        from ..models.registry import detect_family

        family = detect_family(configs)
        return cls.from_modules(family, meta_unet(configs.unet), [meta_text_encoder(c) for c in configs.text_encoders])

    # --- names dreamlora writes ---------------------------------------------------------------------------------

    @property
    def components(self) -> list[str]:
        return [UNET] + [n.diffusers_prefix for n in self.family.text_encoder_naming]

    def naming(self, component: str) -> TextEncoderNaming:
        return next(n for n in self.family.text_encoder_naming if n.diffusers_prefix == component)

    def kohya_stem(self, target: Target) -> str:
        """`lora_unet_...` (the family's UNet names) or `lora_te_...`/`lora_te1_...` for a module."""
        if target.component == UNET:
            return self.family.kohya_unet_key(target.module, self.unet_config)
        return f"{self.naming(target.component).kohya_prefix}_{target.module.replace('.', '_')}"

    def peft_stem(self, target: Target) -> str:
        """`unet.<path>` (`transformer.<path>` for SD3/Flux) / `text_encoder.<path>`: diffusers' (peft) key stem."""
        component = self.family.denoiser_prefix if target.component == UNET else target.component
        return f"{component}.{target.module}"

    def stem(self, target: Target, style: Style) -> str:
        if style == "kohya":
            return self.kohya_stem(target)
        if style == "peft":
            return self.peft_stem(target)
        raise ValueError(f"dreamlora writes kohya or peft keys, not {style!r}")

    # --- names dreamlora reads ----------------------------------------------------------------------------------

    def read(self, style: Style, stem: str) -> Target | None:
        """The module a stem names, under every spelling dreamlora reads (the union of the tools' spellings)."""
        if style == "kohya":
            return self._kohya_index.get(stem)
        if style == "peft":
            return self._peft_target(stem)
        if style == "attn-procs":
            return self._peft_target(attn_procs_to_peft(stem))
        raise ValueError(f"{style!r} stems are resolved by the reader (formats.py), not by name")

    @cached_property
    def _kohya_index(self) -> dict[str, Target]:
        index: dict[str, Target] = {}
        namings = self.family.text_encoder_naming
        for target in self.modules:
            if target.component == UNET:
                # kohya SD files use diffusers paths, SDXL files SGM paths, and other trainers the other one.
                index.setdefault("lora_unet_" + target.module.replace(".", "_"), target)
                original = self._original(target.module)
                if original:
                    index.setdefault("lora_unet_" + original.replace(".", "_"), target)
                continue
            naming = self.naming(target.component)
            flat = target.module.replace(".", "_")
            index.setdefault(f"{naming.kohya_prefix}_{flat}", target)
            if naming == namings[0]:  # the first encoder: files of one-encoder models say lora_te or lora_te1
                index.setdefault(f"lora_te_{flat}", target)
                index.setdefault(f"lora_te1_{flat}", target)
        return index

    def _peft_target(self, stem: str) -> Target | None:
        component, dot, path = stem.partition(".")
        if dot and component == self.family.denoiser_prefix:
            component = UNET  # SD3/Flux files say transformer.: the denoiser, whatever the pipeline calls it
        if not dot or component not in self.components:
            component, path = UNET, stem  # unprefixed keys: a UNet's own save (save_attn_procs)
        if component != UNET and not path.startswith("text_model.") and path.split(".", 1)[0] in _TEXT_CHILDREN:
            path = "text_model." + path  # transformers 5.x dropped the text_model level
        target = Target(component, path)
        return target if target in self.modules else None

    def _original(self, module: str) -> str | None:
        try:
            return self.family.original_unet_module(module, self.unet_config)
        except ValueError:
            return None

    # --- what each tool does with a stem ------------------------------------------------------------------------

    def resolve(self, tool: Tool, style: Style, stem: str) -> Target | None:
        """The module `tool` patches with a stem of a file in `style`; None when it does not load it."""
        if tool == "automatic1111":
            return self._a1111(stem) if style == "kohya" else None
        if tool == "comfyui":
            return self._comfy_map.get(stem) if style in ("kohya", "peft", "attn-procs") else None
        if tool == "diffusers":
            if style == "kohya":
                return self._diffusers_kohya(stem)
            if style in ("peft", "attn-procs"):
                return self.read(style, stem)
        return None

    def unsupported(self, tool: Tool) -> str | None:
        """Why `tool` does not load LoRA files into this model at all (its keys are then not held to its rules)."""
        if tool == "automatic1111" and not self.a1111_loads_unet:
            return ("loads only UNets with two resnets a level (SD's), which its LoRA key rules assume; this base "
                    "model is not one, so its keys are not held to them")
        return None

    def file_refusal(self, tool: Tool, style: Style, modules: dict[str, LoraModule]) -> str | None:
        """Why `tool` refuses a whole file of these modules (then it loads none of them), or None."""
        if tool == "diffusers" and style == "kohya" and not all(s.startswith(DIFFUSERS_KOHYA_PREFIXES) for s in modules):
            return ("takes a file for kohya's only when every key starts with lora_unet_, lora_te_, lora_te1_ or "
                    "lora_te2_")
        return None

    # AUTOMATIC1111 / Forge

    @cached_property
    def _a1111_names(self) -> dict[str, Target]:
        """AUTOMATIC1111's network layer names (original module paths, dots as underscores) -> module."""
        names: dict[str, Target] = {}
        for target in self.modules:
            if target.component == UNET:
                original = self._original(target.module)
                if original:
                    names["diffusion_model_" + original.replace(".", "_")] = target
                continue
            naming = self.naming(target.component)
            if not naming.openclip:
                names[naming.a1111_prefix + target.module.replace(".", "_")] = target
                continue
            m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", target.module)
            if m and m[2] in _OPENCLIP_MODULES:
                names[f"{naming.a1111_prefix}transformer_resblocks_{m[1]}_{_OPENCLIP_MODULES[m[2]]}"] = target
        return names

    @cached_property
    def a1111_loads_unet(self) -> bool:
        """AUTOMATIC1111's rules number an SD UNet's blocks for two resnets a level (its SD 1/2 configs); a UNet of
        another depth (the built-in toy model) is no model it loads, so its keys are not held to those rules. SDXL
        files use original names, which need no numbering."""
        layers = self.unet_config.get("layers_per_block", 2)
        layers = set(layers) if isinstance(layers, (list, tuple)) else {layers}
        return layers == {2} or self.family.kohya_unet_key("conv_in", self.unet_config) != "lora_unet_conv_in"

    @cached_property
    def _a1111_is_sd2(self) -> bool:
        # AUTOMATIC1111 takes a model for SD 2 when it has an (unprefixed) OpenCLIP encoder.
        return any(n.openclip and n.a1111_prefix == "model_" for n in self.family.text_encoder_naming)

    def _a1111(self, stem: str) -> Target | None:
        names = self._a1111_names
        found = names.get(a1111_rewrite(stem, self._a1111_is_sd2))
        if found is None and "lora_unet" in stem:
            found = names.get(stem.replace("lora_unet", "diffusion_model"))
        elif found is None and "lora_te1_text_model" in stem:
            found = names.get(stem.replace("lora_te1_text_model", "0_transformer_text_model")) or \
                names.get(stem.replace("lora_te1_text_model", "transformer_text_model"))
        return found

    # ComfyUI

    @cached_property
    def _comfy_map(self) -> dict[str, Target]:
        key_map: dict[str, Target] = {}
        for target in self.modules:
            if target.component != UNET:
                continue
            original = self._original(target.module)
            if original:
                key_map["lora_unet_" + original.replace(".", "_")] = target
            key_map["lora_unet_" + target.module.replace(".", "_")] = target
            if self.family.denoiser_prefix == "transformer":  # SD3's and Flux's diffusers keys (its q/k/v slices)
                key_map[f"transformer.{target.module}"] = target
            procs = target.module.replace(".to_", ".processor.to_")
            if procs.endswith(".to_out.0"):
                procs = procs[:-2]
            key_map[procs] = key_map["unet." + procs] = target
        namings = self.family.text_encoder_naming
        clip_l = any(n.comfy_name == "clip_l" for n in namings)
        for naming in namings:
            component = naming.diffusers_prefix
            for target in self.modules:
                if target.component != component:
                    continue
                if target.module == "text_projection":
                    if naming.comfy_name in ("clip_g", "clip_l"):
                        key_map[f"lora_te{2 if naming.comfy_name == 'clip_g' else 1}_text_projection"] = target
                    continue
                m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", target.module)
                if not m or m[2] not in _COMFY_CLIP_MODULES or int(m[1]) >= 32:
                    continue
                flat = f"text_model_encoder_layers_{m[1]}_{m[2].replace('.', '_')}"
                if naming.comfy_name in ("clip_h", "clip_l") or not clip_l:
                    key_map[f"lora_te_{flat}"] = target
                    key_map[f"text_encoder.{target.module}"] = target
                    if naming.comfy_name == "clip_g":
                        key_map[f"lora_prior_te_{flat}"] = target
                    else:
                        key_map[f"lora_te1_{flat}"] = target
                else:  # SDXL's CLIP-G beside CLIP-L
                    key_map[f"lora_te2_{flat}"] = target
                    key_map[f"text_encoder_2.{target.module}"] = target
        return key_map

    # diffusers

    def _diffusers_kohya(self, stem: str) -> Target | None:
        if stem.startswith("lora_unet_"):
            rest = stem.removeprefix("lora_unet_")
            if re.match(r"(input_blocks|middle_block|output_blocks)_", rest) or rest.startswith(("time_embed_",
                                                                                               "label_emb_", "out_")):
                path = self._from_original(rest)
            else:
                path = join_compounds(rest)
            target = Target(UNET, path) if path else None
        else:
            m = re.match(r"lora_te([12]?)_(.+)", stem)
            if not m:
                return None
            index = 1 if m[1] == "2" else 0
            namings = self.family.text_encoder_naming
            if index >= len(namings):
                return None
            target = Target(namings[index].diffusers_prefix, join_compounds(m[2]))
        return target if target in self.modules else None

    @cached_property
    def _original_index(self) -> dict[str, str]:
        return {o.replace(".", "_"): t.module for t in self.modules if t.component == UNET
                for o in [self._original(t.module)] if o}

    def _from_original(self, flat: str) -> str | None:
        return self._original_index.get(flat)


# transformers' CLIPTextTransformer children, which 5.x hoists to the top of CLIPTextModel (see lora._text_role_name).
_TEXT_CHILDREN = ("embeddings", "encoder", "final_layer_norm")


def _is_adapter_internal(name: str) -> bool:
    """peft's modules inside an adapted layer (base_layer, lora_A.default, lora_dropout, ...)."""
    return any(part == "base_layer" or part.startswith("lora_") for part in name.split("."))


def _module_info(module) -> ModuleInfo | None:
    import torch

    if isinstance(module, torch.nn.Linear):  # bitsandbytes' layers too: their weights are packed, their sizes not
        return ModuleInfo("linear", (module.out_features, module.in_features))
    if isinstance(module, torch.nn.Conv2d) and module.groups == 1:
        return ModuleInfo("conv", tuple(module.weight.shape))
    return None


def join_compounds(flat: str) -> str:
    """`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0` -> `down_blocks.0...attn1.to_out.0`."""
    parts: list[str] = []
    for word in flat.split("_"):
        if parts and f"{parts[-1]}_{word}" in _COMPOUND_PREFIXES:
            parts[-1] = f"{parts[-1]}_{word}"
        else:
            parts.append(word)
    return ".".join(parts)


# Every leading run of words of a compound (time_emb of time_emb_proj): joining grows word by word.
_COMPOUND_PREFIXES = frozenset("_".join(c.split("_")[:n]) for c in _DIFFUSERS_COMPOUNDS
                               for n in range(2, c.count("_") + 2))


def attn_procs_to_peft(stem: str) -> str:
    """An older diffusers stem -> the peft stem of the same module.

    `unet.X.attn1.processor.to_out` (from `to_out_lora.down.weight`) -> `unet.X.attn1.to_out.0`; text stems
    (`text_encoder.X.q_proj`, from `.lora_linear_layer.`) are already module paths.
    """
    if ".processor." in stem:
        stem = stem.replace(".processor.", ".")
        if stem.endswith(".to_out"):
            stem += ".0"
    return stem


def a1111_rewrite(stem: str, is_sd2: bool) -> str:
    """AUTOMATIC1111's rewrite of a kohya stem in diffusers names to its network layer name (networks.py's rules).

    Its block numbers assume SD's UNet: two resnets a level (3 blocks a level) and no attention in the first up
    level (its upsampler at `.1`); a stem it does not recognise is returned unchanged.
    """
    def m(pattern: str) -> re.Match | None:
        return re.fullmatch(pattern, stem)

    if r := m(r"lora_unet_conv_in(.*)"):
        return f"diffusion_model_input_blocks_0_0{r[1]}"
    if r := m(r"lora_unet_conv_out(.*)"):
        return f"diffusion_model_out_2{r[1]}"
    if r := m(r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{int(r[1]) * 2 - 2}{r[2]}"
    if r := m(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        rest = _A1111_RESNET.get(r[4], r[4]) if r[2] == "resnets" else r[4]
        return f"diffusion_model_input_blocks_{1 + int(r[1]) * 3 + int(r[3])}_{1 if r[2] == 'attentions' else 0}_{rest}"
    if r := m(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        rest = _A1111_RESNET.get(r[3], r[3]) if r[1] == "resnets" else r[3]
        return f"diffusion_model_middle_block_{1 if r[1] == 'attentions' else int(r[2]) * 2}_{rest}"
    if r := m(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        rest = _A1111_RESNET.get(r[4], r[4]) if r[2] == "resnets" else r[4]
        return f"diffusion_model_output_blocks_{int(r[1]) * 3 + int(r[3])}_{1 if r[2] == 'attentions' else 0}_{rest}"
    if r := m(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + int(r[1]) * 3}_0_op"
    if r := m(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + int(r[1]) * 3}_{2 if int(r[1]) > 0 else 1}_conv"
    if r := m(r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        if is_sd2:
            return f"model_transformer_resblocks_{r[1]}_{_openclip_rest(r[2])}"
        return f"transformer_text_model_encoder_layers_{r[1]}_{r[2]}"
    if r := m(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"):
        return f"1_model_transformer_resblocks_{r[1]}_{_openclip_rest(r[2])}"
    return stem


def _openclip_rest(rest: str) -> str:
    if "mlp_fc1" in rest:
        return rest.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in rest:
        return rest.replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")

"""The compatibility check: will each tool load a LoRA file into this base model, and load it as trained?

Run before dreamlora writes any LoRA file (training, convert, merge, extract) and by `dreamlora check FILE`. For one
file and one base model it asks:

- every key names a module of the model (dreamlora reads every tool's spelling), and its shapes fit that module's
  weight (down (r, in[, kh, kw]), up (out, r[, 1, 1]), DoRA magnitudes one per output row or input column);
- each tool (AUTOMATIC1111/Forge, ComfyUI, diffusers; see keymaps.py) places every key on that same module. A key
  a tool the file's format is written for cannot place, or places on another module, is an error naming the keys;
  the other tools are reported (a diffusers file is not for AUTOMATIC1111);
- the header's version entries (`ss_base_model_version`, `ss_v2`, `modelspec.architecture`,
  `modelspec.prediction_type`) are the base model family's, and each format's header says only what its readers
  should believe: no kohya `ss_*` entries in a diffusers file, no `lora_adapter_metadata` in a kohya file.

What a tool does differently from training without failing (ComfyUI's alpha = rank for diffusers keys, DoRA handling)
is a note. A Flux model's kohya files name Black Forest Labs' modules, q/k/v fused (`lora_unet_double_blocks_0_img_
attn_qkv`): they are checked against those fused modules and each tool's rules for them (bfl.BflLayout).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, ModelLoadError
from .formats import DIFFUSERS_METADATA_KEY, LoraData, LoraModule, parse_lora, read_lora, state_dict, to_targets
from .keymaps import READERS, TOOL_TITLES, TOOLS, ModelLayout, Target, Tool

VERSION_KEYS = ("ss_base_model_version", "ss_v2", "modelspec.architecture", "modelspec.prediction_type")
SHOWN = 3  # keys named in a message


class CompatibilityError(ModelLoadError):
    """A LoRA file that a tool it is written for would not load (fully, or onto the right modules) into the model."""


@dataclass
class ToolResult:
    """What one tool does with the file."""

    tool: Tool
    intended: bool  # the file's format is written for this tool
    loaded: int  # modules it places on the module they were trained for
    total: int
    not_loaded: list[str] = field(default_factory=list)  # stems it skips
    misplaced: list[str] = field(default_factory=list)  # stems it puts on another module
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return TOOL_TITLES[self.tool]

    @property
    def ok(self) -> bool:
        return self.loaded == self.total


@dataclass
class CompatibilityReport:
    file: str
    style: str  # kohya, peft (diffusers), attn-procs (older diffusers), cloneofsimo
    family: str
    modules: int
    tools: list[ToolResult]
    errors: list[str]
    notes: list[str]
    names: str | None = None  # the module names a kohya file uses when not the family's own (Flux: BFL's)

    def raise_for_errors(self) -> None:
        """Raises CompatibilityError listing every error, if there is one."""
        if self.errors:
            raise CompatibilityError(f"'{self.file}' does not fit the {self.family} base model: "
                                     + "; ".join(self.errors))


def check_lora(data: LoraData, layout: ModelLayout) -> CompatibilityReport:
    """Check a parsed LoRA file against a base model's layout (see the module docstring)."""
    from .bfl import BflLayout

    if data.style == "kohya":
        layout = BflLayout.of(layout)  # Flux's kohya files name BFL's modules (q/k/v fused), not diffusers'
    errors: list[str] = []
    notes: list[str] = []
    own = _own_targets(data, layout, errors)
    errors.extend(_shape_problems(data, layout, own))
    errors.extend(_version_problems(data, layout))
    tools = [_tool_result(tool, data, layout, own) for tool in TOOLS]
    for result in tools:
        if not result.intended:
            continue
        if result.not_loaded:
            errors.append(f"{result.title} would not load {len(result.not_loaded)} of {result.total} modules "
                          f"({_some(result.not_loaded)})")
        if result.misplaced:
            errors.append(f"{result.title} would put {len(result.misplaced)} modules on other layers of this "
                          f"model ({_some(result.misplaced)})")
    errors.extend(_format_header_problems(data))
    notes.extend(_hash_notes(data))
    if data.embeddings:
        notes.append(f"{len(data.embeddings)} bundled embedding tensors ({_some(sorted(data.embeddings))}) are not "
                     "LoRA weights and are not checked: AUTOMATIC1111 registers them as embeddings and dreamlora "
                     "sample/eval load them; diffusers' load_lora_weights refuses a file holding them (`dreamlora "
                     "convert` writes the adapters alone)")
    return CompatibilityReport(file=data.source, style=data.style, family=layout.family.name,
                               modules=len(data.modules), tools=tools, errors=errors, notes=notes,
                               names=layout.kohya_names)


def check_file(path: str | Path, model: str | None = None, single_file_config: str | None = None) -> CompatibilityReport:
    """Read a LoRA file and check it against `model` (default: the model its dreamlora metadata names).

    Raises:
        ConfigError: no model given and the file names none that can be found.
        ModelLoadError: the file or the model's configs cannot be read.
    """
    from .bfl import is_flux_file

    data = read_lora(path)
    if model is None and stored_model_name(data.metadata) is None and is_flux_file(list(data.modules), data.metadata):
        raise ConfigError(f"'{data.source}' is a Flux.1 LoRA that does not say which Flux model it was made for; pass "
                          "it with --model (a hub id such as black-forest-labs/FLUX.1-dev, a diffusers folder, or a "
                          "transformer file with --model-config).")
    layout = layout_for(model, data.metadata, data.source, single_file_config)
    return check_lora(data, layout)


def check_before_write(tensors: dict[str, torch.Tensor], header: dict[str, str], layout: ModelLayout,
                       name: str) -> CompatibilityReport:
    """The check dreamlora runs on a file it is about to write (the tensors and header as they will be written).

    Raises:
        CompatibilityError: naming the keys a tool the format is written for would not load as trained.
    """
    report = check_lora(parse_lora(tensors, header, name), layout)
    report.raise_for_errors()
    return report


def layout_for(model: str | None, metadata: dict[str, str], source: str,
               single_file_config: str | None = None) -> ModelLayout:
    """The layout of `model`, or of the model a dreamlora file's metadata names; built from configs, no weights.

    Raises:
        ConfigError: no model given and the file names none.
        ModelLoadError: the model's configs cannot be found.
    """
    from ..models.configs import read_model_configs

    if model is None:
        model = stored_model_name(metadata)
        if model is None:
            raise ConfigError(f"'{source}' does not say which base model it was made for; pass it with --model "
                              "(a hub id, a diffusers folder, or builtin:<name>).")
        try:
            return ModelLayout.from_configs(read_model_configs(model, single_file_config))
        except ModelLoadError as exc:
            raise ConfigError(f"'{source}' was made for '{model}', which cannot be read here ({exc}); pass the model "
                              "with --model.") from exc
    return ModelLayout.from_configs(read_model_configs(model, single_file_config))


def stored_model_name(metadata: dict[str, str]) -> str | None:
    """The base model a dreamlora file's stored config names, if any."""
    import json

    try:
        config = json.loads(metadata.get("dreamlora.config", "{}"))
    except json.JSONDecodeError:
        return None
    name = config.get("model", {}).get("name") if isinstance(config, dict) and isinstance(config.get("model"), dict) \
        else None
    return name if isinstance(name, str) and name else None


# ---------------------------------------------------------------------------------------------------------------


def _own_targets(data: LoraData, layout: ModelLayout, errors: list[str]) -> dict[str, Target]:
    """Each stem's module under dreamlora's reading (every tool's spellings); unplaceable stems become an error."""
    if data.style == "cloneofsimo":
        try:
            by_target = to_targets(data, layout)
        except ModelLoadError as exc:
            errors.append(str(exc))
            return {}
        inverse = {id(m): t for t, m in by_target.items()}
        return {stem: inverse[id(m)] for stem, m in data.modules.items()}
    found, unknown = {}, []
    for stem in data.modules:
        target = layout.read(data.style, stem)
        if target is None:
            unknown.append(stem)
        else:
            found[stem] = target
    if unknown:
        errors.append(f"{len(unknown)} of {len(data.modules)} modules name no module of the model "
                      f"({_some(unknown)}): misspelt, or made for another model")
    return found


def _shape_problems(data: LoraData, layout: ModelLayout, own: dict[str, Target]) -> list[str]:
    problems = []
    for stem, target in own.items():
        module, info = data.modules[stem], layout.modules[target]
        problem = shape_problem(module, info.kind, info.shape)
        if problem:
            problems.append(f"'{stem}' {problem} ({target.component} module '{target.module}', weight "
                            f"{tuple(info.shape)})")
    return problems[:SHOWN] + ([f"and {len(problems) - SHOWN} more shape mismatches"] if len(problems) > SHOWN else [])


def shape_problem(module: LoraModule, kind: str, shape: tuple[int, ...]) -> str | None:
    """What is wrong with a module's shapes for a layer of this kind and weight shape; None when they fit."""
    down, up = module.down, module.up
    out, inputs = shape[0], shape[1]
    if kind == "linear" and down.dim() != 2:
        return f"has a {down.dim()}-D down weight for a Linear layer"
    if kind == "conv":
        if down.dim() != 4:
            return "has a 2-D down weight for a Conv2d layer (kohya files store (rank, in, kh, kw))"
        if tuple(down.shape[2:]) != tuple(shape[2:]) or tuple(up.shape[2:]) != (1, 1):
            return f"has kernels {tuple(down.shape[2:])} / {tuple(up.shape[2:])} for a {tuple(shape[2:])} convolution"
    if int(down.shape[1]) != inputs:
        return f"takes {down.shape[1]} inputs (down {tuple(down.shape)}), the layer {inputs}"
    if int(up.shape[0]) != out:
        return f"gives {up.shape[0]} outputs (up {tuple(up.shape)}), the layer {out}"
    if module.magnitude is not None:
        want = out if module.magnitude_axis == "out" else inputs
        if module.magnitude.numel() != want:
            return f"has {module.magnitude.numel()} DoRA magnitudes, the layer {want} {module.magnitude_axis}puts"
    return None


def _tool_result(tool: Tool, data: LoraData, layout: ModelLayout, own: dict[str, Target]) -> ToolResult:
    stems = list(data.modules)
    result = ToolResult(tool=tool, intended=tool in READERS.get(data.style, ()), loaded=0, total=len(stems))
    if data.style == "cloneofsimo":
        result.not_loaded = stems
        result.notes.append("does not read cloneofsimo's files: convert them with dreamlora convert")
        return result
    unsupported = layout.unsupported(tool)
    if unsupported:
        result.intended = False
        result.notes.append(unsupported)
    refusal = layout.file_refusal(tool, data.style, data.modules)
    if refusal:
        result.not_loaded = stems
        result.notes.append(refusal)
        return result
    for stem in stems:
        placed = layout.resolve(tool, data.style, stem)
        if placed is None:
            result.not_loaded.append(stem)
        elif stem in own and placed != own[stem]:
            result.misplaced.append(stem)
        else:
            result.loaded += 1
    if result.loaded == 0 and stems and tool == "automatic1111" and data.style != "kohya":
        result.notes.append("reads kohya keys (lora_unet_..., lora_te_...) only")
    result.notes.extend(_tool_notes(tool, data, layout, result))
    return result


def _tool_notes(tool: Tool, data: LoraData, layout: ModelLayout, result: ToolResult) -> list[str]:
    notes = []
    modules = data.modules.values()
    if tool == "comfyui" and data.style != "kohya" and result.loaded and any(m.alpha_value != m.rank for m in modules):
        notes.append("applies these keys at alpha = rank (it reads alpha from .alpha tensors only), not at the "
                     "file's alpha / rank")
    if tool == "diffusers" and data.style == "kohya" and result.loaded and not layout.diffusers_reads_each_kohya_alpha:
        # diffusers turns kohya alphas into a peft alpha_pattern keyed by names peft never matches: a UNet module
        # whose alpha differs from the file's most common one gets the common one (seen with diffusers 0.42).
        unet = [m.alpha_value for s, m in data.modules.items() if s.startswith("lora_unet_")]
        common = Counter(unet).most_common(1)[0][0] if unet else None
        odd = sum(1 for a in unet if a != common)
        if odd:
            notes.append(f"applies {odd} UNet modules whose alpha differs from the file's most common alpha "
                         f"({common:g}) at that alpha: per-module alphas of kohya UNet keys are lost in its "
                         "conversion")
    dora = [m for m in modules if m.magnitude is not None]
    if not dora:
        return notes
    if data.style != "kohya":
        if tool != "diffusers":
            notes.append("does not read DoRA magnitudes (lora_magnitude_vector): applies a plain LoRA")
        return notes
    by_axis = {m.magnitude_axis for m in dora}
    if tool == "automatic1111" and "out" in by_axis:
        notes.append("reads dora_scale as one magnitude per input column; this file's are per output row, "
                     "which it applies wrongly")
    if tool == "comfyui" and "out" in by_axis:
        notes.append("divides output-row DoRA magnitudes by the base weight's norm, not the adapted weight's: "
                     "close to, not exactly, the trained DoRA")
    if tool == "diffusers":
        notes.append("drops dora_scale keys (with a warning) and applies a plain LoRA")
    return notes


def fit_problems(data: LoraData, layout: ModelLayout) -> list[str]:
    """Whether the file fits the model whatever tool loads it: keys naming layers, shapes, version entries."""
    problems: list[str] = []
    own = _own_targets(data, layout, problems)
    return problems + _shape_problems(data, layout, own) + _version_problems(data, layout)


def _version_problems(data: LoraData, layout: ModelLayout) -> list[str]:
    meta = data.metadata
    expected = layout.family.file_metadata(512)  # the version entries do not depend on the resolution
    return [f"header '{key}' is '{meta[key]}' but the base model is '{expected[key]}' (made for another model, or "
            "the header is wrong)" for key in VERSION_KEYS if key in meta and key in expected and meta[key] != expected[key]]


def _format_header_problems(data: LoraData) -> list[str]:
    meta = data.metadata
    problems = []
    if data.style in ("peft", "attn-procs"):
        kohya = sorted(k for k in meta if k.startswith(("ss_", "sshs_")))
        if kohya:
            problems.append(f"a diffusers-format file carries kohya's header entries ({_some(kohya)}): AUTOMATIC1111 "
                            "takes it for a kohya network and applies nothing; rewrite it with dreamlora convert")
    if data.style == "kohya" and DIFFUSERS_METADATA_KEY in meta:
        problems.append(f"a kohya-format file carries '{DIFFUSERS_METADATA_KEY}': diffusers refuses a file with both "
                        "it and .alpha tensors; rewrite it with dreamlora convert")
    return problems


def _hash_notes(data: LoraData) -> list[str]:
    """sshs_model_hash depends on the tensors alone: a mismatch means they changed after it was written."""
    stored = data.metadata.get("sshs_model_hash")
    if not stored or data.style != "kohya" or data.has_dora:
        return []
    from .hashes import addnet_hashes

    computed, _ = addnet_hashes(state_dict(data.modules, "kohya"), data.metadata)
    if computed != stored:
        return ["sshs_model_hash does not match the tensors (they changed after it was written): "
                "AUTOMATIC1111 and the additional-networks extension will show a stale hash"]
    return []


def _some(items: list[str]) -> str:
    shown = ", ".join(f"'{s}'" for s in items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")

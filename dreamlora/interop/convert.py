"""`dreamlora convert`: a LoRA file from one key layout to the other, losslessly.

Tensors are moved, never recomputed: kohya -> diffusers -> kohya gives back the same tensors bit for bit, and the
same header (what one format cannot say travels under `dreamlora.*` entries, see formats.py). Alpha is carried as
each format's readers expect it: kohya as a float32 `.alpha` tensor per module (strength alpha / rank), diffusers
as the peft config in `lora_adapter_metadata` (lora_alpha, with alpha_pattern / rank_pattern for modules that
differ). Inputs may also be diffusers' older attention-processor files and cloneofsimo's `lora` files.

Flux files are kohya files in Black Forest Labs' module names, with q/k/v fused as BFL fuses them (bfl.py); that
conversion is exact both ways too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import ConfigError
from .bfl import SPLIT_KEY, from_bfl, is_flux_file, to_bfl
from .check import check_before_write, layout_for
from .formats import (KOHYA_DORA_REFUSAL, from_targets, header_for, peft_adapter_config, read_lora,
                      restore_alpha_dtype, state_dict, to_targets, write_lora)

OutputFormat = Literal["kohya", "diffusers"]
STYLE_OF = {"kohya": "kohya", "diffusers": "peft"}
FORMAT_NAMES = {"kohya": "kohya", "peft": "diffusers", "attn-procs": "diffusers (attention processors)",
                "cloneofsimo": "cloneofsimo lora"}


@dataclass
class ConvertReport:
    source: str
    source_format: str  # kohya, diffusers, diffusers (attention processors), cloneofsimo lora
    out: Path
    format: OutputFormat
    modules: int
    notes: list[str] = field(default_factory=list)


def convert_lora(src: str | Path, out: str | Path, to: OutputFormat, *, model: str | None = None,
                 single_file_config: str | None = None, overwrite: bool = False) -> ConvertReport:
    """Rewrite a LoRA file in the kohya or the diffusers layout.

    Args:
        src: The LoRA file (.safetensors, or a .bin/.pt state dict or list).
        out: The .safetensors file to write.
        to: "kohya" (AUTOMATIC1111, ComfyUI, sd-scripts, diffusers) or "diffusers" (diffusers' peft keys).
        model: The base model the file is for (default: the one its dreamlora metadata names); only its configs are
            read, to name its modules.
        single_file_config: For a single-file --model: the folder or hub id of its configs.
        overwrite: Replace `out` if it exists.

    Returns:
        What was written, with notes on what the output cannot carry.

    Raises:
        ConfigError: bad paths, or DoRA into the kohya layout.
        ModelLoadError / CompatibilityError: the file cannot be read or does not fit the model.
    """
    src, out = Path(src), Path(out)
    _check_paths(src, out, overwrite)
    if to not in STYLE_OF:
        raise ConfigError(f"--to must be kohya or diffusers (got {to!r})")
    style = STYLE_OF[to]
    data = read_lora(src)
    if is_flux_file(list(data.modules), data.metadata):
        return _convert_flux(data, out, to)
    if style == "kohya" and data.has_dora:
        raise ConfigError(f"'{src.name}' is a DoRA: {KOHYA_DORA_REFUSAL}.")
    layout = layout_for(model, data.metadata, data.source, single_file_config)
    targets = to_targets(data, layout)
    modules = from_targets(targets, layout, style)
    notes = []
    if style == "kohya":
        modules = restore_alpha_dtype(modules, data.metadata)
        header = header_for("kohya", data.metadata, modules, family=layout.family,
                            adapter_config=peft_adapter_config(from_targets(targets, layout, "peft")))
    else:
        header = header_for("peft", data.metadata, modules, family=layout.family)
    missing_alpha = sum(1 for m in modules.values() if m.alpha is None)
    if missing_alpha and style == "peft":
        notes.append(f"{missing_alpha} modules had no alpha; written with alpha = rank, as every loader applied them")
    if data.embeddings:
        notes.append(f"{len(data.embeddings)} bundled textual-inversion embeddings are not carried over "
                     f"({', '.join(sorted(data.embeddings)[:3])})")
    check_before_write(state_dict(modules, style), header, layout, out.name)
    write_lora(out, modules, style, header)
    return ConvertReport(source=src.name, source_format=FORMAT_NAMES[data.style], out=out, format=to,
                         modules=len(modules), notes=notes)


def _convert_flux(data, out: Path, to: OutputFormat) -> ConvertReport:
    """Flux: kohya files use BFL's module names with q/k/v fused (bfl.py); no base model is needed to name them."""
    from ..models.flux import FluxFamily

    if data.style not in ("kohya", "peft"):
        raise ConfigError(f"'{data.source}' is a {FORMAT_NAMES[data.style]} file; Flux files are kohya or diffusers.")
    if to == "kohya" and data.has_dora:
        raise ConfigError(f"'{data.source}' is a DoRA: {KOHYA_DORA_REFUSAL}.")
    family = FluxFamily(variant="schnell" if "schnell" in data.metadata.get("modelspec.architecture", "") else "dev")
    split = from_bfl(data.modules, data.metadata) if data.style == "kohya" else data.modules
    metadata = {k: v for k, v in data.metadata.items() if k != SPLIT_KEY}
    if to == "kohya":
        modules, extra = (data.modules, {k: v for k, v in data.metadata.items() if k == SPLIT_KEY}) \
            if data.style == "kohya" else to_bfl(split)
        header = {**header_for("kohya", metadata, modules, family=family), **extra}
        header["ss_network_module"] = "networks.lora_flux"  # what sd-scripts' Flux LoRA files say
        write_lora(out, restore_alpha_dtype(modules, data.metadata), "kohya", header)
    else:
        modules = split
        write_lora(out, modules, "peft", header_for("peft", metadata, modules, family=family))
    return ConvertReport(source=data.source, source_format=FORMAT_NAMES[data.style], out=out, format=to,
                         modules=len(modules))


def _check_paths(src: Path, out: Path, overwrite: bool) -> None:
    if out.resolve() == src.resolve():
        raise ConfigError(f"--out '{out}' is the input file; write the converted file elsewhere.")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out '{out}' exists; pass --overwrite to replace it.")

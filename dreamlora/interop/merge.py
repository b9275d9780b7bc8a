"""`dreamlora merge`: bake LoRAs into a base model, or combine several LoRAs into one file.

Bake (`bake_loras`): each file's update is added to the weights it adapts, in float32, in the order given:
W += w * (alpha / rank) * up @ down. A DoRA layer becomes m / ||W + w dW|| * (W + w dW), normalised per output row
(peft's DoRA) or per input column (LyCORIS' default), as peft merges it. The model is written as a diffusers folder
or as one original-layout .safetensors checkpoint (the family's single-file layout, `export_single_file`).

Combine (`combine_loras`): one LoRA whose update is the weighted sum of the inputs', exactly: per layer the ranks are
concatenated, up = [w1 s1 up1 | w2 s2 up2 | ...] and down = [down1; down2; ...] (s = alpha / rank), alpha = the
total rank. Applying the combined file equals applying each input with its weight. DoRA files are refused: their
normalisation does not add.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from ..errors import ConfigError
from .check import check_before_write, layout_for, stored_model_name
from .formats import LoraModule, from_targets, header_for, read_lora, state_dict, to_targets, write_lora
from .keymaps import UNET, ModelLayout, Target

if TYPE_CHECKING:
    from ..models import BaseModel

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class MergeReport:
    out: Path
    kind: Literal["diffusers folder", "single file", "LoRA file"]
    layers: int  # layers changed (bake) or written (combine)
    notes: list[str] = field(default_factory=list)


def parse_weights(weights: list[float] | None, count: int) -> list[float]:
    """One weight per LoRA (default 1 each).

    Raises:
        ConfigError: another number of weights than LoRAs, or a weight that is not finite.
    """
    if not weights:
        return [1.0] * count
    if len(weights) != count:
        raise ConfigError(f"--weights gives {len(weights)} weights for {count} LoRA files; give one each, e.g. "
                          f"--weights {','.join(['1'] * count)}")
    if not all(torch.isfinite(torch.tensor(w)) for w in weights):
        raise ConfigError(f"--weights must be finite numbers (got {weights})")
    return [float(w) for w in weights]


# ---------------------------------------------------------------------------------------------------- bake


def bake_loras(model: str | BaseModel, loras: list[str | Path], out: str | Path, *, weights: list[float] | None = None,
               save_dtype: str = "fp16", single_file_config: str | None = None, overwrite: bool = False) -> MergeReport:
    """Add the LoRAs' updates to `model`'s weights and write the merged model.

    Args:
        model: The base model (anything `load_base_model` takes, or a loaded BaseModel, which is changed in place).
        loras: LoRA files of any layout dreamlora reads.
        out: A folder (diffusers layout) or a `.safetensors` file (the family's original single-file layout).
        weights: One strength per file (default 1).
        save_dtype: fp16, bf16 or fp32.
        single_file_config: For a single-file --model: the folder or hub id of its configs.
        overwrite: Replace `out` if it exists (a folder only when it is a diffusers model folder).

    Raises:
        ConfigError: bad arguments. ModelLoadError / CompatibilityError: a file does not fit the model.
    """
    from ..models import load_base_model

    out = Path(out)
    weights = parse_weights(weights, len(loras))
    if save_dtype not in DTYPES:
        raise ConfigError(f"--save-dtype must be one of {', '.join(DTYPES)} (got {save_dtype!r})")
    if not loras:
        raise ConfigError("name at least one LoRA file to merge")
    single = out.suffix.lower() == ".safetensors"
    _check_out(out, overwrite, folder=not single)
    base = model if not isinstance(model, str) else load_base_model(model, single_file_config=single_file_config)
    layout = ModelLayout.from_modules(base.family, base.unet, base.text_encoders)
    parts = component_modules(base, layout)
    changed: set[Target] = set()
    notes: list[str] = []
    for path, weight in zip(loras, weights):
        data = read_lora(path)
        _raise_misfits(data, layout)
        for target, module in to_targets(data, layout).items():
            layer = parts[target.component].get_submodule(layout.installed[target])
            with torch.no_grad():
                layer.weight.copy_(merged_weight(layer.weight, module, weight).to(layer.weight.dtype))
            changed.add(target)
        if data.embeddings:
            notes.append(f"'{data.source}': {len(data.embeddings)} bundled embeddings are not merged")
    dtype = DTYPES[save_dtype]
    lost = sorted({t.component for t in changed if t.component != UNET})
    if single and lost and not base.family.single_file_text_encoders:
        raise ConfigError(f"a {base.family.name} single file holds the denoiser alone, so the LoRA's changes to "
                          f"{', '.join(lost)} would be lost; bake into a diffusers folder (--out without .safetensors)")
    if single:
        from ..models import export_single_file

        export_single_file(base, out, dtype=dtype)
        kind = "single file"
    else:
        if out.exists():
            shutil.rmtree(out)
        pipe = base.pipeline()
        pipe.to(dtype=dtype)
        pipe.save_pretrained(str(out), safe_serialization=True)
        pipe.to(dtype=torch.float32)
        kind = "diffusers folder"
    return MergeReport(out=out, kind=kind, layers=len(changed), notes=notes)


def merged_weight(weight: torch.Tensor, module: LoraModule, strength: float) -> torch.Tensor:
    """The weight with one LoRA module applied at `strength` (float32)."""
    w = weight.detach().float()
    adapted = w + strength * module.delta().to(w.device)
    if module.magnitude is None:
        return adapted
    magnitude = module.magnitude.float().to(w.device)
    if module.magnitude_axis == "out":  # one magnitude per output row (peft)
        norm = adapted.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
        return adapted * (magnitude.reshape(norm.shape) / norm)
    # one magnitude per input column (DoRA paper, LyCORIS' default)
    norm = adapted.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))
    return adapted * (magnitude.reshape(norm.shape) / norm)


def component_modules(base: BaseModel, layout: ModelLayout) -> dict[str, torch.nn.Module]:
    """{"unet": unet, "text_encoder": ..., ...} of a loaded model."""
    return {UNET: base.unet, **{layout.components[i + 1]: te for i, te in enumerate(base.text_encoders)}}


def _raise_misfits(data, layout: ModelLayout) -> None:
    """Keys that name no layer, shapes that do not fit, or a header for another model family (how each tool would
    load the file does not matter to a merge)."""
    from .check import CompatibilityError, fit_problems

    problems = fit_problems(data, layout)
    if problems:
        raise CompatibilityError(f"'{data.source}' does not fit the {layout.family.name} base model: "
                                 + "; ".join(problems))


def _check_out(out: Path, overwrite: bool, folder: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise ConfigError(f"--out '{out}' exists; pass --overwrite to replace it.")
    if folder and not (out.is_dir() and (out / "model_index.json").is_file()):
        raise ConfigError(f"--out '{out}' exists and is not a diffusers model folder; dreamlora replaces only those. "
                          "Choose another path.")


# ---------------------------------------------------------------------------------------------------- combine


def combine_loras(loras: list[str | Path], out: str | Path, *, weights: list[float] | None = None,
                  to: Literal["kohya", "diffusers"] | None = None, save_dtype: str | None = None,
                  model: str | None = None, single_file_config: str | None = None,
                  overwrite: bool = False) -> MergeReport:
    """One LoRA file equal to applying each input with its weight (ranks concatenated; see the module docstring).

    Args:
        loras: Two or more LoRA files (any layout dreamlora reads), for one base model.
        out: The .safetensors file to write.
        weights: One strength per file (default 1).
        to: The output layout (default: the first file's, kohya for older layouts).
        save_dtype: fp16, bf16 or fp32 (default: the inputs' weight dtype when they agree, else fp32).
        model: The base model (default: the one the first file's dreamlora metadata names); only its configs are
            read, to name its layers.
        single_file_config: For a single-file --model: the folder or hub id of its configs.
        overwrite: Replace `out` if it exists.

    Raises:
        ConfigError: bad arguments, or a DoRA input. ModelLoadError / CompatibilityError: a file does not fit.
    """
    out = Path(out)
    weights = parse_weights(weights, len(loras))
    if len(loras) < 2:
        raise ConfigError("combine needs at least two LoRA files (to change one file's strength, convert or resize it)")
    if out.suffix.lower() != ".safetensors":
        raise ConfigError(f"--out '{out}' must end in .safetensors")
    _check_out(out, overwrite, folder=False)
    datas = [read_lora(p) for p in loras]
    dora = [d.source for d in datas if d.has_dora]
    if dora:
        raise ConfigError(f"'{dora[0]}' is a DoRA: its layers are normalised after the update, so DoRA files do not "
                          "add up into one LoRA. Bake it into the model with --bake instead.")
    layout = layout_for(model or next((stored_model_name(d.metadata) for d in datas if stored_model_name(d.metadata)),
                                      None), datas[0].metadata, datas[0].source, single_file_config)
    dtypes = {m.down.dtype for d in datas for m in d.modules.values()}
    dtype = DTYPES[save_dtype] if save_dtype else (dtypes.pop() if len(dtypes) == 1 else torch.float32)

    pieces: dict[Target, list[tuple[float, LoraModule]]] = {}
    for data, weight in zip(datas, weights):
        _raise_misfits(data, layout)
        for target, module in to_targets(data, layout).items():
            pieces.setdefault(target, []).append((weight, module))
    combined: dict[Target, LoraModule] = {}
    for target, parts in pieces.items():
        shapes = {m.down.shape[1:] for _, m in parts}
        if len(shapes) > 1:
            raise ConfigError(f"the inputs adapt {target.component} layer '{target.module}' with different kernel "
                              f"shapes {sorted(map(tuple, shapes))}; they cannot be concatenated.")
        up = torch.cat([(m.up.double() * (w * m.scale)) for w, m in parts], dim=1)
        down = torch.cat([m.down.double() for _, m in parts], dim=0)
        combined[target] = LoraModule(down=down, up=up, alpha=float(down.shape[0]))  # strength 1: the sum itself
    # One alpha for the whole file (the most common total rank), as diffusers needs (LoraModule.with_alpha).
    alpha = float(Counter(m.rank for m in combined.values()).most_common(1)[0][0])
    combined = {t: _cast(m.with_alpha(alpha), dtype) for t, m in combined.items()}

    style = {"kohya": "kohya", "diffusers": "peft"}.get(to or "", datas[0].style if datas[0].style in ("kohya", "peft")
                                                           else "kohya")
    modules = from_targets(combined, layout, style)
    metadata = _combined_metadata(datas, weights, out, layout, model)
    header = header_for(style, metadata, modules, family=layout.family)
    check_before_write(state_dict(modules, style), header, layout, out.name)
    write_lora(out, modules, style, header)
    return MergeReport(out=out, kind="LoRA file", layers=len(modules))


def _cast(module: LoraModule, dtype: torch.dtype) -> LoraModule:
    return LoraModule(down=module.down.to(dtype), up=module.up.to(dtype), alpha=module.alpha)


def _combined_metadata(datas, weights: list[float], out: Path, layout: ModelLayout, model: str | None) -> dict[str, str]:
    """A fresh header: the family's entries, the inputs and weights, their trigger phrases; no input's training config
    (it described one run) but the base model's name, so later commands find the model."""
    name = model or next((stored_model_name(d.metadata) for d in datas if stored_model_name(d.metadata)), None)
    triggers = [d.metadata.get("modelspec.trigger_phrase", "") for d in datas]
    meta = {k: v for k, v in layout.family.file_metadata(512).items()}
    meta.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": out.stem,
        "modelspec.trigger_phrase": ", ".join(t for t in triggers if t),
        "dreamlora.combine": json.dumps([{"file": d.source, "weight": w} for d, w in zip(datas, weights)]),
    })
    resolution = next((d.metadata["modelspec.resolution"] for d in datas if "modelspec.resolution" in d.metadata), None)
    if resolution:
        meta["modelspec.resolution"] = resolution
    if name:
        meta["dreamlora.config"] = json.dumps({"model": {"name": name}})
    return meta

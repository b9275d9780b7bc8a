"""`dreamlora extract`: a LoRA file from the difference of two checkpoints (a full fine-tune into a small file).

For every Linear layer and 1x1 convolution of the UNet and the text encoders (and, with `--conv-rank`, the larger
convolutions, as kohya's LoCon does), the update is tuned - base; a layer whose largest change is at most
`--min-diff` is left out (kohya's extract_lora_from_models.py uses 1e-4 to tell an untouched text encoder). The rest
get the truncated SVD of their update at `--rank` (alpha = --rank everywhere, so the file's strength 1 is the update
itself).
Reported: each layer's relative error ||dW - dW_r|| / ||dW||, the total over all layers, and the changes a LoRA
cannot hold (biases, norms, embeddings, layers left out).

Only layers that every tool the output format is written for can place are extracted (AUTOMATIC1111 reaches a text
encoder's layers but not its projection, for example); the others are reported.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from ..errors import ConfigError, ModelLoadError
from .formats import LoraModule, from_targets, header_for, state_dict, write_lora
from .keymaps import READERS, UNET, ModelLayout, Target
from .lowrank import singular_factors, truncate

if TYPE_CHECKING:
    from ..models import BaseModel

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class ModuleError:
    target: Target
    rank: int
    relative_error: float  # ||dW - dW_r|| / ||dW||


@dataclass
class ExtractReport:
    out: Path
    modules: list[ModuleError]
    total_relative_error: float  # over all extracted layers: sqrt(sum ||dW - dW_r||^2 / sum ||dW||^2)
    unchanged: int  # layers whose largest change was at most min_diff
    notes: list[str] = field(default_factory=list)


def extract_lora(base: str | BaseModel, tuned: str | BaseModel, out: str | Path, *, rank: int, conv_rank: int = 0,
                 format: Literal["kohya", "diffusers"] = "kohya", save_dtype: str = "fp16", min_diff: float = 1e-4,
                 single_file_config: str | None = None, overwrite: bool = False) -> ExtractReport:
    """Write a LoRA whose update approximates tuned - base at `rank`.

    Args:
        base: The original model (anything `load_base_model` takes, or a loaded BaseModel).
        tuned: The fine-tuned model of the same architecture.
        out: The .safetensors file to write.
        rank: Rank of the Linear layers and 1x1 convolutions.
        conv_rank: Rank of the larger convolutions (0: leave them out).
        format: "kohya" or "diffusers".
        save_dtype: fp16, bf16 or fp32.
        min_diff: A layer whose largest absolute change is at most this is left out.
        single_file_config: For single-file checkpoints: the folder or hub id of their configs.
        overwrite: Replace `out` if it exists.

    Raises:
        ConfigError: bad arguments. ModelLoadError: a model cannot be loaded, or the two differ in architecture.
    """
    from ..models import load_base_model
    from .check import check_before_write

    out = Path(out)
    if rank < 1 or conv_rank < 0:
        raise ConfigError(f"--rank must be at least 1 and --conv-rank at least 0 (got {rank}, {conv_rank})")
    if save_dtype not in DTYPES or format not in ("kohya", "diffusers"):
        raise ConfigError(f"--save-dtype must be one of {', '.join(DTYPES)} and --format kohya or diffusers")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out '{out}' exists; pass --overwrite to replace it.")
    names = [m if isinstance(m, str) else m.identity for m in (base, tuned)]
    base = base if not isinstance(base, str) else load_base_model(base, single_file_config=single_file_config)
    tuned = tuned if not isinstance(tuned, str) else load_base_model(tuned, single_file_config=single_file_config)
    if base.family.name != tuned.family.name:
        raise ModelLoadError(f"--base '{names[0]}' is {base.family.name} and --tuned '{names[1]}' is "
                             f"{tuned.family.name}: extract needs two models of one architecture.")
    layout = ModelLayout.from_modules(base.family, base.unet, base.text_encoders)
    other = ModelLayout.from_modules(tuned.family, tuned.unet, tuned.text_encoders)
    if other.modules != layout.modules:
        raise ModelLoadError(f"--base '{names[0]}' and --tuned '{names[1]}' differ in layers or shapes: extract "
                             "needs a fine-tune of the base model.")
    style = "kohya" if format == "kohya" else "peft"
    readers = READERS[style]
    parts = {UNET: (base.unet, tuned.unet)}
    parts.update({layout.components[i + 1]: pair for i, pair in enumerate(zip(base.text_encoders,
                                                                                 tuned.text_encoders))})

    modules: dict[Target, LoraModule] = {}
    errors: list[ModuleError] = []
    unreachable, unchanged, kept_sq, lost_sq = [], 0, 0.0, 0.0
    covered: set[tuple[str, str]] = set()  # (component, parameter name) of the layers considered
    dtype = DTYPES[save_dtype]
    for target, info in layout.modules.items():
        name = layout.installed[target]
        is_kernel = info.kind == "conv" and tuple(info.shape[2:]) != (1, 1)
        layer_rank = conv_rank if is_kernel else rank
        if layer_rank == 0:
            continue
        a, b = (model.get_submodule(name) for model in parts[target.component])
        covered.add((target.component, f"{name}.weight"))
        delta = b.weight.detach().float() - a.weight.detach().float()
        if float(delta.abs().max()) <= min_diff:
            unchanged += 1
            continue
        if not all(layout.resolve(tool, style, layout.stem(target, style)) == target for tool in readers):
            unreachable.append(layout.stem(target, style))
            continue
        u, s, vh = singular_factors(delta.flatten(1))
        low = truncate(u, s, vh, rank=layer_rank)
        norm_sq = float((s.double() ** 2).sum())
        kept_sq += norm_sq * low.energy
        lost_sq += norm_sq * (1 - low.energy)
        r = low.rank
        # strength 1, written with the file's one alpha (= --rank) as diffusers needs (LoraModule.with_alpha)
        module = LoraModule(down=low.down.reshape(r, *info.shape[1:]),
                            up=low.up.reshape(info.shape[0], r, *([1, 1] if info.kind == "conv" else [])),
                            alpha=float(r)).with_alpha(float(rank))
        modules[target] = LoraModule(down=module.down.to(dtype), up=module.up.to(dtype), alpha=module.alpha)
        errors.append(ModuleError(target, r, low.relative_error))
    if not modules:
        raise ConfigError(f"--tuned '{names[1]}' differs from --base '{names[0]}' by at most {min_diff:g} in every "
                          "layer a LoRA can hold: nothing to extract (lower --min-diff, or check the models).")

    notes = _other_changes(parts, covered, min_diff)
    if unreachable:
        notes.append(f"{len(unreachable)} changed layers are left out because a tool the {format} format is "
                     f"written for cannot place them ({', '.join(unreachable[:3])})")
    by_stem = from_targets(modules, layout, style)
    header = header_for(style, _metadata(base, names, out, by_stem, rank, conv_rank), by_stem, family=base.family)
    check_before_write(state_dict(by_stem, style), header, layout, out.name)
    write_lora(out, by_stem, style, header)
    total = math.sqrt(lost_sq / (kept_sq + lost_sq)) if kept_sq + lost_sq > 0 else 0.0
    return ExtractReport(out=out, modules=errors, total_relative_error=total, unchanged=unchanged, notes=notes)


def _other_changes(parts: dict, covered: set[tuple[str, str]], min_diff: float) -> list[str]:
    """Changed parameters no extracted layer holds (biases, norms, embeddings, convolutions left out)."""
    changed = []
    for component, (a, b) in parts.items():
        tuned = dict(b.named_parameters())
        for name, param in a.named_parameters():
            if (component, name) in covered or name not in tuned:
                continue
            diff = float((tuned[name].detach().float() - param.detach().float()).abs().max())
            if diff > min_diff:
                changed.append((diff, f"{component}.{name}"))
    if not changed:
        return []
    changed.sort(reverse=True)
    return [f"{len(changed)} other tensors changed and a LoRA cannot hold them (largest |change| {changed[0][0]:.3g} "
            f"in '{changed[0][1]}')"]


def _metadata(base: BaseModel, names: list[str], out: Path, modules: dict[str, LoraModule], rank: int,
              conv_rank: int) -> dict[str, str]:
    from ..lora import lora_metadata

    config = {"model": {"name": names[0]}, "extract": {"base": names[0], "tuned": names[1], "rank": rank,
                                                      "conv_rank": conv_rank}}
    ranks = {m.rank for m in modules.values()}
    meta = lora_metadata(family=base.family, rank=rank, alpha=float(rank), resolution=base.default_resolution,
                         output_name=out.stem, trigger_phrase="", title=out.stem, config_json=json.dumps(config),
                         train_text_encoder=any(not s.startswith(("lora_unet", "unet.")) for s in modules),
                         date=datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat())
    if len(ranks) > 1:  # layers narrower than the rank, or of --conv-rank: kohya writes "Dynamic"
        meta["ss_network_dim"] = "Dynamic"
    return meta

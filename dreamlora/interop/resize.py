"""`dreamlora resize`: a LoRA file at a lower rank, by truncated SVD of each module's update.

Each module's update (alpha / rank) * up @ down is refactored exactly (QR of both factors, then an r x r SVD) and
truncated to `--rank r`, or per module to the fewest singular values that keep `--energy e` of its squared
Frobenius norm (kohya's resize_lora.py calls this "sv_fro"). Every module keeps the file's alpha, the change of strength
alpha / rank folded into its up weight: the update is what the truncation gives, ss_network_alpha keeps its value,
and diffusers (which misreads per-module alphas of kohya UNet keys) loads it right. At the full rank the result is the
same update (to float round-off). DoRA magnitudes are kept as they are.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from .formats import DIFFUSERS_STASH, KOHYA_STASH, LoraModule, header_for, read_lora, state_dict, write_lora
from .lowrank import product_factors, truncate

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class ModuleResize:
    stem: str
    rank_before: int
    rank_after: int
    energy: float  # share of the update's squared norm kept


@dataclass
class ResizeReport:
    out: Path
    modules: list[ModuleResize]
    notes: list[str] = field(default_factory=list)

    @property
    def min_energy(self) -> float:
        return min(m.energy for m in self.modules)

    @property
    def mean_energy(self) -> float:
        return sum(m.energy for m in self.modules) / len(self.modules)


def resize_lora(src: str | Path, out: str | Path, *, rank: int | None = None, energy: float | None = None,
                save_dtype: str | None = None, model: str | None = None, single_file_config: str | None = None,
                overwrite: bool = False) -> ResizeReport:
    """Write `src` at a lower rank; report the energy each module keeps.

    Args:
        src: A kohya or diffusers LoRA file.
        out: The .safetensors file to write (same layout as `src`).
        rank: The rank of every module (modules already at or below it are kept as they are).
        energy: Instead of a rank: per module, the fewest singular values keeping this share of the squared norm.
        save_dtype: fp16, bf16 or fp32 (default: the input's weight dtype).
        model: If given (or named by the file), the output is checked against it before it is written.
        single_file_config: For a single-file --model: the folder or hub id of its configs.
        overwrite: Replace `out` if it exists.

    Raises:
        ConfigError: bad arguments or paths. ModelLoadError / CompatibilityError: unreadable or unfit file.
    """
    src, out = Path(src), Path(out)
    if (rank is None) == (energy is None):
        raise ConfigError("pass exactly one of --rank and --energy")
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be at least 1 (got {rank})")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"--energy must be in (0, 1], e.g. 0.95 (got {energy})")
    if save_dtype is not None and save_dtype not in DTYPES:
        raise ConfigError(f"--save-dtype must be one of {', '.join(DTYPES)} (got {save_dtype!r})")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out '{out}' exists; pass --overwrite to replace it.")
    if out.resolve() == src.resolve():
        raise ConfigError(f"--out '{out}' is the input file; write the resized file elsewhere.")
    data = read_lora(src)
    if data.style not in ("kohya", "peft"):
        raise ConfigError(f"'{src.name}' is in an older layout; convert it first with dreamlora convert --to kohya.")

    modules: dict[str, LoraModule] = {}
    report: list[ModuleResize] = []
    # The file's alpha stays (ss_network_alpha keeps its meaning): every resized module is written with it and its
    # strength folded into up, since diffusers misreads per-module alphas (LoraModule.with_alpha).
    file_alpha = Counter(m.alpha_value for m in data.modules.values()).most_common(1)[0][0]
    for stem, module in data.modules.items():
        dtype = DTYPES[save_dtype] if save_dtype else module.down.dtype
        if rank is not None and module.rank <= rank:  # nothing to cut: kept bit for bit (or only cast)
            modules[stem] = LoraModule(down=module.down.to(dtype), up=module.up.to(dtype), alpha=module.alpha,
                                       magnitude=module.magnitude, magnitude_axis=module.magnitude_axis,
                                       alpha_dtype=module.alpha_dtype)
            report.append(ModuleResize(stem, module.rank, module.rank, 1.0))
            continue
        u, s, vh = product_factors(module.up.flatten(1), module.down.flatten(1))
        low = truncate(u, s, vh, energy=energy) if energy is not None else truncate(u, s, vh, rank=rank)
        new_rank = low.rank
        up = low.up.reshape(module.up.shape[0], new_rank, *module.up.shape[2:])
        down = low.down.reshape(new_rank, *module.down.shape[1:])
        resized = LoraModule(down=down, up=up, alpha=module.scale * new_rank).with_alpha(file_alpha)
        modules[stem] = LoraModule(down=resized.down.to(dtype), up=resized.up.to(dtype), alpha=file_alpha,
                                   magnitude=module.magnitude, magnitude_axis=module.magnitude_axis,
                                   alpha_dtype=module.alpha_dtype)
        report.append(ModuleResize(stem, module.rank, new_rank, low.energy))

    metadata = _resized_metadata(data.metadata, modules, src.name, rank, energy)
    header = header_for(data.style, metadata, modules)
    notes = []
    if data.has_dora:
        notes.append("DoRA magnitudes are kept as they are; the layer normalises the resized update, so it changes "
                     "a little beyond the energy reported")
    layout = _optional_layout(model, data.metadata, data.source, single_file_config, notes)
    if layout is not None:
        from .check import check_before_write

        check_before_write(state_dict(modules, data.style), header, layout, out.name)
    write_lora(out, modules, data.style, header)
    return ResizeReport(out=out, modules=report, notes=notes)


def _resized_metadata(metadata: dict[str, str], modules: dict[str, LoraModule], source: str, rank: int | None,
                      energy: float | None) -> dict[str, str]:
    """The source's header with the rank entries kohya's resize_lora.py changes ("Dynamic" when ranks differ)."""
    # The hashes and a stashed diffusers config describe the old tensors; write_lora and header_for renew them.
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_") and k != DIFFUSERS_STASH}
    ranks = {m.rank for m in modules.values()}
    alphas = {m.alpha_value for m in modules.values()}
    kohya = any(k.startswith("ss_") for k in meta) or KOHYA_STASH in meta
    if kohya:
        meta["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
        meta["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    meta["dreamlora.resize"] = json.dumps({"from": source, **({"rank": rank} if rank else {"energy": energy})})
    return meta


def _optional_layout(model: str | None, metadata: dict[str, str], source: str, single_file_config: str | None,
                     notes: list[str]):
    from ..errors import DreamLoraError
    from .check import layout_for, stored_model_name

    if model is None and stored_model_name(metadata) is None:
        notes.append("no base model known (pass --model to check the result against one): key names are kept as "
                     "they were")
        return None
    try:
        return layout_for(model, metadata, source, single_file_config)
    except DreamLoraError as exc:
        if model is not None:
            raise
        notes.append(f"not checked against a base model ({exc})")
        return None

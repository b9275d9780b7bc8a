"""`dreamlora resize`: a LoRA file at a lower rank (truncated SVD), with the energy each module keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from .options import ModelConfigOpt, ModelOpt, OverwriteOpt, existing_path


def command(
    file: Annotated[Path, typer.Argument(help="A kohya or diffusers LoRA .safetensors file.")],
    rank: Annotated[Optional[int], typer.Option("--rank", help="The new rank of every module.")] = None,
    energy: Annotated[Optional[float], typer.Option(
        "--energy", help="Instead of --rank: per module, the fewest ranks keeping this share of the update's squared "
                         "norm, e.g. 0.95.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="The .safetensors file to write (default: FILE's name with -rank<r> or -energy<e>).")] = None,
    save_dtype: Annotated[Optional[Literal["fp16", "bf16", "fp32"]], typer.Option(
        "--save-dtype", help="Weight dtype in the file (default: the input's).")] = None,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    overwrite: OverwriteOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="One line per module.")] = False,
) -> None:
    """Cut FILE's rank by SVD of each module's update, keeping its strength; report the retained energy per module
    (the share of the update's squared Frobenius norm)."""
    from dreamlora.interop.resize import resize_lora

    file = existing_path(file, "FILE")
    if out is None:
        tag = f"rank{rank}" if rank is not None else f"energy{energy:g}" if energy is not None else "resized"
        out = file.with_name(f"{file.stem}-{tag}.safetensors")
    report = resize_lora(file, out, rank=rank, energy=energy, save_dtype=save_dtype, model=model,
                         single_file_config=model_config, overwrite=overwrite)
    worst = sorted(report.modules, key=lambda m: m.energy)
    for m in report.modules if verbose else worst[:5]:
        typer.echo(f"  rank {m.rank_before:>3} -> {m.rank_after:<3} energy {100 * m.energy:6.2f} %  {m.stem}")
    if not verbose and len(report.modules) > 5:
        typer.echo(f"  ({len(report.modules) - 5} more modules; the 5 that keep least are shown, --verbose lists all)")
    for note in report.notes:
        typer.echo(f"note: {note}")
    ranks = sorted({m.rank_after for m in report.modules})
    typer.echo(f"wrote {report.out}: {len(report.modules)} modules at rank {ranks[0] if len(ranks) == 1 else ranks}, "
               f"energy kept: mean {100 * report.mean_energy:.2f} %, least {100 * report.min_energy:.2f} %")

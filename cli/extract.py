"""`dreamlora extract`: a LoRA file from the difference of two checkpoints (a full fine-tune into a small file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from .options import ModelConfigOpt, OverwriteOpt


def command(
    base: Annotated[str, typer.Option("--base", help="The original model: a hub id, diffusers folder, single file or "
                                                     "builtin:<name>.")],
    tuned: Annotated[str, typer.Option("--tuned", help="The fine-tuned model of the same architecture.")],
    rank: Annotated[int, typer.Option("--rank", help="Rank of the Linear layers and 1x1 convolutions.")],
    out: Annotated[Path, typer.Option("--out", help="The .safetensors file to write.")],
    conv_rank: Annotated[int, typer.Option(
        "--conv-rank", help="Rank of the 3x3 convolutions (0: leave them out, as kohya does by default).")] = 0,
    format: Annotated[Literal["kohya", "diffusers"], typer.Option(
        "--format", help="kohya (AUTOMATIC1111/ComfyUI keys) or diffusers (peft keys).")] = "kohya",
    save_dtype: Annotated[Literal["fp16", "bf16", "fp32"], typer.Option(
        "--save-dtype", help="Weight dtype in the file.")] = "fp16",
    min_diff: Annotated[float, typer.Option(
        "--min-diff", help="A layer whose largest change is at most this is left out.")] = 1e-4,
    model_config: ModelConfigOpt = None,
    overwrite: OverwriteOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="One line per layer.")] = False,
) -> None:
    """Approximate TUNED - BASE layer by layer with a truncated SVD; report each layer's relative error and the
    total."""
    from dreamlora.interop.extract import extract_lora

    report = extract_lora(base, tuned, out, rank=rank, conv_rank=conv_rank, format=format, save_dtype=save_dtype,
                          min_diff=min_diff, single_file_config=model_config, overwrite=overwrite)
    worst = sorted(report.modules, key=lambda m: -m.relative_error)
    for m in report.modules if verbose else worst[:5]:
        typer.echo(f"  rank {m.rank:>3}  error {100 * m.relative_error:6.2f} %  {m.target.component}.{m.target.module}")
    if not verbose and len(report.modules) > 5:
        typer.echo(f"  ({len(report.modules) - 5} more layers; the 5 worst are shown, --verbose lists all)")
    for note in report.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {report.out}: {len(report.modules)} layers ({report.unchanged} unchanged left out), relative "
               f"error ||dW - LoRA|| / ||dW|| = {100 * report.total_relative_error:.2f} %")

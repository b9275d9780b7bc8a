"""`dreamlora export`: the LoRA file of any kept step of a run (a checkpoint, or a step scored by --eval-every)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from .options import ModelOpt, OverwriteOpt, existing_path


def command(
    run_dir: Annotated[Path, typer.Argument(help="The run folder of a training (<out>-run, or its --run-dir).")],
    out: Annotated[Path, typer.Option("--out", help="The .safetensors file to write.")],
    step: Annotated[Optional[str], typer.Option(
        "--step", help="A step number, best (the step the run recommends) or latest [default: best when the "
                       "run scored its steps (--eval-every), else latest].")] = None,
    format: Annotated[Optional[Literal["kohya", "diffusers"]], typer.Option(
        "--format", help="File format (default: the run's).")] = None,
    save_dtype: Annotated[Optional[Literal["fp16", "bf16", "fp32"]], typer.Option(
        "--save-dtype", help="Weight dtype in the file (default: the run's).")] = None,
    model: ModelOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write the LoRA file of a kept step of RUN_DIR, e.g. the step the run's scores recommend."""
    from dreamlora.selection import export

    existing_path(run_dir, "RUN_DIR")
    result = export(run_dir, out, step, model=model, format=format, save_dtype=save_dtype, overwrite=overwrite)
    typer.echo(f"wrote {result.output} (step {result.step}, from {result.source})")

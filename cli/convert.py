"""`dreamlora convert`: a LoRA file from one key layout to the other (kohya <-> diffusers), losslessly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from .options import ModelConfigOpt, ModelOpt, OverwriteOpt, existing_path


def command(
    file: Annotated[Path, typer.Argument(help="A LoRA file: kohya, diffusers (peft or the older attention-processor "
                                              "keys, .safetensors or .bin) or cloneofsimo's lora (.safetensors, .pt).")],
    to: Annotated[Literal["kohya", "diffusers"], typer.Option(
        "--to", help="kohya (AUTOMATIC1111, ComfyUI, sd-scripts, diffusers; Flux files in BFL's names with q/k/v "
                     "fused) or diffusers (peft keys).")],
    out: Annotated[Path, typer.Option("--out", help="The .safetensors file to write.")],
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Rewrite FILE's keys for another set of tools; tensors are moved bit for bit and alpha is carried as each
    format's readers expect. The base model (default: the one the file names) gives the layer names; only its configs
    are read."""
    from dreamlora.interop.convert import convert_lora

    report = convert_lora(existing_path(file, "FILE"), out, to, model=model, single_file_config=model_config,
                          overwrite=overwrite)
    for note in report.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {report.out}: {report.modules} modules, {report.source_format} -> {report.format}")

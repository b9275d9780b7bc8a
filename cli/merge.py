"""`dreamlora merge`: combine LoRA files into one, or bake them into the base model (--bake)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from .options import ModelConfigOpt, ModelOpt, OverwriteOpt, existing_path, parse_list


def command(
    loras: Annotated[list[Path], typer.Argument(metavar="LORA...", help="LoRA files (any layout dreamlora reads).")],
    out: Annotated[Path, typer.Option(
        "--out", help="Combined: a LoRA .safetensors file. With --bake: a folder (diffusers layout) or a .safetensors "
                      "single-file checkpoint (the model's original layout).")],
    weights: Annotated[Optional[str], typer.Option(
        "--weights", metavar="W1,W2,...", help="One strength per LoRA, comma-separated (default: 1 each).")] = None,
    bake: Annotated[bool, typer.Option(
        "--bake", help="Add the LoRAs to the weights of --model and write the merged model.")] = False,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    format: Annotated[Optional[Literal["kohya", "diffusers"]], typer.Option(
        "--format", help="Layout of a combined LoRA (default: the first file's).")] = None,
    save_dtype: Annotated[Optional[Literal["fp16", "bf16", "fp32"]], typer.Option(
        "--save-dtype", help="Weight dtype written (default: fp16 for a baked model, the inputs' for a combined "
                             "LoRA).")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Combine LORAS into one LoRA file (ranks concatenated: exactly the weighted sum of their updates), or with
    --bake merge them into the base model and save it."""
    from dreamlora.errors import ConfigError

    paths = [existing_path(p, "LORAS") for p in loras]
    strengths = parse_list(weights, float, "--weights")
    if bake:
        from dreamlora.interop.merge import bake_loras

        if not model:
            raise ConfigError("--bake needs --model: the base model the LoRAs are merged into")
        if format:
            raise ConfigError("--format is the layout of a combined LoRA; a baked model is a diffusers folder or a "
                              "single file, chosen by --out")
        report = bake_loras(model, paths, out, weights=strengths, save_dtype=save_dtype or "fp16",
                            single_file_config=model_config, overwrite=overwrite)
    else:
        from dreamlora.interop.merge import combine_loras

        report = combine_loras(paths, out, weights=strengths, to=format, save_dtype=save_dtype, model=model,
                               single_file_config=model_config, overwrite=overwrite)
    for note in report.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {report.out} ({report.kind}): {report.layers} layers")

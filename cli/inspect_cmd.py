"""`dreamlora inspect`: what a LoRA file holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def command(
    file: Annotated[Path, typer.Argument(help="A LoRA .safetensors file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show a LoRA file's format, rank, alpha, modules, dtype, size, base model, trigger phrase and config."""
    from dreamlora import describe_lora

    info = describe_lora(file)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "config" and value:
            typer.echo("config:")
            for section, values in value.items():  # a config too large for the file is a note, not sections
                shown = ", ".join(f"{k}={v!r}" for k, v in values.items()) if isinstance(values, dict) else repr(values)
                typer.echo(f"  [{section}] {shown}")
        else:
            typer.echo(f"{key}: {value}")

"""`dreamlora check`: would AUTOMATIC1111/Forge, ComfyUI and diffusers load a LoRA file into a base model as trained?"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

from .options import ModelConfigOpt, ModelOpt, existing_path

STYLE_NAMES = {"kohya": "kohya", "peft": "diffusers (peft)", "attn-procs": "diffusers (attention processors)",
               "cloneofsimo": "cloneofsimo lora"}


def command(
    file: Annotated[Path, typer.Argument(help="A LoRA file (.safetensors, or a .bin/.pt state dict).")],
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Check every key of FILE against the base model (default: the one the file names) under each tool's naming,
    the shapes, and the version metadata; exit code 1 on a mismatch, naming the keys."""
    from dreamlora.interop.check import check_file

    report = check_file(existing_path(file, "FILE"), model, model_config)
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        names = f" in {report.names}" if report.names else ""
        typer.echo(f"{report.file}: {STYLE_NAMES.get(report.style, report.style)} format{names}, {report.modules} "
                   f"modules, checked for the {report.family} base model")
        for tool in report.tools:
            status = "loads all" if tool.ok else f"loads {tool.loaded} of {tool.total}"
            aim = "" if tool.intended else " (not a reader of this format)"
            typer.echo(f"  {tool.title:<20} {status}{aim}")
            for note in tool.notes:
                typer.echo(f"  {'':<20}   {note}")
        for note in report.notes:
            typer.echo(f"note: {note}")
        if not report.errors:
            typer.echo("ok: every tool this format is written for loads every key onto the layer it was trained for")
    report.raise_for_errors()

"""`dreamlora sample`: a grid of prompts (x LoRA scales) by seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dreamlora.config import SampleSettings

from .options import ModelConfigOpt, ModelOpt, existing_path, with_settings
from .progress import TerminalProgress

Opt = typer.Option


@with_settings(SampleSettings)
def command(
    settings: dict,
    out: Annotated[Path, Opt("--out", help="The grid PNG; images go to <out>-images/, settings to <out>.json.")],
    lora: Annotated[Optional[Path], Opt("--lora", help="LoRA .safetensors (omit for the base model alone).")] = None,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
) -> None:
    """Render a sample grid with a LoRA file: rows are prompts (x scales), columns are seeds."""
    from dreamlora.config import settings_from

    if lora is not None:
        existing_path(lora, "--lora")
    resolved = settings_from(SampleSettings, settings)
    from dreamlora import sample

    progress = TerminalProgress()
    try:
        result = sample(lora, resolved, out, model=model, single_file_config=model_config, progress=progress)
    finally:
        progress.close()
    typer.echo(f"wrote {result.grid} ({len(result.images)} images in {result.images[0].parent}, settings in {result.sidecar})")

"""`dreamlora train`: read the config and flags, then call dreamlora.train (or print the plan with --dry-run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dreamlora.config import DreamLoraConfig

from .options import with_settings
from .progress import TerminalProgress

Opt = typer.Option


@with_settings(DreamLoraConfig)
def command(
    settings: dict,
    config: Annotated[Optional[Path], Opt("--config", help="TOML file of settings; flags override it.")] = None,
    dry_run: Annotated[bool, Opt("--dry-run", help="Print steps, epochs, class images and the memory estimate; "
                                                   "load no weights, train nothing.")] = False,
) -> None:
    """Train a DreamBooth LoRA on the photos in INSTANCE_DIR and write one .safetensors file."""
    from dreamlora.config import check_paths, load_config

    resolved = load_config(config, settings)
    check_paths(resolved)  # a missing folder is reported before torch is imported
    if dry_run:
        from dreamlora.memory import plan
        from dreamlora.preflight import preflight_training_data

        preflight_training_data(resolved.data, resolved.prior)  # the photos and captions a run would refuse

        for line in plan(resolved).lines():
            typer.echo(line)
        return
    from dreamlora import train

    progress = TerminalProgress()
    try:
        result = train(resolved, progress=progress)
    finally:
        progress.close()
    loss = f", final loss {result.loss:.4f}" if result.loss is not None else ""
    typer.echo(f"wrote {result.output} ({result.output.stat().st_size / 1e6:.2f} MB) after {result.steps} steps{loss}")
    if result.validation_grid:
        typer.echo(f"validation grid: {result.validation_grid}")

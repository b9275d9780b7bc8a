"""`dreamlora train`: read the config and flags, then call dreamlora.train (or print the plan with --dry-run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dreamlora.config import DreamLoraConfig

from .options import with_settings
from .progress import TerminalProgress

Opt = typer.Option
FINETUNE_ONLY = ("data.image_column", "data.caption_column")
ConfigOpt = Annotated[Optional[Path], Opt("--config", help="TOML file of settings; flags override it.")]
DryRunOpt = Annotated[bool, Opt("--dry-run", help="Print steps, epochs, class images and the memory estimate; "
                                                  "load no weights, train nothing.")]


@with_settings(DreamLoraConfig, skip=FINETUNE_ONLY)
def command(settings: dict, config: ConfigOpt = None, dry_run: DryRunOpt = False) -> None:
    """Train a DreamBooth LoRA on the photos in INSTANCE_DIR and write one .safetensors file."""
    run(settings, config, dry_run, "dreambooth")


def run(settings: dict, config: Path | None, dry_run: bool, job: str) -> None:
    """Resolve the settings for `job` (dreambooth or finetune), then plan (--dry-run) or train."""
    from dreamlora.config import check_paths, load_config

    resolved = load_config(config, {**settings, "data.job": job})
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
    if resolved.output.push_to_hub:  # after the file is written: a failed upload keeps it (one line, exit 1)
        from dreamlora.sharing import push_lora

        url = push_lora(result.output, resolved.output.push_to_hub, private=resolved.output.hub_private,
                        grid=result.validation_grid)
        typer.echo(f"uploaded to {url}")

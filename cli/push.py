"""`dreamlora push`: upload a LoRA file with its model card to the Hugging Face hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import existing_path

Opt = typer.Option


def command(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The .safetensors LoRA file.")],
    repo_id: Annotated[str, Opt("--repo-id", help="The hub model repo, user/name (created if missing).")],
    private: Annotated[bool, Opt("--private", help="Create the repo private.")] = False,
    grid: Annotated[Optional[Path], Opt("--grid", help="The validation grid to show on the card (default: the "
                                                      "latest in the file's run folder, else its thumbnail).")] = None,
) -> None:
    """Upload FILE with a model card (base model, trigger words, settings, the last grid); the card is written
    beside the file first, so it stays when the upload fails."""
    from dreamlora.sharing import push_lora

    existing_path(file, "FILE")
    typer.echo(f"uploaded to {push_lora(file, repo_id, private=private, grid=grid)}")

"""`dreamlora check-images`: the training preflight for one folder, file by file, without loading a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DEFAULT_RESOLUTION = 512  # SD 1.x; pass 768 for SD 2.x-v models, 64 for the built-in tiny models
MARKS = {"ok": "ok     ", "warning": "warning", "error": "error  ", "skipped": "skipped"}


def command(
    folder: Annotated[Path, typer.Argument(help="Folder of photos (instance or class images).")],
    resolution: Annotated[int, typer.Option(
        "--resolution", help="Training resolution the sizes are checked against (SD 1.x: 512, SD 2.x-v: 768).")
    ] = DEFAULT_RESOLUTION,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Also show the conversions (EXIF rotation, CMYK, ...).")] = False,
) -> None:
    """Read every image in FOLDER as training would and list what is wrong; exit code 1 if any image is unusable."""
    from dreamlora.config import MAX_RESOLUTION
    from dreamlora.errors import ConfigError
    from dreamlora.preflight import preflight

    if not 8 <= resolution <= MAX_RESOLUTION or resolution % 8:
        raise ConfigError(f"--resolution must be a multiple of 8 in [8, {MAX_RESOLUTION}] (got {resolution})")
    report = preflight(folder, "image", resolution)
    for check in report.files:
        notes = check.notes + (check.info if verbose else [])
        size = f" ({check.size[0]}x{check.size[1]})" if check.size else ""
        typer.echo(f"{MARKS[check.status]}  {check.path.name}{size}" + "".join(f"\n           {n}" for n in notes))
    counts = {status: sum(1 for f in report.files if f.status == status) for status in MARKS}
    typer.echo(f"{len(report.usable)} usable images in {folder} at {resolution} px: {counts['ok']} ok, "
               f"{counts['warning']} with warnings, {counts['error']} unusable; "
               f"{counts['skipped']} other files skipped")
    report.raise_for_errors()

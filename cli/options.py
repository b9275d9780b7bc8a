"""Option types shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", help="Base model: builtin:toy (default), builtin:tiny-sd, builtin:tiny-sd2, a hub id, a diffusers folder, "
                    "or a .safetensors/.ckpt checkpoint.")]
ModelConfigOpt = Annotated[Optional[str], typer.Option(
    "--model-config", help="For a single-file checkpoint: a diffusers folder or hub id holding its configs.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed.")]
ResolutionOpt = Annotated[Optional[int], typer.Option("--resolution", help="Image side in pixels (default: the model's).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]
SamplerOpt = Annotated[str, typer.Option("--sampler", help="dpm++2m, ddim, pndm, euler, euler_a, ddpm or unipc.")]


def parse_list(text: str | None, kind: type, flag: str) -> list | None:
    """'0,1,2' -> [0, 1, 2]; a bad item is a one-line error naming the flag."""
    if text is None:
        return None
    from dreamlora.errors import ConfigError

    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated {kind.__name__} values, e.g. 0,1,2 (got {text!r})") from None


def existing_path(path: Path, flag: str) -> Path:
    from dreamlora.errors import ConfigError

    if not path.exists():
        raise ConfigError(f"{flag} '{path}' does not exist. Check the path.")
    return path

"""`dreamlora priors`: generate (or complete) a folder of class prior images."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from dreamlora.config import MAX_RESOLUTION, PriorConfig
from dreamlora.samplers import Sampler

from .options import ModelConfigOpt, ModelOpt, OverwriteOpt, ResolutionOpt
from .progress import TerminalProgress

Opt = typer.Option
DEFAULTS = PriorConfig()  # the same defaults as the class images `train` makes


def command(
    class_prompt: Annotated[str, Opt("--class-prompt", help="e.g. 'a photo of a dog'.")],
    out: Annotated[Path, Opt("--out", help="Folder for the images and their manifest.")],
    num_images: Annotated[int, Opt("--num-images", help="How many images the folder must hold.")] = DEFAULTS.num_class_images,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    seed: Annotated[int, Opt("--seed", help="Image i uses a seed derived from (seed, i).")] = DEFAULTS.seed,
    steps: Annotated[int, Opt("--steps", help="Sampling steps.")] = DEFAULTS.steps,
    guidance: Annotated[float, Opt("--guidance", help="Classifier-free guidance scale.")] = DEFAULTS.guidance,
    negative_prompt: Annotated[str, Opt("--negative-prompt")] = DEFAULTS.negative_prompt,
    batch_size: Annotated[int, Opt("--batch-size", help="Images per batch (does not change any image).")] = DEFAULTS.batch_size,
    resolution: ResolutionOpt = None,
    sampler: Annotated[Sampler, Opt("--sampler", help="Sampler.")] = DEFAULTS.sampler,
    overwrite: OverwriteOpt = False,
) -> None:
    """Generate class prior images with the frozen base model; only missing images are made."""
    from dreamlora import make_class_images

    check_flags(guidance=guidance, seed=seed, resolution=resolution)

    progress = TerminalProgress()
    try:
        paths = make_class_images(class_prompt, out, num_images, model=model, single_file_config=model_config,
                                  seed=seed, steps=steps, guidance=guidance, negative_prompt=negative_prompt,
                                  batch_size=batch_size, resolution=resolution, sampler=sampler,
                                  overwrite=overwrite, progress=progress)
    finally:
        progress.close()
    typer.echo(f"{len(paths)} class images in {out}")


def check_flags(*, guidance: float, seed: int, resolution: int | None) -> None:
    """The flags the library takes as plain numbers: refused before the model loads (click reads 'nan' and 'inf'
    as floats, and a negative resolution passes the library's multiple-of-8 check).

    Raises:
        ConfigError: every bad flag at once.
    """
    from dreamlora.errors import ConfigError

    problems = []
    if not math.isfinite(guidance) or guidance < 0:
        problems.append(f"--guidance must be a finite number >= 0 (got {guidance})")
    if seed < 0:
        problems.append(f"--seed must be >= 0 (got {seed})")
    if resolution is not None and not 8 <= resolution <= MAX_RESOLUTION:
        problems.append(f"--resolution must be in [8, {MAX_RESOLUTION}] (got {resolution})")
    if problems:
        raise ConfigError("; ".join(problems))

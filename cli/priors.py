"""`dreamlora priors`: generate (or complete) a folder of class prior images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import ModelConfigOpt, ModelOpt, OverwriteOpt, ResolutionOpt, SamplerOpt
from .progress import TerminalProgress

Opt = typer.Option


def command(
    class_prompt: Annotated[str, Opt("--class-prompt", help="e.g. 'a photo of a dog'.")],
    out: Annotated[Path, Opt("--out", help="Folder for the images and their manifest.")],
    num_images: Annotated[int, Opt("--num-images", help="How many images the folder must hold.")] = 100,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    seed: Annotated[int, Opt("--seed", help="Image i uses a seed derived from (seed, i).")] = 0,
    steps: Annotated[int, Opt("--steps", help="Sampling steps.")] = 20,
    guidance: Annotated[float, Opt("--guidance", help="Classifier-free guidance scale.")] = 7.5,
    negative_prompt: Annotated[str, Opt("--negative-prompt")] = "",
    batch_size: Annotated[int, Opt("--batch-size", help="Images per batch (does not change any image).")] = 4,
    resolution: ResolutionOpt = None,
    sampler: SamplerOpt = "dpm++2m",
    overwrite: OverwriteOpt = False,
) -> None:
    """Generate class prior images with the frozen base model; only missing images are made."""
    from dreamlora import make_class_images

    progress = TerminalProgress()
    try:
        paths = make_class_images(class_prompt, out, num_images, model=model, single_file_config=model_config,
                                  seed=seed, steps=steps, guidance=guidance, negative_prompt=negative_prompt,
                                  batch_size=batch_size, resolution=resolution, sampler=sampler,
                                  overwrite=overwrite, progress=progress)
    finally:
        progress.close()
    typer.echo(f"{len(paths)} class images in {out}")

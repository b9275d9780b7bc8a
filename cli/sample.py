"""`dreamlora sample`: a grid of prompts (x LoRA scales) by seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import ModelConfigOpt, ModelOpt, ResolutionOpt, SamplerOpt, existing_path, parse_list
from .progress import TerminalProgress

Opt = typer.Option


def command(
    prompt: Annotated[list[str], Opt("--prompt", help="Repeatable; {token} and {class} come from the LoRA file.")],
    out: Annotated[Path, Opt("--out", help="The grid PNG; images go to <out>-images/, settings to <out>.json.")],
    lora: Annotated[Optional[Path], Opt("--lora", help="LoRA .safetensors (omit for the base model alone).")] = None,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    seeds: Annotated[str, Opt("--seeds", help="Comma-separated seeds: the columns.")] = "0,1,2,3",
    scales: Annotated[str, Opt("--scales", help="Comma-separated LoRA scales; 0 is the base model.")] = "0,1",
    steps: Annotated[int, Opt("--steps", help="Sampling steps.")] = 20,
    guidance: Annotated[float, Opt("--guidance")] = 7.5,
    negative_prompt: Annotated[str, Opt("--negative-prompt")] = "",
    sampler: SamplerOpt = "dpm++2m",
    resolution: ResolutionOpt = None,
) -> None:
    """Render a sample grid with a LoRA file: rows are prompts (x scales), columns are seeds."""
    from dreamlora import SampleSettings, sample

    if lora is not None:
        existing_path(lora, "--lora")
    settings = SampleSettings(prompts=prompt, seeds=parse_list(seeds, int, "--seeds"),
                              scales=parse_list(scales, float, "--scales"), steps=steps, guidance=guidance,
                              sampler=sampler, negative_prompt=negative_prompt, resolution=resolution)
    progress = TerminalProgress()
    try:
        result = sample(lora, settings, out, model=model, single_file_config=model_config, progress=progress)
    finally:
        progress.close()
    typer.echo(f"wrote {result.grid} ({len(result.images)} images in {result.images[0].parent}, settings in {result.sidecar})")

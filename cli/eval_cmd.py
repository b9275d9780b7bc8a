"""`dreamlora eval`: score a LoRA beside its base model, as the DreamBooth paper does."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from dreamlora.progress import ProgressEvent

from .options import ModelConfigOpt, ModelOpt, SamplerOpt, existing_path, parse_list
from .progress import TerminalProgress

Opt = typer.Option

# Rows of the readable table: (field, label, how to read it).
ROWS = (
    ("subject_detected", "subject detected", "subject prompts showing the subject (oracle)"),
    ("subject_similarity", "subject similarity", "oracle cosine to the instance photos"),
    ("background_match", "background match", "subject prompts on the asked background (oracle)"),
    ("class_shows_subject", "class shows subject", "class prompts showing the subject (lower is better)"),
    ("class_shift", "class shift", "1 - cosine to the base model's class renders"),
    ("dino", "DINO", "cosine to the instance photos"),
    ("clip_i", "CLIP-I", "cosine to the instance photos"),
    ("clip_t", "CLIP-T", "cosine to the prompt"),
)


def command(
    file: Annotated[Path, typer.Argument(help="A LoRA .safetensors file.")],
    as_json: Annotated[bool, Opt("--json", help="Print one JSON object.")] = False,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    seeds: Annotated[str, Opt("--seeds", help="Comma-separated seeds: one render per prompt and seed.")] = "0,1,2,3,4,5,6,7",
    backgrounds: Annotated[str, Opt("--backgrounds", help="Comma-separated backgrounds of the subject prompts.")]
    = "blue,gray,pink,orange",
    steps: Annotated[int, Opt("--steps", help="Sampling steps.")] = 20,
    guidance: Annotated[float, Opt("--guidance")] = 7.5,
    sampler: SamplerOpt = "dpm++2m",
    instance_dir: Annotated[Optional[Path], Opt("--instance-dir", help="The instance photos (default: the folder "
                                                "recorded in the file, or sample_instances/<its name>).")] = None,
    oracle: Annotated[Optional[bool], Opt("--oracle/--no-oracle", help="Read renders with the toy oracle "
                                          "(default: only for builtin:toy).")] = None,
    dino: Annotated[Optional[Path], Opt("--dino", help="Local DINO/ViT transformers folder: adds the DINO score.")] = None,
    clip: Annotated[Optional[Path], Opt("--clip", help="Local CLIP transformers folder: adds CLIP-I and CLIP-T.")] = None,
    grid: Annotated[Optional[Path], Opt("--grid", help="Also save the renders as a PNG grid (LoRA and base rows).")]
    = None,
) -> None:
    """Render subject and class prompts with and without the LoRA and score them (subject fidelity, prior drift)."""
    from dreamlora.evaluate import evaluate

    existing_path(file, "FILE")
    bars = TerminalProgress()

    def progress(event: ProgressEvent) -> None:
        if not as_json:  # --json keeps the terminal for the JSON alone
            bars(replace(event, stage="sample") if event.stage == "eval" else event)  # drawn as a "sampling" bar

    try:
        report = evaluate(file, model=model, single_file_config=model_config, seeds=parse_list(seeds, int, "--seeds"),
                          backgrounds=parse_list(backgrounds, str, "--backgrounds"), steps=steps, guidance=guidance,
                          sampler=sampler, instance_dir=instance_dir, oracle=oracle, dino=dino, clip=clip,
                          grid=grid, progress=progress)
    finally:
        bars.close()
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    typer.echo(format_table(report))


def format_table(report) -> str:
    """The report as a small table: one row a computed metric, LoRA beside base."""
    lines = [f"{report.lora_file} on {report.model}: {len(report.seeds)} seeds x {len(report.prompts)} prompts, "
             f"{report.steps} {report.sampler} steps, guidance {report.guidance:g} ({report.seconds:.0f} s)",
             "", f"{'metric':<22}{'LoRA':>8}{'base':>8}  "]
    for key, label, meaning in ROWS:
        lora, base = getattr(report.lora, key), getattr(report.base, key)
        if lora is None and base is None:
            continue
        lines.append(f"{label:<22}{_cell(lora):>8}{_cell(base):>8}  {meaning}")
    lines += ["", "subject prompts: " + "; ".join(report.subject_prompts),
              "class prompts: " + "; ".join(report.class_prompts)]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"

"""`dreamlora eval`: score a LoRA beside its base model, as the DreamBooth paper does."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from dreamlora.config import EvalSettings
from dreamlora.progress import ProgressEvent

from .options import ModelConfigOpt, ModelOpt, existing_path, with_settings
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


@with_settings(EvalSettings)
def command(
    settings: dict,
    file: Annotated[Path, typer.Argument(help="A LoRA .safetensors file.")],
    as_json: Annotated[bool, Opt("--json", help="Print one JSON object.")] = False,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
) -> None:
    """Render subject and class prompts with and without the LoRA and score them (subject fidelity, prior drift)."""
    from dreamlora.config import settings_from

    existing_path(file, "FILE")
    resolved = settings_from(EvalSettings, settings)
    from dreamlora.evaluation import evaluate

    bars = TerminalProgress()

    def progress(event: ProgressEvent) -> None:
        if not as_json:  # --json keeps the terminal for the JSON alone
            bars(replace(event, stage="sample") if event.stage == "eval" else event)  # drawn as a "sampling" bar

    try:
        report = evaluate(file, resolved, model=model, single_file_config=model_config, progress=progress)
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

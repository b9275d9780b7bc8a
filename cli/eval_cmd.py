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
    ("subject_detected", "subject detected",
     "subject prompts showing a round red ball with separate white dots (oracle and pixels)"),
    ("dots_detected", "dots detected", "subject prompts where the dot detector alone fires (oracle)"),
    ("subject_similarity", "subject similarity", "oracle cosine to the instance photos"),
    ("background_match", "background match", "subject prompts on the asked background (oracle)"),
    ("class_shows_subject", "class shows subject", "class prompts showing the subject (lower is better)"),
    ("class_shift", "class shift", "1 - cosine to the base model's class renders"),
    ("other_classes_color_shift", "other classes: colour", "TV distance of their colours from the base's"),
    ("other_classes_background_shift", "other classes: bg", "TV distance of their backgrounds from the base's"),
    ("base_color_spread", "  base's own: colour", "the same distance, base vs base on other seeds (floor)"),
    ("base_background_spread", "  base's own: bg", "the same for backgrounds (floor)"),
    ("other_classes_show_subject", "other classes: dots", "renders of other classes with the dots"),
    ("attributes_obeyed", "attributes obeyed", "asked colour and background both rendered"),
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
    """The report as small tables, one a prompt set: one row a computed metric, LoRA beside base."""
    scale = f", LoRA scale {report.lora_scale:g}" if report.lora_scale != 1 else ""
    lines = [f"{report.lora_file} on {report.model}: {report.steps} {report.sampler} steps, guidance "
             f"{report.guidance:g}{scale} ({report.seconds:.0f} s)"]
    for chosen in report.sets:
        lines += ["", f"{chosen.name} set: {len(chosen.seeds)} seeds ({_seed_range(chosen.seeds)}) x "
                  f"{len(chosen.subject_prompts)} subject prompts", f"{'metric':<24}{'LoRA':>8}{'base':>8}  "]
        for key, label, meaning in ROWS:
            lora, base = getattr(chosen.lora, key), getattr(chosen.base, key)
            if lora is None and base is None:
                continue
            lines.append(f"{label:<24}{_cell(lora):>8}{_cell(base):>8}  {meaning}")
        if any(v for v in chosen.per_background.values()):
            lines.append("subject detected by background: " + ", ".join(
                f"{bg} {_cell(v.get('lora'))} (base {_cell(v.get('base'))})" for bg, v in chosen.per_background.items()))
        lines.append("subject prompts: " + "; ".join(chosen.subject_prompts))
        lines.append("class prompts: " + "; ".join(chosen.class_prompts))
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def _seed_range(seeds: list[int]) -> str:
    consecutive = seeds == list(range(seeds[0], seeds[0] + len(seeds)))
    return f"{seeds[0]}-{seeds[-1]}" if consecutive and len(seeds) > 2 else ",".join(map(str, seeds))


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"

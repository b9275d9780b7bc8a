"""`dreamlora train`: check flags, build the config, call dreamlora.train."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import ModelConfigOpt, ModelOpt, OverwriteOpt, ResolutionOpt, SeedOpt
from .progress import TerminalProgress

Opt = typer.Option


def command(
    instance_dir: Annotated[Optional[Path], typer.Argument(help="Folder of photos of the subject.")] = None,
    token: Annotated[Optional[str], Opt("--token", help="Rare token that names the subject (default sks).")] = None,
    class_word: Annotated[Optional[str], Opt("--class-word", help="The subject's class, e.g. dog.")] = None,
    out: Annotated[Optional[Path], Opt("--out", help="The .safetensors file to write.")] = None,
    config: Annotated[Optional[Path], Opt("--config", help="TOML file of settings; flags override it.")] = None,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    steps: Annotated[Optional[int], Opt("--steps", help="Optimizer steps (default 500; builtin:toy 1000).")] = None,
    prior: Annotated[Optional[bool], Opt("--prior/--no-prior", help="Prior preservation (default on).")] = None,
    class_dir: Annotated[Optional[Path], Opt("--class-dir", help="Use these class images instead of generating.")] = None,
    num_class_images: Annotated[Optional[int], Opt("--num-class-images", help="Generated class images (default 100).")] = None,
    prior_loss_weight: Annotated[Optional[float], Opt("--prior-loss-weight", help="λ of the class loss (default 1; builtin:toy 0.5).")] = None,
    class_prompt: Annotated[Optional[str], Opt("--class-prompt", help="Default: 'a photo of {class}'.")] = None,
    instance_prompt: Annotated[Optional[str], Opt("--instance-prompt", help="Default: 'a photo of {token} {class}'.")] = None,
    resolution: ResolutionOpt = None,
    crop: Annotated[Optional[str], Opt("--crop", help="center or random (redrawn every step).")] = None,
    random_flip: Annotated[Optional[bool], Opt("--random-flip/--no-random-flip", help="Random horizontal flips.")] = None,
    rank: Annotated[Optional[int], Opt("--rank", help="LoRA rank (default 4; builtin:toy 32).")] = None,
    alpha: Annotated[Optional[float], Opt("--alpha", help="LoRA alpha (default = rank).")] = None,
    lora_dropout: Annotated[Optional[float], Opt("--lora-dropout", help="Dropout on the LoRA path.")] = None,
    train_text_encoder: Annotated[Optional[bool], Opt("--train-text-encoder/--no-train-text-encoder",
                                                      help="Also train LoRA on the text encoder (default off; builtin:toy on).")] = None,
    text_encoder_lr: Annotated[Optional[float], Opt("--text-encoder-lr", help="Text-encoder LR (default: --lr).")] = None,
    lr: Annotated[Optional[float], Opt("--lr", help="Learning rate (default 1e-4; builtin:toy 1e-3).")] = None,
    lr_scheduler: Annotated[Optional[str], Opt("--lr-scheduler", help="constant, constant_with_warmup, linear, cosine, polynomial.")] = None,
    lr_warmup_steps: Annotated[Optional[int], Opt("--lr-warmup-steps")] = None,
    batch_size: Annotated[Optional[int], Opt("--batch-size", help="Instance images per step (as many class images join).")] = None,
    grad_accum: Annotated[Optional[int], Opt("--grad-accum", help="Gradient accumulation steps.")] = None,
    max_grad_norm: Annotated[Optional[float], Opt("--max-grad-norm", help="Gradient clipping (0: off).")] = None,
    snr_gamma: Annotated[Optional[float], Opt("--snr-gamma", help="Min-SNR-γ loss weighting, e.g. 5 (default: off).")] = None,
    noise_offset: Annotated[Optional[float], Opt("--noise-offset", help="Offset noise strength, e.g. 0.05 (default 0).")] = None,
    optimizer: Annotated[Optional[str], Opt("--optimizer", help="adamw or adamw8bit (bitsandbytes).")] = None,
    mixed_precision: Annotated[Optional[str], Opt("--mixed-precision", help="no, fp16 (GPU) or bf16.")] = None,
    gradient_checkpointing: Annotated[Optional[bool], Opt("--gradient-checkpointing/--no-gradient-checkpointing")] = None,
    seed: SeedOpt = None,
    checkpoint_every: Annotated[Optional[int], Opt("--checkpoint-every", help="Steps between checkpoints.")] = None,
    validate_every: Annotated[Optional[int], Opt("--validate-every", help="Steps between validation grids (0: end only).")] = None,
    run_dir: Annotated[Optional[Path], Opt("--run-dir", help="Checkpoints and validation grids (default <out>-run).")] = None,
    resume: Annotated[Optional[bool], Opt("--resume/--no-resume", help="Continue from the latest checkpoint.")] = None,
    format: Annotated[Optional[str], Opt("--format", help="kohya (AUTOMATIC1111/ComfyUI, default) or diffusers.")] = None,
    save_dtype: Annotated[Optional[str], Opt("--save-dtype", help="fp16 (default), bf16 or fp32.")] = None,
    overwrite: OverwriteOpt = False,
    compile: Annotated[Optional[bool], Opt("--compile/--no-compile",
                                           help="torch.compile the UNet (GPU: faster steps after a compile).")] = None,
    memory_budget: Annotated[Optional[float], Opt("--memory-budget",
                                                  help="GiB the run may use (e.g. 8, 12, 24): memory savers are "
                                                       "turned on until the estimate fits.")] = None,
    dry_run: Annotated[bool, Opt("--dry-run", help="Print steps, epochs, class images and the memory estimate; "
                                                   "load no weights, train nothing.")] = False,
) -> None:
    """Train a DreamBooth LoRA on the photos in INSTANCE_DIR and write one .safetensors file."""
    from dreamlora import load_config, train

    overrides = {
        "data.instance_dir": instance_dir, "data.token": token, "data.class_word": class_word,
        "output.path": out, "model.name": model, "model.single_file_config": model_config,
        "train.steps": steps, "prior.enabled": prior, "prior.class_dir": class_dir,
        "prior.num_class_images": num_class_images, "prior.loss_weight": prior_loss_weight,
        "data.class_prompt": class_prompt, "data.instance_prompt": instance_prompt, "data.resolution": resolution,
        "data.crop": crop, "data.random_flip": random_flip, "lora.rank": rank, "lora.alpha": alpha,
        "lora.dropout": lora_dropout, "lora.train_text_encoder": train_text_encoder,
        "lora.text_encoder_lr": text_encoder_lr, "train.learning_rate": lr, "train.lr_scheduler": lr_scheduler,
        "train.lr_warmup_steps": lr_warmup_steps, "train.batch_size": batch_size,
        "train.gradient_accumulation_steps": grad_accum, "train.max_grad_norm": max_grad_norm,
        "train.snr_gamma": snr_gamma, "train.noise_offset": noise_offset,
        "train.optimizer": optimizer, "train.mixed_precision": mixed_precision,
        "train.gradient_checkpointing": gradient_checkpointing, "train.seed": seed,
        "train.checkpoint_every": checkpoint_every, "validation.every": validate_every, "train.run_dir": run_dir,
        "train.resume": resume, "output.format": format, "output.save_dtype": save_dtype,
        "output.overwrite": overwrite or None, "train.compile": compile, "train.memory_budget": memory_budget,
    }
    overrides = {k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items()}
    settings = load_config(config, overrides)
    if dry_run:
        from dreamlora.memory import plan

        for line in plan(settings).lines():
            typer.echo(line)
        return
    progress = TerminalProgress()
    try:
        result = train(settings, progress=progress)
    finally:
        progress.close()
    loss = f", final loss {result.loss:.4f}" if result.loss is not None else ""
    typer.echo(f"wrote {result.output} ({result.output.stat().st_size / 1e6:.2f} MB) after {result.steps} steps{loss}")
    if result.validation_grid:
        typer.echo(f"validation grid: {result.validation_grid}")

"""The plan of a run (the `--dry-run` report) and the settings that fit a memory budget."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import DreamLoraConfig, describe, with_epochs
from ..errors import ConfigError
from ..models.configs import ModelConfigs, read_model_configs
from ..models.registry import detect_family
from .estimate import GIB, MemoryEstimate, MemorySettings, estimate_memory


@dataclass
class TrainingPlan:
    """What `train(config)` will do, from the configs and folders alone (the `--dry-run` report)."""

    config: DreamLoraConfig  # the settings the run will use (after the memory budget)
    model: str
    device: str  # "cuda" | "cpu" | "mps"
    processes: int
    resolution: int
    instance_images: int
    images_per_step: int  # instance images per optimizer step, over all processes
    epochs: float  # passes over the instance images
    class_images: int  # 0 without prior preservation
    class_images_to_generate: int | None  # None: unknown (the cache could not be checked)
    memory: MemoryEstimate
    budget_gib: float | None = None
    changes: list[str] = field(default_factory=list)  # what the budget changed

    @property
    def fits(self) -> bool | None:
        return None if self.budget_gib is None else self.memory.needs() <= self.budget_gib

    def lines(self) -> list[str]:
        """The plan as text, one line each (the CLI prints them)."""
        t, m, gib = self.config.train, self.memory, format_bytes
        out = [f"model: {self.model} at {self.resolution} px, {self.processes} process(es) on {self.device}",
               f"steps: {t.steps} ({self.images_per_step} instance image(s) a step: batch {t.batch_size} x "
               f"grad-accum {t.gradient_accumulation_steps} x {self.processes} process(es))",
               f"epochs: {self.epochs:.1f} over {self.instance_images} instance images"]
        if self.class_images:
            todo = ("unknown how many are cached" if self.class_images_to_generate is None
                    else f"{self.class_images_to_generate} to generate")
            out.append(f"class images: {self.class_images} ({todo})")
        else:
            out.append("class images: none (prior preservation off)")
        out.append(f"settings: mixed precision {t.mixed_precision}, gradient checkpointing "
                   f"{'on' if t.gradient_checkpointing else 'off'}, optimizer {t.optimizer}, batch {t.batch_size}, "
                   f"text encoder {'trained' if self.config.lora.train_text_encoder else 'frozen'}, "
                   f"LoRA rank {self.config.lora.rank}"
                   + (f", frozen denoiser in {t.base_quantization}" if t.base_quantization != "none" else "")
                   + (", T5 on the CPU" if t.t5_on_cpu else ""))
        out.append(f"estimated peak {'accelerator' if self.device != 'cpu' else 'tensor'} memory: {gib(m.peak)} "
                   f"({m.peak_phase}); by phase: " + ", ".join(f"{k} {gib(v)}" for k, v in m.phases.items()))
        out.append("training peak: " + ", ".join(f"{k} {gib(v)}" for k, v in m.training.items() if v))
        if self.budget_gib is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            overhead = "CUDA context" if self.device == "cuda" else "process overhead"
            out.append(f"memory budget {self.budget_gib:g} GiB: needs {m.needs():.2f} GiB with allocator slack and "
                       f"{overhead}: {verdict}" + (f"; changed: {'; '.join(self.changes)}" if self.changes else ""))
        return out


def format_bytes(size: int) -> str:
    """1536 MiB -> '1.50 GiB'; below a GiB in MiB."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2**20:.1f} MiB"


def accelerator_type() -> str:
    """The device type `accelerate` will train on here, found without initialising a process group."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def training_rows(data) -> list:
    """The images a run trains on, unchecked: a fine-tune's captioned rows, or the instance folder's photos."""
    if data.job == "finetune":
        from ..captioned import read_captioned

        return read_captioned(data.instance_dir, image_column=data.image_column, caption_column=data.caption_column)
    from ..data import list_image_files

    return list_image_files(data.instance_dir, "instance")[0]


def plan(config: DreamLoraConfig, *, device_type: str | None = None, num_processes: int | None = None) -> TrainingPlan:
    """Plan a run of `config` without loading any weights: counts, epochs and a memory estimate.

    With `config.train.memory_budget` set, the returned plan's config has the settings chosen to fit.

    Args:
        config: a validated configuration.
        device_type: "cuda", "cpu" or "mps"; None: what this machine offers.
        num_processes: processes sharing the run; None: $WORLD_SIZE (set by accelerate launch) or 1.

    Raises:
        DataError: the instance or class folder is unusable; ModelLoadError: the model's configs are missing;
        ConfigError: no settings fit the memory budget.
    """
    from ..data import list_image_files

    device_type = device_type or accelerator_type()
    processes = num_processes or int(os.environ.get("WORLD_SIZE", "1"))
    models = read_model_configs(config.model.name, config.model.single_file_config)
    images = len(training_rows(config.data))
    config = with_epochs(config, images, processes)
    resolution = config.data.resolution or models.default_resolution
    class_images, to_generate = 0, 0
    if config.prior.enabled and config.prior.class_dir:
        class_images = len(list_image_files(config.prior.class_dir, "class")[0])
    elif config.prior.enabled:
        class_images = config.prior.num_class_images
        to_generate = _class_images_to_generate(config, resolution, device_type)

    def settings_for(c: DreamLoraConfig) -> MemorySettings:
        return MemorySettings.from_config(c, device_type=device_type, instance_images=images,
                                          generate_class_images=to_generate != 0, resolution=resolution)

    changes: list[str] = []
    if config.train.memory_budget is not None:
        config, changes, estimate = fit_budget(config, models, settings_for, config.train.memory_budget, device_type)
    else:
        estimate = estimate_memory(models, settings_for(config))
    t = config.train
    per_step = t.batch_size * t.gradient_accumulation_steps * processes
    return TrainingPlan(config=config, model=config.model.name if config.model.name.startswith("builtin:")
                        else Path(config.model.name).name or config.model.name, device=device_type,
                        processes=processes, resolution=resolution, instance_images=images,
                        images_per_step=per_step, epochs=t.steps * per_step / images,
                        class_images=class_images, class_images_to_generate=to_generate, memory=estimate,
                        budget_gib=config.train.memory_budget, changes=changes)


def fit_budget(config: DreamLoraConfig, models: ModelConfigs, settings_for, budget_gib: float,
               device_type: str) -> tuple[DreamLoraConfig, list[str], MemoryEstimate]:
    """The first settings on a ladder of memory savers that fit `budget_gib`, cheapest in speed and quality first.

    The ladder only turns savers on: half-precision frozen weights (CUDA, when mixed precision is "no"),
    SD3's/Flux's T5 encoding the prompts on the CPU (it costs the start a little, training nothing), 8-bit AdamW
    (only where it saves memory: LoRA tensors are mostly too small for 8-bit states), gradient checkpointing, halving the batch while doubling gradient accumulation (same images a
    step), and last, text-encoder training off.

    Raises:
        ConfigError: even the leanest settings do not fit; names the estimate and what to change.
    """
    current, changes = config, []
    estimate = estimate_memory(models, settings_for(current))
    if estimate.needs() <= budget_gib:
        return current, changes, estimate

    def step(label: str, **train_or_lora) -> bool:
        nonlocal current, estimate
        candidate = _replace(current, **train_or_lora)
        candidate_estimate = estimate_memory(models, settings_for(candidate))
        if candidate_estimate.peak >= estimate.peak * 0.99:  # saves (almost) nothing: keep the faster setting
            return False
        current, estimate = candidate, candidate_estimate
        changes.append(f"{label} (estimate {estimate.needs():.2f} GiB)")
        return estimate.needs() <= budget_gib

    t = current.train
    if device_type == "cuda" and t.mixed_precision == "no":
        half = "bf16" if _bf16_supported() else "fp16"
        if step(f"{describe('train.mixed_precision')} {half}", mixed_precision=half):
            return current, changes, estimate
    if detect_family(models).cached_text_encoder is not None and not t.t5_on_cpu and \
            step(f"{describe('train.t5_on_cpu')} on", t5_on_cpu=True):
        return current, changes, estimate
    if t.optimizer == "adamw" and step(f"{describe('train.optimizer')} adamw8bit", optimizer="adamw8bit"):
        return current, changes, estimate
    if not t.gradient_checkpointing and step(f"{describe('train.gradient_checkpointing')} on",
                                             gradient_checkpointing=True):
        return current, changes, estimate
    while current.train.batch_size > 1:
        b, a = current.train.batch_size, current.train.gradient_accumulation_steps
        if step(f"{describe('train.batch_size')} {max(1, b // 2)} with {describe('train.gradient_accumulation_steps')} "
                f"{a * 2}", batch_size=max(1, b // 2), gradient_accumulation_steps=a * 2):
            return current, changes, estimate
    # The token's embedding is learnt inside the trained text encoder: it goes off with it.
    off = describe('lora.train_text_encoder') + (f" and {describe('lora.train_token_embedding')}"
                                                 if current.lora.train_token_embedding else "")
    if current.lora.train_text_encoder and step(f"{off} off", train_text_encoder=False, train_token_embedding=False):
        return current, changes, estimate
    raise ConfigError(
        f"{describe('train.memory_budget')} {budget_gib:g} GiB is too small: with the leanest settings "
        f"({'; '.join(changes) or 'nothing to change'}) the run needs {estimate.needs():.2f} GiB "
        f"(peak {estimate.peak / GIB:.2f} GiB in {estimate.peak_phase}). Lower --resolution, raise the budget"
        + (", or store the frozen weights in 8 or 4 bits (--base-quantization int8 or nf4)"
           if current.train.base_quantization == "none" else "") + ".")


def _replace(config: DreamLoraConfig, **values) -> DreamLoraConfig:
    train_fields = {f.name for f in dataclasses.fields(config.train)}
    train = {k: v for k, v in values.items() if k in train_fields}
    lora = {k: v for k, v in values.items() if k not in train_fields}
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **train),
                               lora=dataclasses.replace(config.lora, **lora))


def _bf16_supported() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def apply_memory_budget(config: DreamLoraConfig) -> tuple[DreamLoraConfig, list[str], MemoryEstimate | None]:
    """For train(): the config with settings that fit `train.memory_budget` (unchanged when it is None)."""
    if config.train.memory_budget is None:
        return config, [], None
    planned = plan(config)
    return planned.config, planned.changes, planned.memory


def _class_images_to_generate(config: DreamLoraConfig, resolution: int, device_type: str) -> int | None:
    """How many class images the cache lacks for this config, or None when the model cannot be identified."""
    from ..errors import DreamLoraError
    from ..identity import model_identity
    from ..priors import cached_prior_dir, missing_indices, training_prior_spec

    try:
        identity = model_identity(config.model.name, config.model.single_file_config, config.model.vae)
    except (DreamLoraError, OSError):  # an estimate: unknown is an answer
        return None
    spec = training_prior_spec(config, identity, resolution, device_type)
    return len(missing_indices(cached_prior_dir(spec), config.prior.num_class_images))

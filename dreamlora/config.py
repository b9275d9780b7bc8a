"""One typed, validated configuration tree: defaults, then a TOML file, then command-line flags.

Every field has a docstring-like comment and, where the CLI exposes it, the flag that sets it
(see FLAGS). Problems are gathered and raised once as a ConfigError listing each, so a user fixes
everything in one go. The resolved tree is stored as JSON in the LoRA file's metadata.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError
from .models.builtin import recommended_settings
from .models.loading import SAMPLERS as _SAMPLER_TABLE

DEFAULT_MODEL = "builtin:toy"
SAMPLERS = tuple(_SAMPLER_TABLE)  # the names --sampler / --prior-sampler accept


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL  # builtin:<name>, hub id, diffusers folder, or .safetensors/.ckpt file
    single_file_config: str | None = None  # for a single-file checkpoint: diffusers folder or hub id with its configs


@dataclass
class DataConfig:
    instance_dir: str = ""  # folder of photos of the subject (TOML: relative to the TOML file)
    token: str = "sks"  # rare token that will name the subject
    class_word: str = ""  # the subject's class, e.g. "dog"
    instance_prompt: str = "a photo of {token} {class}"  # per-image .txt captions override it
    class_prompt: str = "a photo of {class}"
    resolution: int | None = None  # None: the base model's native resolution
    crop: Literal["center", "random"] = "center"  # random crops are redrawn every step
    random_flip: bool = False  # horizontal flip, redrawn every step


@dataclass
class PriorConfig:
    enabled: bool = True  # prior preservation (class images + class loss)
    class_dir: str | None = None  # use these class images instead of generating them
    num_class_images: int = 100  # generated into the cache when class_dir is not given
    loss_weight: float = 1.0  # λ in  loss = mse(instance) + λ · mse(class)
    sampler: str = "dpm++2m"  # DPM-Solver++ 2M: near 50-step PNDM quality in 20 steps
    steps: int = 20
    guidance: float = 7.5
    negative_prompt: str = ""
    batch_size: int = 4
    seed: int = 0


@dataclass
class LoraConfig:
    rank: int = 4
    alpha: float | None = None  # None: equal to rank (scale 1); stored in the file
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    train_text_encoder: bool = False
    text_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    text_encoder_lr: float | None = None  # None: the UNet learning rate

    @property
    def resolved_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass
class TrainConfig:
    steps: int = 500  # optimizer steps
    batch_size: int = 1  # instance images per step (as many class images join them)
    learning_rate: float = 1e-4
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "polynomial"] = "constant"
    lr_warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    snr_gamma: float | None = None  # min-SNR-γ loss weighting (5 is the paper's value); None: plain MSE
    noise_offset: float = 0.0  # per-channel offset added to the noise (kohya's noise_offset; 0.05-0.1 typical)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    weight_decay: float = 1e-2
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 100  # steps between checkpoints in the run folder (0: only the final one)
    keep_checkpoints: int = 2  # older checkpoints are deleted
    run_dir: str | None = None  # None: "<out stem>-run" beside the output file
    resume: bool = False  # continue from the latest checkpoint in the run folder
    log_every: int = 10  # steps between loss reports (the only host-device syncs)
    compile: bool = False  # torch.compile the UNet: faster steps on a GPU after a compile of a minute or more
    memory_budget: float | None = None  # GiB the run may use; settings are picked to fit (see dreamlora.memory)


@dataclass
class ValidationConfig:
    every: int = 0  # steps between validation grids in the run folder (0: only at the end)
    prompts: list[str] = field(default_factory=lambda: ["a photo of {token} {class}", "a photo of {class}"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int = 20
    guidance: float = 7.5
    sampler: str = "dpm++2m"


@dataclass
class OutputConfig:
    path: str = ""  # the .safetensors file to write
    format: Literal["kohya", "diffusers"] = "kohya"  # kohya: AUTOMATIC1111/ComfyUI keys
    save_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    overwrite: bool = False


@dataclass
class DreamLoraConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# The flag that sets each key, quoted in error messages.
FLAGS: dict[str, str] = {
    "model.name": "--model",
    "model.single_file_config": "--model-config",
    "data.instance_dir": "INSTANCE_DIR",
    "data.token": "--token",
    "data.class_word": "--class-word",
    "data.instance_prompt": "--instance-prompt",
    "data.class_prompt": "--class-prompt",
    "data.resolution": "--resolution",
    "data.crop": "--crop",
    "data.random_flip": "--random-flip",
    "prior.enabled": "--no-prior",
    "prior.class_dir": "--class-dir",
    "prior.num_class_images": "--num-class-images",
    "prior.loss_weight": "--prior-loss-weight",
    "prior.sampler": "--prior-sampler",
    "prior.steps": "--prior-steps",
    "prior.guidance": "--prior-guidance",
    "lora.rank": "--rank",
    "lora.alpha": "--alpha",
    "lora.dropout": "--lora-dropout",
    "lora.train_text_encoder": "--train-text-encoder",
    "lora.text_encoder_lr": "--text-encoder-lr",
    "train.steps": "--steps",
    "train.batch_size": "--batch-size",
    "train.learning_rate": "--lr",
    "train.lr_scheduler": "--lr-scheduler",
    "train.lr_warmup_steps": "--lr-warmup-steps",
    "train.gradient_accumulation_steps": "--grad-accum",
    "train.max_grad_norm": "--max-grad-norm",
    "train.snr_gamma": "--snr-gamma",
    "train.noise_offset": "--noise-offset",
    "train.optimizer": "--optimizer",
    "train.mixed_precision": "--mixed-precision",
    "train.gradient_checkpointing": "--gradient-checkpointing",
    "train.seed": "--seed",
    "train.checkpoint_every": "--checkpoint-every",
    "train.run_dir": "--run-dir",
    "train.resume": "--resume",
    "train.compile": "--compile",
    "train.memory_budget": "--memory-budget",
    "validation.every": "--validate-every",
    "output.path": "--out",
    "output.format": "--format",
    "output.save_dtype": "--save-dtype",
    "output.overwrite": "--overwrite",
}

# Flags that say how a command is run, not what is learnt: left out of the stored config, so a resumed
# run stores what an uninterrupted one does.
RUN_CONTROL_KEYS = ("train.resume", "output.overwrite")

# Keys holding paths: in a TOML file they are relative to the file.
PATH_KEYS = ("data.instance_dir", "prior.class_dir", "train.run_dir", "output.path", "model.single_file_config")


def describe(key: str) -> str:
    """'train.steps (flag --steps)' for messages."""
    flag = FLAGS.get(key)
    return f"{key} (flag {flag})" if flag else key


def load_config(toml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> DreamLoraConfig:
    """Build the configuration: defaults, then the TOML file, then `overrides` (dotted keys, e.g. from flags).

    Keys that neither sets take the base model's recommended value where it has one
    (dreamlora.models.builtin.recommended_settings: builtin:toy), else the dataclass default.

    Args:
        toml_path: optional TOML file; relative paths inside it are resolved against its folder.
        overrides: {"train.steps": 100, ...}; None values are ignored (flag not given).

    Returns:
        The validated configuration.

    Raises:
        ConfigError: listing every problem (unknown keys with suggestions, wrong types, bad values).
    """
    problems: list[str] = []
    values: dict[str, Any] = {}
    if toml_path is not None:
        values.update(_read_toml(Path(toml_path), problems))
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    # Then what the base model recommends (builtin:toy), for the keys neither the file nor a flag set.
    model = values.get("model.name", DEFAULT_MODEL)
    for key, value in recommended_settings(model if isinstance(model, str) else "").items():
        values.setdefault(key, value)
    config = DreamLoraConfig()
    unread = {key for key, value in values.items() if not _assign(config, key, value, problems)}
    # A value that could not be read keeps its default; the others are still checked, so all show at once.
    problems.extend(p for p in validate(config) if not any(p.startswith(f"{key} ") for key in unread))
    if problems:
        raise ConfigError(_format_problems(problems))
    return config


def _format_problems(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} configuration problems: " + "; ".join(problems)


def _read_toml(path: Path, problems: list[str]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist. Check the --config path.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file '{path}' is not valid TOML: {exc}. Fix the file.") from exc
    flat: dict[str, Any] = {}
    for section, body in data.items():
        if not isinstance(body, dict):
            flat[section] = body  # reported as an unknown key by _assign
            continue
        for key, value in body.items():
            flat[f"{section}.{key}"] = value
    for key in PATH_KEYS:
        value = flat.get(key)
        if isinstance(value, str) and value and not _looks_like_hub_id(key, value):
            flat[key] = str((path.parent / value).resolve()) if not Path(value).is_absolute() else value
    return flat


def _looks_like_hub_id(key: str, value: str) -> bool:
    # model.single_file_config may be a hub id ("org/name"); keep it as written unless it exists locally.
    return key == "model.single_file_config" and value.count("/") == 1 and not Path(value).exists()


def _assign(config: DreamLoraConfig, key: str, value: Any, problems: list[str]) -> bool:
    """Set one dotted key; False (and a problem) when the key is unknown or the value has the wrong type."""
    section_name, _, field_name = key.partition(".")
    sections = {f.name: f for f in dataclasses.fields(config)}
    if section_name not in sections or not field_name:
        problems.append(f"unknown config key '{key}'{_suggest(key, _all_keys())}")
        return False
    section = getattr(config, section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if field_name not in fields:
        problems.append(f"unknown config key '{key}'{_suggest(key, _all_keys())}")
        return False
    hint = typing.get_type_hints(type(section))[field_name]
    try:
        setattr(section, field_name, _coerce(value, hint))
    except (TypeError, ValueError) as exc:
        problems.append(f"{describe(key)}: {exc}")
        return False
    return True


def _all_keys() -> list[str]:
    config = DreamLoraConfig()
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(config) for f in dataclasses.fields(getattr(config, s.name))]


def _suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(key.rpartition(".")[2], [c.rpartition(".")[2] for c in candidates], n=1)
        close = [c for c in candidates if close and c.endswith("." + close[0])][:1]
    return f"; did you mean '{close[0]}'?" if close else "; see the README for the keys"


def _coerce(value: Any, hint: Any) -> Any:
    """Convert a TOML or flag value to the field's type, or raise ValueError naming what was expected."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(str, choices))} (got {value!r})")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be a list (got {value!r})")
        return [_coerce(v, item) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"must be true or false (got {value!r})")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"must be a whole number (got {value!r})")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a whole number (got {value!r})") from None
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number (got {value!r})")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number (got {value!r})") from None
    if hint is str:
        if not isinstance(value, (str, Path)):
            raise ValueError(f"must be a string (got {value!r})")
        return str(value)
    return value


def validate(config: DreamLoraConfig) -> list[str]:
    """Every problem with the values and their combinations, each naming its key and flag."""
    c, problems = config, []

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(f"{describe(key)} {message}")

    check(c.train.steps > 0, "train.steps", f"must be > 0 (got {c.train.steps})")
    check(c.train.batch_size > 0, "train.batch_size", f"must be > 0 (got {c.train.batch_size})")
    check(c.train.learning_rate > 0, "train.learning_rate", f"must be > 0 (got {c.train.learning_rate})")
    check(c.train.lr_warmup_steps >= 0, "train.lr_warmup_steps", f"must be >= 0 (got {c.train.lr_warmup_steps})")
    check(c.train.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps",
          f"must be > 0 (got {c.train.gradient_accumulation_steps})")
    check(c.train.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0, 0 turns clipping off (got {c.train.max_grad_norm})")
    check(c.train.snr_gamma is None or c.train.snr_gamma > 0, "train.snr_gamma",
          f"must be > 0, or unset for plain MSE (got {c.train.snr_gamma})")
    check(0 <= c.train.noise_offset <= 1, "train.noise_offset", f"must be in [0, 1] (got {c.train.noise_offset})")
    check(c.train.checkpoint_every >= 0, "train.checkpoint_every", f"must be >= 0 (got {c.train.checkpoint_every})")
    check(c.train.keep_checkpoints > 0, "train.keep_checkpoints", f"must be > 0 (got {c.train.keep_checkpoints})")
    check(c.train.log_every > 0, "train.log_every", f"must be > 0 (got {c.train.log_every})")
    check(c.train.memory_budget is None or c.train.memory_budget > 0, "train.memory_budget",
          f"must be > 0 GiB (got {c.train.memory_budget})")
    check(c.lora.rank > 0, "lora.rank", f"must be > 0 (got {c.lora.rank})")
    check(c.lora.alpha is None or c.lora.alpha > 0, "lora.alpha", f"must be > 0 (got {c.lora.alpha})")
    check(0 <= c.lora.dropout < 1, "lora.dropout", f"must be in [0, 1) (got {c.lora.dropout})")
    check(bool(c.lora.target_modules), "lora.target_modules", "must name at least one module")
    check(c.lora.text_encoder_lr is None or c.lora.text_encoder_lr > 0, "lora.text_encoder_lr",
          f"must be > 0 (got {c.lora.text_encoder_lr})")
    check(c.data.resolution is None or (c.data.resolution >= 8 and c.data.resolution % 8 == 0), "data.resolution",
          f"must be a multiple of 8 (got {c.data.resolution})")
    check(c.prior.num_class_images > 0, "prior.num_class_images", f"must be > 0 (got {c.prior.num_class_images})")
    check(c.prior.loss_weight >= 0, "prior.loss_weight", f"must be >= 0 (got {c.prior.loss_weight})")
    check(c.prior.steps > 0, "prior.steps", f"must be > 0 (got {c.prior.steps})")
    check(c.prior.batch_size > 0, "prior.batch_size", f"must be > 0 (got {c.prior.batch_size})")
    check(c.prior.sampler in SAMPLERS, "prior.sampler", f"must be one of {', '.join(SAMPLERS)} (got {c.prior.sampler!r})")
    check(c.validation.sampler in SAMPLERS, "validation.sampler",
          f"must be one of {', '.join(SAMPLERS)} (got {c.validation.sampler!r})")
    check(c.validation.every >= 0, "validation.every", f"must be >= 0 (got {c.validation.every})")
    check(bool(c.validation.seeds), "validation.seeds", "must list at least one seed")
    check(all(0 <= s < 2**63 for s in c.validation.seeds), "validation.seeds",
          f"must be whole numbers from 0 to 2**63-1 (got {c.validation.seeds})")
    check(c.validation.steps > 0, "validation.steps", f"must be > 0 (got {c.validation.steps})")
    check(c.validation.guidance >= 0, "validation.guidance", f"must be >= 0 (got {c.validation.guidance})")
    check(c.prior.guidance >= 0, "prior.guidance", f"must be >= 0 (got {c.prior.guidance})")
    check(not (c.prior.enabled and c.prior.class_dir and c.data.instance_dir
               and Path(c.prior.class_dir).resolve() == Path(c.data.instance_dir).resolve()), "prior.class_dir",
          f"must not be the instance folder (both '{c.prior.class_dir}'): class images show other "
          f"{c.data.class_word or 'class'} pictures")
    problems.extend(_prompt_problems(c.data))
    check(bool(c.data.instance_dir), "data.instance_dir", "is required: the folder of subject photos")
    check(bool(c.output.path), "output.path", "is required: the .safetensors file to write")
    check(not c.output.path or c.output.path.endswith(".safetensors"), "output.path",
          f"must end in .safetensors (got '{c.output.path}')")
    return problems


def _prompt_problems(data: DataConfig) -> list[str]:
    problems = []
    token = data.token.strip()
    if not token:
        problems.append(f"{describe('data.token')} must not be empty; use a rare token such as 'sks'")
    if not data.class_word.strip():
        problems.append(f"{describe('data.class_word')} is required, e.g. --class-word dog")
    if token and token.lower() == data.class_word.strip().lower():
        problems.append(f"{describe('data.token')} must differ from the class word (both '{token}')")
    if token and len(token.split()) > 1:
        problems.append(f"{describe('data.token')} must be one word without spaces (got '{data.token}'), e.g. sks")
    if "{token}" not in data.instance_prompt and token and token not in _words(data.instance_prompt):
        problems.append(f"{describe('data.instance_prompt')} must contain {{token}} or '{token}' (got '{data.instance_prompt}')")
    if token and ("{token}" in data.class_prompt or token in _words(data.class_prompt)):
        problems.append(f"{describe('data.class_prompt')} must not contain the token '{token}' (got "
                        f"'{data.class_prompt}'): class images show any {data.class_word or 'member of the class'}, "
                        "not the subject")
    for key, template in (("data.instance_prompt", data.instance_prompt), ("data.class_prompt", data.class_prompt)):
        try:
            fill_prompt(template, "t", "c")
        except (KeyError, IndexError, ValueError):
            problems.append(f"{describe(key)} may only use the placeholders {{token}} and {{class}} (got '{template}')")
    return problems


def _words(text: str) -> list[str]:
    """'a photo of sks, dog.' -> ['a', 'photo', 'of', 'sks', 'dog']"""
    return [w.strip(".,;:!?()[]\"'") for w in text.split()]


def fill_prompt(template: str, token: str, class_word: str) -> str:
    """'a photo of {token} {class}' -> 'a photo of sks dog'."""
    return template.format_map({"token": token, "class": class_word})


def to_dict(config: DreamLoraConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_portable_json(config: DreamLoraConfig) -> str:
    """The resolved config as JSON with local paths reduced to their base names (for file metadata)."""
    data = to_dict(config)
    for key in RUN_CONTROL_KEYS:  # how the command was run, not how the file was made
        section, _, name = key.partition(".")
        data[section].pop(name, None)
    for key in PATH_KEYS:
        section, _, name = key.partition(".")
        value = data[section][name]
        if isinstance(value, str) and value and (Path(value).is_absolute() or Path(value).exists()):
            data[section][name] = Path(value).name
    model = data["model"]["name"]
    if Path(model).is_absolute() or Path(model).exists():
        data["model"]["name"] = Path(model).name
    return json.dumps(data, sort_keys=True)

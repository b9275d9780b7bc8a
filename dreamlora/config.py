"""One typed, validated configuration tree: defaults, then a TOML file, then command-line flags.

Every key is declared once, as a dataclass field made by `setting()`: its type (a `Literal` lists the
choices), default, help text, flag, value range and the built-in models' recommendations. The `train`
command's options and `--help`, the validation of ranges and the README's flag table are all derived from
these declarations. Problems are gathered and raised once as a ConfigError listing each, so a user fixes
everything in one go. The resolved tree is stored as JSON in the LoRA file's metadata.

Importing this module imports neither torch nor diffusers: the CLI builds its options from it in
milliseconds.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError
from .samplers import DEFAULT_SAMPLER, SAMPLERS, Sampler

DEFAULT_MODEL = "builtin:toy-dots"  # the toy model that draws the sample subject best (README, "does it learn?")
# Image sides beyond this are typos (a side of 10**9 asks for exabytes): SDXL trains at 1024, upscales reach 4096.
MAX_RESOLUTION = 8192
ARGUMENT = "INSTANCE_DIR"  # the one key set by a positional argument of `dreamlora train`
_NO_DEFAULT = object()


def setting(default: Any = _NO_DEFAULT, *, help: str, flag: str | None = None, factory: Any = None,
            low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
            recommended: dict[str, Any] | None = None, path: bool = False, run_control: bool = False,
            repeatable: bool = False) -> Any:
    """Declare one configuration key (a dataclass field) with everything the CLI, validation and docs need.

    Args:
        default: the value when neither the TOML file, a flag nor a model's recommendation sets it.
        help: one sentence for `--help`, the README's flag table and error messages.
        flag: the command-line flag (`--steps`; `--x/--no-x` for on/off; ARGUMENT for the positional one);
            None: TOML only.
        factory: a default factory, for list defaults.
        low, high: the allowed range; `low_open`/`high_open` exclude the bound itself.
        recommended: {"builtin:toy": value}: what a built-in model asks for where the default does not fit it.
        path: the value is a path; in a TOML file it is relative to the file.
        run_control: says how a command runs, not what is learnt: left out of the stored config.
        repeatable: a list flag given once per item (`--validation-prompt A --validation-prompt B`); other
            list flags take comma-separated items.
    """
    metadata = {"help": help, "flag": flag, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
                "recommended": dict(recommended or {}), "path": path, "run_control": run_control,
                "repeatable": repeatable}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


TOY = "builtin:toy"  # the shipped toy-world model; its tiny UNet needs more rank, rate and steps than SD 1.5
# the white-dot world's model (32x32 latents; docs/proof-of-learning.md): builtin:toy's recipe at a third of its rate
TOY_DOTS = "builtin:toy-dots"
ORACLE_MODELS = (TOY, TOY_DOTS)  # base models the shipped toy oracle reads (drawn like its world)


def oracle_reads(model: str, choice: bool | None) -> bool:
    """Whether the toy oracle reads a model's renders: the user's --oracle / --eval-oracle choice, else whether
    the model (a name, or a loaded model's identity) is one it was trained to read."""
    return model in ORACLE_MODELS if choice is None else choice


@dataclass
class ModelConfig:
    name: str = setting(DEFAULT_MODEL, flag="--model", help="Base model: builtin:toy-dots (the default), builtin:toy, "
                        "builtin:tiny-sd, builtin:tiny-sd2, builtin:tiny-sdxl, builtin:tiny-sd3, builtin:tiny-flux, "
                        "a hub id, a diffusers folder, or a .safetensors/.ckpt checkpoint (SD 1.x/2.x/SDXL, or a Flux "
                        "transformer file such as flux1-dev.safetensors with --model-config).")
    single_file_config: str | None = setting(None, flag="--model-config", path=True, help="For a single-file "
                                             "checkpoint: a diffusers folder or hub id holding its configs (for a "
                                             "Flux transformer file also its VAE, text encoders and tokenizers).")
    vae: str | None = setting(None, flag="--vae", path=True, help="Another VAE: a diffusers folder, a hub id or a "
                              ".safetensors file (e.g. an fp16-fixed SDXL VAE).")


@dataclass
class DataConfig:
    instance_dir: str = setting("", flag=ARGUMENT, path=True, help="Folder of photos of the subject.")
    token: str = setting("sks", flag="--token", help="Rare token that names the subject.")
    class_word: str = setting("", flag="--class-word", help="The subject's class, e.g. dog (required).")
    instance_prompt: str = setting("a photo of {token} {class}", flag="--instance-prompt",
                                   help="Prompt of the photos; a .txt caption beside a photo replaces it.")
    class_prompt: str = setting("a photo of {class}", flag="--class-prompt", help="Prompt of the class images.")
    resolution: int | None = setting(None, flag="--resolution", low=8, high=MAX_RESOLUTION,
                                     help="Training resolution in pixels (default: the model's own: 512 for SD 1.5, "
                                          "768 for SD 2.x-v, 64 for the built-ins).")
    crop: Literal["center", "random"] = setting("center", flag="--crop",
                                                help="Square crop of each photo: center, or random (redrawn every step).")
    random_flip: bool = setting(False, flag="--random-flip/--no-random-flip",
                                help="Random horizontal flips, redrawn every step; not for a subject with a side "
                                     "(text, a logo).")
    job: Literal["dreambooth", "finetune"] = setting(
        "dreambooth", help="What is learnt: a subject from photos with a token (dreambooth: `dreamlora train`), or "
                           "a style or domain from captioned images (finetune: `dreamlora finetune`); set by the "
                           "command.")
    image_column: str = setting("image", flag="--image-column",
                                help="finetune: the image column of a datasets dataset.")
    caption_column: str = setting("text", flag="--caption-column",
                                  help="finetune: the caption column of a datasets dataset or metadata file.")
    caption_prefix: str = setting("", flag="--caption-prefix",
                                  help="Put in front of every caption (e.g. a trigger word), before the tags shuffle.")
    caption_dropout: float = setting(0.0, flag="--caption-dropout", low=0, high=1,
                                     help="Share of captions replaced by the empty one each step (for "
                                          "classifier-free guidance), drawn from (seed, step).")
    shuffle_tags: bool = setting(False, flag="--shuffle-tags/--no-shuffle-tags",
                                 help="Shuffle the comma-separated tags of each caption every step, from (seed, step).")
    keep_tags: int = setting(0, flag="--keep-tags", low=0,
                             help="With --shuffle-tags: the first N tags (the prefix counts as one) stay in place.")
    buckets: bool = setting(False, flag="--buckets/--no-buckets",
                            help="Aspect-ratio buckets instead of square crops: each image whole at about "
                                 "resolution² pixels, each batch from one bucket.")
    bucket_step: int = setting(64, flag="--bucket-step", low=8, help="With --buckets: bucket sides in steps of this "
                                                                     "many pixels (a multiple of 8).")
    bucket_max_upscale: float = setting(1.0, flag="--bucket-max-upscale", low=1,
                                        help="With --buckets: an image its bucket would enlarge more than this gets a "
                                             "bucket of its own size instead.")


@dataclass
class PriorConfig:
    enabled: bool = setting(True, flag="--prior/--no-prior", help="Prior preservation: class images and a class loss.")
    class_dir: str | None = setting(None, flag="--class-dir", path=True,
                                    help="Use these class images instead of generating them.")
    num_class_images: int = setting(100, flag="--num-class-images", low=0, low_open=True,
                                    recommended={TOY_DOTS: 50},  # as good on the tuning set, 16 s sooner
                                    help="Class images generated into the cache (ignored with --class-dir).")
    loss_weight: float = setting(1.0, flag="--prior-loss-weight", low=0, recommended={TOY: 0.5, TOY_DOTS: 0.5},
                                 help="λ in instance loss + λ · class loss.")
    sampler: Sampler = setting(DEFAULT_SAMPLER, flag="--prior-sampler", help="Sampler of the class images.")
    steps: int = setting(20, flag="--prior-steps", low=0, low_open=True, help="Sampling steps a class image.")
    guidance: float = setting(7.5, flag="--prior-guidance", low=0, help="Guidance scale of the class images.")
    negative_prompt: str = setting("", flag="--prior-negative-prompt", help="Negative prompt of the class images.")
    batch_size: int = setting(4, flag="--prior-batch-size", low=0, low_open=True,
                              help="Class images a sampling call (does not change any image).")
    seed: int = setting(0, flag="--prior-seed", low=0, help="Class image i is drawn from a seed derived from (seed, i).")


@dataclass
class LoraConfig:
    rank: int = setting(4, flag="--rank", low=0, low_open=True, recommended={TOY: 32, TOY_DOTS: 32}, help="LoRA rank.")
    alpha: float | None = setting(None, flag="--alpha", low=0, low_open=True,
                                  help="LoRA alpha, stored in the file; strength = alpha / rank (default: = rank).")
    dropout: float = setting(0.0, flag="--lora-dropout", low=0, high=1, high_open=True,
                             help="Dropout on the LoRA input while training.")
    target_modules: list[str] = setting(flag="--lora-targets", factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
                                        help="Denoiser modules that get adapters (comma-separated name suffixes).")
    train_text_encoder: bool = setting(False, flag="--train-text-encoder/--no-train-text-encoder",
                                       recommended={TOY: True, TOY_DOTS: True},
                                       help="Also train LoRA on the text encoder(s).")
    text_target_modules: list[str] = setting(flag="--text-lora-targets",
                                             factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
                                             help="Text-encoder modules that get adapters (comma-separated).")
    text_encoder_lr: float | None = setting(None, flag="--text-encoder-lr", low=0, low_open=True,
                                            help="Learning rate of the text-encoder adapters (default: --lr).")
    train_token_embedding: bool = setting(False, flag="--train-token-embedding/--no-train-token-embedding",
                                          recommended={TOY: True, TOY_DOTS: True},
                                          help="Also learn the token's own input embedding (pivotal tuning), "
                                               "stored in the file as AUTOMATIC1111's bundled embedding.")
    token_embedding_lr: float = setting(1e-3, flag="--token-embedding-lr", low=0, low_open=True,
                                        help="Learning rate of the token's embedding (no weight decay).")
    token_init: str | None = setting(None, flag="--token-init",
                                     help="Start the learnt embedding from these words (the mean of their vectors, "
                                          "e.g. 'red dots') instead of the token's own; needs --train-token-embedding.")
    position_jitter: int = setting(0, flag="--position-jitter", low=0, high=16,
                                   help="Read each training prompt at token positions shifted by a random k in "
                                        "[-N, N] (CLIP text encoders, when they train), so the token is not learnt "
                                        "at one position only; 0 is off.")
    dora: bool = setting(False, flag="--dora/--no-dora",
                         help="DoRA (peft): a learned magnitude per output channel on top of the LoRA update. "
                              "Written with --format diffusers only: no kohya reader applies peft's DoRA.")

    @property
    def resolved_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass
class TrainConfig:
    steps: int = setting(500, flag="--steps", low=0, low_open=True, recommended={TOY: 1000, TOY_DOTS: 1000},
                         help="Optimizer steps.")
    epochs: float | None = setting(None, flag="--epochs", low=0, low_open=True,
                                   help="Passes over the images instead of --steps (rounded up to whole steps).")
    batch_size: int = setting(1, flag="--batch-size", low=0, low_open=True,
                              help="Instance images a step (as many class images join them).")
    learning_rate: float = setting(1e-4, flag="--lr", low=0, low_open=True, recommended={TOY: 1e-3, TOY_DOTS: 3e-4},
                                   help="AdamW learning rate of the denoiser's adapters.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "polynomial"] = setting(
        "constant", flag="--lr-scheduler", recommended={TOY_DOTS: "cosine"},
        help="Learning-rate schedule over --steps.")
    lr_warmup_steps: int = setting(0, flag="--lr-warmup-steps", low=0, help="Steps of linear warm-up.")
    gradient_accumulation_steps: int = setting(1, flag="--grad-accum", low=0, low_open=True,
                                               help="Micro-batches summed into one optimizer step.")
    max_grad_norm: float = setting(1.0, flag="--max-grad-norm", low=0, help="Gradient clipping norm (0: off).")
    snr_gamma: float | None = setting(None, flag="--snr-gamma", low=0, low_open=True,
                                      help="Min-SNR-γ loss weighting, e.g. 5 (default: plain MSE).")
    timestep_sampling: Literal["logit_normal", "uniform", "mode"] = setting(
        "logit_normal", flag="--timestep-sampling",
        help="Flow-matching models (SD3, Flux): the density σ is drawn from (the SD3 paper's schemes).")
    logit_mean: float = setting(0.0, flag="--logit-mean", help="Flow matching, logit_normal: mean of the normal.")
    logit_std: float = setting(1.0, flag="--logit-std", low=0, low_open=True,
                               help="Flow matching, logit_normal: std of the normal.")
    mode_scale: float = setting(1.29, flag="--mode-scale", help="Flow matching, mode sampling: its scale.")
    flow_weighting: Literal["none", "sigma_sqrt", "cosmap"] = setting(
        "none", flag="--flow-weighting", help="Flow matching: loss weighting by σ (the SD3 paper's schemes).")
    flow_shift: float | None = setting(None, flag="--flow-shift", low=0, low_open=True,
                                       help="Flow matching: shift σ towards noise by this factor (default: the "
                                            "model's own: SD3's scheduler shift, Flux's by image size).")
    flux_guidance: float = setting(1.0, flag="--flux-guidance", low=0,
                                   help="Flux dev: the value its guidance embedding gets while training (kohya's "
                                        "recommendation 1.0; diffusers' script uses 3.5).")
    noise_offset: float = setting(0.0, flag="--noise-offset", low=0, high=1,
                                  help="Offset noise, e.g. 0.05: lets the model make darker or brighter pictures.")
    optimizer: Literal["adamw", "adamw8bit"] = setting("adamw", flag="--optimizer",
                                                       help="adamw, or adamw8bit (bitsandbytes).")
    weight_decay: float = setting(1e-2, flag="--weight-decay", low=0, help="AdamW weight decay.")
    mixed_precision: Literal["no", "fp16", "bf16"] = setting(
        "no", flag="--mixed-precision", help="Frozen weights in bf16 or fp16 (GPU); adapters always train in fp32.")
    gradient_checkpointing: bool = setting(False, flag="--gradient-checkpointing/--no-gradient-checkpointing",
                                           help="Less activation memory, slower steps.")
    base_quantization: Literal["none", "int8", "nf4"] = setting(
        "none", flag="--base-quantization",
        help="Store the frozen denoiser's linear layers in 8 bits (int8) or 4 bits (nf4: QLoRA) through "
             "bitsandbytes: a third or a quarter of bf16's memory for a little fidelity; the file is unchanged.")
    t5_on_cpu: bool = setting(False, flag="--t5-on-cpu/--no-t5-on-cpu",
                              help="SD3/Flux: T5 encodes the run's prompts on the CPU (once; they are cached), so the "
                                   "accelerator never holds it (T5-XXL: 9 GB in bf16). Slower start; for small cards.")
    seed: int = setting(0, flag="--seed", low=0, help="Seeds the adapters' initial weights and every step's draws.")
    checkpoint_every: int = setting(100, flag="--checkpoint-every", low=0,
                                    help="Steps between checkpoints in the run folder (0: only the final one).")
    keep_checkpoints: int = setting(2, flag="--keep-checkpoints", low=0, low_open=True,
                                    help="Checkpoints kept in the run folder; older ones are deleted.")
    run_dir: str | None = setting(None, flag="--run-dir", path=True,
                                  help="Checkpoints and validation grids (default: <out stem>-run beside --out).")
    resume: bool = setting(False, flag="--resume/--no-resume", run_control=True,
                           help="Continue from the latest checkpoint in the run folder.")
    log_every: int = setting(10, flag="--log-every", low=0, low_open=True,
                             help="Steps between loss reports (the only host-device syncs).")
    compile: bool = setting(False, flag="--compile/--no-compile",
                            help="torch.compile the denoiser: faster GPU steps after a compile of a minute or more.")
    threads: int | None = setting(None, flag="--threads", low=1, run_control=True,
                                  help="CPU threads (default: the cores other jobs leave free when the run starts; "
                                       "OMP_NUM_THREADS also sets it).")
    report_to: Literal["none", "tensorboard", "wandb"] = setting(
        "none", flag="--report-to", run_control=True,
        help="Log losses, learning rate, validation grids and the config to TensorBoard (<run folder>/logs) or "
             "Weights & Biases.")
    memory_budget: float | None = setting(None, flag="--memory-budget", low=0, low_open=True,
                                          help="GiB the run may use (e.g. 8, 12, 24): memory savers are turned on "
                                               "until the estimate fits.")


@dataclass
class ValidationConfig:
    every: int = setting(0, flag="--validate-every", low=0,
                         help="Steps between base-vs-LoRA grids in the run folder (0: only at the end).")
    prompts: list[str] = setting(flag="--validation-prompt", repeatable=True,
                                 factory=lambda: ["a photo of {token} {class}", "a photo of {class}"],
                                 help="Prompts of the validation grids (repeat the flag for several).")
    seeds: list[int] = setting(flag="--validation-seeds", factory=lambda: [0, 1], low=0, high=2**63 - 1,
                               help="Seeds of the validation grids (comma-separated).")
    steps: int = setting(20, flag="--validation-steps", low=0, low_open=True, help="Sampling steps of the grids.")
    guidance: float = setting(7.5, flag="--validation-guidance", low=0, help="Guidance scale of the grids.")
    sampler: Sampler = setting(DEFAULT_SAMPLER, flag="--validation-sampler", help="Sampler of the grids.")
    final: bool = setting(True, flag="--final-grid/--no-final-grid",
                          help="Render a base-vs-LoRA grid at the end of the run (on a CPU it can take longer "
                               "than a short training).")
    eval_every: int = setting(0, flag="--eval-every", low=0, recommended={TOY: 200, TOY_DOTS: 250},
                              help="Steps between scored checkpoints (0: off). Each is rendered on the tuning "
                                   "prompts and scored (the toy oracle on the toy models, else --eval-dino / "
                                   "--eval-clip); the run folder gets the scores, a plot, report.html and the "
                                   "recommended step, which `dreamlora export` writes.")
    eval_seeds: list[int] = setting(flag="--eval-seeds", factory=list, low=0, high=2**63 - 1,
                                    recommended={TOY_DOTS: [0, 1, 2, 3]},
                                    help="Seeds each scored checkpoint renders the tuning prompts from (comma-"
                                         "separated; default: the tuning set's own, 0-7). Fewer seeds score a "
                                         "checkpoint faster and less exactly.")
    max_class_drift: float = setting(0.5, flag="--max-class-drift", low=0,
                                     help="The recommended step has the best subject score among those whose "
                                          "class drift (1 - cosine of class renders to the base's) is at most this.")
    eval_oracle: bool | None = setting(None, flag="--eval-oracle/--no-eval-oracle",
                                       help="Score --eval-every with the toy oracle (default: on builtin:toy and "
                                            "toy-dots only; pass it for a toy-world model rebuilt with `reproduce`).")
    eval_dino: str | None = setting(None, flag="--eval-dino", path=True,
                                    help="Local DINO/ViT transformers folder scoring --eval-every (any base model).")
    eval_clip: str | None = setting(None, flag="--eval-clip", path=True,
                                    help="Local CLIP transformers folder scoring --eval-every (any base model).")


@dataclass
class OutputConfig:
    path: str = setting("", flag="--out", path=True, help="The .safetensors file to write.")
    format: Literal["kohya", "diffusers"] = setting(
        "kohya", flag="--format", help="kohya (AUTOMATIC1111/ComfyUI keys) or diffusers (peft keys).")
    save_dtype: Literal["fp16", "bf16", "fp32"] = setting("fp16", flag="--save-dtype", help="Weight dtype in the file.")
    overwrite: bool = setting(False, flag="--overwrite/--no-overwrite", run_control=True,
                              help="Replace an existing output and start its run folder over.")
    push_to_hub: str | None = setting(None, flag="--push-to-hub", run_control=True,
                                      help="At the end, upload the file with a model card to this hub repo "
                                           "(user/name); the card is written beside the file either way.")
    hub_private: bool = setting(False, flag="--hub-private/--no-hub-private", run_control=True,
                                help="With --push-to-hub: create the repo private.")


@dataclass
class DreamLoraConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ----------------------------------------------------------------------------------------------
# The declarations, read back


@dataclass(frozen=True)
class Key:
    """One declared key: `section.name`, its type and its `setting()` metadata."""

    dotted: str
    hint: Any  # the resolved type annotation
    default: Any
    meta: dict

    @property
    def flag(self) -> str | None:
        return self.meta["flag"]

    @property
    def help(self) -> str:
        return self.meta["help"]

    @property
    def choices(self) -> tuple | None:
        """The allowed values of a Literal-typed key (also under Optional[...])."""
        hint = _without_none(self.hint)
        return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def keys(config_type: type = DreamLoraConfig) -> list[Key]:
    """Every declared key of a config tree (or of one flat settings dataclass), in declaration order."""
    out = []
    for section in dataclasses.fields(config_type):
        section_type = typing.get_type_hints(config_type)[section.name]
        if dataclasses.is_dataclass(section_type):
            hints = typing.get_type_hints(section_type)
            for f in dataclasses.fields(section_type):
                out.append(Key(f"{section.name}.{f.name}", hints[f.name], _default_of(f), dict(f.metadata)))
        else:  # a flat dataclass (SampleSettings, EvalSettings)
            out.append(Key(section.name, section_type, _default_of(section), dict(section.metadata)))
    return out


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


_KEYS = {k.dotted: k for k in keys()}
RUN_CONTROL_KEYS = tuple(k for k, v in _KEYS.items() if v.meta["run_control"])
PATH_KEYS = tuple(k for k, v in _KEYS.items() if v.meta["path"])
FLAGS: dict[str, str] = {k: v.flag for k, v in _KEYS.items() if v.flag}  # the flag that sets each key


def flag_name(key: str) -> str | None:
    """The flag a user types for `key`: '--steps'; for an on/off pair the one that changes the default."""
    spec = _KEYS.get(key)
    if spec is None or not spec.flag:
        return None
    if spec.flag == ARGUMENT:
        return ARGUMENT
    on, _, off = spec.flag.partition("/")
    return off if off and spec.default is True else on


def describe(key: str) -> str:
    """'train.steps (flag --steps)' for messages."""
    flag = flag_name(key)
    if flag == ARGUMENT:
        return f"{key} (argument {ARGUMENT})"
    return f"{key} (flag {flag})" if flag else key


def recommended_settings(model: str) -> dict[str, Any]:
    """The settings a base model asks for where the defaults (sized for SD 1.5) do not fit it ({} for most models).

    Args:
        model: a --model value; only built-in names (builtin:toy) carry recommendations.
    """
    return {k: v.meta["recommended"][model] for k, v in _KEYS.items() if model in v.meta["recommended"]}


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(toml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> DreamLoraConfig:
    """Build the configuration: defaults, then the TOML file, then `overrides` (dotted keys, e.g. from flags).

    Keys that neither sets take the base model's recommended value where it has one (builtin:toy),
    else the declared default.

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
    if values.get("data.job") == "finetune":  # a fine-tune regularises only with the user's own class images
        values.setdefault("prior.enabled", bool(values.get("prior.class_dir")))
    model = values.get("model.name", DEFAULT_MODEL)
    for key, value in recommended_settings(model if isinstance(model, str) else "").items():
        if key not in values and not _ruled_out(key, value, values):
            values[key] = value
    config = DreamLoraConfig()
    unread = {key for key, value in values.items() if not _assign(config, key, value, problems)}
    # A value that could not be read keeps its default; the others are still checked, so all show at once.
    problems.extend(p for p in validate(config) if not any(p.startswith(f"{key} ") for key in unread))
    if problems:
        raise ConfigError(format_problems(problems))
    return config


def _ruled_out(key: str, value: Any, values: dict[str, Any]) -> bool:
    """Whether a recommended value conflicts with what the user chose; it then gives way instead of failing
    validation (builtin:toy learns the token's embedding, which a fine-tune or a frozen text encoder cannot)."""
    if key == "lora.train_token_embedding" and value:
        return values.get("data.job") == "finetune" or values.get("lora.train_text_encoder") is False
    return False


def with_epochs(config: DreamLoraConfig, images: int, processes: int) -> DreamLoraConfig:
    """The config with train.steps set from train.epochs (if given): enough steps to show every image that many
    times, `images` being the usable training images and each step drawing batch x grad-accum x processes."""
    t = config.train
    if t.epochs is None:
        return config
    per_step = t.batch_size * t.gradient_accumulation_steps * processes
    steps = max(1, math.ceil(round(t.epochs * images / per_step, 9)))
    return dataclasses.replace(config, train=dataclasses.replace(t, steps=steps))


def format_problems(problems: list[str]) -> str:
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
    # --model-config and --vae may be hub ids ("org/name"); keep them as written unless they exist locally.
    return key in ("model.single_file_config", "model.vae") and value.count("/") == 1 and not Path(value).exists()


def _assign(config: Any, key: str, value: Any, problems: list[str]) -> bool:
    """Set one dotted key; False (and a problem) when the key is unknown or the value has the wrong type."""
    spec = _KEYS.get(key)
    if spec is None:
        problems.append(f"unknown config key '{key}'{_suggest(key, list(_KEYS))}")
        return False
    section_name, _, field_name = key.partition(".")
    try:
        setattr(getattr(config, section_name), field_name, coerce(value, spec.hint))
    except (TypeError, ValueError) as exc:
        problems.append(f"{describe(key)}: {exc}")
        return False
    return True


def _suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(key.rpartition(".")[2], [c.rpartition(".")[2] for c in candidates], n=1)
        close = [c for c in candidates if close and c.endswith("." + close[0])][:1]
    return f"; did you mean '{close[0]}'?" if close else "; see the README for the keys"


def _without_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def coerce(value: Any, hint: Any) -> Any:
    """Convert a TOML or flag value to the key's type, or raise ValueError naming what was expected."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return None if value is None else coerce(value, _without_none(hint))
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
        return [coerce(v, item) for v in value]
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
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"must be a whole number (got {value!r})") from None
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number (got {value!r})")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"must be a number (got {value!r})") from None
        if not math.isfinite(number):
            raise ValueError(f"must be a finite number (got {value!r})")
        return number
    if hint is str:
        if not isinstance(value, (str, Path)):
            raise ValueError(f"must be a string (got {value!r})")
        return str(value)
    return value


# ----------------------------------------------------------------------------------------------
# Validation


def range_problems(settings: Any, config_type: type | None = None) -> list[str]:
    """The declared ranges (`low`, `high`) that values of a config tree or flat settings object break."""
    problems = []
    for spec in keys(config_type or type(settings)):
        section, _, name = spec.dotted.partition(".")
        value = getattr(getattr(settings, section), name) if name else getattr(settings, section)
        for item in value if isinstance(value, list) else [value]:
            message = _range_message(spec, item)
            if message:
                shown = value if isinstance(value, list) else item
                where = describe(spec.dotted) if name else (spec.flag or spec.dotted).partition("/")[0]
                problems.append(f"{where} {message} (got {shown})")
                break
    return problems


def _range_message(spec: Key, value: Any) -> str | None:
    m = spec.meta
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):  # a Python caller's: flags and TOML never pass one
        return "must be a finite number"
    low, high = m["low"], m["high"] if m["high"] is not None and m["high"] < 2**62 else None
    too_low = low is not None and (value <= low if m["low_open"] else value < low)
    too_high = m["high"] is not None and (value >= m["high"] if m["high_open"] else value > m["high"])
    if not (too_low or too_high):
        return None
    if low is not None and high is not None:  # an interval: [0, 1), (0, 1]
        return f"must be in {'(' if m['low_open'] else '['}{low:g}, {high:g}{')' if m['high_open'] else ']'}"
    if too_low:
        return f"must be {'>' if m['low_open'] else '>='} {low:g}"
    return f"must be {'<' if m['high_open'] else '<='} {m['high']:g}"


def validate(config: DreamLoraConfig) -> list[str]:
    """Every problem with the values and their combinations, each naming its key and flag."""
    c = config
    problems = range_problems(c)

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(f"{describe(key)} {message}")

    check(bool(c.lora.target_modules), "lora.target_modules", "must name at least one module")
    # AUTOMATIC1111 reads kohya's dora_scale per input column, ComfyUI and Forge normalise by the base weight, and
    # diffusers drops it (docs/interop.md): a kohya DoRA file would load wrong everywhere, so it is refused up front.
    check(not (c.lora.dora and c.output.format == "kohya"), "lora.dora",
          "needs --format diffusers: no kohya reader applies peft's DoRA as trained (AUTOMATIC1111 reads dora_scale "
          "per input column, ComfyUI and Forge divide by the base weight's norm, diffusers drops it)")
    check(c.data.resolution is None or c.data.resolution % 8 == 0, "data.resolution",
          f"must be a multiple of 8 (got {c.data.resolution})")
    check(bool(c.validation.seeds), "validation.seeds", "must list at least one seed")
    check(not (c.prior.enabled and c.prior.class_dir and c.data.instance_dir
               and Path(c.prior.class_dir).resolve() == Path(c.data.instance_dir).resolve()), "prior.class_dir",
          f"must not be the instance folder (both '{c.prior.class_dir}'): class images show other "
          f"{c.data.class_word or 'class'} pictures")
    if c.data.job == "dreambooth":
        problems.extend(_prompt_problems(c.data))
    else:  # captions name what each image shows; only regularisation images take a class prompt
        check(not c.prior.enabled or bool(c.prior.class_dir), "prior.enabled",
              "needs --class-dir in a fine-tune: regularisation images are the user's (none are generated)")
        check(not (c.prior.enabled and c.prior.class_dir) or bool(c.data.class_word.strip())
              or "{class}" not in c.data.class_prompt, "data.class_word",
              "is required with --class-dir: the class prompt of the regularisation images names it")
        check(_fills(c.data.class_prompt), "data.class_prompt", f"{prompt_problem(c.data.class_prompt)}")
    check(not c.lora.train_token_embedding or c.data.job == "dreambooth", "lora.train_token_embedding",
          "needs a subject token (a DreamBooth run): a fine-tune's captions name no token to learn")
    # The token's vectors are learnt inside the text encoder the adapters train: it runs every step, and in a
    # multi-process run its gradients are synchronised with the adapters'.
    check(not c.lora.train_token_embedding or c.lora.train_text_encoder, "lora.train_token_embedding",
          "needs --train-text-encoder (the token's embedding is learnt inside the text encoder it trains)")
    # Frozen encoders' prompt embeddings are computed once, before training: there is nothing to read at other positions.
    check(c.lora.position_jitter == 0 or c.lora.train_text_encoder, "lora.position_jitter",
          "shifts what a trained text encoder reads: pass --train-text-encoder too, or --position-jitter 0")
    check(c.lora.token_init is None or c.lora.train_token_embedding, "lora.token_init",
          "starts the learnt token embedding: pass --train-token-embedding too, or leave --token-init out")
    check(c.lora.token_init is None or bool(c.lora.token_init.strip()), "lora.token_init",
          "is empty: give one or more words (e.g. 'red dots'), or leave it out")
    check(c.data.keep_tags == 0 or c.data.shuffle_tags, "data.keep_tags", "only applies with --shuffle-tags")
    check(c.data.bucket_step % 8 == 0, "data.bucket_step", f"must be a multiple of 8 (got {c.data.bucket_step})")
    check(not (c.data.buckets and c.data.crop == "random"), "data.buckets",
          "trains on whole images, --crop random on square crops: choose one")
    # Class images are square crops, and a batch is one tensor: they cannot join a bucket's batch.
    check(not (c.data.buckets and c.prior.enabled), "data.buckets", "cannot be combined with prior preservation "
          "(class images are square crops and a batch holds one size): pass --no-prior or --no-buckets")
    for i, prompt in enumerate(c.validation.prompts):
        if not _fills(prompt):
            problems.append(f"{describe('validation.prompts')}: prompt {i + 1} {prompt_problem(prompt)} (got '{prompt}')")
    reads_with_oracle = oracle_reads(c.model.name, c.validation.eval_oracle)
    check(not c.validation.eval_every or c.data.job != "dreambooth" or reads_with_oracle
          or bool(c.validation.eval_dino or c.validation.eval_clip),
          "validation.eval_every", f"needs something to score the renders of '{c.model.name}': pass --eval-dino or "
          "--eval-clip with a local model folder (the toy oracle reads builtin:toy, or toy-world models with "
          "--eval-oracle)")
    check(bool(c.data.instance_dir), "data.instance_dir", "is required: the folder of subject photos"
          if c.data.job == "dreambooth" else "is required: the captioned images (DATA)")
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
        if not _fills(template):
            problems.append(f"{describe(key)} {prompt_problem(template)} (got '{template}')")
    return problems


def _fills(template: str) -> bool:
    return prompt_problem(template) is None


# A prompt template's markup, as str.format spells it: {{ and }} are literal braces, {name} a placeholder.
_MARKUP = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
PLACEHOLDERS = ("token", "class")


def prompt_problem(template: str) -> str | None:
    """What is wrong with a prompt template's braces, or None: only {token} and {class} are placeholders.

    Checked where text enters (flags, TOML keys, caption files), before any model loads: str.format
    would raise KeyError for '{cute}' or AttributeError for '{token.x}' only when the prompt is used.
    """
    for match in _MARKUP.finditer(template):
        text = match.group(0)
        if text in ("{{", "}}") or match.group(1) in PLACEHOLDERS:
            continue
        if text in ("{", "}"):
            return f"has an unmatched '{text}' (write a literal brace as {text * 2})"
        return (f"uses the unknown placeholder '{text}': only {{token}} and {{class}} exist (write literal braces "
                "as {{ and }})")
    return None


def _words(text: str) -> list[str]:
    """'a photo of sks, dog.' -> ['a', 'photo', 'of', 'sks', 'dog']"""
    return [w.strip(".,;:!?()[]\"'") for w in text.split()]


def fill_prompt(template: str, token: str, class_word: str) -> str:
    """'a photo of {token} {class}' -> 'a photo of sks dog'; '{{' and '}}' give literal braces.

    Raises:
        ConfigError: the template has another placeholder or an unmatched brace (see `prompt_problem`).
    """
    values = {"token": token, "class": class_word}

    def replace(match: re.Match) -> str:
        text = match.group(0)
        if text in ("{{", "}}"):
            return text[0]
        if match.group(1) in values:
            return values[match.group(1)]
        raise ConfigError(f"prompt '{template}' {prompt_problem(template)}")

    return _MARKUP.sub(replace, template)


# ----------------------------------------------------------------------------------------------
# Storing and documenting


def to_dict(config: DreamLoraConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_portable_json(config: DreamLoraConfig) -> str:
    """The resolved config as JSON, free of local paths (for file metadata): each path is its base name.

    A relative path is as local as an absolute one ("clients/acme/ref.safetensors" names a folder on this
    machine), and the output file may not exist yet, so no path is kept whole; only hub ids ("org/name"
    given for the model, its configs or the VAE, and not a local folder) and built-in names stay as they are.
    """
    data = to_dict(config)
    for key in RUN_CONTROL_KEYS:  # how the command was run, not how the file was made
        section, _, name = key.partition(".")
        data[section].pop(name, None)
    for key in (*PATH_KEYS, "model.name"):
        section, _, name = key.partition(".")
        value = data[section][name]
        if isinstance(value, str) and value and not _hub_or_builtin(key, value):
            data[section][name] = Path(value.rstrip("/\\")).name or value
    return json.dumps(data, sort_keys=True)


def _hub_or_builtin(key: str, value: str) -> bool:
    """A model name that is not a local path: builtin:toy, or a hub id 'org/name' with no such local folder."""
    if key not in ("model.name", "model.single_file_config", "model.vae"):
        return False
    if value.startswith("builtin:"):
        return True
    return value.count("/") == 1 and not value.startswith((".", "/", "~")) and not Path(value).exists()


def _shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def default_text(spec: Key) -> str:
    """'500 (toy: 1000)': the declared default and the built-in models' recommendations, for help and docs."""
    default = _shown(spec.default)
    for model, value in spec.meta["recommended"].items():
        default += f" ({model.removeprefix('builtin:')}: {_shown(value)})"
    return default.strip()


def flag_table() -> str:
    """The README's flag table (markdown), derived from the declarations: flag, TOML key, default, meaning."""
    lines = ["| flag | TOML key | default | what it does |", "|---|---|---|---|"]
    for spec in _KEYS.values():
        if not spec.flag:
            continue
        default = default_text(spec)
        text = spec.help + (f" One of: {', '.join(map(str, spec.choices))}." if spec.choices else "")
        flag = spec.flag if spec.flag == ARGUMENT else " ".join(f"`{f}`" for f in spec.flag.split("/"))
        lines.append(f"| {flag} | `{spec.dotted}` | {default} | {text.replace('|', '/')} |")
    return "\n".join(lines)


def check_paths(config: DreamLoraConfig) -> None:
    """Refuse missing input folders and a missing local model at once, before anything heavy loads.

    Raises:
        ConfigError: naming each missing path and its key and flag.
    """
    problems = []
    data = config.data
    folders = [("data.instance_dir", data.instance_dir)] if data.job == "dreambooth" else []
    if data.job == "finetune" and not Path(data.instance_dir).expanduser().exists() \
            and not _hub_or_builtin("model.name", data.instance_dir):  # DATA: a folder, a parquet file or a hub id
        problems.append(f"DATA '{data.instance_dir}' does not exist. Check the path (or give a hub id 'user/name')")
    if config.prior.enabled and config.prior.class_dir:
        folders.append(("prior.class_dir", config.prior.class_dir))
    for key, folder in folders:
        if not Path(folder).expanduser().is_dir():
            what = "is not a folder" if Path(folder).expanduser().exists() else "does not exist"
            problems.append(f"{describe(key)} '{folder}' {what}. Check the path")
    name = config.model.name
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        problems.append(f"{describe('model.name')} '{name}' does not exist. Check the path")
    if problems:
        raise ConfigError(format_problems(problems) + ".")


# ----------------------------------------------------------------------------------------------
# Settings of the other commands (flat: one key a field), declared the same way


@dataclass
class SampleSettings:
    """What `dreamlora sample` renders: prompts (x LoRA scales) in rows, seeds in columns."""

    prompts: list[str] = setting(flag="--prompt", repeatable=True, factory=list,
                                 help="A prompt (repeatable); {token} and {class} come from the LoRA file.")
    seeds: list[int] = setting(flag="--seeds", factory=lambda: [0, 1, 2, 3], low=0, high=2**64 - 1,
                               help="Comma-separated seeds: the columns.")
    scales: list[float] = setting(flag="--scales", factory=lambda: [0.0, 1.0], low=0,
                                  help="Comma-separated LoRA scales; 0 is the base model.")
    steps: int = setting(20, flag="--steps", low=0, low_open=True, help="Sampling steps.")
    guidance: float = setting(7.5, flag="--guidance", low=0, help="Classifier-free guidance scale.")
    sampler: Sampler = setting(DEFAULT_SAMPLER, flag="--sampler", help="Sampler.")
    negative_prompt: str = setting("", flag="--negative-prompt", help="Negative prompt.")
    resolution: int | None = setting(None, flag="--resolution", low=8, high=MAX_RESOLUTION,
                                     help="Image side in pixels (default: the model's).")

    def check(self) -> None:
        """Raises ConfigError listing every bad value, each naming its flag."""
        problems = range_problems(self)
        if not self.prompts or not all(p.strip() for p in self.prompts):
            problems.append("--prompt must be given at least once and not be empty")
        problems += [f"--prompt {prompt_problem(p)} (got '{p}')" for p in self.prompts if p.strip() and not _fills(p)]
        if not self.seeds:
            problems.append("--seeds must list at least one seed, e.g. 0,1,2,3")
        if not self.scales:
            problems.append("--scales must list at least one scale, e.g. 0,1")
        if self.resolution is not None and self.resolution % 8:
            problems.append(f"--resolution must be a multiple of 8 (got {self.resolution})")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class EvalSettings:
    """What `dreamlora eval` renders and how it scores the renders."""

    prompt_sets: list[Literal["tuning", "report", "phrasings"]] = setting(
        flag="--prompt-sets", factory=lambda: ["tuning", "report"],
        help="Prompt sets to render (comma-separated): tuning (what defaults and the best checkpoint are chosen "
             "on), report (other phrasings, backgrounds the photos do not show, other seeds; nothing is "
             "chosen on it) and phrasings (the tuning set's backgrounds and seeds with phrasings one word off "
             "the training prompt, neither set's: for choosing what helps the token into other phrasings).")
    seeds: list[int] | None = setting(None, flag="--seeds", low=0, high=2**64 - 1,
                                      help="Comma-separated seeds replacing each set's own (tuning 0-7, report "
                                           "1000-1007): one render per prompt and seed.")
    backgrounds: list[str] | None = setting(None, flag="--backgrounds",
                                            help="Comma-separated backgrounds replacing each set's own "
                                                 "(tuning blue,gray,pink,orange; report white,pink,orange).")
    steps: int = setting(20, flag="--steps", low=0, low_open=True, help="Sampling steps.")
    guidance: float = setting(7.5, flag="--guidance", low=0, help="Classifier-free guidance scale.")
    sampler: Sampler = setting(DEFAULT_SAMPLER, flag="--sampler", help="Sampler.")
    lora_scale: float = setting(1.0, flag="--lora-scale", low=0,
                                help="Strength of the LoRA in its renders (the base model's are always at 0).")
    instance_dir: str | None = setting(None, flag="--instance-dir", path=True,
                                       help="The instance photos (default: the folder recorded in the file, "
                                            "or sample_instances/<its name>).")
    oracle: bool | None = setting(None, flag="--oracle/--no-oracle",
                                  help="Read renders with the toy oracle (default: only for the toy models, "
                                       "builtin:toy-dots and builtin:toy).")
    dino: str | None = setting(None, flag="--dino", path=True,
                               help="Local DINO/ViT transformers folder: adds the DINO score.")
    clip: str | None = setting(None, flag="--clip", path=True,
                               help="Local CLIP transformers folder: adds CLIP-I and CLIP-T.")
    grid: str | None = setting(None, flag="--grid", path=True,
                               help="Also save the renders as a PNG grid (LoRA and base rows).")

    def check(self) -> None:
        """Raises ConfigError listing every bad value, each naming its flag."""
        problems = range_problems(self)
        if not self.prompt_sets:
            problems.append("--prompt-sets must name at least one set: tuning, report, phrasings")
        if self.seeds is not None and not self.seeds:
            problems.append("--seeds must list at least one seed, e.g. 0,1,2,3")
        if self.backgrounds is not None and not all(b.strip() for b in self.backgrounds or [""]):
            problems.append(f"--backgrounds must list at least one background, e.g. blue,pink (got {self.backgrounds})")
        if problems:
            raise ConfigError("; ".join(problems))


def settings_from(settings_type: type, given: dict[str, Any], base: Any = None) -> Any:
    """A flat settings object from flag values ({field: value or None}); every bad value reported at once.

    Raises:
        ConfigError: values of the wrong type, each naming its flag.
    """
    result = base if base is not None else settings_type()
    problems = []
    for spec in keys(settings_type):
        value = given.get(spec.dotted)
        if value is None:
            value = getattr(result, spec.dotted)  # a Python caller's value: checked the same way
            if value is None:
                continue
        try:
            setattr(result, spec.dotted, coerce(value, spec.hint))
        except (TypeError, ValueError) as exc:
            problems.append(f"{(spec.flag or spec.dotted).partition('/')[0]}: {exc}")
    if problems:
        raise ConfigError("; ".join(problems))
    result.check()
    return result

"""The memory plan: peak accelerator memory of a training run, estimated before any weight is read.

`plan(config)` reads the base model's JSON configs (unet/, vae/, text_encoder/), builds the models
on PyTorch's meta device (shapes, no storage) and runs each phase of a run there: class-image
sampling, encoding the caches, one training step (forward and backward, with the run's LoRA,
precision and gradient checkpointing), a validation grid; on the CPU also loading the fp32 weights.
A dispatch mode adds up the bytes of the tensors that are alive at each moment; weights, adapters
and optimizer states are added from their shapes. With `train.memory_budget` (flag --memory-budget)
it then picks the settings that fit.

Two things of the accelerator are modelled rather than run, because meta tensors cannot run them:
- attention is flash/memory-efficient SDPA (what PyTorch uses on CUDA and on the CPU): it keeps
  q, k, v, the output and a log-sum-exp per row for backward, never the (L x L) attention matrix;
- autocast (mixed precision fp16/bf16) casts matmul/conv inputs to half and, on CUDA, runs
  group_norm/layer_norm/softmax in fp32, so their saved inputs and outputs are fp32.

The estimate is of tensor memory (what torch.cuda.max_memory_allocated reports). A card also needs
room for the CUDA context and allocator slack, so a budget is met when
`peak * (1 + BUDGET_SLACK) + BUDGET_RESERVE_GIB` fits. benchmarks/train_step.py reports the error
against measured peaks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.overrides
import torch.utils._python_dispatch
import torch.utils._pytree
import torch.utils.checkpoint

from .config import DreamLoraConfig, describe, fill_prompt
from .errors import ConfigError, ModelLoadError

GIB = 1024**3
BUDGET_SLACK = 0.10  # allocator rounding, fragmentation and cuDNN/cuBLAS workspaces, as a share of the peak
BUDGET_RESERVE_GIB = 0.75  # CUDA context and libraries: on the card but never in torch's allocated bytes
CACHE_BATCH = 1  # images per VAE call when the caches are encoded: an fp32 SD VAE needs ~0.6 GiB an image at 512 px
TEXT_TOKENS = 77  # CLIP context length: prompts are padded to it
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps the Adam states of smaller tensors in fp32


# ----------------------------------------------------------------------------------------------
# The model's configs, without its weights


@dataclass(frozen=True)
class ModelConfigs:
    """The JSON configs of a base model: enough to build it on the meta device."""

    unet: dict
    vae: dict
    text_encoders: tuple[dict, ...]  # transformers CLIPTextConfig kwargs, in pipeline order
    source: str  # where they were read, for messages

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.get("block_out_channels", (128, 256, 512, 512))) - 1)

    @property
    def default_resolution(self) -> int:
        return int(self.unet.get("sample_size", 64)) * self.vae_scale_factor


def read_model_configs(name: str, single_file_config: str | None = None) -> ModelConfigs:
    """The configs of the model `name` (a --model value) from its files alone; no weights are read.

    Raises:
        ModelLoadError: the configs cannot be found (a hub model not in the cache, a single-file
            checkpoint without --model-config).
    """
    name = str(name)
    if name.startswith("builtin:"):
        return _builtin_configs(name.removeprefix("builtin:"))
    path = Path(name).expanduser()
    if path.is_dir():
        return _folder_configs(path)
    if path.is_file():
        if not single_file_config:
            raise ModelLoadError(f"--model '{name}' is a single-file checkpoint: its memory can only be estimated "
                                 "from a diffusers folder or hub id with its configs. Pass --model-config.")
        return read_model_configs(single_file_config)
    return _hub_configs(name)


def _builtin_configs(name: str) -> ModelConfigs:
    from .models.builtin import TINY_TEXT, TINY_UNET, TINY_VAE, builtin_spec
    from .models.tokenizer import DEFAULT_WORDS, build_merges, build_vocab

    spec = builtin_spec(name)
    if getattr(spec, "shipped", False):  # trained weights inside the package: its folder has the configs
        from .models.builtin import SHIPPED_DIR

        return _folder_configs(SHIPPED_DIR / name)
    vocab = len(build_vocab(build_merges(DEFAULT_WORDS)))
    text = {**TINY_TEXT, "vocab_size": vocab, "hidden_act": "gelu" if spec.v2 else "quick_gelu"}
    return ModelConfigs({**TINY_UNET, "use_linear_projection": spec.v2}, dict(TINY_VAE), (text,), f"builtin:{name}")


def _folder_configs(folder: Path) -> ModelConfigs:
    def read(part: str) -> dict | None:
        path = folder / part / "config.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    unet, vae = read("unet"), read("vae")
    if unet is None or vae is None:
        raise ModelLoadError(f"--model folder '{folder}' has no unet/config.json or vae/config.json; "
                             "pass a diffusers model folder.")
    texts = tuple(c for c in (read("text_encoder"), read("text_encoder_2")) if c is not None)
    return ModelConfigs(unet, vae, texts, str(folder))


def _hub_configs(repo_id: str) -> ModelConfigs:
    from huggingface_hub import try_to_load_from_cache

    def read(part: str) -> dict | None:
        cached = try_to_load_from_cache(repo_id, f"{part}/config.json")
        return json.loads(Path(cached).read_text(encoding="utf-8")) if isinstance(cached, str) else None

    unet, vae = read("unet"), read("vae")
    if unet is None or vae is None:
        raise ModelLoadError(f"model '{repo_id}' is not a local folder or file and its configs are not in the local "
                             f"Hugging Face cache. Download it first (hf download {repo_id}).")
    texts = tuple(c for c in (read("text_encoder"), read("text_encoder_2")) if c is not None)
    return ModelConfigs(unet, vae, texts, repo_id)


def meta_unet(config: dict):
    """A UNet2DConditionModel with the shapes of `config` and no storage (meta device)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(_plain(config))


def meta_vae(config: dict):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL.from_config(_plain(config))


def meta_text_encoder(config: dict):
    """A CLIP text encoder (with projection when the config says so: SDXL's second one) on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    architecture = (config.get("architectures") or ["CLIPTextModel"])[0]
    cls = CLIPTextModelWithProjection if architecture == "CLIPTextModelWithProjection" else CLIPTextModel
    kwargs = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "dtype",
                                                                                     "torch_dtype")}
    with torch.device("meta"):
        return cls(CLIPTextConfig(**kwargs))


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """module.to(dtype) without diffusers' warning about modules it would keep in fp32 (there are none here)."""
    return torch.nn.Module.to(module, dtype)


def _plain(config: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}


def parameter_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None, trainable: bool | None = None) -> int:
    """Bytes of `module`'s parameters (in `dtype` if given); trainable=True/False counts only those."""
    total = 0
    for p in module.parameters():
        if trainable is None or p.requires_grad == trainable:
            total += p.numel() * (dtype.itemsize if dtype is not None and p.is_floating_point() else p.element_size())
    return total


# ----------------------------------------------------------------------------------------------
# Counting live tensor bytes on the meta device


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Adds up the storage bytes of every tensor created while active, minus those freed since: `peak`."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()  # views and in-place results share it: counted once
        key = id(storage)
        if key in self._seen:
            return
        size = storage.nbytes()
        self._seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self._seen.discard(key)


class _FlashAttention(torch.autograd.Function):
    """Shape-only stand-in for fused SDPA: saves q, k, v, out and a log-sum-exp per query row."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _AcceleratorOps(torch.overrides.TorchFunctionMode):
    """Runs SDPA as the fused kernel and, for mixed precision, casts as autocast on `device_type` would."""

    def __init__(self, device_type: str, half: torch.dtype | None):
        super().__init__()
        F = torch.nn.functional
        self.half = half
        self.to_half = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, torch.matmul, torch.bmm,
                        torch.baddbmm, torch.mm, torch.addmm, torch.Tensor.matmul, torch.Tensor.__matmul__,
                        torch.Tensor.bmm}
        # CUDA autocast runs normalisations and softmax in fp32; CPU autocast keeps them in the half dtype.
        self.to_float = {F.mse_loss} | ({F.group_norm, F.layer_norm, F.softmax, torch.softmax,
                                         torch.Tensor.softmax} if device_type == "cuda" else set())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = (self._cast(t, self.half) for t in args[:3])
            return _FlashAttention.apply(q, k, v)
        if self.half is not None and func in self.to_half:
            args, kwargs = self._cast_all(args, kwargs, self.half)
        elif self.half is not None and func in self.to_float:
            args, kwargs = self._cast_all(args, kwargs, torch.float32)
        return func(*args, **kwargs)

    @staticmethod
    def _cast(t, dtype):
        if dtype is not None and isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
            return t.to(dtype)
        return t

    def _cast_all(self, args, kwargs, dtype):
        return (tuple(self._cast(a, dtype) for a in args), {k: self._cast(v, dtype) for k, v in kwargs.items()})


@contextlib.contextmanager
def _simulate(device_type: str, half: torch.dtype | None):
    """Count live bytes (yields the LiveBytes) while ops run as on the accelerator."""
    counter = LiveBytes()
    with _AcceleratorOps(device_type, half), counter:
        yield counter


# ----------------------------------------------------------------------------------------------
# The estimate


@dataclass(frozen=True)
class MemorySettings:
    """What memory depends on, taken from a DreamLoraConfig (see `from_config`)."""

    resolution: int
    batch_size: int  # instance rows per micro-step; as many class rows join with prior preservation
    prior: bool
    mixed_precision: str  # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool
    optimizer: str  # "adamw" | "adamw8bit"
    rank: int
    unet_targets: tuple[str, ...]
    train_text_encoder: bool
    text_targets: tuple[str, ...]
    generate_class_images: bool  # class images are sampled in this run
    prior_batch_size: int  # images per sampling call (CFG doubles the UNet rows)
    validation_images: int  # seeds in a validation row
    cache_images: int  # images per VAE call while caching
    cached_prompts: int  # distinct prompts whose embeddings stay on the device
    device_type: str  # "cuda" | "cpu" | "mps"

    @classmethod
    def from_config(cls, config: DreamLoraConfig, *, device_type: str, instance_images: int = 5,
                    generate_class_images: bool | None = None, resolution: int) -> MemorySettings:
        c = config
        generate = c.prior.enabled and not c.prior.class_dir if generate_class_images is None else generate_class_images
        return cls(resolution=resolution, batch_size=c.train.batch_size, prior=c.prior.enabled,
                   mixed_precision=c.train.mixed_precision, gradient_checkpointing=c.train.gradient_checkpointing,
                   optimizer=c.train.optimizer, rank=c.lora.rank, unet_targets=tuple(c.lora.target_modules),
                   train_text_encoder=c.lora.train_text_encoder, text_targets=tuple(c.lora.text_target_modules),
                   generate_class_images=generate, prior_batch_size=c.prior.batch_size,
                   validation_images=len(c.validation.seeds), cache_images=max(1, min(CACHE_BATCH, instance_images)),
                   cached_prompts=instance_images + (1 if c.prior.enabled else 0), device_type=device_type)

    @property
    def frozen_dtype(self) -> torch.dtype:
        return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.mixed_precision]

    @property
    def half(self) -> torch.dtype | None:
        return None if self.mixed_precision == "no" else self.frozen_dtype

    @property
    def rows(self) -> int:
        return self.batch_size * (2 if self.prior else 1)


@dataclass
class MemoryEstimate:
    """Peak tensor bytes on the accelerator, by phase of the run, and what makes up the training peak."""

    phases: dict[str, int]  # "loading" (CPU), "class images", "caching", "training", "validation" -> peak bytes
    training: dict[str, int]  # breakdown of the training phase's peak
    device_type: str

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def needs(self) -> float:
        """GiB a device must have for this run: the peak plus allocator slack and the CUDA context."""
        return self.peak * (1 + BUDGET_SLACK) / GIB + BUDGET_RESERVE_GIB


def estimate_memory(models: ModelConfigs, s: MemorySettings) -> MemoryEstimate:
    """Estimate each phase's peak accelerator memory for `s` on the model described by `models`.

    Runs the phases on the meta device (no weights, a second or a few for SD-size models).
    """
    from .lora import add_lora_adapters

    unet = _cast(meta_unet(models.unet), s.frozen_dtype)
    texts = [_cast(meta_text_encoder(c), s.frozen_dtype) for c in models.text_encoders]
    vae = meta_vae(models.vae)  # fp32 while it encodes the caches (train.place_frozen)
    unet_bytes, vae_bytes = parameter_bytes(unet), parameter_bytes(vae)
    text_bytes = sum(parameter_bytes(t) for t in texts)
    latent = s.resolution // models.vae_scale_factor
    phases: dict[str, int] = {}
    if s.device_type == "cpu":  # the weights load in fp32 into the same memory, then are cast one by one
        phases["loading"] = sum(parameter_bytes(m, torch.float32) for m in (unet, vae, *texts))

    if s.generate_class_images:
        phases["class images"] = unet_bytes + text_bytes + vae_bytes + _sampling_peak(
            unet, texts, vae, models, s, rows=2 * s.prior_batch_size, latent=latent)
    phases["caching"] = unet_bytes + text_bytes + vae_bytes + _encode_peak(vae, s)

    add_lora_adapters(unet, texts, rank=s.rank, alpha=float(s.rank), dropout=0.0, unet_targets=list(s.unet_targets),
                      train_text_encoder=s.train_text_encoder, text_targets=list(s.text_targets))
    trained = [p for m in (unet, *texts) for p in m.parameters() if p.requires_grad]
    for p in trained:
        p.data = p.data.float()  # adapters train in fp32 (train.add_adapters)
    adapter_bytes = sum(p.numel() * 4 for p in trained)
    # After caching the VAE, and the text encoders unless trained, leave the accelerator (train.offload_encoders);
    # on the CPU everything stays in the same memory.
    stays = s.device_type == "cpu"
    resident_text = text_bytes if (s.train_text_encoder or stays) else 0
    resident_vae = parameter_bytes(vae, s.frozen_dtype) if stays else 0
    embedding_bytes = 0 if s.train_text_encoder else s.cached_prompts * TEXT_TOKENS * sum(
        _text_width(c) for c in models.text_encoders) * s.frozen_dtype.itemsize
    optimizer_bytes = _optimizer_bytes(trained, s.optimizer)
    step = _training_step_peak(unet, texts, models, s, latent)
    training = {"frozen UNet": unet_bytes, "text encoders": resident_text, "VAE": resident_vae,
                "adapters": adapter_bytes, "optimizer states": optimizer_bytes, "cached embeddings": embedding_bytes,
                "activations + gradients": step}
    phases["training"] = sum(training.values())
    validation_text = text_bytes if not stays else 0  # brought back for the grid
    validation_vae = parameter_bytes(vae, s.frozen_dtype) if not stays else 0
    phases["validation"] = (phases["training"] - step + validation_text + validation_vae +
                            _sampling_peak(unet, texts, vae, models, s, rows=2 * s.validation_images, latent=latent,
                                           vae_dtype=s.frozen_dtype))
    return MemoryEstimate(phases, training, s.device_type)


def _text_width(config: dict) -> int:
    return int(config.get("hidden_size", 768))


def _optimizer_bytes(params: list[torch.nn.Parameter], optimizer: str) -> int:
    """AdamW keeps two fp32 moments a parameter; bitsandbytes' 8-bit AdamW one byte each (+ block scales)
    for tensors of at least 4096 elements, fp32 for smaller ones."""
    total = 0
    for p in params:
        n = p.numel()
        if optimizer == "adamw8bit" and n >= BNB_MIN_8BIT_SIZE:
            total += 2 * n + 2 * 4 * math.ceil(n / 256)
        else:
            total += 2 * 4 * n
    return total


def unet_inputs(config: dict, rows: int, latent: int, dtype: torch.dtype) -> tuple[list, dict]:
    """Meta inputs for a UNet2DConditionModel forward: (sample, timestep), conditioning kwargs.

    SDXL-style UNets (addition_embed_type "text_time") also get pooled text embeddings and size ids.
    """
    channels = int(config.get("in_channels", 4))
    sample = torch.empty(rows, channels, latent, latent, dtype=dtype, device="meta")
    timesteps = torch.empty(rows, dtype=torch.long, device="meta")
    width = int(config.get("cross_attention_dim", 768) if not isinstance(config.get("cross_attention_dim"), list)
                else config["cross_attention_dim"][0])
    kwargs: dict[str, Any] = {"encoder_hidden_states": torch.empty(rows, TEXT_TOKENS, width, dtype=dtype, device="meta")}
    if config.get("addition_embed_type") == "text_time":
        time_ids = 6
        pooled = int(config["projection_class_embeddings_input_dim"]) - time_ids * int(config["addition_time_embed_dim"])
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(rows, pooled, dtype=dtype, device="meta"),
                                       "time_ids": torch.empty(rows, time_ids, dtype=dtype, device="meta")}
    return [sample, timesteps], kwargs


def _sampling_peak(unet, texts, vae, models: ModelConfigs, s: MemorySettings, *, rows: int, latent: int,
                   vae_dtype: torch.dtype = torch.float32) -> int:
    """Live bytes while sampling: prompt encoding, the UNet on `rows` rows (CFG), then decoding one image."""
    with torch.no_grad(), _simulate(s.device_type, None) as live:
        ids = torch.empty(rows, TEXT_TOKENS, dtype=torch.long, device="meta")
        for text in texts:
            text(ids)
        args, kwargs = unet_inputs(models.unet, rows, latent, s.frozen_dtype)
        noise = unet(*args, **kwargs).sample  # held by the sampler alongside the latents
        del noise, kwargs
        _cast(vae, vae_dtype).decode(torch.empty(1, vae.config.latent_channels, latent, latent, dtype=vae_dtype,
                                             device="meta")).sample
    _cast(vae, torch.float32)
    return live.peak


def _encode_peak(vae, s: MemorySettings) -> int:
    with torch.no_grad(), _simulate(s.device_type, None) as live:
        x = torch.empty(s.cache_images, 3, s.resolution, s.resolution, device="meta")
        dist = vae.encode(x).latent_dist
        dist.mean, dist.std  # noqa: B018 (what the cache keeps)
    return live.peak


def _training_step_peak(unet, texts, models: ModelConfigs, s: MemorySettings, latent: int) -> int:
    """Live bytes of one micro-step: the batch, text encoding (when trained), UNet forward, fp32 loss, backward."""
    if s.gradient_checkpointing:
        # Recomputation runs in backward, outside the mode's scope: it must see the same stand-ins.
        context = {"use_reentrant": False,
                   "context_fn": lambda: (contextlib.nullcontext(), _AcceleratorOps(s.device_type, s.half))}
        unet.enable_gradient_checkpointing(
            lambda module, *args: torch.utils.checkpoint.checkpoint(module.__call__, *args, **context))
        if s.train_text_encoder:
            for text in texts:
                text.gradient_checkpointing_enable(gradient_checkpointing_kwargs=context)
    unet.train()
    for text in texts:
        text.train(s.train_text_encoder)
    rows = s.rows
    with _simulate(s.device_type, s.half) as live:
        args, kwargs = unet_inputs(models.unet, rows, latent, s.frozen_dtype)
        noise = torch.empty_like(args[0])
        noisy = args[0] * 0.5 + noise * 0.5
        if s.train_text_encoder:
            ids = torch.empty(rows, TEXT_TOKENS, dtype=torch.long, device="meta")
            hidden = [text(ids)[0] for text in texts]
            kwargs["encoder_hidden_states"] = torch.cat(hidden, dim=-1) if len(hidden) > 1 else hidden[0]
        pred = unet(noisy, args[1], **kwargs).sample
        if s.half is not None:
            pred = pred.float()  # accelerate returns fp32 outputs under mixed precision
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
    return live.peak


# ----------------------------------------------------------------------------------------------
# The plan: what a run will do and need, and settings that fit a budget


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
                   f"LoRA rank {self.config.lora.rank}")
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
    from .data import instance_set, list_image_files

    device_type = device_type or accelerator_type()
    processes = num_processes or int(os.environ.get("WORLD_SIZE", "1"))
    models = read_model_configs(config.model.name, config.model.single_file_config)
    instances = instance_set(config.data)
    resolution = config.data.resolution or models.default_resolution
    class_images, to_generate = 0, 0
    if config.prior.enabled and config.prior.class_dir:
        class_images = len(list_image_files(config.prior.class_dir, "class")[0])
    elif config.prior.enabled:
        class_images = config.prior.num_class_images
        to_generate = _class_images_to_generate(config, resolution)

    def settings_for(c: DreamLoraConfig) -> MemorySettings:
        return MemorySettings.from_config(c, device_type=device_type, instance_images=len(instances.paths),
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
                        processes=processes, resolution=resolution, instance_images=len(instances.paths),
                        images_per_step=per_step, epochs=t.steps * per_step / len(instances.paths),
                        class_images=class_images, class_images_to_generate=to_generate, memory=estimate,
                        budget_gib=config.train.memory_budget, changes=changes)


def fit_budget(config: DreamLoraConfig, models: ModelConfigs, settings_for, budget_gib: float,
               device_type: str) -> tuple[DreamLoraConfig, list[str], MemoryEstimate]:
    """The first settings on a ladder of memory savers that fit `budget_gib`, cheapest in speed and quality first.

    The ladder only turns savers on: half-precision frozen weights (CUDA, when mixed precision is "no"),
    8-bit AdamW (only where it saves memory: LoRA tensors are mostly too small for 8-bit states),
    gradient checkpointing, halving the batch while doubling gradient accumulation (same images a
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
    if current.lora.train_text_encoder and step(f"{describe('lora.train_text_encoder')} off", train_text_encoder=False):
        return current, changes, estimate
    raise ConfigError(
        f"{describe('train.memory_budget')} {budget_gib:g} GiB is too small: with the leanest settings "
        f"({'; '.join(changes) or 'nothing to change'}) the run needs {estimate.needs():.2f} GiB "
        f"(peak {estimate.peak / GIB:.2f} GiB in {estimate.peak_phase}). Lower --resolution or raise the budget.")


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


def _class_images_to_generate(config: DreamLoraConfig, resolution: int) -> int | None:
    """How many class images the cache lacks for this config, or None when the cache key is unknown."""
    from .priors import PriorSpec, cached_prior_dir, missing_indices

    identity = model_identity(config.model.name, config.model.single_file_config)
    if identity is None:
        return None
    p = config.prior
    spec = PriorSpec(prompt=fill_prompt(config.data.class_prompt, config.data.token, config.data.class_word),
                     negative_prompt=p.negative_prompt, seed=p.seed, steps=p.steps, guidance=p.guidance,
                     sampler=p.sampler, resolution=resolution, model=identity[0], model_fingerprint=identity[1])
    return len(missing_indices(cached_prior_dir(spec), p.num_class_images))


def model_identity(name: str, single_file_config: str | None = None) -> tuple[str, str] | None:
    """(identity, fingerprint) as load_base_model would set them, without loading; None if unknown.

    Mirrors dreamlora.models.loading (the fingerprints read file edges and configs, not the weights).
    """
    from .models import loading
    from .models.builtin import BUILDER_VERSION, builtin_spec

    try:
        if name.startswith("builtin:"):
            spec = builtin_spec(name.removeprefix("builtin:"))
            if getattr(spec, "shipped", False):
                from .models.builtin import SHIPPED_DIR

                return name, loading.fingerprint_folder(SHIPPED_DIR / spec.name)
            return name, loading._short_hash(f"{name}:{BUILDER_VERSION}".encode())
        path = Path(name).expanduser()
        if path.is_dir():
            return path.resolve().name, loading.fingerprint_folder(path)
        if path.is_file():
            config = loading._resolve_single_file_config(single_file_config)
            return path.name, loading._fingerprint([("", path)] + loading._config_files(config), extra=config or "")
        return name, loading._hub_fingerprint(name)
    except Exception:  # noqa: BLE001 (an estimate: unknown is an answer)
        return None

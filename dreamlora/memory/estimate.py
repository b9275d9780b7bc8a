"""Peak accelerator memory of each phase of a run, from the model's configs and the run's settings.

The phases run on the meta device (dreamlora.memory.meta): class-image sampling, encoding the caches,
one training step (forward and backward, with the run's LoRA, precision and gradient checkpointing),
a validation grid; on the CPU also loading the fp32 weights. Weights, adapters and optimizer states are
added from their shapes.

The estimate is of tensor memory (what torch.cuda.max_memory_allocated reports). A card also needs
room for the CUDA context and allocator slack, so a budget is met when
`peak * (1 + BUDGET_SLACK) + BUDGET_RESERVE_GIB` fits. benchmarks/train_step.py reports the error
against measured peaks.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint

from ..config import DreamLoraConfig
from ..models.configs import ModelConfigs
from ..models.family import text_widths
from ..models.registry import detect_family
from .meta import _AcceleratorOps, _cast, _simulate, meta_text_encoder, meta_unet, meta_vae, parameter_bytes

GIB = 1024**3
BUDGET_SLACK = 0.10  # allocator rounding, fragmentation and cuDNN/cuBLAS workspaces, as a share of the peak
BUDGET_RESERVE_GIB = 0.75  # CUDA context and libraries: on the card but never in torch's allocated bytes
CACHE_BATCH = 1  # images per VAE call when the caches are encoded: an fp32 SD VAE needs ~0.6 GiB an image at 512 px
TEXT_TOKENS = 77  # CLIP context length: prompts are padded to it
CACHE_PROMPTS = 8  # prompts a T5 call while caching: a fine-tune's captions are many, T5-XXL's activations large
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps the Adam states of smaller tensors in fp32


@dataclass(frozen=True)
class MemorySettings:
    """What memory depends on, taken from a DreamLoraConfig (see `from_config`)."""

    resolution: int
    batch_size: int  # instance rows per micro-step; as many class rows join with prior preservation
    prior: bool
    mixed_precision: str  # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool
    optimizer: str  # "adamw" | "adamw8bit"
    base_quantization: str  # "none" | "int8" | "nf4": the denoiser's linear layers (dreamlora.quantization)
    t5_on_cpu: bool  # SD3/Flux: T5 encodes the run's prompts on the CPU (training.encode_cached_prompts)
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
                   optimizer=c.train.optimizer, base_quantization=c.train.base_quantization,
                   t5_on_cpu=c.train.t5_on_cpu, rank=c.lora.rank, unet_targets=tuple(c.lora.target_modules),
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
    from ..lora import add_lora_adapters

    family = detect_family(models)
    unet = _cast(meta_unet(models.unet), s.frozen_dtype)
    texts = [_cast(meta_text_encoder(c), s.frozen_dtype) for c in models.text_encoders]
    adapted = texts if family.adapted_text_encoders is None else texts[:family.adapted_text_encoders]
    vae = meta_vae(models.vae)  # fp32 while it encodes the caches (train.place_frozen)
    unet_bytes, vae_bytes = denoiser_bytes(unet, s), parameter_bytes(vae)
    stays = s.device_type == "cpu"  # on the CPU every module stays in the same memory
    # SD3's/Flux's T5 encodes the run's prompts first, alone, and is on the CPU from then on.
    cached = None if stays else family.cached_text_encoder
    sampled = [i for i in range(len(texts)) if i != cached]  # the encoders that run while sampling
    text_bytes = sum(parameter_bytes(texts[i]) for i in sampled)
    latent = s.resolution // models.vae_scale_factor
    phases: dict[str, int] = {}
    if stays:  # the weights load in fp32 into the same memory, then are cast one by one
        phases["loading"] = sum(parameter_bytes(m, torch.float32) for m in (unet, vae, *texts))
    if cached is not None and not s.t5_on_cpu:
        phases["prompt encoding"] = parameter_bytes(texts[cached]) + _text_peak(
            texts[cached], family.text_tokens[cached], min(s.cached_prompts + 2, CACHE_PROMPTS), s)

    if s.generate_class_images:
        phases["class images"] = unet_bytes + text_bytes + vae_bytes + _sampling_peak(
            unet, texts, sampled, vae, models, s, rows=2 * s.prior_batch_size, latent=latent)
    phases["caching"] = unet_bytes + text_bytes + vae_bytes + _encode_peak(vae, s)

    # The targets and encoders training adapts (training.denoiser_targets / adapted_encoders: never T5).
    from ..config import LoraConfig

    targets = family.default_targets if list(s.unet_targets) == LoraConfig().target_modules else s.unet_targets
    for text in texts:
        text.requires_grad_(False)  # the encoders without adapters (T5) are frozen too
    add_lora_adapters(unet, adapted, rank=s.rank, alpha=float(s.rank), dropout=0.0, unet_targets=list(targets),
                      train_text_encoder=s.train_text_encoder, text_targets=list(s.text_targets))
    trained = [p for m in (unet, *texts) for p in m.parameters() if p.requires_grad]
    for p in trained:
        p.data = p.data.float()  # adapters train in fp32 (train.add_adapters)
    adapter_bytes = sum(p.numel() * 4 for p in trained)
    # After caching the VAE, and the text encoders unless trained, leave the accelerator (train.offload_encoders);
    # on the CPU everything stays in the same memory.
    resident_text = (text_bytes if stays else sum(parameter_bytes(t) for t in adapted)) \
        if s.train_text_encoder else (text_bytes if stays else 0)
    # A VAE that overflows in half precision (SDXL's: force_upcast) stays fp32 (training.vae_dtype).
    vae_dtype = torch.float32 if models.vae.get("force_upcast") else s.frozen_dtype
    resident_vae = parameter_bytes(vae, vae_dtype) if stays else 0
    _, meta_kwargs = unet_inputs(models, 1, latent, s.frozen_dtype)
    hidden = meta_kwargs["encoder_hidden_states"]  # one prompt's states: (1, tokens, width)
    embedding_bytes = 0 if s.train_text_encoder else s.cached_prompts * hidden[0].numel() * s.frozen_dtype.itemsize
    optimizer_bytes = _optimizer_bytes(trained, s.optimizer)
    step = _training_step_peak(unet, texts, models, s, latent)
    # A quantized layer is dequantized into the frozen dtype for its matmul, forward and backward: one at a time.
    dequantized = 0 if s.base_quantization == "none" else max(
        m.weight.numel() for m in unet.modules() if isinstance(m, torch.nn.Linear)) * s.frozen_dtype.itemsize
    training = {"frozen UNet": unet_bytes, "dequantized layer": dequantized, "text encoders": resident_text,
                "VAE": resident_vae,
                "adapters": adapter_bytes, "optimizer states": optimizer_bytes, "cached embeddings": embedding_bytes,
                "activations + gradients": step}
    phases["training"] = sum(training.values())
    validation_text = text_bytes if not stays else 0  # brought back for the grid
    validation_vae = parameter_bytes(vae, vae_dtype) if not stays else 0
    phases["validation"] = (phases["training"] - step + validation_text + validation_vae +
                            _sampling_peak(unet, texts, sampled, vae, models, s, rows=2 * s.validation_images,
                                           latent=latent, vae_dtype=vae_dtype))
    return MemoryEstimate(phases, training, s.device_type)


def denoiser_bytes(unet: torch.nn.Module, s: MemorySettings) -> int:
    """The frozen denoiser's weights on the device: in the frozen dtype, its linear layers' weights quantized with
    --base-quantization (dreamlora.quantization; biases, norms and convolutions keep the frozen dtype)."""
    if s.base_quantization == "none":
        return parameter_bytes(unet)
    from ..quantization import quantized_weight_bytes

    linear_weights = [m.weight for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    quantized = sum(quantized_weight_bytes(w.shape[0], w.shape[1], s.base_quantization) for w in linear_weights)
    return parameter_bytes(unet) - sum(w.numel() * w.element_size() for w in linear_weights) + quantized


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


def unet_inputs(models: ModelConfigs, rows: int, latent: int, dtype: torch.dtype) -> tuple[list, dict]:
    """Meta inputs of one denoiser forward (sample, timesteps), conditioning kwargs: the model family's."""
    return detect_family(models).meta_denoiser_inputs(models, rows, latent, dtype)


def meta_conditions(kwargs: dict) -> dict[str, torch.Tensor]:
    """The per-image conditions among a denoiser's meta inputs (SDXL's time_ids), for denoiser_kwargs."""
    return {k: v for k, v in kwargs.get("added_cond_kwargs", {}).items() if k != "text_embeds"}


def _text_peak(text, tokens: int, rows: int, s: MemorySettings) -> int:
    """Live bytes of one frozen text encoder's forward on `rows` prompts."""
    with torch.no_grad(), _simulate(s.device_type, None) as live:
        text(torch.empty(rows, tokens, dtype=torch.long, device="meta"))
    return live.peak


def _sampling_peak(unet, texts, sampled: list[int], vae, models: ModelConfigs, s: MemorySettings, *, rows: int,
                   latent: int, vae_dtype: torch.dtype = torch.float32) -> int:
    """Live bytes while sampling: prompt encoding (the encoders `sampled` names: a cached T5 is not run), the UNet
    on `rows` rows (CFG), then decoding one image."""
    with torch.no_grad(), _simulate(s.device_type, None) as live:
        family = detect_family(models)
        for index in sampled:
            texts[index](torch.empty(rows, family.text_tokens[index], dtype=torch.long, device="meta"))
        args, kwargs = unet_inputs(models, rows, latent, s.frozen_dtype)
        noise = family.predict(unet, *args, kwargs)  # held by the sampler alongside the latents
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
    family = detect_family(models)
    adapted = texts if family.adapted_text_encoders is None else texts[:family.adapted_text_encoders]
    if s.gradient_checkpointing:
        # Recomputation runs in backward, outside the mode's scope: it must see the same stand-ins.
        context = {"use_reentrant": False,
                   "context_fn": lambda: (contextlib.nullcontext(), _AcceleratorOps(s.device_type, s.half))}
        unet.enable_gradient_checkpointing(
            lambda module, *args: torch.utils.checkpoint.checkpoint(module.__call__, *args, **context))
        if s.train_text_encoder:
            for text in adapted:
                text.gradient_checkpointing_enable(gradient_checkpointing_kwargs=context)
    unet.train()
    for text in texts:
        text.train(s.train_text_encoder and text in adapted)
    rows = s.rows
    with _simulate(s.device_type, s.half) as live:
        args, kwargs = unet_inputs(models, rows, latent, s.frozen_dtype)
        noise = torch.empty_like(args[0])
        noisy = args[0] * 0.5 + noise * 0.5
        if s.train_text_encoder:  # the encoders run in the step, as the family runs them
            embeddings = family.encode_ids(texts, [torch.empty(rows, tokens, dtype=torch.long, device="meta")
                                                   for tokens in family.text_tokens])
            kwargs = family.denoiser_kwargs(embeddings, meta_conditions(kwargs))
        pred = family.predict(unet, noisy, args[1], kwargs)
        if s.half is not None:
            pred = pred.float()  # accelerate returns fp32 outputs under mixed precision
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
    return live.peak

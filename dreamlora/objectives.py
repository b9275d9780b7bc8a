"""Training objectives: how a step draws timesteps, noises latents, and what the denoiser must predict.

The loop asks the base model's objective (a family gives it, see models/family.py) and never the scheduler:

    t = objective.sample_timesteps(rows, generator)
    pred = denoiser(objective.noisy(x0, noise, t), t, ...)
    loss = prior_preservation_loss(pred, objective.target(x0, noise, t), ..., objective.loss_weights(t, γ))

`DiffusionObjective` is SD 1.x/2.x/SDXL's DDPM objective (ε or v prediction); `FlowMatchingObjective` is SD3's
and Flux's rectified flow (x_t = (1 - σ)·x₀ + σ·ε, target ε - x₀, σ from a logit-normal, uniform or mode density,
shifted towards noise for large images). Prior preservation is the same for both: one batched forward, λ on the
class rows (losses.prior_preservation_loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from .losses import diffusion_target, min_snr_weights


class Objective(Protocol):
    def sample_timesteps(self, rows: int, generator: torch.Generator,
                         latent_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(rows,) timesteps drawn from `generator` alone (a step is reproducible from its seed).

        `latent_size` (h, w) lets an objective shift its timesteps by image size (Flux); others ignore it."""

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The denoiser's input at `timesteps`."""

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser must predict."""

    def loss_weights(self, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor | None:
        """Per-row loss weights (min-SNR-γ), or None for plain MSE."""


class DiffusionObjective:
    """DDPM: x_t = sqrt(ᾱ)·x₀ + sqrt(1-ᾱ)·ε on the model's own noise schedule; the target is ε or v."""

    def __init__(self, scheduler_config: dict):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)  # the model's betas and prediction type
        self.prediction_type = self.scheduler.config.prediction_type

    def sample_timesteps(self, rows: int, generator: torch.Generator,
                         latent_size: tuple[int, int] | None = None) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (rows,), generator=generator)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return diffusion_target(self.prediction_type, latents, noise, self.scheduler.alphas_cumprod, timesteps)

    def loss_weights(self, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor | None:
        if snr_gamma is None:
            return None
        return min_snr_weights(self.prediction_type, self.scheduler.alphas_cumprod, timesteps, snr_gamma)


TimestepSampling = Literal["logit_normal", "uniform", "mode"]
FlowWeighting = Literal["none", "sigma_sqrt", "cosmap"]


@dataclass(frozen=True)
class FlowSettings:
    """How a rectified-flow run draws σ and weighs the loss (flags --timestep-sampling, --logit-mean, ...)."""

    sampling: TimestepSampling = "logit_normal"  # SD3 paper's rf/lognorm(0.00, 1.00), its best-ranked sampler
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29  # the paper's mode(1.29)
    weighting: FlowWeighting = "none"  # the density already weighs the timesteps; sigma_sqrt / cosmap on top
    shift: float | None = None  # None: the model's own (SD3: its scheduler's shift; Flux: by image size)
    guidance: float = 1.0  # Flux dev: the guidance embedding's value while training (--flux-guidance)


def flow_density(rows: int, generator: torch.Generator, settings: FlowSettings) -> torch.Tensor:
    """(rows,) values u in (0, 1) from the SD3 paper's timestep densities (Esser et al. 2024, section 3.1).

    logit_normal: u = sigmoid(m + s·n), n ~ N(0, 1); uniform: u ~ U(0, 1); mode: u = 1 - v - scale·(cos²(π·v/2) - 1 + v),
    v ~ U(0, 1), which leans towards the middle timesteps for scale > 0 (and is uniform for scale 0).
    """
    if settings.sampling == "logit_normal":
        normal = torch.randn(rows, generator=generator)
        return torch.sigmoid(settings.logit_mean + settings.logit_std * normal)
    uniform = torch.rand(rows, generator=generator)
    if settings.sampling == "uniform":
        return uniform
    if settings.sampling == "mode":
        return 1 - uniform - settings.mode_scale * (torch.cos(math.pi * uniform / 2) ** 2 - 1 + uniform)
    raise ValueError(f"unknown timestep sampling {settings.sampling!r}")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = s·σ / (1 + (s - 1)·σ): more noise for s > 1, as larger images need (the SD3 paper's shift, s = √(m/n))."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def resolution_shift(image_tokens: int, scheduler_config: dict) -> float:
    """The shift factor exp(μ) Flux uses for an image of `image_tokens` packed tokens.

    μ runs linearly from base_shift at base_image_seq_len tokens (256: 256 px) to max_shift at max_image_seq_len
    (4096: 1024 px), as FluxPipeline's calculate_shift does; exp(μ) as a shift factor equals the scheduler's
    exponential time shift e^μ / (e^μ + 1/σ - 1).
    """
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return math.exp(base_shift + slope * (image_tokens - base_len))


def flow_loss_weights(sigmas: torch.Tensor, weighting: FlowWeighting) -> torch.Tensor | None:
    """Per-row loss weights of the SD3 paper's schemes: sigma_sqrt 1/σ², cosmap 2 / (π(1 - 2σ + 2σ²)); none: None."""
    if weighting == "none":
        return None
    if weighting == "sigma_sqrt":
        return sigmas.float() ** -2
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    raise ValueError(f"unknown flow weighting {weighting!r}")


class FlowMatchingObjective:
    """Rectified flow (SD3, Flux): x_t = (1 - σ)·x₀ + σ·ε; the denoiser predicts the velocity ε - x₀.

    Timesteps are σ·num_train_timesteps (0..1000, floats), what the pipelines give SD3's transformer (Flux's family
    divides them by 1000 again). σ comes from `flow_density`, then the shift: a fixed one (`settings.shift`, or the
    scheduler's `shift` for SD3: 3.0), or for a scheduler with `use_dynamic_shifting` (Flux) exp(μ) from the
    image's token count (`resolution_shift`), as kohya's `flux_shift` and FluxPipeline do.
    """

    def __init__(self, scheduler_config: dict, settings: FlowSettings | None = None, patch_size: int = 2):
        self.scheduler_config = dict(scheduler_config)
        self.settings = settings or FlowSettings()
        self.patch_size = patch_size  # latent cells per token side: a token covers patch_size² cells
        self.num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
        self.prediction_type = "flow"

    @property
    def scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)

    def shift(self, latent_size: tuple[int, int] | None) -> float:
        """The shift factor for latents of this (h, w)."""
        if self.settings.shift is not None:
            return self.settings.shift
        if self.scheduler_config.get("use_dynamic_shifting", False):
            if latent_size is None:
                raise ValueError("a resolution-dependent shift needs the latent size")
            h, w = latent_size
            return resolution_shift((h // self.patch_size) * (w // self.patch_size), self.scheduler_config)
        return float(self.scheduler_config.get("shift", 1.0))

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / self.num_train_timesteps

    def sample_timesteps(self, rows: int, generator: torch.Generator,
                         latent_size: tuple[int, int] | None = None) -> torch.Tensor:
        sigmas = shift_sigmas(flow_density(rows, generator, self.settings), self.shift(latent_size))
        return sigmas * self.num_train_timesteps

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas(timesteps).to(latents.device).view(-1, *([1] * (latents.ndim - 1)))
        return ((1 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def loss_weights(self, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor | None:
        if snr_gamma is not None:
            # Refused in the settings check (training.objective_settings); kept here for Python callers.
            raise ValueError("min-SNR-γ weighting is for DDPM models; flow matching uses its own weighting")
        return flow_loss_weights(self.sigmas(timesteps), self.settings.weighting)

"""Training objectives: how a step draws timesteps, noises latents, and what the denoiser must predict.

The loop asks the base model's objective (a family gives it, see models/family.py) and never the scheduler:

    t = objective.sample_timesteps(rows, generator)
    pred = denoiser(objective.noisy(x0, noise, t), t, ...)
    loss = prior_preservation_loss(pred, objective.target(x0, noise, t), ..., objective.loss_weights(t, γ))

`DiffusionObjective` is SD 1.x/2.x/SDXL's DDPM objective (ε or v prediction). A rectified-flow objective for
SD3/Flux would implement the same four methods (x_t = (1 - σ)·x₀ + σ·ε, target ε - x₀, timesteps from a
logit-normal density).
"""

from __future__ import annotations

from typing import Protocol

import torch

from .losses import diffusion_target, min_snr_weights


class Objective(Protocol):
    def sample_timesteps(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        """(rows,) timesteps drawn from `generator` alone (a step is reproducible from its seed)."""

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

    def sample_timesteps(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (rows,), generator=generator)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return diffusion_target(self.prediction_type, latents, noise, self.scheduler.alphas_cumprod, timesteps)

    def loss_weights(self, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor | None:
        if snr_gamma is None:
            return None
        return min_snr_weights(self.prediction_type, self.scheduler.alphas_cumprod, timesteps, snr_gamma)

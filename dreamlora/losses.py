"""The maths of a DreamBooth step, as pure functions."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class LossParts(NamedTuple):
    total: torch.Tensor  # what is back-propagated
    instance: torch.Tensor  # mse over the instance rows
    prior: torch.Tensor  # mse over the class rows (0 without prior preservation)


def diffusion_target(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x₀ (SD 2.x v-models).

    Args:
        prediction_type: the scheduler's config.prediction_type: "epsilon", "v_prediction" or "sample".
        latents: clean latents x₀, (B, C, h, w).
        noise: ε, same shape.
        alphas_cumprod: ᾱ for every training timestep, (T,).
        timesteps: (B,) integer timesteps.
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return latents
    if prediction_type == "v_prediction":
        abar = alphas_cumprod.to(device=latents.device, dtype=torch.float32)[timesteps]
        abar = abar.view(-1, *([1] * (latents.ndim - 1)))
        return (abar.sqrt() * noise.float() - (1 - abar).sqrt() * latents.float()).to(latents.dtype)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def prior_preservation_loss(pred: torch.Tensor, target: torch.Tensor, num_instance: int,
                            prior_weight: float) -> LossParts:
    """Instance loss + prior_weight · class loss; the batch holds instance rows first, then class rows.

    Computed in fp32 whatever the forward dtype, so fp16 predictions cannot underflow the mean.
    """
    pred, target = pred.float(), target.float()
    instance = F.mse_loss(pred[:num_instance], target[:num_instance])
    if pred.shape[0] == num_instance:
        zero = instance.new_zeros(())
        return LossParts(instance, instance, zero)
    prior = F.mse_loss(pred[num_instance:], target[num_instance:])
    return LossParts(instance + prior_weight * prior, instance, prior)

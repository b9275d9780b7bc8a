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
                            prior_weight: float, row_weights: torch.Tensor | None = None) -> LossParts:
    """Instance loss + prior_weight · class loss; the batch holds instance rows first, then class rows.

    Computed in fp32 whatever the forward dtype, so fp16 predictions cannot underflow the mean.

    Args:
        row_weights: optional (B,) weights of each row's mean squared error (e.g. min_snr_weights);
            None weighs every row 1, which is plain MSE.
    """
    per_row = (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    if row_weights is not None:
        per_row = per_row * row_weights.to(per_row)
    instance = per_row[:num_instance].mean()
    if pred.shape[0] == num_instance:
        zero = instance.new_zeros(())
        return LossParts(instance, instance, zero)
    prior = per_row[num_instance:].mean()
    return LossParts(instance + prior_weight * prior, instance, prior)


def min_snr_weights(prediction_type: str, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                    gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), (B,): min(SNR, γ) / SNR for ε targets, min(SNR, γ) / (SNR + 1) for v.

    SNR(t) = ᾱ / (1 − ᾱ). Nearly clean timesteps have a huge SNR; their ε loss is mostly about
    invisible noise, so the weight shrinks there and the steps go to the noisy timesteps where shapes
    and colours are decided. γ = 5 is the paper's value (and what --snr_gamma users set).

    Written without dividing by the SNR where it is below γ: a zero-terminal-SNR schedule
    (`rescale_betas_zero_snr`) has SNR = 0 at its last timestep, where min(SNR, γ) / SNR is 0 / 0 but its
    limit, and the weight of every other noisy timestep, is 1.
    """
    abar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    return torch.where(snr > gamma, gamma / snr, torch.ones_like(snr))


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """ε + strength · one random value per (row, channel): lets the model change an image's mean colour.

    The SD schedule leaves a little of each latent's mean at t = 999, so a model trained on plain
    noise can never make much darker or brighter pictures than its start; a per-channel offset
    teaches it to set the mean itself (kohya's --noise_offset). (B, C, h, w) -> same shape.
    """
    if strength == 0:
        return noise
    offset = torch.randn((*noise.shape[:2], 1, 1), generator=generator, dtype=noise.dtype)
    return noise + strength * offset

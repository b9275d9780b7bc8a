"""The rectified-flow objective (SD3, Flux) against hand computations and against diffusers' training helpers."""

import math

import pytest
import torch

from dreamlora.losses import prior_preservation_loss
from dreamlora.objectives import (FlowMatchingObjective, FlowSettings, flow_density, flow_loss_weights,
                                  resolution_shift, shift_sigmas)

SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}


def test_noisy_is_the_straight_line_from_data_to_noise_and_the_target_its_velocity():
    objective = FlowMatchingObjective(SD3_SCHEDULER)
    x0 = torch.tensor([[2.0], [2.0], [-4.0]]).view(3, 1, 1, 1)
    noise = torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1, 1)
    timesteps = torch.tensor([250.0, 0.0, 1000.0])  # σ = 0.25, 0 (clean), 1 (pure noise)
    noisy = objective.noisy(x0, noise, timesteps).flatten()
    torch.testing.assert_close(noisy, torch.tensor([0.75 * 2 + 0.25 * -1, 2.0, 1.0]))
    torch.testing.assert_close(objective.target(x0, noise, timesteps).flatten(), torch.tensor([-3.0, -3.0, 5.0]))
    # One Euler step of -σ along the target from x_t lands on x0.
    torch.testing.assert_close(noisy - timesteps / 1000 * objective.target(x0, noise, timesteps).flatten(),
                               x0.flatten())


def test_noisy_matches_diffusers_scale_noise():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in SD3_SCHEDULER.items() if k != "_class_name"})
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[3:4]
    x0, noise = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1)), torch.randn(1, 2, 4, 4)
    expected = scheduler.scale_noise(x0, t, noise)
    torch.testing.assert_close(FlowMatchingObjective(SD3_SCHEDULER).noisy(x0, noise, t), expected)


def test_densities_by_hand():
    n = torch.randn(3, generator=torch.Generator().manual_seed(5))
    u = torch.rand(3, generator=torch.Generator().manual_seed(5))
    logit = flow_density(3, torch.Generator().manual_seed(5), FlowSettings("logit_normal", logit_mean=0.5, logit_std=2.0))
    torch.testing.assert_close(logit, torch.tensor([1 / (1 + math.exp(-(0.5 + 2 * float(v)))) for v in n]))
    torch.testing.assert_close(flow_density(3, torch.Generator().manual_seed(5), FlowSettings("uniform")), u)
    # mode: u = 1 - v - s·(cos²(πv/2) - 1 + v); at v = 0.25, s = 1.29: 0.75 - 1.29·(0.853553 - 0.75) = 0.616416
    mode = flow_density(3, torch.Generator().manual_seed(5), FlowSettings("mode", mode_scale=1.29))
    expected = [1 - v - 1.29 * (math.cos(math.pi * v / 2) ** 2 - 1 + v) for v in u.tolist()]
    torch.testing.assert_close(mode, torch.tensor(expected))
    v = 0.25
    assert 1 - v - 1.29 * (math.cos(math.pi * v / 2) ** 2 - 1 + v) == pytest.approx(0.616416, abs=1e-6)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_densities_match_diffusers(scheme):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    settings = FlowSettings(scheme, logit_mean=0.3, logit_std=0.8, mode_scale=1.29)
    expected = compute_density_for_timestep_sampling(scheme if scheme != "uniform" else "none", 6, logit_mean=0.3,
                                                     logit_std=0.8, mode_scale=1.29,
                                                     generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(flow_density(6, torch.Generator().manual_seed(2), settings), expected)


def test_loss_weights_by_hand_and_as_diffusers():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = torch.tensor([0.5, 0.25])
    torch.testing.assert_close(flow_loss_weights(sigmas, "sigma_sqrt"), torch.tensor([4.0, 16.0]))
    torch.testing.assert_close(flow_loss_weights(sigmas, "cosmap"),
                               torch.tensor([2 / (math.pi * 0.5), 2 / (math.pi * (1 - 0.5 + 0.125))]))
    assert flow_loss_weights(sigmas, "none") is None
    for scheme in ("sigma_sqrt", "cosmap"):
        torch.testing.assert_close(flow_loss_weights(sigmas, scheme), compute_loss_weighting_for_sd3(scheme, sigmas))


def test_shifts():
    assert float(shift_sigmas(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)  # 1.5 / 2
    assert float(shift_sigmas(torch.tensor(0.2), 1.0)) == pytest.approx(0.2)
    # Flux: μ from 0.5 at 256 tokens to 1.15 at 4096; 512 px = 64x64 latents = 1024 tokens: μ = 0.5 + 0.65·768/3840
    assert resolution_shift(4096, FLUX_SCHEDULER) == pytest.approx(math.exp(1.15))
    assert resolution_shift(1024, FLUX_SCHEDULER) == pytest.approx(math.exp(0.63))
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in FLUX_SCHEDULER.items() if k != "_class_name"})
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(shift_sigmas(sigmas, math.exp(0.63)), scheduler.time_shift(0.63, 1.0, sigmas))


def test_sampled_timesteps_are_shifted_sigmas_times_1000():
    u = torch.rand(4, generator=torch.Generator().manual_seed(9))
    sd3 = FlowMatchingObjective(SD3_SCHEDULER, FlowSettings("uniform"))
    torch.testing.assert_close(sd3.sample_timesteps(4, torch.Generator().manual_seed(9)), 1000 * 3 * u / (1 + 2 * u))
    flux = FlowMatchingObjective(FLUX_SCHEDULER, FlowSettings("uniform"))
    s = math.exp(0.63)  # 64x64 latents -> 1024 tokens of 2x2
    torch.testing.assert_close(flux.sample_timesteps(4, torch.Generator().manual_seed(9), (64, 64)),
                               1000 * s * u / (1 + (s - 1) * u))
    fixed = FlowMatchingObjective(FLUX_SCHEDULER, FlowSettings("uniform", shift=1.0))  # --flow-shift overrides
    torch.testing.assert_close(fixed.sample_timesteps(4, torch.Generator().manual_seed(9), (64, 64)), 1000 * u)


def test_prior_preservation_with_the_flow_target_and_weights():
    objective = FlowMatchingObjective(SD3_SCHEDULER, FlowSettings(weighting="sigma_sqrt"))
    x0 = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)
    noise = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    timesteps = torch.tensor([500.0, 250.0])
    pred = torch.zeros(2, 1, 1, 1)
    # targets -1 and 1: squared errors 1 and 1, weights 1/0.25 and 1/0.0625; λ = 0.5 on the class row
    parts = prior_preservation_loss(pred, objective.target(x0, noise, timesteps), 1, 0.5,
                                    objective.loss_weights(timesteps, None))
    torch.testing.assert_close(parts.instance, torch.tensor(4.0))
    torch.testing.assert_close(parts.prior, torch.tensor(16.0))
    torch.testing.assert_close(parts.total, torch.tensor(4.0 + 0.5 * 16.0))
    with pytest.raises(ValueError, match="min-SNR"):
        objective.loss_weights(timesteps, 5.0)

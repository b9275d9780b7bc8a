import torch
from diffusers import DDPMScheduler

from dreamlora.losses import diffusion_target, prior_preservation_loss


def test_prior_preservation_loss_matches_hand_computation():
    pred = torch.tensor([[1.0, 2.0], [3.0, 5.0], [0.0, 0.0], [1.0, -1.0]]).view(4, 2, 1, 1)
    target = torch.tensor([[0.0, 2.0], [3.0, 3.0], [1.0, 1.0], [1.0, 1.0]]).view(4, 2, 1, 1)
    parts = prior_preservation_loss(pred, target, num_instance=2, prior_weight=0.5)
    # instance rows: squared errors 1, 0, 0, 4 -> mean 1.25; class rows: 1, 1, 0, 4 -> mean 1.5
    torch.testing.assert_close(parts.instance, torch.tensor(1.25))
    torch.testing.assert_close(parts.prior, torch.tensor(1.5))
    torch.testing.assert_close(parts.total, torch.tensor(1.25 + 0.5 * 1.5))


def test_without_class_rows_the_prior_loss_is_zero():
    pred, target = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    parts = prior_preservation_loss(pred, target, num_instance=2, prior_weight=1.0)
    assert parts.total.item() == 1.0 and parts.prior.item() == 0.0


def test_loss_is_computed_in_fp32_from_half_inputs():
    pred = torch.full((2, 1, 1, 1), 300.0, dtype=torch.float16)  # 300**2 overflows nothing in fp32
    parts = prior_preservation_loss(pred, torch.zeros_like(pred), num_instance=1, prior_weight=1.0)
    assert parts.total.dtype == torch.float32 and parts.total.item() == 2 * 90000.0


def test_v_prediction_target_is_the_velocity():
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="v_prediction")
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 500, 999])
    target = diffusion_target("v_prediction", latents, noise, scheduler.alphas_cumprod, timesteps)
    torch.testing.assert_close(target, scheduler.get_velocity(latents, noise, timesteps))
    # by hand for one row: v = sqrt(abar) * eps - sqrt(1 - abar) * x0
    abar = scheduler.alphas_cumprod[500]
    torch.testing.assert_close(target[1], abar.sqrt() * noise[1] - (1 - abar).sqrt() * latents[1])


def test_epsilon_target_is_the_noise():
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    target = diffusion_target("epsilon", latents, noise, torch.ones(1000), torch.tensor([1, 2]))
    assert target is noise


def test_min_snr_weights_match_hand_computation():
    from dreamlora.losses import min_snr_weights

    abar = torch.tensor([0.99, 0.5, 0.01])  # SNR 99, 1, 1/99
    t = torch.tensor([0, 1, 2])
    torch.testing.assert_close(min_snr_weights("epsilon", abar, t, 5.0), torch.tensor([5 / 99, 1.0, 1.0]))
    torch.testing.assert_close(min_snr_weights("v_prediction", abar, t, 5.0),
                               torch.tensor([5 / 100, 0.5, (1 / 99) / (1 / 99 + 1)]))


def test_min_snr_weights_are_finite_on_a_zero_terminal_snr_schedule():
    """rescale_betas_zero_snr makes ᾱ = 0 at t = T-1: SNR 0, where the ε weight min(SNR, γ)/SNR was 0/0 = NaN."""
    from diffusers import DDPMScheduler

    from dreamlora.losses import min_snr_weights

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              rescale_betas_zero_snr=True)
    abar = scheduler.alphas_cumprod
    assert abar[-1] == 0
    t = torch.tensor([0, 500, 999])
    eps = min_snr_weights("epsilon", abar, t, 5.0)
    assert torch.isfinite(eps).all() and eps[2] == 1.0 and eps[1] == 1.0  # noisy steps keep their full weight
    torch.testing.assert_close(eps[0], 5.0 / (abar[0] / (1 - abar[0])))
    v = min_snr_weights("v_prediction", abar, t, 5.0)
    assert torch.isfinite(v).all() and v[2] == 0.0


def test_row_weights_scale_each_rows_mse():
    pred, target = torch.tensor([[1.0, 1.0], [2.0, 2.0]]), torch.zeros(2, 2)
    parts = prior_preservation_loss(pred, target, num_instance=1, prior_weight=1.0, row_weights=torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(parts.instance, torch.tensor(0.5))  # 0.5 * mean(1, 1)
    torch.testing.assert_close(parts.prior, torch.tensor(8.0))  # 2 * mean(4, 4)


def test_offset_noise_adds_one_value_per_row_and_channel():
    from dreamlora.losses import offset_noise

    noise = torch.zeros(2, 4, 3, 3)
    assert offset_noise(noise, 0.0, torch.Generator().manual_seed(0)) is noise  # off: no draw, same stream
    shifted = offset_noise(noise, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(shifted, shifted[:, :, :1, :1].expand_as(shifted)) and shifted.abs().sum() > 0

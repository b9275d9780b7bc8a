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

"""Noise schedule, targets and loss weights against independent references (diffusers' DDPMScheduler, hand
arithmetic)."""

import math

import pytest
import torch

from sdstack.train.autoencoder import edge_weights
from sdstack.train.config import NoiseConfig, Text2ImageConfig
from sdstack.train.loop import lr_factor
from sdstack.train.text2image import snr_weights, training_alphas_cumprod


def _cfg(**noise):
    return Text2ImageConfig(vae="v", noise=NoiseConfig(**noise))


def test_zero_terminal_snr_schedule_matches_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        rescale_betas_zero_snr=True).alphas_cumprod.double()
    ours = training_alphas_cumprod(_cfg(zero_terminal_snr=True))
    assert float(ours[-1]) == 0.0  # training uses the true zero (sampling clamps it)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)


def test_plain_schedule_matches_diffusers_and_leaks_signal():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.double()
    ours = training_alphas_cumprod(_cfg(zero_terminal_snr=False, prediction_type="epsilon"))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-8)
    assert 0.06 < math.sqrt(float(ours[-1])) < 0.08  # ~7% of the signal survives the last step


def test_v_target_matches_diffusers_velocity():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          rescale_betas_zero_snr=True, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0, 500, 999])
    a = training_alphas_cumprod(_cfg()).float()[t].view(3, 1, 1, 1)
    ours = a.sqrt() * noise - (1 - a).sqrt() * x0
    torch.testing.assert_close(ours, sched.get_velocity(x0, noise, t), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.sqrt() * x0 + (1 - a).sqrt() * noise, sched.add_noise(x0, noise, t),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("snr, pred, expected", [
    (1.0, "epsilon", 1.0), (9.0, "epsilon", 5 / 9), (0.5, "epsilon", 1.0),
    (1.0, "v_prediction", 1.0), (9.0, "v_prediction", 0.5), (0.0, "v_prediction", 1.0), (99.0, "v_prediction", 0.05),
])
def test_min_snr_gamma_weights(snr, pred, expected):
    a = torch.tensor([snr / (1 + snr)], dtype=torch.float64)
    assert float(snr_weights(a, 5.0, pred)) == pytest.approx(expected, rel=1e-9)


def test_min_snr_off_is_plain_mse():
    assert torch.equal(snr_weights(torch.tensor([0.3, 0.9]), 0.0, "v_prediction"), torch.ones(2))


@pytest.mark.parametrize("step, expected", [(0, 0.1), (4, 0.5), (9, 1.0), (10, 1.0), (60, 0.55), (110, 0.1),
                                            (200, 0.1)])
def test_warmup_then_cosine(step, expected):
    assert lr_factor(step, warmup=10, total=110, decay="cosine", min_ratio=0.1) == pytest.approx(expected)


def test_constant_after_warmup():
    assert lr_factor(50, 10, 110, "constant", 0.1) == 1.0


def test_edge_weights_mark_pixels_next_to_colour_steps():
    x = -torch.ones(1, 3, 8, 8)
    assert torch.equal(edge_weights(x, 4.0), torch.ones(1, 1, 8, 8))
    x[..., 4:] = 1.0  # a vertical edge between columns 3 and 4
    w = edge_weights(x, 4.0)[0, 0]
    assert torch.equal(w[:, 2:6], torch.full((8, 4), 5.0))  # the two edge columns, grown by one pixel
    assert torch.equal(w[:, :2], torch.ones(8, 2)) and torch.equal(w[:, 6:], torch.ones(8, 2))


def test_gradient_loss_sees_blur_that_keeps_the_mean():
    from sdstack.train.autoencoder import gradient_loss

    x = -torch.ones(1, 3, 8, 8)
    x[..., 4:] = 1.0
    blurred = x.clone()
    blurred[..., 3], blurred[..., 4] = -1 / 3, 1 / 3  # same column sums, softer step
    assert float(gradient_loss(x, x)) == 0.0
    # the step of 2 becomes three steps of 2/3: |dx| errors 2/3 + 4/3 + 2/3 over 7 columns, 3 channels, 8 rows
    assert float(gradient_loss(blurred, x)) == pytest.approx(0.5 * (8 / 3) / 7)


def test_timestep_range_draws_only_from_it_and_defaults_to_every_timestep():
    """kohya's --min_timestep / --max_timestep: t uniform in [lo, hi); the default is the whole schedule."""
    from sdstack.train.diffusion import diffusion_loss

    alpha_bar = torch.linspace(0.999, 0.001, 1000)
    x0 = torch.randn(64, 4, 2, 2)
    seen = {}

    def loss_with(key, **kw):
        seen[key] = []

        def predict(noisy, t):
            seen[key].append(t.clone())
            return torch.zeros_like(noisy)

        out = diffusion_loss(predict, x0, alpha_bar, prediction_type="epsilon", min_snr_gamma=0.0,
                             generator=torch.Generator().manual_seed(3), **kw)
        seen[key] = torch.cat(seen[key])
        return out[0]

    loss_with("low", timesteps=(100, 300))
    assert int(seen["low"].min()) >= 100 and int(seen["low"].max()) < 300
    assert len(set(seen["low"].tolist())) > 20  # spread over the range, not one value
    loss_with("one", timesteps=(250, 251))
    assert set(seen["one"].tolist()) == {250}
    a = loss_with("default")
    b = loss_with("all", timesteps=(0, 1000))
    assert torch.equal(seen["default"], seen["all"]) and float(a) == float(b)
    assert int(seen["default"].max()) >= 500  # the default reaches the high-noise half


def test_prior_images_can_draw_from_their_own_timestep_range():
    """noise.prior_max_timestep: the masked (class / reg) samples draw from [lo, prior_hi), the others keep their
    range and, the option off, the very same draws as before."""
    from sdstack.train.diffusion import diffusion_loss

    alpha_bar = torch.linspace(0.999, 0.001, 1000)
    x0 = torch.randn(200, 4, 2, 2)
    reg = torch.arange(200) % 2 == 1
    drawn = []

    def predict(noisy, t):
        drawn.append(t.clone())
        return torch.zeros_like(noisy)

    for other in (None, (reg, (0, 1000))):
        diffusion_loss(predict, x0, alpha_bar, prediction_type="epsilon", min_snr_gamma=0.0,
                       generator=torch.Generator().manual_seed(5), timesteps=(0, 450), other_timesteps=other)
    plain, mixed = drawn
    assert int(plain.max()) < 450
    assert torch.equal(mixed[~reg], plain[~reg])  # the instance samples' draws are unchanged
    assert int(mixed[reg].max()) >= 450 and int(mixed[reg].min()) < 450  # the prior ones span the whole schedule

"""DiscreteSchedule and the eps / v denoiser adapters, against diffusers and closed-form identities."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from sdstack.errors import UserError
from sdstack.sampling.denoisers import DiscreteSchedule, EpsDenoiser, VDenoiser, make_denoiser
from sdstack.sampling.rng import generator, randn

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def ref():
    return diffusers.EulerDiscreteScheduler(**SD_BETAS)


@pytest.fixture(scope="module")
def sched(ref) -> DiscreteSchedule:
    return DiscreteSchedule(ref.alphas_cumprod)


def test_sigmas_are_sqrt_one_minus_a_over_a(sched, ref):
    """sigma_t = sqrt((1 - a_t) / a_t), ascending; SD's range is about 0.0292 .. 14.6146."""
    a = ref.alphas_cumprod.double()
    torch.testing.assert_close(sched.sigmas.double(), ((1 - a) / a).sqrt(), rtol=1e-6, atol=0)
    assert bool((sched.sigmas[1:] > sched.sigmas[:-1]).all())
    assert sched.sigma_min == pytest.approx(0.02916753, rel=1e-5)
    assert sched.sigma_max == pytest.approx(14.6146, rel=1e-5)
    assert sched.num_timesteps == 1000


def test_sigma_to_t_matches_diffusers(sched, ref):
    """diffusers' `_sigma_to_t` is the same log-sigma interpolation; it clamps outside the table too.
    Tolerance 1e-4 timesteps (float32 log-sigmas vs float64)."""
    log_sigmas = np.log(((1 - ref.alphas_cumprod.numpy()) / ref.alphas_cumprod.numpy()) ** 0.5)
    values = [0.01, 0.0291675, 0.03, 0.1, 0.5, 1.0, 2.5, 5.0, 14.6, 14.6146, 20.0]
    got = sched.sigma_to_t(torch.tensor(values))
    want = torch.tensor([float(ref._sigma_to_t(np.array(v), log_sigmas)) for v in values])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert got.shape == (len(values),)


def test_sigma_to_t_inverts_t_to_sigma(sched):
    t = torch.tensor([0.0, 1.0, 0.5, 17.25, 500.0, 998.9, 999.0])
    torch.testing.assert_close(sched.sigma_to_t(sched.t_to_sigma(t)), t, atol=2e-3, rtol=0)
    torch.testing.assert_close(sched.t_to_sigma(torch.arange(1000.0)), sched.sigmas, rtol=1e-6, atol=0)


def test_t_to_sigma_is_log_linear_between_timesteps(sched):
    """Halfway between two timesteps the sigma is their geometric mean."""
    want = (sched.sigmas[10] * sched.sigmas[11]).sqrt()
    torch.testing.assert_close(sched.t_to_sigma(torch.tensor(10.5)), want, rtol=1e-6, atol=0)


def _gaussian_case(sched):
    x0 = randn((3, 4, 2, 2), generator(5))
    eps = randn((3, 4, 2, 2), generator(6))
    sigma = torch.tensor([0.5, 2.0, 9.0])
    x = x0 + sigma.view(-1, 1, 1, 1) * eps
    return x0, eps, sigma, x


def test_eps_denoiser_preconditioning(sched):
    """The model sees x / sqrt(sigma^2 + 1) and t(sigma); denoised = x - sigma * eps. Tolerance 1e-5."""
    x0, eps, sigma, x = _gaussian_case(sched)
    seen = {}

    def model(x_in, t, **extra):
        seen.update(x_in=x_in, t=t, extra=extra)
        return eps

    out = EpsDenoiser(model, sched.alphas_cumprod)(x, sigma, cond="c")
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["x_in"], x / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt())
    torch.testing.assert_close(seen["t"], sched.sigma_to_t(sigma))
    assert seen["extra"] == {"cond": "c"}


def test_v_denoiser_recovers_x0_from_true_v(sched):
    """Salimans & Ho 2022: on x_vp = alpha x0 + s eps (alpha = 1/sqrt(1+sigma^2), s = sigma alpha),
    v = alpha eps - s x0. A model returning the true v must give denoised = x0. Tolerance 1e-5."""
    x0, eps, sigma, x = _gaussian_case(sched)
    alpha = (1 / (1 + sigma**2).sqrt()).view(-1, 1, 1, 1)
    s = sigma.view(-1, 1, 1, 1) * alpha
    v = alpha * eps - s * x0
    out = VDenoiser(lambda x_in, t: v, sched.alphas_cumprod)(x, sigma)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_scalar_sigma_is_broadcast(sched):
    x0, eps, _, _ = _gaussian_case(sched)
    x = x0 + 3.0 * eps
    den = make_denoiser(lambda x_in, t: eps * torch.ones_like(t).view(-1, 1, 1, 1), sched.alphas_cumprod)
    torch.testing.assert_close(den(x, 3.0), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(den(x, torch.tensor(3.0)), x0, atol=1e-5, rtol=0)


def test_model_runs_in_its_dtype_sigma_math_in_float32(sched):
    """With dtype=bfloat16 the model gets bf16 input; the combination stays float32 for a float32 x."""
    x0, eps, sigma, x = _gaussian_case(sched)
    seen = {}

    def model(x_in, t):
        seen["dtype"], seen["t_dtype"] = x_in.dtype, t.dtype
        return eps.to(x_in.dtype)

    out = make_denoiser(model, sched.alphas_cumprod, "epsilon", dtype=torch.bfloat16)(x, sigma)
    assert seen == {"dtype": torch.bfloat16, "t_dtype": torch.float32}
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x0, atol=0.1, rtol=0.01)  # eps rounded to bf16, times sigma up to 9


def test_make_denoiser_picks_the_adapter(sched):
    assert isinstance(make_denoiser(lambda x, t: x, sched.alphas_cumprod, "epsilon"), EpsDenoiser)
    assert isinstance(make_denoiser(lambda x, t: x, sched.alphas_cumprod, "v_prediction"), VDenoiser)
    with pytest.raises(UserError, match="v_prediction"):
        make_denoiser(lambda x, t: x, sched.alphas_cumprod, "sample")


def test_schedule_rejects_bad_alphas():
    with pytest.raises(ValueError):
        DiscreteSchedule(torch.tensor([0.5, 0.9]))

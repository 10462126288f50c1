"""Sigma schedules against the paper formula, hand computations and diffusers' schedulers."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch

from sdstack.sampling import schedules
from sdstack.sampling.denoisers import DiscreteSchedule
from sdstack.sampling.schedules import SCHEDULERS

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def sd_schedule() -> DiscreteSchedule:
    return DiscreteSchedule(diffusers.EulerDiscreteScheduler(**SD_BETAS).alphas_cumprod)


def diffusers_sigmas(n: int, **config) -> torch.Tensor:
    sched = diffusers.EulerDiscreteScheduler(**SD_BETAS, **config)
    sched.set_timesteps(n)
    return sched.sigmas


def test_karras_by_hand_eq5():
    """Karras et al. 2022 eq. 5 with n=3, sigma_min=0.1, sigma_max=10, rho=7, written out by hand.
    Tolerance 1e-6 relative (float32 output)."""
    mid = ((10 ** (1 / 7) + 0.1 ** (1 / 7)) / 2) ** 7
    want = torch.tensor([10.0, mid, 0.1, 0.0])
    torch.testing.assert_close(schedules.karras(3, 0.1, 10.0), want, rtol=1e-6, atol=0)


def test_karras_rho_one_is_linear():
    """rho = 1 makes eq. 5 a straight line from sigma_max to sigma_min."""
    torch.testing.assert_close(schedules.karras(5, 1.0, 5.0, rho=1.0), torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0]))


@pytest.mark.parametrize("n", [7, 10, 20, 28])
def test_karras_matches_diffusers(sd_schedule, n):
    """EulerDiscreteScheduler(use_karras_sigmas=True) over the SD model's sigma range. Tolerance 1e-6 rel."""
    got = schedules.karras(n, sd_schedule.sigma_min, sd_schedule.sigma_max)
    torch.testing.assert_close(got, diffusers_sigmas(n, use_karras_sigmas=True), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n", [7, 10, 20])
def test_exponential_matches_diffusers(sd_schedule, n):
    """EulerDiscreteScheduler(use_exponential_sigmas=True). Tolerance 1e-6 relative."""
    got = schedules.exponential(n, sd_schedule.sigma_min, sd_schedule.sigma_max)
    torch.testing.assert_close(got, diffusers_sigmas(n, use_exponential_sigmas=True), rtol=1e-6, atol=1e-7)


def test_exponential_by_hand():
    """log-sigmas evenly spaced: 8, 4, 2, 1 then 0."""
    torch.testing.assert_close(schedules.exponential(4, 1.0, 8.0), torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0]))


@pytest.mark.parametrize("n", [10, 28])
def test_uniform_matches_diffusers_linspace_exactly_on_integer_timesteps(sd_schedule, n):
    """EulerDiscreteScheduler's default "linspace" spacing: timesteps linspace(999, 0, n). For n=10 and 28
    they are integers and the two agree to float32 round-off (tolerance 1e-6 relative)."""
    got = schedules.uniform(n, sd_schedule.sigma_min, sd_schedule.sigma_max, schedule=sd_schedule)
    torch.testing.assert_close(got, diffusers_sigmas(n), rtol=1e-6, atol=1e-7)


def test_uniform_differs_from_diffusers_only_by_interpolation(sd_schedule):
    """At fractional timesteps (n=20) k-diffusion/A1111 interpolate log-sigma, diffusers sigma itself; the
    difference is below 1e-4 relative. Our values equal exp(np.interp(t, arange, log_sigmas))."""
    got = schedules.uniform(20, 0, 0, schedule=sd_schedule)
    torch.testing.assert_close(got, diffusers_sigmas(20), rtol=1e-4, atol=1e-7)
    t = np.linspace(999, 0, 20)
    by_hand = np.exp(np.interp(t, np.arange(1000), sd_schedule.log_sigmas.double().numpy()))
    np.testing.assert_allclose(got[:-1].numpy(), by_hand, rtol=2e-6)


def test_sgm_uniform_by_hand(sd_schedule):
    """A1111 sgm_uniform: t = linspace(t(sigma_max), t(sigma_min), n+1) without the last, then 0. On the
    SD schedule t(sigma_max)=999 and t(sigma_min)=0, so t = 999, 899.1, ..., 99.9 (n=10)."""
    got = schedules.sgm_uniform(10, sd_schedule.sigma_min, sd_schedule.sigma_max, schedule=sd_schedule)
    t = 999.0 * (1 - np.arange(10) / 10)
    by_hand = np.exp(np.interp(t, np.arange(1000), sd_schedule.log_sigmas.double().numpy()))
    np.testing.assert_allclose(got[:-1].numpy(), by_hand, rtol=2e-6)
    assert got[-1] == 0 and len(got) == 11


def test_ddim_schedule_is_a1111_timesteps(sd_schedule):
    """A1111 ddim_scheduler: sigmas at timesteps 1, 1+k, ... (k = 1000 // n), descending, then 0.
    n=20 -> 951, 901, ..., 1; n=30 -> k=33 gives 31 timesteps 991, ..., 1; n=7 -> k=142 gives 8 (as A1111)."""
    got = schedules.ddim(20, 0, 0, schedule=sd_schedule)
    torch.testing.assert_close(got[:-1], sd_schedule.sigmas[list(range(951, 0, -50))], rtol=0, atol=0)
    got30 = schedules.ddim(30, 0, 0, schedule=sd_schedule)
    assert len(got30) == 32
    torch.testing.assert_close(got30[:-1], sd_schedule.sigmas[list(range(991, 0, -33))], rtol=0, atol=0)
    got7 = schedules.ddim(7, 0, 0, schedule=sd_schedule)  # k = 142: 1, 143, ..., 995 -> 8 steps
    torch.testing.assert_close(got7[:-1], sd_schedule.sigmas[list(range(995, 0, -142))], rtol=0, atol=0)


@pytest.mark.parametrize("key", [k for k in SCHEDULERS if k != "automatic"])
@pytest.mark.parametrize("n", [1, 2, 15])
def test_every_schedule_descends_to_zero(sd_schedule, key, n):
    sigmas = SCHEDULERS[key].fn(n, sd_schedule.sigma_min, sd_schedule.sigma_max, schedule=sd_schedule)
    assert sigmas.dtype == torch.float32 and sigmas.device.type == "cpu"
    assert sigmas[-1] == 0 and bool((sigmas[:-1] > 0).all())
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    assert len(sigmas) == n + 1 or key == "ddim"
    assert float(sigmas[0]) <= sd_schedule.sigma_max * (1 + 1e-6)


def test_schedules_on_model_timesteps_need_the_schedule():
    with pytest.raises(ValueError, match="schedule="):
        schedules.uniform(10, 0.03, 14.6)


def test_registry_keys_and_labels_are_a1111s():
    assert {k: s.label for k, s in SCHEDULERS.items()} == {
        "automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
        "sgm_uniform": "SGM Uniform", "ddim": "DDIM",
    }
    assert SCHEDULERS["automatic"].fn is None
    assert "SGMUniform" in SCHEDULERS["sgm_uniform"].aliases
    assert all(s.name == k for k, s in SCHEDULERS.items())


def test_karras_endpoints_are_exact():
    sigmas = schedules.karras(9, 0.0292, 14.6146)
    assert math.isclose(float(sigmas[0]), 14.6146, rel_tol=1e-6)
    assert math.isclose(float(sigmas[-2]), 0.0292, rel_tol=1e-6)

"""Golden tests: each basic sampler against the diffusers scheduler implementing the same algorithm.

Both sides run the same tiny analytic eps-model (a fixed channel-mixing matrix plus a function of the
timestep) from the same start latent, on the same sigmas, with the same noise tensors. diffusers is an
independent implementation, so agreement to float32 round-off checks the algorithm, the sigma <-> t mapping
and the eps preconditioning together.
"""

from __future__ import annotations

import importlib

import diffusers
import numpy as np
import pytest
import torch
from scipy import integrate

from sdstack.sampling import samplers as S
from sdstack.sampling import schedules
from sdstack.sampling.denoisers import make_denoiser
from sdstack.sampling.rng import generator, randn

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SHAPE = (2, 4, 3, 3)
# float32 round-off over ~10-20 steps on values of size ~10; the model is smooth, so this is tight
TOL = 2e-5

W = torch.tensor([[0.5, 0.1, 0.0, 0.0], [0.0, 0.6, 0.1, 0.0], [0.05, 0.0, 0.4, 0.1], [0.0, 0.1, 0.0, 0.7]])


def toy_eps(x_in: torch.Tensor, t) -> torch.Tensor:
    """A fixed linear map of the scaled input plus a smooth function of the timestep."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
    return torch.einsum("ij,bjhw->bihw", W, x_in) + 0.2 * torch.cos(t / 300.0)


def start_noise() -> torch.Tensor:
    return randn(SHAPE, generator(1))


def noise_list(n: int = 64) -> list[torch.Tensor]:
    return [randn(SHAPE, generator(100 + i)) for i in range(n)]


def feed(noises):
    it = iter(noises)
    return lambda *args, **kwargs: next(it)


def run_diffusers_k(cls, n, x0, noises=None, monkeypatch=None, **config):
    """diffusers k-style loop: scale_model_input -> model -> step; noise patched into `randn_tensor`."""
    sched = cls(**SD_BETAS, **config)
    sched.set_timesteps(n)
    if noises is not None:
        monkeypatch.setattr(importlib.import_module(cls.__module__), "randn_tensor", feed(noises))
    x = x0.clone()
    for t in sched.timesteps:
        x = sched.step(toy_eps(sched.scale_model_input(x, t), t), t, x).prev_sample
    return x, sched


CASES = [
    ("euler", diffusers.EulerDiscreteScheduler, S.sample_euler, False),
    ("euler_a", diffusers.EulerAncestralDiscreteScheduler, S.sample_euler_ancestral, True),
    ("heun", diffusers.HeunDiscreteScheduler, S.sample_heun, False),
    ("dpm_2", diffusers.KDPM2DiscreteScheduler, S.sample_dpm_2, False),
    ("dpm_2_a", diffusers.KDPM2AncestralDiscreteScheduler, S.sample_dpm_2_ancestral, True),
    ("lms", diffusers.LMSDiscreteScheduler, S.sample_lms, False),
]


@pytest.mark.parametrize("name,cls,fn,stochastic", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("n", [10, 28])
def test_k_samplers_match_diffusers_uniform(name, cls, fn, stochastic, n, monkeypatch):
    """Default "linspace" spacing; n=10 and 28 put every timestep on an integer (999 = 9*111 = 27*37), where
    diffusers' linear sigma interpolation and ours agree. Tolerance: 2e-5 absolute (float32 round-off)."""
    sched = cls(**SD_BETAS)
    den = make_denoiser(toy_eps, sched.alphas_cumprod, "epsilon")
    sigmas = schedules.uniform(n, den.sigma_min, den.sigma_max, schedule=den.schedule)
    x0 = start_noise() * sigmas[0]
    noises = noise_list() if stochastic else None
    expected, _ = run_diffusers_k(cls, n, x0, noises, monkeypatch)
    got = fn(den, x0, sigmas, noise=feed(noises) if stochastic else None)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["karras", "exponential"])
def test_euler_matches_diffusers_on_karras_and_exponential_sigmas(kind):
    """12 karras / exponential steps: EulerDiscreteScheduler passes the model log-sigma-interpolated
    (fractional) timesteps, as our denoiser does. (Heun and KDPM2 round those timesteps to integers and
    Euler a has no karras option, so they are compared on uniform sigmas only.) Tolerance 2e-5 absolute."""
    sched = diffusers.EulerDiscreteScheduler(**SD_BETAS)
    den = make_denoiser(toy_eps, sched.alphas_cumprod, "epsilon")
    sigmas = getattr(schedules, kind)(12, den.sigma_min, den.sigma_max)
    x0 = start_noise() * sigmas[0]
    expected, _ = run_diffusers_k(diffusers.EulerDiscreteScheduler, 12, x0, **{f"use_{kind}_sigmas": True})
    got = S.sample_euler(den, x0, sigmas)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("n", [20, 10])
def test_ddim_matches_diffusers_ddim_scheduler(n):
    """DDIM, eta=0, against DDIMScheduler with SD's "leading" spacing + steps_offset=1 (timesteps 951..1 for
    20 steps, the same as A1111's) and set_alpha_to_one=True (its last step lands on sigma 0 like ours).
    diffusers works on x_vp = x / sqrt(1 + sigma^2); at sigma 0 both are the same. Tolerance 2e-5.
    (For n not dividing 1000, A1111 and our "ddim" schedule take one step more than diffusers: n=30 -> 31.)"""
    sched = diffusers.DDIMScheduler(**SD_BETAS, set_alpha_to_one=True, steps_offset=1,
                                    timestep_spacing="leading", clip_sample=False)
    sched.set_timesteps(n)
    den = make_denoiser(toy_eps, sched.alphas_cumprod, "epsilon")
    sigmas = schedules.ddim(n, den.sigma_min, den.sigma_max, schedule=den.schedule)
    torch.testing.assert_close(sigmas[:-1], den.schedule.sigmas[sched.timesteps.long()], atol=0, rtol=0)
    x_vp = start_noise()
    for t in sched.timesteps:
        x_vp = sched.step(toy_eps(x_vp, t), t, x_vp).prev_sample
    got = S.sample_ddim(den, start_noise() * (1 + sigmas[0] ** 2).sqrt(), sigmas)
    torch.testing.assert_close(got, x_vp, atol=TOL, rtol=0)


@pytest.mark.parametrize("n", [4, 2, 1])
def test_lcm_matches_diffusers_lcm_scheduler(n, monkeypatch):
    """LCMScheduler also applies the consistency-model boundary condition c_skip/c_out to the model output;
    that belongs to an LCM model's denoiser, not to the sampler, so it is switched off here
    (timestep_scaling=1e6 gives c_skip < 1e-11, c_out = 1 - 1e-11). Same timesteps (999, 759, 499, 259 for
    n=4), same noise. diffusers re-noises x_vp = x / sqrt(1 + sigma^2). Tolerance 2e-5."""
    import diffusers.schedulers.scheduling_lcm as lcm_module

    sched = diffusers.LCMScheduler(**SD_BETAS, timestep_scaling=1e6, set_alpha_to_one=True)
    sched.set_timesteps(n)
    den = make_denoiser(toy_eps, sched.alphas_cumprod, "epsilon")
    sigmas = torch.cat([den.schedule.sigmas[sched.timesteps.long()], torch.zeros(1)])
    noises = noise_list()
    monkeypatch.setattr(lcm_module, "randn_tensor", feed(noises))
    x_vp = start_noise()
    for t in sched.timesteps:
        x_vp = sched.step(toy_eps(x_vp, t), t, x_vp).prev_sample
    got = S.sample_lcm(den, start_noise() * (1 + sigmas[0] ** 2).sqrt(), sigmas, noise=feed(noises))
    torch.testing.assert_close(got, x_vp, atol=TOL, rtol=0)


def test_lms_coefficients_match_scipy_quad():
    """Gauss-Legendre LMS coefficients vs scipy's adaptive quadrature of the Lagrange basis, written out
    here from the definition. Tolerance 1e-9 relative to the step size."""
    sigmas = np.array([14.6, 9.7, 6.1, 3.3, 1.9, 0.8, 0.3, 0.0])
    for i in range(len(sigmas) - 1):
        order = min(i + 1, 4)
        for j in range(order):
            def basis(tau, i=i, j=j, order=order):
                terms = [(tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]) for k in range(order) if k != j]
                return float(np.prod(terms))

            want = integrate.quad(basis, sigmas[i], sigmas[i + 1], epsabs=1e-13)[0]
            assert abs(S.lms_coefficient(sigmas, i, j, order) - want) < 1e-9 * abs(sigmas[i] - sigmas[i + 1])


def test_lms_coefficients_sum_to_step():
    """The Lagrange basis sums to 1, so at every order the coefficients sum to sigma_{i+1} - sigma_i."""
    sigmas = np.array([10.0, 5.0, 2.0, 1.0, 0.5, 0.0])
    for i in range(len(sigmas) - 1):
        order = min(i + 1, 4)
        total = sum(S.lms_coefficient(sigmas, i, j, order) for j in range(order))
        assert total == pytest.approx(sigmas[i + 1] - sigmas[i], abs=1e-12)


STOCHASTIC = [S.sample_euler_ancestral, S.sample_dpm_2_ancestral, S.sample_lcm]


@pytest.mark.parametrize("fn", STOCHASTIC, ids=lambda f: f.__name__)
def test_stochastic_samplers_need_noise(fn):
    den = make_denoiser(toy_eps, diffusers.EulerDiscreteScheduler(**SD_BETAS).alphas_cumprod)
    with pytest.raises(ValueError, match="noise"):
        fn(den, torch.zeros(SHAPE), torch.tensor([5.0, 1.0, 0.0]))


def test_callback_once_per_step_with_k_diffusion_keys():
    """callback(dict(i, x, sigma, sigma_hat, denoised)) once per step, i = 0..n-1, x is the step's input."""
    den = make_denoiser(toy_eps, diffusers.EulerDiscreteScheduler(**SD_BETAS).alphas_cumprod)
    sigmas = torch.tensor([5.0, 2.0, 0.5, 0.0])
    x = start_noise() * 5.0
    seen = []
    S.sample_heun(den, x, sigmas, callback=seen.append)
    assert [d["i"] for d in seen] == [0, 1, 2]
    assert set(seen[0]) == {"i", "x", "sigma", "sigma_hat", "denoised"}
    assert torch.equal(seen[0]["x"], x)
    assert [float(d["sigma"]) for d in seen] == [5.0, 2.0, 0.5]
    torch.testing.assert_close(seen[0]["denoised"], den(x, torch.tensor(5.0)))


def test_extra_kwargs_reach_the_denoiser():
    calls = []

    def den(x, sigma, **extra):
        calls.append(extra)
        return torch.zeros_like(x)

    S.sample_euler(den, torch.ones(SHAPE), torch.tensor([2.0, 1.0, 0.0]), extra={"cond": "c"})
    assert calls == [{"cond": "c"}, {"cond": "c"}]


# --- convergence on Gaussian data, where the probability-flow ODE is solvable in closed form --------------

MU, SD = 0.3, 0.5


def gaussian_denoiser(x, sigma, **extra):
    """Exact denoiser for data ~ N(MU, SD^2): E[x0 | x] = MU + SD^2 / (SD^2 + sigma^2) (x - MU)."""
    s = sigma.view(-1, 1, 1, 1)
    return MU + SD**2 / (SD**2 + s**2) * (x - MU)


def ode_error(fn, n: int) -> float:
    """Max error at sigma 0 against the exact ODE solution x(0) = MU + SD / sqrt(SD^2 + smax^2) (x_T - MU)."""
    x_t = torch.linspace(-2, 2, 8, dtype=torch.float64).view(2, 1, 2, 2) * 14.6
    exact = MU + SD / (SD**2 + 14.6**2) ** 0.5 * (x_t - MU)
    sigmas = schedules.karras(n, 0.03, 14.6).double()
    return float((fn(gaussian_denoiser, x_t, sigmas) - exact).abs().max())


@pytest.mark.parametrize("fn,rate", [(S.sample_euler, 1), (S.sample_ddim, 1), (S.sample_heun, 2),
                                     (S.sample_dpm_2, 2), (S.sample_lms, 2)], ids=lambda v: getattr(v, "__name__", v))
def test_deterministic_samplers_converge_at_their_order(fn, rate):
    """Doubling the steps (10 -> 20 -> 40 karras steps, float64) must cut the error by about 2 for a
    first-order method and by at least 3.5 for a second-order one (theory: 4; LMS is higher)."""
    errs = [ode_error(fn, n) for n in (10, 20, 40)]
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    if rate == 1:
        assert all(1.8 < r < 2.2 for r in ratios), ratios
    else:
        assert all(r > 3.5 for r in ratios), ratios
    assert errs[2] < 0.05

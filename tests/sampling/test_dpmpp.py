"""DPM-Solver++ samplers against diffusers schedulers and hand references on a tiny analytic eps-model.

The toy model lives on the SD 1.x discrete schedule (scaled_linear betas 0.00085..0.012, 1000 steps):
eps(x_vp, t) is the exact noise prediction for Gaussian data N(mu, 0.5^2 I) plus a small nonlinear term,
with alpha_bar(t) interpolated from the table. Our samplers see it through a k-diffusion style denoiser
(sigma = sqrt((1-a)/a), c_in = 1/sqrt(1+sigma^2), t from sigma by log-sigma interpolation); the diffusers
loops call the same eps-model at the same sigma. Diffusers works on x_vp = x / sqrt(1+sigma^2), so both
sides start from the same state: x_vp = noise there, x = noise * sqrt(1+sigma_0^2) here (at sigma=0 the
two spaces coincide). Every golden number comes from diffusers or from the hand-written loops below.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, DPMSolverSDEScheduler

from sdstack.sampling.samplers_dpmpp import (
    ancestral_sigmas,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_sde,
)

N_TRAIN = 1000
SHAPE = (2, 3, 2, 2)
SCHEDULE = dict(num_train_timesteps=N_TRAIN, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# float32 runs (diffusers' DPMSolverMultistep casts the sample to float32): observed error ~7e-7 on values ~2.
TOL32 = dict(atol=1e-5, rtol=1e-5)


def _alphas_cumprod() -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, N_TRAIN, dtype=np.float64) ** 2
    return np.cumprod(1 - betas)


ALPHAS_CUMPROD = _alphas_cumprod()
LOG_SIGMAS = np.log(np.sqrt((1 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD))


def sigma_to_t(sigma: torch.Tensor) -> np.ndarray:
    """Continuous timestep from sigma by interpolating log-sigma over the discrete table."""
    log_sigma = np.log(sigma.detach().double().cpu().numpy())
    return np.interp(log_sigma, LOG_SIGMAS, np.arange(N_TRAIN, dtype=np.float64))


class ToyEps:
    """eps(x_vp, t): Gaussian-data posterior noise plus 0.1*tanh(mix @ x); counts its calls."""

    def __init__(self, seed: int = 0, data_std: float = 0.5):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(1, *SHAPE[1:], generator=g, dtype=torch.float64)
        self.mix = 0.3 * torch.randn(SHAPE[1], SHAPE[1], generator=g, dtype=torch.float64)
        self.var = data_std**2
        self.calls = 0

    def __call__(self, x_vp: torch.Tensor, t: np.ndarray) -> torch.Tensor:
        self.calls += 1
        ab = torch.from_numpy(np.interp(t, np.arange(N_TRAIN, dtype=np.float64), ALPHAS_CUMPROD))
        a, s = ab.sqrt().reshape(-1, 1, 1, 1), (1 - ab).sqrt().reshape(-1, 1, 1, 1)
        xv = x_vp.double()
        eps = s * (xv - a * self.mu) / (a * a * self.var + s * s)
        eps = eps + 0.1 * torch.tanh(torch.einsum("ij,bjhw->bihw", self.mix, xv))
        return eps.to(x_vp.dtype)


def eps_denoiser(eps):
    """k-diffusion style wrapper: denoised = x - sigma * eps(x * c_in, t(sigma))."""

    def denoiser(x, sigma):
        s = sigma.reshape(-1, 1, 1, 1)
        return x - s * eps(x / (s * s + 1).sqrt(), sigma_to_t(sigma))

    return denoiser


def draws(n: int, seed: int = 7, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g).to(dtype) for _ in range(n)]


class Replay:
    """A noise source that hands out pre-drawn tensors in order and records the intervals asked for."""

    def __init__(self, tensors):
        self.tensors, self.intervals = list(tensors), []

    def __call__(self, x, sigma, sigma_next):
        self.intervals.append((float(sigma), float(sigma_next)))
        return self.tensors[len(self.intervals) - 1]


def run_multistep(sched, eps, noise, variance_noise=None):
    """Plain diffusers loop (VP sample, init_noise_sigma == 1), model evaluated at sched.sigmas[i]."""
    assert float(sched.init_noise_sigma) == 1.0
    sample = noise.clone()
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas[i].to(noise.dtype).expand(noise.shape[0])
        kw = {} if variance_noise is None else {"variance_noise": variance_noise[i]}
        sample = sched.step(eps(sample, sigma_to_t(sigma)), t, sample, **kw).prev_sample
    return sample


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def multistep_scheduler(steps: int, **kw) -> DPMSolverMultistepScheduler:
    sched = DPMSolverMultistepScheduler(
        **SCHEDULE, solver_order=2, use_karras_sigmas=True, lower_order_final=True,
        euler_at_final=False, final_sigmas_type="zero", **kw,
    )
    sched.set_timesteps(steps)
    sigma_min, sigma_max = math.exp(LOG_SIGMAS[0]), math.exp(LOG_SIGMAS[-1])
    torch.testing.assert_close(sched.sigmas.double(), karras(steps, sigma_min, sigma_max), rtol=1e-5, atol=1e-6)
    return sched


def noise_tensor(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(dtype)


# --- golden: diffusers ---------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_matches_diffusers_dpmsolver_pp_order2(steps):
    """Tolerance: atol=rtol=1e-5 in float32; a first-order (DDIM-like) run differs by > 0.1."""
    eps, noise = ToyEps(), noise_tensor()
    sched = multistep_scheduler(steps, algorithm_type="dpmsolver++", solver_type="midpoint")
    ref = run_multistep(sched, eps, noise)
    sigmas = sched.sigmas.float()
    out = sample_dpmpp_2m(eps_denoiser(eps), noise * (1 + sigmas[0] ** 2).sqrt(), sigmas)
    torch.testing.assert_close(out, ref, **TOL32)
    ddim = DPMSolverMultistepScheduler(**SCHEDULE, solver_order=1, use_karras_sigmas=True, final_sigmas_type="zero")
    ddim.set_timesteps(steps)
    assert (run_multistep(ddim, eps, noise) - ref).abs().max() > 0.1


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpmpp_2m_sde_matches_diffusers_sde_dpmsolver_pp(solver_type):
    """Same injected noise on both sides (diffusers' variance_noise); tolerance atol=rtol=1e-5, float32."""
    steps, eps, noise = 10, ToyEps(), noise_tensor()
    z = draws(steps)
    sched = multistep_scheduler(steps, algorithm_type="sde-dpmsolver++", solver_type=solver_type)
    ref = run_multistep(sched, eps, noise, variance_noise=z)
    sigmas = sched.sigmas.float()
    replay = Replay(z)
    out = sample_dpmpp_2m_sde(
        eps_denoiser(eps), noise * (1 + sigmas[0] ** 2).sqrt(), sigmas, noise=replay, solver_type=solver_type
    )
    torch.testing.assert_close(out, ref, **TOL32)
    # one draw per step except the final denoising step, for the interval (sigma_i, sigma_i+1)
    assert replay.intervals == [(float(sigmas[i]), float(sigmas[i + 1])) for i in range(steps - 1)]


def run_dpmsolver_sde(sched, eps, noise):
    """diffusers DPMSolverSDEScheduler loop (VE sample); two model calls per step, first or midpoint sigma."""
    sample = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        model_in = sched.scale_model_input(sample, t)
        sigma = sched.sigmas[sched.step_index] if sched.state_in_first_order else sched.mid_point_sigma
        sample = sched.step(eps(model_in, sigma_to_t(sigma.expand(noise.shape[0]))), t, sample).prev_sample
    return sample


def test_dpmpp_sde_matches_diffusers_dpmsolver_sde_with_injected_noise():
    """diffusers' Brownian-tree sampler is replaced by the same replayed draws we hand to ours.
    Tolerance: atol=rtol=1e-5 (float32); the noise intervals must agree to 1e-5."""
    steps, eps, noise = 10, ToyEps(), noise_tensor()
    z = draws(2 * steps)
    sched = DPMSolverSDEScheduler(**SCHEDULE, use_karras_sigmas=True)
    sched.set_timesteps(steps)
    theirs = Replay(z)
    sched.noise_sampler = lambda sigma, sigma_next: theirs(None, sigma, sigma_next)
    ref = run_dpmsolver_sde(sched, eps, noise)
    sigmas = torch.cat([sched.sigmas[:1], sched.sigmas[1:-1:2], sched.sigmas[-1:]])  # undo the repeat
    ours = Replay(z)
    out = sample_dpmpp_sde(eps_denoiser(eps), noise * sigmas[0], sigmas, noise=ours)
    torch.testing.assert_close(out, ref, **TOL32)
    assert len(ours.intervals) == len(theirs.intervals) == 2 * (steps - 1)
    np.testing.assert_allclose(ours.intervals, theirs.intervals, rtol=1e-5)


# --- golden: hand reference for DPM++ 2S a (diffusers has no ancestral DPM-Solver++(2S)) ----------


def reference_2s_ancestral(eps, x_ve, sigmas, z):
    """Lu et al. 2022 Alg. 1 (DPM-Solver++(2S), r=1/2) written in VP variables (alpha_t, sigma_t,
    lambda_t), stepping to sigma_down, then ancestral noise sigma_up (Euler-ancestral split, eta=1)."""

    def vp(sig):  # VE sigma -> (alpha, sigma_vp, lambda)
        alpha = 1 / math.sqrt(1 + sig * sig)
        return alpha, sig * alpha, math.log(alpha / (sig * alpha))

    def x0(x_vp, sig):
        alpha, s_vp, _ = vp(sig)
        t = sigma_to_t(torch.full((x_vp.shape[0],), sig, dtype=torch.float64))
        return (x_vp - s_vp * eps(x_vp, t)) / alpha

    sig = [float(s) for s in sigmas]
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        down = math.sqrt(s_next**2 - up**2)
        a_i, sv_i, lam_i = vp(s)
        m_i = x0(a_i * x_ve, s)
        if down == 0:
            x_ve = m_i
            continue
        a_d, sv_d, lam_d = vp(down)
        lam_mid = (lam_i + lam_d) / 2
        s_mid = math.exp(-lam_mid)
        a_m, sv_m, _ = vp(s_mid)
        h = lam_d - lam_i
        u = (sv_m / sv_i) * (a_i * x_ve) - a_m * (math.exp(-h / 2) - 1) * m_i
        x_vp = (sv_d / sv_i) * (a_i * x_ve) - a_d * (math.exp(-h) - 1) * x0(u, s_mid)
        x_ve = x_vp / a_d + up * z[i]
    return x_ve


def test_dpmpp_2s_ancestral_matches_hand_reference():
    """No exact diffusers equivalent (DPMSolverSinglestep uses grid points, no ancestral noise); the
    reference above is an independent VP-form derivation. float64, tolerance atol=rtol=1e-10."""
    steps, eps = 8, ToyEps()
    sigmas = karras(steps, 0.0292, 14.6146)
    noise, z = noise_tensor(torch.float64), draws(steps, dtype=torch.float64)
    ref = reference_2s_ancestral(eps, noise * sigmas[0], sigmas, z)
    out = sample_dpmpp_2s_ancestral(eps_denoiser(eps), noise * sigmas[0], sigmas, noise=Replay(z))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    quiet = sample_dpmpp_2s_ancestral(eps_denoiser(eps), noise * sigmas[0], sigmas, noise=lambda x: 0 * x)
    assert (quiet - ref).abs().max() > 0.01  # the noise really enters


def test_ancestral_step_by_hand():
    down, up = ancestral_sigmas(2.0, 1.0)
    assert up == pytest.approx(math.sqrt(1.0 * (4.0 - 1.0) / 4.0))  # sqrt(3)/2
    assert down == pytest.approx(0.5)  # sqrt(1 - 3/4)
    assert ancestral_sigmas(2.0, 1.0, eta=0.0) == (1.0, 0.0)
    assert ancestral_sigmas(2.0, 0.0) == (0.0, 0.0)


# --- properties ---------------------------------------------------------------------------------

STOCHASTIC = [sample_dpmpp_2m_sde, sample_dpmpp_sde, sample_dpmpp_2s_ancestral]
ALL = [sample_dpmpp_2m, *STOCHASTIC]


@pytest.mark.parametrize("sampler", ALL, ids=lambda f: f.__name__)
def test_ideal_denoiser_ends_at_the_data_point(sampler):
    """Data = one point x0, so the exact denoiser returns x0 everywhere; every sampler must end there."""
    x0 = torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(SHAPE)
    sigmas = karras(6, 0.03, 14.6)
    z = draws(20, dtype=torch.float64)
    out = sampler(lambda x, sigma: x0.clone(), noise_tensor(torch.float64) * sigmas[0], sigmas, noise=Replay(z))
    torch.testing.assert_close(out, x0, atol=1e-12, rtol=0)


def test_dpmpp_2m_is_exact_on_the_ideal_trajectory():
    """With a constant x0 prediction the probability-flow ODE solution is x0 + sigma/sigma_0 (x_T - x0),
    and an exponential integrator reproduces it at every step (checked through the callback)."""
    x0 = torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(SHAPE)
    sigmas = karras(6, 0.03, 14.6)
    x_t = noise_tensor(torch.float64) * sigmas[0]
    seen = []
    sample_dpmpp_2m(lambda x, sigma: x0.clone(), x_t, sigmas, callback=seen.append)
    for info in seen:
        expected = x0 + float(info["sigma"] / sigmas[0]) * (x_t - x0)
        torch.testing.assert_close(info["x"], expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("sampler", ALL, ids=lambda f: f.__name__)
def test_callback_contract_and_extra_kwargs(sampler):
    sigmas = karras(4, 0.03, 14.6)
    seen, got_extra = [], []

    def denoiser(x, sigma, cond=None):
        got_extra.append(cond)
        assert sigma.shape == (x.shape[0],)
        return torch.zeros_like(x)

    sampler(denoiser, noise_tensor() * sigmas[0], sigmas.float(), extra={"cond": "c"}, callback=seen.append,
            noise=lambda x: torch.zeros_like(x))
    assert [d["i"] for d in seen] == [0, 1, 2, 3]
    assert all(set(d) == {"i", "x", "sigma", "sigma_hat", "denoised"} for d in seen)
    assert [float(d["sigma"]) for d in seen] == pytest.approx(sigmas[:-1].tolist(), rel=1e-6)
    assert set(got_extra) == {"c"}


@pytest.mark.parametrize("sampler", STOCHASTIC, ids=lambda f: f.__name__)
def test_stochastic_samplers_require_noise(sampler):
    sigmas = karras(3, 0.03, 14.6)
    with pytest.raises(ValueError, match="noise"):
        sampler(lambda x, s: x, noise_tensor() * sigmas[0], sigmas)


@pytest.mark.parametrize("sampler", STOCHASTIC, ids=lambda f: f.__name__)
def test_noise_callable_forms(sampler):
    """noise(x) functions, objects with __call__(x) and noise(x, sigma, sigma_next) all work the same."""

    class OneArg:
        def __init__(self):
            self.it = iter(draws(20))

        def __call__(self, x):
            return next(self.it)

    sigmas = karras(4, 0.03, 14.6).float()
    eps = ToyEps()
    args = (eps_denoiser(eps), noise_tensor() * sigmas[0], sigmas)
    it = iter(draws(20))
    a = sampler(*args, noise=lambda x: next(it))
    b = sampler(*args, noise=OneArg())
    c = sampler(*args, noise=Replay(draws(20)))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, c, atol=0, rtol=0)
    with pytest.raises(ValueError, match="shape"):
        sampler(*args, noise=lambda x: torch.zeros(3))


def test_eta_zero_reduces_to_the_deterministic_solvers():
    """k-diffusion semantics: 2M SDE with eta=0 is DPM++ 2M; DPM++ SDE (r=1/2) and 2S a with eta=0 are the
    same deterministic DPM-Solver++(2S). No noise source is needed then. Tolerance 1e-12 (float64)."""
    eps, sigmas = ToyEps(), karras(8, 0.0292, 14.6146)
    x = noise_tensor(torch.float64) * sigmas[0]
    den = eps_denoiser(eps)
    torch.testing.assert_close(sample_dpmpp_2m_sde(den, x, sigmas, eta=0.0), sample_dpmpp_2m(den, x, sigmas),
                               atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(sample_dpmpp_sde(den, x, sigmas, eta=0.0),
                               sample_dpmpp_2s_ancestral(den, x, sigmas, eta=0.0), atol=1e-12, rtol=1e-12)


def test_model_calls_per_step():
    sigmas = karras(5, 0.03, 14.6)
    counts = {}
    for sampler in ALL:
        eps = ToyEps()
        sampler(eps_denoiser(eps), noise_tensor(torch.float64) * sigmas[0], sigmas, noise=Replay(draws(20)))
        counts[sampler.__name__] = eps.calls
    # multistep: one call per step; singlestep 2S: two per step, one on the final (Euler) step
    assert counts == {"sample_dpmpp_2m": 5, "sample_dpmpp_2m_sde": 5, "sample_dpmpp_sde": 9,
                      "sample_dpmpp_2s_ancestral": 9}

"""UniPC against diffusers' UniPCMultistepScheduler on a tiny analytic eps-model.

Same toy set-up as test_dpmpp.py (kept self-contained: test modules are imported in importlib mode):
the SD 1.x discrete schedule, eps(x_vp, t) = Gaussian-data posterior noise + 0.1*tanh(mix @ x), a
k-diffusion style eps->x0 denoiser for our sampler, and a plain diffusers loop calling the same
eps-model at the same sigma. Diffusers works on x_vp = x / sqrt(1+sigma^2): both sides start from the
same state, and results are compared in the same space. The scheduler's float32 sigmas are upcast to
float64 so that diffusers' own arithmetic is double precision; the tolerance is then 1e-10.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from sdstack.sampling.samplers_unipc import sample_unipc

N_TRAIN = 1000
SHAPE = (2, 3, 2, 2)
SCHEDULE = dict(num_train_timesteps=N_TRAIN, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
TOL64 = dict(atol=1e-10, rtol=1e-10)  # observed ~1e-14 on values ~2


def _alphas_cumprod() -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, N_TRAIN, dtype=np.float64) ** 2
    return np.cumprod(1 - betas)


ALPHAS_CUMPROD = _alphas_cumprod()
LOG_SIGMAS = np.log(np.sqrt((1 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD))


def sigma_to_t(sigma: torch.Tensor) -> np.ndarray:
    """Continuous timestep from sigma by interpolating log-sigma over the discrete table."""
    return np.interp(np.log(sigma.detach().double().numpy()), LOG_SIGMAS, np.arange(N_TRAIN, dtype=np.float64))


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


def noise_tensor() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def unipc_scheduler(steps: int, **kw) -> UniPCMultistepScheduler:
    sched = UniPCMultistepScheduler(**SCHEDULE, predict_x0=True, thresholding=False, disable_corrector=[], **kw)
    sched.set_timesteps(steps)
    sched.sigmas = sched.sigmas.double()
    return sched


def run_diffusers(sched, eps, noise):
    """Plain diffusers loop on x_vp (init_noise_sigma == 1). Returns the final sample and the x0
    prediction of the last model call."""
    assert float(sched.init_noise_sigma) == 1.0
    sample, x0 = noise.clone(), None
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas[i].expand(noise.shape[0])
        out = eps(sample, sigma_to_t(sigma))
        s = float(sched.sigmas[i])
        x0 = sample * math.sqrt(1 + s * s) - s * out  # (x_vp - sigma_vp * eps) / alpha
        sample = sched.step(out, t, sample).prev_sample
    return sample, x0


def run_ours(eps, noise, sigmas, **kw):
    """Our sampler from the same start (x = x_vp / alpha), result mapped back to x_vp at the last sigma."""
    s0, s_end = float(sigmas[0]), float(sigmas[-1])
    out = sample_unipc(eps_denoiser(eps), noise * math.sqrt(1 + s0 * s0), sigmas, **kw)
    return out / math.sqrt(1 + s_end * s_end)


# --- golden: diffusers ---------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_bh2_karras_to_zero_matches_diffusers(order, steps):
    """bh2, karras sigmas, final sigma 0, lower_order_final; tolerance atol=rtol=1e-10 (float64)."""
    eps, noise = ToyEps(), noise_tensor()
    sched = unipc_scheduler(steps, solver_order=order, solver_type="bh2", use_karras_sigmas=True,
                            lower_order_final=True, final_sigmas_type="zero")
    torch.testing.assert_close(sched.sigmas, karras(steps, math.exp(LOG_SIGMAS[0]), math.exp(LOG_SIGMAS[-1])),
                               rtol=1e-5, atol=1e-6)
    ref, _ = run_diffusers(sched, eps, noise)
    out = run_ours(eps, noise, sched.sigmas, order=order, variant="bh2")
    torch.testing.assert_close(out, ref, **TOL64)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order,lower_order_final", [(1, True), (2, True), (3, True), (2, False), (3, False)])
def test_unipc_to_sigma_min_matches_diffusers(variant, order, lower_order_final):
    """Both variants with a final sigma_min > 0 (diffusers' default timestep spacing), so the last step
    is a genuine predictor step of the chosen order; tolerance atol=rtol=1e-10 (float64)."""
    eps, noise = ToyEps(), noise_tensor()
    sched = unipc_scheduler(10, solver_order=order, solver_type=variant, lower_order_final=lower_order_final,
                            final_sigmas_type="sigma_min")
    ref, _ = run_diffusers(sched, eps, noise)
    out = run_ours(eps, noise, sched.sigmas, order=order, variant=variant, lower_order_final=lower_order_final)
    torch.testing.assert_close(out, ref, **TOL64)


def test_unipc_bh1_to_zero_ends_on_the_last_x0_prediction():
    """bh1 with a final sigma of 0: diffusers' last step multiplies B(h) = -inf by 0 (NaN), so the
    reference is the x0 prediction of diffusers' last model call, which is what the first-order step to
    sigma=0 returns (its trajectory up to there is ordinary bh1 arithmetic). Tolerance 1e-10, float64."""
    eps, noise = ToyEps(), noise_tensor()
    sched = unipc_scheduler(10, solver_order=3, solver_type="bh1", use_karras_sigmas=True, final_sigmas_type="zero")
    _, ref_x0 = run_diffusers(sched, eps, noise)
    out = run_ours(eps, noise, sched.sigmas, order=3, variant="bh1")
    torch.testing.assert_close(out, ref_x0, **TOL64)


def test_variants_and_orders_really_differ():
    """The goldens above can fail: bh1/bh2 and orders 2/3 give results far apart compared with 1e-10."""
    eps, noise, sigmas = ToyEps(), noise_tensor(), karras(10, 0.0292, 14.6146)
    bh2 = run_ours(eps, noise, sigmas, order=3, variant="bh2")
    assert (run_ours(eps, noise, sigmas, order=3, variant="bh1") - bh2).abs().max() > 1e-4
    assert (run_ours(eps, noise, sigmas, order=2, variant="bh2") - bh2).abs().max() > 1e-4


# --- properties ---------------------------------------------------------------------------------


def test_defaults_are_order_3_bh1_as_a1111():
    # A1111's options: uni_pc_order = 3, uni_pc_variant = "bh1"
    eps, noise, sigmas = ToyEps(), noise_tensor(), karras(8, 0.0292, 14.6146)
    torch.testing.assert_close(run_ours(eps, noise, sigmas), run_ours(eps, noise, sigmas, order=3, variant="bh1"),
                               atol=0, rtol=0)


def test_ideal_denoiser_is_followed_exactly_and_ends_at_the_data_point():
    """Constant x0 prediction: all differences D1 vanish, every step is the exact ODE solution
    x0 + sigma/sigma_0 (x_T - x0) (checked through the callback), and the run ends at x0."""
    x0 = torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(SHAPE)
    sigmas = karras(6, 0.03, 14.6)
    x_t = noise_tensor() * sigmas[0]
    seen = []
    out = sample_unipc(lambda x, sigma: x0.clone(), x_t, sigmas, callback=seen.append)
    torch.testing.assert_close(out, x0, atol=1e-12, rtol=0)
    for info in seen:
        torch.testing.assert_close(info["x"], x0 + float(info["sigma"] / sigmas[0]) * (x_t - x0),
                                   atol=1e-12, rtol=1e-12)


def test_one_model_call_per_step_and_callback_contract():
    eps, sigmas = ToyEps(), karras(7, 0.03, 14.6)
    seen, got = [], []

    def denoiser(x, sigma, cond=None):
        got.append(cond)
        assert sigma.shape == (x.shape[0],)
        return eps_denoiser(eps)(x, sigma)

    sample_unipc(denoiser, noise_tensor() * sigmas[0], sigmas, extra={"cond": "c"}, callback=seen.append)
    assert eps.calls == 7 and set(got) == {"c"}
    assert [d["i"] for d in seen] == list(range(7))
    assert all(set(d) == {"i", "x", "sigma", "sigma_hat", "denoised"} for d in seen)


@pytest.mark.parametrize("bad", [dict(variant="vary_coeff"), dict(order=0), dict(order=2.0)])
def test_bad_options_are_refused(bad):
    sigmas = karras(3, 0.03, 14.6)
    with pytest.raises(ValueError):
        sample_unipc(lambda x, s: x, noise_tensor() * sigmas[0], sigmas, **bad)


def test_more_order_than_steps_is_fine():
    """order 3 with 2 steps runs orders 1, 1 (warm-up and lower_order_final) and still ends at x0."""
    x0 = torch.ones(SHAPE, dtype=torch.float64)
    sigmas = karras(2, 0.03, 14.6)
    out = sample_unipc(lambda x, s: x0.clone(), noise_tensor() * sigmas[0], sigmas, order=3)
    torch.testing.assert_close(out, x0, atol=1e-12, rtol=0)

"""Basic samplers, k-diffusion style: pure functions with one signature.

    sample_X(denoiser, x, sigmas, *, extra=None, callback=None, noise=None) -> x

`denoiser(x, sigma[B], **extra) -> denoised`; `sigmas` is the descending schedule ending in 0 and `x` starts
at noise level sigmas[0]. `callback(dict(i, x, sigma, sigma_hat, denoised))` is called once per step, right
after the step's first denoiser call (x is the step's input), as k-diffusion does. `noise(x)` returns fresh
standard-normal noise shaped like x; stochastic samplers need it and raise ValueError without it.
Sigma arithmetic is float32 (float64 for a float64 x). The ODE is dx/dsigma = (x - denoised) / sigma
(Karras et al. 2022, eq. 3). Optional keywords beyond the common signature: `eta` for the ancestral samplers
(default 1, A1111's) and `order` for LMS (default 4).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .common import ancestral_sigmas, noise_drawer, report_step

Denoiser = Callable[..., torch.Tensor]
Callback = Callable[[dict], Any] | None
NoiseFn = Callable[[torch.Tensor], torch.Tensor] | None


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma at (x, sigma)."""
    return (x - denoised) / sigma


def ancestral_step(
    sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`common.ancestral_sigmas` on tensors: (sigma_down, sigma_up) with down^2 + up^2 = sigma_next^2."""
    down, up = ancestral_sigmas(float(sigma), float(sigma_next), eta)
    return sigma_next.new_tensor(down), sigma_next.new_tensor(up)


def _setup(x: torch.Tensor, sigmas: torch.Tensor, extra: dict | None):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    sigmas = torch.as_tensor(sigmas).to(device=x.device, dtype=dtype)
    return sigmas, x.new_ones([x.shape[0]], dtype=dtype), (extra or {})


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x, sigmas, *, extra=None, callback=None, noise=None) -> torch.Tensor:
    """Euler method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    sigmas, s_in, extra = _setup(x, sigmas, extra)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra)
        report_step(callback, i, x, sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser, x, sigmas, *, extra=None, callback=None, noise=None, eta: float = 1.0
) -> torch.Tensor:
    """Ancestral sampling with Euler steps (k-diffusion `sample_euler_ancestral`, Ho et al. 2020 ancestral)."""
    sigmas, s_in, extra = _setup(x, sigmas, extra)
    noise = noise_drawer(noise, "Euler a") if eta else noise
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra)
        report_step(callback, i, x, sigmas[i], denoised)
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i])
        if sigmas[i + 1] > 0 and eta:
            x = x + noise(x, sigmas[i], sigmas[i + 1]) * up
    return x


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x, sigmas, *, extra=None, callback=None, noise=None) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); Euler for the last step to sigma 0."""
    sigmas, s_in, extra = _setup(x, sigmas, extra)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, **extra)
        report_step(callback, i, x, sigma, denoised)
        d = to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigma_next, denoiser(x_2, sigma_next * s_in, **extra))
        x = x + (d + d_2) / 2 * dt
    return x


def _dpm2_step(denoiser, x, d, sigma, sigma_to, s_in, extra) -> torch.Tensor:
    """One DPM-Solver-2 step from sigma to sigma_to, midpoint at their geometric mean."""
    sigma_mid = (sigma.log().lerp(sigma_to.log(), 0.5)).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid * s_in, **extra))
    return x + d_2 * (sigma_to - sigma)


@torch.no_grad()
def sample_dpm_2(denoiser: Denoiser, x, sigmas, *, extra=None, callback=None, noise=None) -> torch.Tensor:
    """DPM-Solver-2 (Lu et al. 2022) in Karras' sigma form (k-diffusion `sample_dpm_2`); Euler to sigma 0."""
    sigmas, s_in, extra = _setup(x, sigmas, extra)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, **extra)
        report_step(callback, i, x, sigma, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            x = _dpm2_step(denoiser, x, d, sigma, sigma_next, s_in, extra)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    denoiser: Denoiser, x, sigmas, *, extra=None, callback=None, noise=None, eta: float = 1.0
) -> torch.Tensor:
    """Ancestral sampling with DPM-Solver-2 steps (k-diffusion `sample_dpm_2_ancestral`)."""
    sigmas, s_in, extra = _setup(x, sigmas, extra)
    noise = noise_drawer(noise, "DPM2 a") if eta else noise
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = denoiser(x, sigma * s_in, **extra)
        report_step(callback, i, x, sigma, denoised)
        down, up = ancestral_step(sigma, sigmas[i + 1], eta)
        d = to_d(x, sigma, denoised)
        if down == 0:
            x = x + d * (down - sigma)
        else:
            x = _dpm2_step(denoiser, x, d, sigma, down, s_in, extra)
            if eta:
                x = x + noise(x, sigmas[i], sigmas[i + 1]) * up
    return x


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)  # exact for polynomials up to degree 15


def lms_coefficient(sigmas: np.ndarray, i: int, j: int, order: int) -> float:
    """Integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial of node sigmas[i-j] on the
    nodes sigmas[i], ..., sigmas[i-order+1] (linear multistep coefficient, Gauss-Legendre quadrature)."""
    a, b = float(sigmas[i]), float(sigmas[i + 1])
    tau = (b - a) / 2 * _GL_NODES + (a + b) / 2
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
    return float((b - a) / 2 * np.dot(_GL_WEIGHTS, basis))


@torch.no_grad()
def sample_lms(denoiser: Denoiser, x, sigmas, *, extra=None, callback=None, noise=None, order: int = 4) -> torch.Tensor:
    """Linear multistep method of order 4 on the ODE in sigma (Karras et al. 2022 / k-diffusion `sample_lms`)."""
    sigmas, s_in, extra = _setup(x, sigmas, extra)
    nodes = sigmas.double().cpu().numpy()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra)
        report_step(callback, i, x, sigmas[i], denoised)
        ds.insert(0, to_d(x, sigmas[i], denoised))  # ds[j] is the derivative at sigmas[i - j]
        del ds[order:]
        cur = min(i + 1, order)
        x = x + sum(lms_coefficient(nodes, i, j, cur) * ds[j] for j in range(cur))
    return x


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x, sigmas, *, extra=None, callback=None, noise=None) -> torch.Tensor:
    """DDIM, eta = 0 (Song et al. 2020): exactly an Euler step in (x / sqrt(alpha), sigma) coordinates."""
    # With x_k = x_vp / sqrt(alpha) and sigma = sqrt(1 - alpha) / sqrt(alpha), DDIM's update
    # x_k' = x0 + sigma' * eps is x_k + (sigma' - sigma) * (x_k - x0) / sigma. Use it with the "ddim" schedule.
    return sample_euler(denoiser, x, sigmas, extra=extra, callback=callback, noise=noise)


@torch.no_grad()
def sample_lcm(denoiser: Denoiser, x, sigmas, *, extra=None, callback=None, noise=None) -> torch.Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023): predict x0, re-noise to the next sigma."""
    sigmas, s_in, extra = _setup(x, sigmas, extra)
    noise = noise_drawer(noise, "LCM") if len(sigmas) > 2 else noise
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra)
        report_step(callback, i, x, sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + noise(x, sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
    return x


SAMPLER_FUNCTIONS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "ddim": sample_ddim,
    "lcm": sample_lcm,
}

__all__ = [
    *(f.__name__ for f in SAMPLER_FUNCTIONS.values()),
    "to_d", "ancestral_step", "lms_coefficient", "SAMPLER_FUNCTIONS",
]

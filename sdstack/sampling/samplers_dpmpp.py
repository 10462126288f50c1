"""DPM-Solver++ samplers (Lu et al. 2022, arXiv 2211.01095) in the k-diffusion sigma parametrisation.

Every sampler has the one sampler signature of this package::

    sample_x(denoiser, x, sigmas, *, extra=None, callback=None, noise=None, **options) -> x

``denoiser(x, sigma, **extra)`` returns the x0 (data) prediction, ``sigmas`` is descending and ends with 0,
and ``x`` enters already scaled by ``sigmas[0]``. Time is ``t = -log(sigma)`` (the half log-SNR of the
VE/EDM formulation), so a step from ``sigma`` to ``sigma_next`` has ``h = log(sigma / sigma_next)``.
Step coefficients are computed in Python floats (double precision) from ``sigmas``; only the tensor
updates run in the dtype of ``x``.

``noise`` is the source of every random draw (this module never draws itself): a callable returning a
tensor shaped like ``x``, called as ``noise(x, sigma, sigma_next)`` when it accepts three positional
arguments (a Brownian-tree style source that knows the interval) and as ``noise(x)`` otherwise.
"""

from __future__ import annotations

import math

import torch

from .common import ancestral_sigmas, noise_drawer, prepare_sampling, report_step

__all__ = [
    "ancestral_sigmas",
    "noise_drawer",
    "prepare_sampling",
    "report_step",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
]

@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, extra=None, callback=None, noise=None):
    """DPM-Solver++(2M), multistep second order in data prediction (Lu et al. 2022, arXiv 2211.01095)."""
    sigmas, sig, s_in, extra = prepare_sampling(x, sigmas, extra)
    old = None
    for i in range(len(sig) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra)
        report_step(callback, i, x, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = denoised  # the exponential-integrator step to sigma=0 is exactly the x0 prediction
        else:
            h = math.log(sig[i] / sig[i + 1])
            d = denoised
            if old is not None:
                r = math.log(sig[i - 1] / sig[i]) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * d
        old = denoised
    return x


def _sde_correction(h: float, eh: float, r: float, solver_type: str) -> float:
    """Coefficient of (denoised - old_denoised) in the DPM-Solver++(2M) SDE step."""
    phi = -math.expm1(-h - eh)
    if solver_type == "heun":
        return (phi / (-h - eh) + 1) / r
    return 0.5 * phi / r


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser, x, sigmas, *, extra=None, callback=None, noise=None, eta=1.0, s_noise=1.0, solver_type="midpoint"
):
    """DPM-Solver++(2M) SDE, multistep second order with Langevin noise (Lu et al. 2022, arXiv 2211.01095)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    draw = noise_drawer(noise, "DPM++ 2M SDE") if eta else None
    sigmas, sig, s_in, extra = prepare_sampling(x, sigmas, extra)
    old, h_last = None, None
    for i in range(len(sig) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra)
        report_step(callback, i, x, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sig[i] / sig[i + 1])
            eh = eta * h
            x = (sig[i + 1] / sig[i] * math.exp(-eh)) * x - math.expm1(-h - eh) * denoised
            if old is not None:
                x = x + _sde_correction(h, eh, h_last / h, solver_type) * (denoised - old)
            if draw is not None:
                scale = sig[i + 1] * math.sqrt(-math.expm1(-2 * eh)) * s_noise
                x = x + draw(x, sigmas[i], sigmas[i + 1]) * scale
            h_last = h
        old = denoised
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser, x, sigmas, *, extra=None, callback=None, noise=None, eta=1.0, s_noise=1.0, r=0.5
):
    """DPM-Solver++ SDE: singlestep DPM-Solver++(2S) with ancestral noise in both stages (k-diffusion)."""
    draw = noise_drawer(noise, "DPM++ SDE") if eta else None
    sigmas, sig, s_in, extra = prepare_sampling(x, sigmas, extra)
    fac = 1 / (2 * r)
    for i in range(len(sig) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra)
        report_step(callback, i, x, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = denoised  # Euler step to sigma=0: x + (x - denoised) / sigma * (0 - sigma)
            continue
        # Stage 1: from sigma to the intermediate sigma_s = sigma^(1-r) * sigma_next^r (t_s = t + r*h).
        sigma_s = math.exp((1 - r) * math.log(sig[i]) + r * math.log(sig[i + 1]))
        down, up = ancestral_sigmas(sig[i], sigma_s, eta)
        x_2 = (down / sig[i]) * x + (1 - down / sig[i]) * denoised
        if draw is not None:
            x_2 = x_2 + draw(x, sigmas[i], sigmas.new_tensor(sigma_s)) * (s_noise * up)
        denoised_2 = denoiser(x_2, sigma_s * s_in, **extra)
        # Stage 2: from sigma to sigma_next with the blended x0 prediction.
        down, up = ancestral_sigmas(sig[i], sig[i + 1], eta)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (down / sig[i]) * x + (1 - down / sig[i]) * denoised_d
        if draw is not None:
            x = x + draw(x, sigmas[i], sigmas[i + 1]) * (s_noise * up)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, extra=None, callback=None, noise=None, eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver++(2S) second-order steps (k-diffusion, Lu et al. 2022)."""
    draw = noise_drawer(noise, "DPM++ 2S a") if eta else None
    sigmas, sig, s_in, extra = prepare_sampling(x, sigmas, extra)
    for i in range(len(sig) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra)
        report_step(callback, i, x, sigmas[i], denoised)
        down, up = ancestral_sigmas(sig[i], sig[i + 1], eta)
        if down == 0:
            x = denoised  # Euler step to sigma_down=0
        else:
            sigma_s = math.sqrt(sig[i] * down)  # midpoint in t = -log(sigma)
            x_2 = (sigma_s / sig[i]) * x + (1 - sigma_s / sig[i]) * denoised
            denoised_2 = denoiser(x_2, sigma_s * s_in, **extra)
            x = (down / sig[i]) * x + (1 - down / sig[i]) * denoised_2
        if draw is not None and sig[i + 1] > 0:
            x = x + draw(x, sigmas[i], sigmas[i + 1]) * (s_noise * up)
    return x

"""Helpers shared by every sampler module: set-up, progress reports, noise draws, ancestral splits."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch

NoiseDraw = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _takes_interval(fn) -> bool:
    """True when ``fn`` can be called with three positional arguments (x, sigma, sigma_next)."""
    try:
        inspect.signature(fn).bind(None, None, None)
    except (TypeError, ValueError):
        return False
    return True


def noise_drawer(noise, sampler: str) -> NoiseDraw:
    """Wrap the user's ``noise`` callable as ``draw(x, sigma, sigma_next)``; refuse a missing one."""
    if noise is None:
        raise ValueError(
            f"{sampler} is a stochastic sampler: pass noise=<callable returning a tensor shaped like x> "
            "(see sdstack.sampling.rng)"
        )
    if not callable(noise):
        raise ValueError(f"{sampler}: noise must be callable, got {type(noise).__name__}")
    interval = _takes_interval(noise)

    def draw(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        out = noise(x, sigma, sigma_next) if interval else noise(x)
        if tuple(out.shape) != tuple(x.shape):
            raise ValueError(f"{sampler}: noise returned shape {tuple(out.shape)}, expected {tuple(x.shape)}")
        return out.to(device=x.device, dtype=x.dtype)

    return draw


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step in Python floats (k-diffusion `get_ancestral_step`):
    solve the ODE down to sigma_down, then add sigma_up noise; sigma_down^2 + sigma_up^2 = sigma_next^2."""
    if not eta:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0)))
    down = math.sqrt(max(sigma_next**2 - up**2, 0.0))
    return down, up


def prepare_sampling(x: torch.Tensor, sigmas: torch.Tensor, extra):
    """Common sampler set-up: sigmas on x's device, their float values, the batch of ones, the extra kwargs."""
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D tensor, got shape {tuple(sigmas.shape)}")
    sigmas = sigmas.to(x.device)
    s_in = x.new_ones([x.shape[0]], dtype=torch.promote_types(x.dtype, torch.float32))  # sigma never in fp16
    return sigmas, [float(s) for s in sigmas.tolist()], s_in, (extra or {})


def report_step(callback, i: int, x, sigma, denoised, sigma_hat=None) -> None:
    """Call the progress callback with k-diffusion's keys (without churn, sigma_hat == sigma)."""
    if callback is not None:
        hat = sigma if sigma_hat is None else sigma_hat
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": hat, "denoised": denoised})

"""Denoiser adapters: the one model contract `denoiser(x, sigma, **extra) -> denoised`.

A network trained on a discrete DDPM schedule (1000 `alphas_cumprod`) predicts eps or v at an integer
timestep t. Samplers work instead in the k-diffusion/EDM parametrisation: a noise level sigma and an
un-scaled latent x = x0 + sigma * eps (Karras et al. 2022, "Elucidating the Design Space...", table 1).
`DiscreteSchedule` maps between sigma and t; `EpsDenoiser` / `VDenoiser` own the preconditioning
(c_in, c_out, c_skip with sigma_data = 1) so samplers never see a prediction type.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import unknown_name

ModelFn = Callable[..., torch.Tensor]

PREDICTION_TYPES = ("epsilon", "v_prediction")


class DiscreteSchedule:
    """The noise levels of a discrete-time DDPM model: sigma_t = sqrt((1 - a_t) / a_t), ascending in t."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu()
        if ac.numel() < 2:
            raise ValueError("alphas_cumprod needs at least 2 timesteps")
        sigmas = ((1 - ac) / ac).sqrt()
        if not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.alphas_cumprod = ac.float()
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()

    @property
    def num_timesteps(self) -> int:
        return int(self.sigmas.numel())

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Continuous timestep for `sigma`: linear interpolation of log-sigma between neighbouring
        timesteps, clamped to [0, T-1] (k-diffusion `DiscreteSchedule.sigma_to_t`, quantize=False)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.log()
        # index of the last tabulated log-sigma <= log_sigma, kept inside [0, T-2]
        low = torch.searchsorted(log_sigmas, log_sigma.reshape(-1).contiguous(), right=True) - 1
        low = low.clamp(0, log_sigmas.numel() - 2).reshape(sigma.shape)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low.float() + w * (low + 1).float()

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Sigma at continuous timestep `t`: linear interpolation of log-sigma, then exp."""
        t = torch.as_tensor(t, dtype=torch.float32)
        log_sigmas = self.log_sigmas.to(t.device)
        low = t.floor().long().clamp(0, log_sigmas.numel() - 1)
        high = t.ceil().long().clamp(0, log_sigmas.numel() - 1)
        w = t - t.floor()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def _sigma_column(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """sigma as float32 of shape [B] on x's device (a scalar is broadcast over the batch)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(x.shape[0])


def _append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class _DiscreteDenoiser:
    """Shared part of the eps and v adapters: sigma -> t, input scaling, dtype handling."""

    def __init__(self, model_fn: ModelFn, alphas_cumprod: torch.Tensor, *, dtype: torch.dtype | None = None):
        self.model_fn = model_fn
        self.schedule = DiscreteSchedule(alphas_cumprod)
        self.dtype = dtype  # the network's dtype; None means "x's dtype"

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **extra: Any) -> torch.Tensor:
        sigma = _sigma_column(sigma, x)
        s = _append_dims(sigma, x.ndim)
        x32 = x.float()
        c_in = (s**2 + 1.0).rsqrt()
        t = self.schedule.sigma_to_t(sigma)
        out = self.model_fn((x32 * c_in).to(self.dtype or x.dtype), t, **extra).float()
        return self._combine(x32, s, out).to(x.dtype)

    def _combine(self, x32: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EpsDenoiser(_DiscreteDenoiser):
    """eps-prediction model: c_in = 1/sqrt(sigma^2+1), denoised = x - sigma * eps (Ho et al. 2020)."""

    prediction_type = "epsilon"

    def _combine(self, x32: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x32 - s * out


class VDenoiser(_DiscreteDenoiser):
    """v-prediction model (Salimans & Ho 2022): denoised = c_skip * x + c_out * v, sigma_data = 1."""

    prediction_type = "v_prediction"

    def _combine(self, x32: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        c_skip = 1.0 / (s**2 + 1.0)
        c_out = -s / (s**2 + 1.0).sqrt()
        return c_skip * x32 + c_out * out


def make_denoiser(
    model_fn: ModelFn,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
    *,
    dtype: torch.dtype | None = None,
) -> EpsDenoiser | VDenoiser:
    """The adapter for `prediction_type` ("epsilon" | "v_prediction")."""
    if prediction_type == "epsilon":
        return EpsDenoiser(model_fn, alphas_cumprod, dtype=dtype)
    if prediction_type == "v_prediction":
        return VDenoiser(model_fn, alphas_cumprod, dtype=dtype)
    raise unknown_name("prediction type", prediction_type, PREDICTION_TYPES, field="prediction_type")

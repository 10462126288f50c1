"""The denoising loss every latent-diffusion trainer shares (text2image from scratch and all fine-tune methods).

Forward process on the discrete schedule: noisy = sqrt(a) x0 + sqrt(1 - a) eps with a = alpha_bar[t]; target eps,
or v = sqrt(a) eps - sqrt(1 - a) x0 for v-prediction. Noise offset (Guttenberg 2023, as kohya's
`--noise_offset`): eps += offset * n with one n ~ N(0, 1) per sample and channel, constant over the image.

Loss weight (min-SNR-gamma, Hang et al. 2023), per sample with snr = a / (1 - a):
  epsilon:       min(snr, gamma) / snr
  v_prediction:  min(snr + 1, gamma) / (snr + 1)    (the v-target's own SNR is snr + 1, so pure-noise
                                                    timesteps keep weight 1 instead of 0 under zero terminal SNR)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..models.bundle import alphas_cumprod_from_config, rescale_zero_terminal_snr


def training_alphas(schedule: dict) -> torch.Tensor:
    """alpha_bar (float64) for training from a diffusers scheduler config: with zero terminal SNR the last one
    is exactly 0 (sampling clamps it to a tiny positive value instead)."""
    base = alphas_cumprod_from_config(dict(schedule, rescale_betas_zero_snr=False))
    return rescale_zero_terminal_snr(base) if schedule.get("rescale_betas_zero_snr") else base


def snr_weights(alpha_bar: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample min-SNR-gamma weights (module docstring); ones when gamma is 0."""
    if gamma <= 0:
        return torch.ones_like(alpha_bar)
    snr = alpha_bar / (1 - alpha_bar).clamp_min(1e-20)
    if prediction_type == "v_prediction":
        return (snr + 1).clamp(max=gamma) / (snr + 1)
    return snr.clamp(max=gamma) / snr.clamp_min(1e-20)


def diffusion_loss(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                   alpha_bar: torch.Tensor, *, prediction_type: str, min_snr_gamma: float,
                   generator: torch.Generator, noise_offset: float = 0.0,
                   sample_weights: torch.Tensor | None = None,
                   timesteps: tuple[int, int] | None = None,
                   other_timesteps: tuple[torch.Tensor, tuple[int, int]] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw timesteps and noise from `generator` (CPU; in this order), run `predict(noisy, t)` and return the
    weighted mean loss and the unweighted per-sample MSE. `timesteps` = (lo, hi): t uniform in [lo, hi) (kohya's
    --min_timestep / --max_timestep); default every timestep. `other_timesteps` = (mask, (lo, hi)): the samples
    where mask is true draw from that range instead (drawn after the others, so without it the draws are the same)."""
    b, device = x0.shape[0], x0.device
    lo, hi = timesteps or (0, len(alpha_bar))
    t = torch.randint(lo, hi, (b,), generator=generator)
    if other_timesteps is not None:
        mask, (olo, ohi) = other_timesteps
        t = torch.where(mask.cpu(), torch.randint(olo, ohi, (b,), generator=generator), t)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((b, x0.shape[1], 1, 1), generator=generator).to(device)
    a = alpha_bar[t].to(device).view(b, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * x0 if prediction_type == "v_prediction" else noise
    pred = predict(noisy, t.to(device))
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    w = snr_weights(a.view(b), min_snr_gamma, prediction_type)
    if sample_weights is not None:
        w = w * sample_weights.to(w)
    return (w * per_sample).mean(), per_sample.detach()

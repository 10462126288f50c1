"""The loaded-model contract every layer above `models/` relies on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

FAMILIES = ("sd1", "sd2", "sdxl")
ZTSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08


def alphas_cumprod_from_config(cfg: dict) -> torch.Tensor:
    """Training noise schedule (diffusers scheduler_config keys) -> alphas_cumprod, float64, length T."""
    n = int(cfg.get("num_train_timesteps", 1000))
    b0, b1 = float(cfg.get("beta_start", 0.00085)), float(cfg.get("beta_end", 0.012))
    kind = cfg.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
    elif kind == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float64)
    elif kind == "squaredcos_cap_v2":
        import math

        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    else:
        raise ValueError(f"unsupported beta_schedule {kind!r}")
    ac = torch.cumprod(1.0 - betas, dim=0)
    if cfg.get("rescale_betas_zero_snr"):
        # Zero terminal SNR makes sigma_max infinite; for sampling, the last alpha_bar is set to a tiny
        # positive value instead (the value A1111 uses), giving sigma_max ~ 4.5e3.
        ac = rescale_zero_terminal_snr(ac)
        ac[-1] = ZTSNR_LAST_ALPHA_BAR
    return ac


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift/scale sqrt(alpha_bar) so the last timestep has zero SNR."""
    s = alphas_cumprod.sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * s0 / (s0 - sT)
    return s**2


@dataclass
class ModelBundle:
    """A loaded Stable-Diffusion-family model: networks, tokenizers and the facts the engine needs.

    `text_encoders[i]` pairs with `tokenizers[i]`; SDXL has two (CLIP ViT-L, OpenCLIP bigG with projection).
    `schedule` holds diffusers scheduler_config keys (beta_start, beta_end, beta_schedule, ...).
    """

    family: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    prediction_type: str = "epsilon"
    schedule: dict = field(default_factory=dict)
    name: str = "model"
    path: Path | None = None
    sha256: str | None = None
    vae_name: str | None = None
    vae_sha256: str | None = None

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return alphas_cumprod_from_config(self.schedule)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def shorthash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

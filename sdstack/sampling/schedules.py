"""Sigma schedules: `fn(n, sigma_min, sigma_max, *, schedule) -> sigmas` (n + 1 values, descending, last 0).

Names, labels and semantics follow AUTOMATIC1111's `modules/sd_schedulers.py` (v1.10). `schedule` is the
model's `DiscreteSchedule`; only the schedules defined on the model's own timesteps need it. Every function
returns a float32 CPU tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .denoisers import DiscreteSchedule

SigmaFn = Callable[..., torch.Tensor]


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.float(), sigmas.new_zeros(1, dtype=torch.float32)])


def _need(schedule: DiscreteSchedule | None, name: str) -> DiscreteSchedule:
    if schedule is None:
        raise ValueError(f"the {name!r} schedule is defined on the model's timesteps: pass schedule=")
    return schedule


def uniform(n: int, sigma_min: float, sigma_max: float, *, schedule: DiscreteSchedule | None = None) -> torch.Tensor:
    """A1111 "Uniform": n timesteps evenly spaced from T-1 down to 0 (k-diffusion `get_sigmas`)."""
    sched = _need(schedule, "uniform")
    t = torch.linspace(sched.num_timesteps - 1, 0, n)
    return _append_zero(sched.t_to_sigma(t))


def sgm_uniform(
    n: int, sigma_min: float, sigma_max: float, *, schedule: DiscreteSchedule | None = None
) -> torch.Tensor:
    """A1111 "SGM Uniform": n + 1 timesteps evenly spaced from t(sigma_max) to t(sigma_min), the last
    replaced by sigma 0 (the "trailing" spacing of SD-XL's generative-models)."""
    sched = _need(schedule, "sgm_uniform")
    start = float(sched.sigma_to_t(torch.tensor(sigma_max)))
    end = float(sched.sigma_to_t(torch.tensor(sigma_min)))
    t = torch.linspace(start, end, n + 1)[:-1]
    return _append_zero(sched.t_to_sigma(t))


def karras(
    n: int, sigma_min: float, sigma_max: float, *, schedule: DiscreteSchedule | None = None, rho: float = 7.0
) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(
    n: int, sigma_min: float, sigma_max: float, *, schedule: DiscreteSchedule | None = None
) -> torch.Tensor:
    """n sigmas evenly spaced in log-sigma from sigma_max to sigma_min (k-diffusion `get_sigmas_exponential`)."""
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return _append_zero(log_sigmas.exp())


def ddim(n: int, sigma_min: float, sigma_max: float, *, schedule: DiscreteSchedule | None = None) -> torch.Tensor:
    """A1111 "DDIM": the DDIM sampler's timesteps 1, 1+k, 1+2k, ... < T with k = T // n, descending.

    As in A1111 this gives more than n steps when n does not divide T (n=30 -> 31 steps)."""
    sched = _need(schedule, "ddim")
    step = max(sched.num_timesteps // n, 1)
    idx = torch.arange(1, sched.num_timesteps, step).flip(0)
    return _append_zero(sched.sigmas[idx])


@dataclass(frozen=True)
class SchedulerInfo:
    """A registered schedule: `name` is the API key, `label` what the UI and infotext show."""

    name: str
    label: str
    fn: SigmaFn | None  # None only for "automatic", resolved per sampler by the registry
    aliases: tuple[str, ...] = field(default=())
    needs_schedule: bool = False


SCHEDULERS: dict[str, SchedulerInfo] = {
    s.name: s
    for s in (
        SchedulerInfo("automatic", "Automatic", None),
        SchedulerInfo("uniform", "Uniform", uniform, needs_schedule=True),
        SchedulerInfo("karras", "Karras", karras),
        SchedulerInfo("exponential", "Exponential", exponential),
        SchedulerInfo("sgm_uniform", "SGM Uniform", sgm_uniform, aliases=("SGMUniform",), needs_schedule=True),
        SchedulerInfo("ddim", "DDIM", ddim, needs_schedule=True),
    )
}

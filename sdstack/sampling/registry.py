"""Sampler registry: AUTOMATIC1111's sampler names, aliases, default schedules and flags (v1.10).

`SAMPLERS` is keyed by the exact UI names; the API's allowed values are these keys. `resolve_sampler`
accepts names, aliases (k_euler_a, k_dpmpp_2m, ...), any letter case, and the pre-1.9 combined names
("DPM++ 2M Karras", "DPM++ 2M SDE Exponential"), as A1111's `get_sampler_and_scheduler` does.
`get_sigmas` builds the schedule a sampler runs on, including "Automatic" and the discarded
next-to-last sigma of DPM2 / DPM2 a.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import UserError, unknown_name
from . import samplers as basic
from .denoisers import DiscreteSchedule
from .schedules import SCHEDULERS, SchedulerInfo

SamplerFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class SamplerInfo:
    """A registered sampler. `default_scheduler` is what "Automatic" means for it (None: the model's
    own "uniform" sigmas). Flags are A1111's options: `uses_noise` = needs `noise=`, `brownian` = A1111
    feeds it Brownian-tree noise, `uses_ensd` = A1111 applies the eta noise seed delta."""

    name: str
    load: Callable[[], SamplerFn] = field(repr=False)
    aliases: tuple[str, ...] = ()
    default_scheduler: str | None = None
    discard_next_to_last_sigma: bool = False
    second_order: bool = False
    uses_noise: bool = False
    brownian: bool = False
    uses_ensd: bool = False

    @property
    def fn(self) -> SamplerFn:
        """The sampler function (modules of the larger samplers are imported on first use)."""
        return self.load()


def _dpmpp():
    from . import samplers_dpmpp

    return samplers_dpmpp


def _unipc():
    from . import samplers_unipc

    return samplers_unipc


def _basic(fn: SamplerFn) -> Callable[[], SamplerFn]:
    return lambda: fn


_ALL = (
    SamplerInfo("DPM++ 2M", lambda: _dpmpp().sample_dpmpp_2m, ("k_dpmpp_2m",), "karras"),
    SamplerInfo("DPM++ SDE", lambda: _dpmpp().sample_dpmpp_sde, ("k_dpmpp_sde",), "karras",
                second_order=True, uses_noise=True, brownian=True),
    SamplerInfo("DPM++ 2M SDE", lambda: _dpmpp().sample_dpmpp_2m_sde, ("k_dpmpp_2m_sde",), "exponential",
                uses_noise=True, brownian=True),
    SamplerInfo("DPM++ 2S a", lambda: _dpmpp().sample_dpmpp_2s_ancestral, ("k_dpmpp_2s_a",), "karras",
                second_order=True, uses_noise=True, uses_ensd=True),
    SamplerInfo("Euler a", _basic(basic.sample_euler_ancestral), ("k_euler_a", "k_euler_ancestral"),
                uses_noise=True, uses_ensd=True),
    SamplerInfo("Euler", _basic(basic.sample_euler), ("k_euler",)),
    SamplerInfo("LMS", _basic(basic.sample_lms), ("k_lms",)),
    SamplerInfo("Heun", _basic(basic.sample_heun), ("k_heun",), second_order=True),
    SamplerInfo("DPM2", _basic(basic.sample_dpm_2), ("k_dpm_2",), "karras",
                discard_next_to_last_sigma=True, second_order=True),
    SamplerInfo("DPM2 a", _basic(basic.sample_dpm_2_ancestral), ("k_dpm_2_a",), "karras",
                discard_next_to_last_sigma=True, second_order=True, uses_noise=True, uses_ensd=True),
    # A1111 runs DDIM on its own timesteps 1, 1+k, ...; our "ddim" schedule is exactly those sigmas.
    SamplerInfo("DDIM", _basic(basic.sample_ddim), ("ddim",), "ddim"),
    # A1111's UniPC steps time-uniformly from t=999 to t=0; SGM Uniform is those timesteps, ending at sigma 0.
    SamplerInfo("UniPC", lambda: _unipc().sample_unipc, ("unipc",), "sgm_uniform"),
    # LCM models are distilled on trailing timesteps (999, 759, ...): SGM Uniform lands on them.
    SamplerInfo("LCM", _basic(basic.sample_lcm), ("k_lcm",), "sgm_uniform", uses_noise=True),
)

SAMPLERS: dict[str, SamplerInfo] = {s.name: s for s in _ALL}

_SAMPLER_LOOKUP = {key.lower(): s for s in _ALL for key in (s.name, *s.aliases)}
_SCHEDULER_LOOKUP = {key.lower(): s for s in SCHEDULERS.values() for key in (s.name, s.label, *s.aliases)}


def find_scheduler(name: str | None) -> SchedulerInfo:
    """A scheduler by key, label or alias (any case); None or "" is "automatic"."""
    if not name:
        return SCHEDULERS["automatic"]
    found = _SCHEDULER_LOOKUP.get(str(name).strip().lower())
    if found is None:
        raise unknown_name("scheduler", name, [s.label for s in SCHEDULERS.values()], field="scheduler")
    return found


def _split_scheduler_suffix(name: str) -> tuple[str, SchedulerInfo | None]:
    """"DPM++ 2M Karras" -> ("DPM++ 2M", karras); old k_*_ka aliases -> karras."""
    lowered = name.lower()
    for sched in SCHEDULERS.values():
        for option in (sched.label, sched.name, *sched.aliases):
            if lowered.endswith(" " + option.lower()):
                return name[: -(len(option) + 1)], sched
    if lowered.endswith("_ka") and lowered[:-3] in _SAMPLER_LOOKUP:
        return name[:-3], SCHEDULERS["karras"]
    return name, None


def resolve_sampler(name: str | None, scheduler: str | None = None) -> tuple[SamplerInfo, SchedulerInfo]:
    """(sampler, scheduler) for a sampler name/alias/old combined name and an optional scheduler.

    A scheduler named in the sampler name wins over `scheduler`; a scheduler equal to the sampler's
    default becomes "Automatic" (A1111 `get_sampler_and_scheduler`). Unknown names raise a UserError."""
    found = find_scheduler(scheduler)
    raw = (name or _ALL[0].name).strip()
    base, suffix = _split_scheduler_suffix(raw)
    sampler = _SAMPLER_LOOKUP.get(base.strip().lower()) if suffix else None
    if sampler is None:  # no suffix, or the "suffix" is part of a real name
        sampler, suffix = _SAMPLER_LOOKUP.get(raw.lower()), None
    if sampler is None:
        raise unknown_name("sampler", raw, list(SAMPLERS), field="sampler_name")
    found = suffix or found
    if sampler.default_scheduler == found.name:
        found = SCHEDULERS["automatic"]
    return sampler, found


# A model trained with zero terminal SNR (Lin et al. 2023) has alpha_bar_T = 0; loaders clamp it, which leaves a
# last sigma in the thousands (SD 1.x/2.x: ~14.6). Karras' rho-spacing from there spends most of the steps at
# noise levels where nothing is decided, and the image is left with residual noise (the built-in model at 20
# DPM++ 2M steps: 49 of 78 one-object images got extra fragments from mottled backgrounds, against 13 with
# evenly spaced "trailing" timesteps). For such models "Automatic" means that spacing (SGM Uniform), as the paper
# prescribes; a schedule the user names still runs as named.
ZERO_SNR_SIGMA_MAX = 1000.0
_SPACING_DEFAULTS = (None, "karras", "exponential")  # not the sampler-specific ones (DDIM's own timesteps)


def is_zero_terminal_snr(schedule) -> bool:
    return schedule is not None and float(schedule.sigma_max) > ZERO_SNR_SIGMA_MAX


def effective_scheduler(sampler: SamplerInfo, scheduler: SchedulerInfo, schedule=None) -> SchedulerInfo:
    """The schedule that actually runs: "Automatic" becomes the sampler's default or the model's uniform, or on a
    zero-terminal-SNR model (`schedule` given) evenly spaced trailing timesteps (SGM Uniform)."""
    if scheduler.fn is not None:
        return scheduler
    if is_zero_terminal_snr(schedule) and sampler.default_scheduler in _SPACING_DEFAULTS:
        return SCHEDULERS["sgm_uniform"]
    return SCHEDULERS[sampler.default_scheduler or "uniform"]


# The same paper's other prescription for such models: rescale classifier-free guidance (phi = 0.7), as diffusers'
# `guidance_rescale` and ComfyUI's RescaleCFG do. Without it the built-in model over-saturated the blend colours at
# CFG 7 (one-object prompts, 2 seeds: colour right 87.7% without, 95.5% with; purple and orange came out red or
# blue). "Automatic" (rescale_cfg = -1) means 0.7 on these models and 0 on the others, as A1111 has no rescale.
ZERO_SNR_RESCALE_CFG = 0.7


def effective_rescale_cfg(value: float, schedule=None) -> float:
    """The CFG rescale phi that runs: `value` when given (0 to 1), else (-1, automatic) 0.7 on a zero-terminal-SNR
    model and 0 on any other."""
    if value >= 0:
        return float(value)
    return ZERO_SNR_RESCALE_CFG if is_zero_terminal_snr(schedule) else 0.0


def schedule_label(sampler: SamplerInfo | str, scheduler: SchedulerInfo | str | None = None, schedule=None) -> str:
    """What infotext's "Schedule type" shows: the resolved label, or "Automatic" when the sampler has no
    default of its own (as A1111 writes it); on a zero-terminal-SNR model (`schedule`), the spacing that ran."""
    if not isinstance(sampler, SamplerInfo) or not isinstance(scheduler, SchedulerInfo):
        sampler_name = sampler.name if isinstance(sampler, SamplerInfo) else sampler
        scheduler_name = scheduler.label if isinstance(scheduler, SchedulerInfo) else scheduler
        sampler, scheduler = resolve_sampler(sampler_name, scheduler_name)
    if scheduler.fn is None and sampler.default_scheduler is None and not is_zero_terminal_snr(schedule):
        return scheduler.label
    return effective_scheduler(sampler, scheduler, schedule).label


def get_sigmas(
    sampler: SamplerInfo, scheduler: SchedulerInfo, steps: int, schedule: DiscreteSchedule
) -> torch.Tensor:
    """The sigmas `sampler` runs for `steps` steps (float32, CPU, last 0), A1111's `get_sigmas`."""
    if int(steps) < 1:
        raise UserError(f"steps must be at least 1, got {steps}", field="steps")
    discard = sampler.discard_next_to_last_sigma
    n = int(steps) + (1 if discard else 0)
    sched = effective_scheduler(sampler, scheduler, schedule)
    sigmas = sched.fn(n, schedule.sigma_min, schedule.sigma_max, schedule=schedule)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas.float()


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def scheduler_labels() -> list[str]:
    return [s.label for s in SCHEDULERS.values()]

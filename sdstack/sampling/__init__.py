"""k-diffusion style sampling: sigma schedules, denoiser adapters (eps / v), RNG, samplers, registries."""

from .denoisers import DiscreteSchedule, EpsDenoiser, VDenoiser, make_denoiser
from .registry import SAMPLERS, SamplerInfo, get_sigmas, resolve_sampler, schedule_label
from .rng import ImageRNG, slerp
from .schedules import SCHEDULERS, SchedulerInfo

__all__ = [
    "DiscreteSchedule", "EpsDenoiser", "VDenoiser", "make_denoiser",
    "SAMPLERS", "SamplerInfo", "get_sigmas", "resolve_sampler", "schedule_label",
    "ImageRNG", "slerp", "SCHEDULERS", "SchedulerInfo",
]

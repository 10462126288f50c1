"""The ONE schema of generation parameters.

Every generation parameter is declared once here: name (AUTOMATIC1111's API field name), type, default,
limits, help text, CLI flag and infotext key. The CLI options, REST request models, UI controls and infotext
writing/reading are derived from `PARAMS`; nothing else lists parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from .errors import UserError


def _sampler_names() -> list[str]:
    from .sampling.registry import SAMPLERS

    return list(SAMPLERS)


def _scheduler_labels() -> list[str]:
    from .sampling.schedules import SCHEDULERS

    return [s.label for s in SCHEDULERS.values()]


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    default: Any
    help: str
    cli: str | None = None
    infotext: str | None = None
    min: float | None = None
    max: float | None = None
    multiple_of: int | None = None
    choices: Callable[[], list[str]] | None = None
    group: str = "core"
    api_default: Any = None  # where A1111's API default differs from ours (e.g. steps=50); None = same
    label: str | None = None  # UI label; None = the infotext key, else the name humanised


def param_label(p: Param) -> str:
    """The name a person sees for a parameter (web UI)."""
    return p.label or p.infotext or p.name.replace("_", " ").capitalize()


PARAMS: tuple[Param, ...] = (
    Param("prompt", str, "", "What to draw (A1111 prompt syntax).", infotext=None),
    Param("negative_prompt", str, "", "What not to draw.", cli="--negative"),
    Param("steps", int, 20, "Sampling steps.", cli="--steps", infotext="Steps", min=1, max=1000, api_default=50,
          label="Sampling steps"),
    Param("sampler_name", str, "DPM++ 2M", "Sampler (A1111 names; old combined names like 'DPM++ 2M Karras' work).",
          cli="--sampler", infotext="Sampler", choices=_sampler_names, label="Sampling method"),
    Param("scheduler", str, "Automatic", "Sigma schedule.", cli="--scheduler", infotext="Schedule type",
          choices=_scheduler_labels),
    Param("cfg_scale", float, 7.0, "Classifier-free guidance scale.", cli="--cfg", infotext="CFG scale",
          min=0.0, max=100.0),
    Param("rescale_cfg", float, -1.0, "CFG rescale phi (Lin et al. 2023): blend the guided prediction with itself "
          "rescaled to the conditional one's spread; -1 = automatic (0.7 on zero-terminal-SNR models, else 0).",
          cli="--rescale-cfg", infotext="Rescale CFG", min=-1.0, max=1.0, label="Rescale CFG"),
    Param("seed", int, -1, "Seed; -1 = random. Image i of a job uses seed+i.", cli="--seed", infotext="Seed",
          min=-1, max=2**32 - 1),
    Param("subseed", int, -1, "Variation seed; -1 = random.", cli="--variation-seed", infotext="Variation seed",
          min=-1, max=2**32 - 1, group="seed"),
    Param("subseed_strength", float, 0.0, "Variation strength (slerp towards the variation seed's noise).",
          cli="--variation-strength", infotext="Variation seed strength", min=0.0, max=1.0, group="seed"),
    Param("seed_resize_from_w", int, -1, "Resize seed from width (-1 = off).", cli="--seed-resize-from-w",
          min=-1, max=8192, group="seed", label="Resize seed from width"),
    Param("seed_resize_from_h", int, -1, "Resize seed from height (-1 = off).", cli="--seed-resize-from-h",
          min=-1, max=8192, group="seed", label="Resize seed from height"),
    Param("width", int, 0, "Width in pixels, a multiple of 8 (0 = the model's native size).", cli="--width",
          min=0, max=8192, multiple_of=8, api_default=512),
    Param("height", int, 0, "Height in pixels, a multiple of 8 (0 = the model's native size).", cli="--height",
          min=0, max=8192, multiple_of=8, api_default=512),
    Param("batch_size", int, 1, "Images per batch.", cli="--batch-size", min=1, max=64),
    Param("n_iter", int, 1, "Number of batches.", cli="--n-iter", min=1, max=1000, label="Batch count"),
    Param("clip_skip", int, 1, "Stop the text encoder this many layers from the end (1 = last layer).",
          cli="--clip-skip", infotext="Clip skip", min=1, max=12),
    Param("denoising_strength", float, 0.75, "img2img / hires-fix denoising strength.", cli="--strength",
          infotext="Denoising strength", min=0.0, max=1.0, group="img2img"),
    Param("resize_mode", int, 0, "img2img resize: 0 just resize, 1 crop and resize, 2 resize and fill, "
          "3 just resize (latent upscale).", cli="--resize-mode", min=0, max=3, group="img2img"),
    Param("enable_hr", bool, False, "Hires fix: generate small, upscale the latent, refine.", group="hires",
          label="Hires fix"),
    Param("hr_scale", float, 2.0, "Hires fix upscale factor.", cli="--hires-scale", infotext="Hires upscale",
          min=1.0, max=8.0, group="hires"),
    Param("hr_second_pass_steps", int, 0, "Hires fix second-pass steps (0 = same as steps).", cli="--hires-steps",
          infotext="Hires steps", min=0, max=1000, group="hires"),
    Param("hr_upscaler", str, "Latent", "Hires fix upscaler.", infotext="Hires upscaler", group="hires",
          choices=lambda: list(LATENT_UPSCALE_MODES)),
)

LATENT_UPSCALE_MODES = {
    "Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False),
}

PARAMS_BY_NAME = {p.name: p for p in PARAMS}

GenerationParams = dataclasses.make_dataclass(
    "GenerationParams",
    [(p.name, p.type, dataclasses.field(default=p.default)) for p in PARAMS],
    namespace={"__doc__": "Generation parameters; fields and defaults come from sdstack.params.PARAMS."},
)


def make_params(**values: Any) -> Any:
    """Build GenerationParams from keyword values; unknown names are a UserError."""
    unknown = sorted(set(values) - set(PARAMS_BY_NAME))
    if unknown:
        raise UserError(f"unknown parameter(s): {', '.join(unknown)}", field=unknown[0])
    return validate(GenerationParams(**{k: v for k, v in values.items() if v is not None}))


def _check(p: Param, value: Any) -> Any:
    if p.type is bool:
        if not isinstance(value, bool):
            raise UserError(f"{p.name} must be true or false, got {value!r}", field=p.name)
        return value
    try:
        cast = p.type(value)
    except (TypeError, ValueError):
        raise UserError(f"{p.name} must be a {p.type.__name__}, got {value!r}", field=p.name) from None
    if p.type is int and isinstance(value, float) and value != int(value):
        raise UserError(f"{p.name} must be a whole number, got {value!r}", field=p.name)
    if p.min is not None and cast < p.min or p.max is not None and cast > p.max:
        raise UserError(f"{p.name} must be between {p.min:g} and {p.max:g}, got {cast!r}", field=p.name)
    if p.multiple_of and cast % p.multiple_of:
        raise UserError(f"{p.name} must be a multiple of {p.multiple_of}, got {cast}", field=p.name)
    return cast


def validate(params: Any) -> Any:
    """Type/range-check every field and resolve sampler/scheduler names; returns a new GenerationParams."""
    values = {p.name: _check(p, getattr(params, p.name)) for p in PARAMS}
    from .sampling.registry import resolve_sampler

    sampler, scheduler = resolve_sampler(values["sampler_name"], values["scheduler"])
    values["sampler_name"], values["scheduler"] = sampler.name, scheduler.label
    if values["hr_upscaler"] not in LATENT_UPSCALE_MODES:
        from .errors import unknown_name

        raise unknown_name("hires upscaler", values["hr_upscaler"], list(LATENT_UPSCALE_MODES), field="hr_upscaler")
    return GenerationParams(**values)

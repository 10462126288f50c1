"""An A1111 txt2img/img2img request -> a job: A1111's semantics for defaults, infotext, sampler_index,
override_settings and the fields sdstack accepts but ignores (a1111_fields.py)."""

from __future__ import annotations

import dataclasses

from ..errors import UserError
from ..params import PARAMS
from .a1111_fields import check_inert
from .jobs import JobSpec
from .submit import check_networks, check_size, fix_seeds, init_pngs, validated_params

HIRES_ONLY = ("hr_scale", "hr_second_pass_steps", "hr_upscaler", "denoising_strength")


def _values(body: dict, explicit: set[str], kind: str) -> dict:
    values = {p.name: body[p.name] for p in PARAMS if body.get(p.name) is not None}
    if body.get("infotext"):
        from ..engine.infotext import params_from_infotext

        try:
            parsed, _ = params_from_infotext(str(body["infotext"]))
        except (ValueError, KeyError) as e:
            raise UserError(f"infotext could not be read: {e}", field="infotext") from None
        values.update({k: v for k, v in parsed.items() if k not in explicit and k in body})
    if not body.get("sampler_name") and "sampler_name" not in values:
        values["sampler_name"] = body.get("sampler_index") or "Euler"
    if kind == "txt2img" and not values.get("enable_hr"):
        for key in HIRES_ONLY:   # A1111 ignores them without hires fix
            values.pop(key, None)
    return values


def _overrides(body: dict, options) -> dict:
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise UserError("override_settings must be an object", field="override_settings")
    return options.check(overrides, prefix="override_settings.")


def a1111_job(req, kind: str, ctx) -> JobSpec:
    """Validate an A1111 request model instance into a JobSpec (UserError -> 4xx naming the field)."""
    body = req.model_dump()
    explicit = set(req.model_fields_set)
    values = _values(body, explicit, kind)
    changes = _overrides(body, ctx.options)
    if "clip_skip" not in explicit:
        values["clip_skip"] = changes.get("clip_skip", ctx.options.clip_skip())
    params = validated_params(values, sampler_status=400)
    from ..sampling.registry import resolve_sampler

    check_inert(kind, body, resolve_sampler(params.sampler_name, params.scheduler)[0])
    check_size(params, ctx.config.max_pixels)
    check_networks(params, ctx.loras)
    pngs: list[bytes] = []
    if kind == "img2img":
        if not body.get("init_images"):
            raise UserError("Init image not found", field="init_images", status=404)
        pngs = init_pngs(body["init_images"], "init_images", ctx.config.max_pixels)
    model = changes["model"] if "model" in changes else ctx.options.model_path()
    vae = changes["vae"] if "vae" in changes else ctx.options.vae_path()
    request = dict(body)
    if kind == "img2img" and not body.get("include_init_images"):
        request["init_images"] = None
        request["mask"] = None
    return JobSpec(kind=kind, source="a1111", params=dataclasses.asdict(fix_seeds(params)), model=str(model),
                   vae=str(vae) if vae else None, request=request, init_pngs=pngs)

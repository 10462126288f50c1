"""A1111 request fields that are not generation parameters of sdstack (those come from params.PARAMS).

Each is declared once, with A1111 v1.10's type and API default. `inert(value, ctx)` says whether a value
has no effect *in A1111 either* for this request (e.g. `eta` with a sampler that has no eta, `mask_blur`
without a mask). A value that is not inert would change A1111's output in a way sdstack cannot reproduce
yet, so it is refused with a 422 naming the field and what is accepted. `inert=None` means the field is
honoured by sdstack (`send_images`, `infotext`, ...) or never changes the image (`comments`).
Fields A1111 itself does not know are ignored, as A1111's pydantic models ignore them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UserError

BOTH = ("txt2img", "img2img")
TXT = ("txt2img",)
IMG = ("img2img",)

Inert = Callable[[Any, dict], bool]


@dataclass(frozen=True)
class ApiField:
    name: str
    type: Any
    default: Any
    help: str
    inert: Inert | None = None     # None: honoured by sdstack, or never changes the image
    allowed: str = ""              # the accepted values, for the error message and the docs
    kinds: tuple[str, ...] = BOTH


def _off(value, ctx) -> bool:
    return value in (None, False, 0, "", [], {}, "None")


def _hr_off_or(*same: str) -> Inert:
    return lambda v, ctx: not ctx["body"].get("enable_hr") or v in (None, "", *same)


def _eta(value, ctx) -> bool:
    if value is None:
        return True
    sampler = ctx["sampler"]
    if sampler.name == "DDIM":          # A1111's DDIM honours eta (default 0); sdstack's DDIM is eta 0
        return value == 0
    if "eta" in inspect.signature(sampler.fn).parameters:
        return value == 1.0             # sdstack runs ancestral/SDE samplers at A1111's default eta 1
    return True                         # A1111 passes eta only to samplers that take it


def _s_churn(value, ctx) -> bool:
    return value in (None, 0) or ctx["sampler"].name not in ("Euler", "Heun", "DPM2")


def _s_noise(value, ctx) -> bool:
    sampler = ctx["sampler"]
    return value in (None, 1.0) or not sampler.uses_noise or sampler.name == "LCM"


def _hr_sampler(value, ctx) -> bool:
    return _hr_off_or("Use same sampler")(value, ctx) or value == ctx["body"].get("sampler_name")


def _hr_prompt(key: str) -> Inert:
    return lambda v, ctx: not ctx["body"].get("enable_hr") or not v or v == ctx["body"].get(key)


API_FIELDS: tuple[ApiField, ...] = (
    ApiField("sampler_index", str, "Euler", "Legacy sampler field, used when sampler_name is null."),
    ApiField("styles", list[str], None, "Prompt styles.", _off, "[] or null (styles are not supported yet)"),
    ApiField("restore_faces", bool, None, "Face restoration.", _off, "false or null (not supported yet)"),
    ApiField("tiling", bool, None, "Seamless tiling.", _off, "false or null (not supported yet)"),
    ApiField("do_not_save_samples", bool, False, "Accepted; sdstack keeps every image in its gallery."),
    ApiField("do_not_save_grid", bool, False, "Accepted; sdstack makes no grids."),
    ApiField("save_images", bool, False, "Accepted; sdstack always saves images (outputs/ + gallery)."),
    ApiField("send_images", bool, True, "Return the images in the response (false: images is [])."),
    ApiField("eta", float, None, "Ancestral noise amount.", _eta,
             "null, 1.0 for ancestral/SDE samplers, 0 for DDIM, anything for samplers without eta"),
    ApiField("s_min_uncond", float, None, "Skip the negative prompt at low sigmas.", _off, "null or 0"),
    ApiField("s_churn", float, None, "Churn (Euler, Heun, DPM2).", _s_churn, "null or 0 for Euler, Heun, DPM2"),
    ApiField("s_tmin", float, None, "Churn range start; only used with s_churn."),
    ApiField("s_tmax", float, None, "Churn range end; only used with s_churn."),
    ApiField("s_noise", float, None, "Noise multiplier of stochastic samplers.", _s_noise,
             "null or 1.0 for samplers that add noise"),
    ApiField("override_settings", dict, None, "Per-request settings: sd_model_checkpoint, sd_vae, "
             "CLIP_stop_at_last_layers; other keys only with their current value (see GET /options)."),
    ApiField("override_settings_restore_afterwards", bool, True, "Accepted; overrides apply to one job only."),
    ApiField("refiner_checkpoint", str, None, "SDXL refiner.", _off, "null (refiner not supported yet)"),
    ApiField("refiner_switch_at", float, None, "Refiner switch point; only used with a refiner."),
    ApiField("disable_extra_networks", bool, False, "Ignore <lora:...> tags.", _off, "false"),
    ApiField("firstpass_image", str, None, "Hires fix from a given first pass.", _off, "null"),
    ApiField("comments", dict, None, "Accepted; not written into the image."),
    ApiField("force_task_id", str, None, "Accepted; sdstack gives each job its own id."),
    ApiField("script_name", str, None, "Selectable script.", _off, "null (scripts are not supported)"),
    ApiField("script_args", list, [], "Arguments of script_name; unused without it."),
    ApiField("alwayson_scripts", dict, {}, "Extension scripts.", _off, "{} (no extension scripts are installed)"),
    ApiField("infotext", str, None, "Infotext whose parameters fill every field not given explicitly."),
    ApiField("firstphase_width", int, 0, "Deprecated; ignored (as by A1111).", kinds=TXT),
    ApiField("firstphase_height", int, 0, "Deprecated; ignored (as by A1111).", kinds=TXT),
    ApiField("hr_resize_x", int, 0, "Hires fix target width.", _hr_off_or(0), "0 (use hr_scale)", TXT),
    ApiField("hr_resize_y", int, 0, "Hires fix target height.", _hr_off_or(0), "0 (use hr_scale)", TXT),
    ApiField("hr_checkpoint_name", str, None, "Hires fix checkpoint.", _hr_off_or("Use same checkpoint"),
             "null or 'Use same checkpoint'", TXT),
    ApiField("hr_sampler_name", str, None, "Hires fix sampler.", _hr_sampler,
             "null, 'Use same sampler' or the sampler_name", TXT),
    ApiField("hr_scheduler", str, None, "Hires fix scheduler.", _hr_off_or("Use same scheduler"),
             "null or 'Use same scheduler'", TXT),
    ApiField("hr_prompt", str, "", "Hires fix prompt.", _hr_prompt("prompt"), "'' or the prompt", TXT),
    ApiField("hr_negative_prompt", str, "", "Hires fix negative prompt.", _hr_prompt("negative_prompt"),
             "'' or the negative_prompt", TXT),
    ApiField("init_images", list[str], None, "Base64 images (PNG/JPEG/WEBP, optional data: prefix).", kinds=IMG),
    ApiField("mask", str, None, "Inpainting mask.", _off, "null (inpainting is not supported yet)", IMG),
    ApiField("mask_blur_x", int, 4, "Mask blur; only used with a mask.", kinds=IMG),
    ApiField("mask_blur_y", int, 4, "Mask blur; only used with a mask.", kinds=IMG),
    ApiField("mask_blur", int, None, "Mask blur; only used with a mask.", kinds=IMG),
    ApiField("mask_round", bool, True, "Only used with a mask.", kinds=IMG),
    ApiField("inpainting_fill", int, 0, "Only used with a mask.", kinds=IMG),
    ApiField("inpaint_full_res", bool, True, "Only used with a mask.", kinds=IMG),
    ApiField("inpaint_full_res_padding", int, 0, "Only used with a mask.", kinds=IMG),
    ApiField("inpainting_mask_invert", int, 0, "Only used with a mask.", kinds=IMG),
    ApiField("initial_noise_multiplier", float, None, "Init noise multiplier.", lambda v, c: v in (None, 1.0),
             "null or 1.0", IMG),
    ApiField("latent_mask", str, None, "Latent mask.", _off, "null", IMG),
    ApiField("image_cfg_scale", float, None, "Instruct-pix2pix models only; ignored for others (as by A1111).",
             kinds=IMG),
    ApiField("include_init_images", bool, False, "Echo init_images in the response's parameters.", kinds=IMG),
)

# A1111 API defaults that PARAMS' `api_default` cannot express (it has no way to say "null"):
# sampler_name is null in A1111's request models and falls back to sampler_index ("Euler").
PARAM_API_DEFAULTS = {"sampler_name": None}

# PARAMS entries that are not fields of one of A1111's two requests
PARAMS_NOT_IN = {"txt2img": {"resize_mode"},
                 "img2img": {"enable_hr", "hr_scale", "hr_second_pass_steps", "hr_upscaler"}}


def fields_for(kind: str) -> tuple[ApiField, ...]:
    return tuple(f for f in API_FIELDS if kind in f.kinds)


def check_inert(kind: str, body: dict, sampler) -> None:
    """422 for the first A1111-only field whose value sdstack cannot honour."""
    ctx = {"body": body, "sampler": sampler, "kind": kind}
    for f in fields_for(kind):
        if f.inert is not None and not f.inert(body.get(f.name), ctx):
            shown = repr(body.get(f.name))
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise UserError(f"{f.name}={shown} is not supported by sdstack yet; accepted: {f.allowed}", field=f.name)

"""GenerationParams <-> A1111 infotext, keyed by the `infotext` names in sdstack.params.PARAMS."""

from __future__ import annotations

from .. import __version__
from ..metadata.infotext import build_infotext, parse_infotext
from ..params import PARAMS, PARAMS_BY_NAME
from ..sampling.denoisers import DiscreteSchedule
from ..sampling.registry import effective_rescale_cfg, schedule_label


def build_image_infotext(bundle, p, seed, subseed, w, h, img2img, networks, cond) -> str:
    schedule = DiscreteSchedule(bundle.alphas_cumprod)
    d: dict[str, object] = {
        "Steps": p.steps, "Sampler": p.sampler_name,
        "Schedule type": schedule_label(p.sampler_name, p.scheduler, schedule),
        "CFG scale": p.cfg_scale,
        "Rescale CFG": _rescale_cfg(p.rescale_cfg, schedule),
        "Seed": seed, "Size": f"{w}x{h}", "Model hash": bundle.shorthash, "Model": bundle.name,
    }
    if bundle.vae_name:
        d["VAE hash"] = bundle.vae_sha256[:10] if bundle.vae_sha256 else None
        d["VAE"] = bundle.vae_name
    if p.subseed_strength > 0:
        d["Variation seed"] = subseed
        d["Variation seed strength"] = p.subseed_strength
    if p.seed_resize_from_w > 0 and p.seed_resize_from_h > 0:
        d["Seed resize from"] = f"{p.seed_resize_from_w}x{p.seed_resize_from_h}"
    if img2img or p.enable_hr:
        d["Denoising strength"] = p.denoising_strength
    if p.clip_skip > 1:
        d["Clip skip"] = p.clip_skip
    d["RNG"] = "CPU"
    if p.enable_hr and not img2img:
        d["Hires upscale"] = p.hr_scale
        d["Hires steps"] = p.hr_second_pass_steps or None
        d["Hires upscaler"] = p.hr_upscaler
    d["Lora hashes"] = networks.lora_hashes()
    used = getattr(cond, "used_embeddings", {})
    d["TI hashes"] = ", ".join(f"{n}: {(e.hash or '')[:12]}" for n, e in used.items()) or None
    d["Version"] = f"sdstack {__version__}"
    return build_infotext(p.prompt, p.negative_prompt, d)


def _rescale_cfg(value: float, schedule: DiscreteSchedule):
    """The CFG rescale that ran; left out (None) where it is 0 on a model whose automatic value is 0 too, so an
    A1111 infotext stays as A1111 writes it."""
    phi = effective_rescale_cfg(value, schedule)
    return phi if phi or effective_rescale_cfg(-1, schedule) else None


def params_from_infotext(text: str) -> tuple[dict, dict]:
    """Infotext -> (GenerationParams keyword values, other facts such as Model / Model hash / VAE)."""
    raw = parse_infotext(text)
    values: dict[str, object] = {"prompt": raw.get("Prompt", ""), "negative_prompt": raw.get("Negative prompt", "")}
    by_key = {p.infotext: p for p in PARAMS if p.infotext}
    for key, value in raw.items():
        p = by_key.get(key)
        if p is not None and p.type is not bool:
            values[p.name] = _cast(p.type, value)
    if "Size-1" in raw:
        values["width"], values["height"] = int(raw["Size-1"]), int(raw["Size-2"])
    if "Seed resize from-1" in raw:
        values["seed_resize_from_w"] = int(raw["Seed resize from-1"])
        values["seed_resize_from_h"] = int(raw["Seed resize from-2"])
    if "Hires upscale" in raw or "Hires upscaler" in raw:
        values["enable_hr"] = True
    if "Schedule type" in raw and raw["Schedule type"] == "Automatic":
        values["scheduler"] = "Automatic"
    others = {k: raw[k] for k in ("Model", "Model hash", "VAE", "VAE hash", "Lora hashes", "TI hashes", "Version")
              if k in raw}
    return values, others


def _cast(kind, value):
    if kind is int:
        return int(float(value))
    if kind is float:
        return float(value)
    return str(value)


__all__ = ["build_image_infotext", "params_from_infotext", "PARAMS_BY_NAME"]

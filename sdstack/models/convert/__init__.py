"""LDM single-file layout <-> diffusers/transformers component state dicts, strictly and by name.

`configs` is the dict sdstack ships and stores in its own files:
`{"unet": {...}, "vae": {...}, "text_encoders": [{...}, ...], "scheduler": {...}, "family": "..."}`
(diffusers / transformers config dicts). Component state dicts use diffusers names for the UNet and VAE and
HF checkpoint names (`text_model.*`) for the text encoders; `clip.to_module_layout` adapts those to a
transformers module, `load_into` loads strictly.
"""

from __future__ import annotations

from typing import Mapping

import torch

from sdstack.errors import CheckpointKeyError

from . import clip, unet, vae
from .keymap import KeyMap, check_shapes, key_error, to_diffusers, to_ldm

# Per family: UNet and VAE prefixes, then (prefix, layout, with_projection) for each text encoder, in order.
LAYOUTS = {
    "sd1": {"unet": unet.PREFIX, "vae": vae.PREFIX,
            "text_encoders": (("cond_stage_model.transformer.", "hf", False),)},
    "sd2": {"unet": unet.PREFIX, "vae": vae.PREFIX,
            "text_encoders": (("cond_stage_model.model.", "openclip", False),)},
    "sdxl": {"unet": unet.PREFIX, "vae": vae.PREFIX,
             "text_encoders": (("conditioner.embedders.0.transformer.", "hf", False),
                               ("conditioner.embedders.1.model.", "openclip", True))},
}

# Keys LDM training code saves that are not network weights: the DDPM schedule buffers, EMA copies, the
# autoencoder's training loss, and SDXL markers read by detection (`v_pred`, `ztsnr`).
IGNORED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "denoiser.sigmas", "v_pred", "ztsnr",
})
IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.")

# Old SD1 files saved CLIPTextModel before transformers added `text_model.` (A1111 renames them the same way).
ALIASES = (
    ("cond_stage_model.transformer.embeddings.", "cond_stage_model.transformer.text_model.embeddings."),
    ("cond_stage_model.transformer.encoder.", "cond_stage_model.transformer.text_model.encoder."),
    ("cond_stage_model.transformer.final_layer_norm.", "cond_stage_model.transformer.text_model.final_layer_norm."),
)


def is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def apply_aliases(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename legacy key prefixes (ALIASES) to the current ones."""
    out = {}
    for k, v in sd.items():
        for old, new in ALIASES:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def _layout(family: str) -> dict:
    if family not in LAYOUTS:
        raise ValueError(f"unknown model family {family!r}; valid: {', '.join(LAYOUTS)}")
    return LAYOUTS[family]


def text_encoder_keymap(cfg: Mapping, layout: str, with_projection: bool) -> KeyMap:
    if layout == "hf":
        return clip.hf_keymap(cfg, with_projection)
    return clip.openclip_keymap(cfg, with_projection)


def keymaps(family: str, configs: Mapping) -> list[tuple[str, str, KeyMap]]:
    """(component label, LDM prefix, key map) for every component of a family, in file order."""
    lay = _layout(family)
    encoders, cfgs = lay["text_encoders"], list(configs["text_encoders"])
    if len(cfgs) != len(encoders):
        raise ValueError(f"{family} has {len(encoders)} text encoder(s), configs give {len(cfgs)}")
    out = [("unet", lay["unet"], unet.unet_keymap(configs["unet"])),
           ("vae", lay["vae"], vae.vae_keymap(configs["vae"]))]
    for i, ((prefix, layout, proj), cfg) in enumerate(zip(encoders, cfgs)):
        out.append((f"text_encoders[{i}]", prefix, text_encoder_keymap(cfg, layout, proj)))
    return out


def _split(sd: Mapping[str, torch.Tensor], prefixes: list[str]) -> list[dict[str, torch.Tensor]]:
    """Partition a flat LDM dict by component prefix; unclaimed keys must be known non-weights."""
    parts: list[dict] = [{} for _ in prefixes]
    stray = []
    for k, v in sd.items():
        if is_ignored(k):
            continue
        owner = next((i for i, p in enumerate(prefixes) if k.startswith(p)), None)
        if owner is None:
            stray.append(k)
        else:
            parts[owner][k[len(prefixes[owner]):]] = v
    if stray:
        raise key_error("checkpoint", (), stray)
    return parts


def ldm_to_diffusers(state_dict: Mapping[str, torch.Tensor], family: str, configs: Mapping) -> dict:
    """Flat LDM single-file state dict -> {"unet": sd, "vae": sd, "text_encoders": [sd, ...]}, strictly."""
    maps = keymaps(family, configs)
    parts = _split(apply_aliases(state_dict), [prefix for _, prefix, _ in maps])
    out = [to_diffusers(km, part, label) for (label, _, km), part in zip(maps, parts)]
    return {"unet": out[0], "vae": out[1], "text_encoders": out[2:]}


def diffusers_to_ldm(components: Mapping, family: str, configs: Mapping) -> dict[str, torch.Tensor]:
    """{"unet": sd, "vae": sd, "text_encoders": [sd, ...]} -> flat LDM single-file state dict, strictly."""
    maps = keymaps(family, configs)
    encoders = list(components["text_encoders"])
    if len(encoders) != len(maps) - 2:
        raise CheckpointKeyError(f"{family} needs {len(maps) - 2} text encoder state dict(s), got {len(encoders)}")
    sds = [components["unet"], components["vae"]] + [clip.to_canonical(sd) for sd in encoders]
    out: dict[str, torch.Tensor] = {}
    for (label, prefix, km), sd in zip(maps, sds):
        out.update((prefix + k, v) for k, v in to_ldm(km, sd, label).items())
    return out


def vae_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A standalone LDM VAE file (keys with or without `first_stage_model.`) -> diffusers AutoencoderKL names.

    Its training-loss tensors (`loss.*`, e.g. the discriminator) are not weights and are dropped, as A1111 does.
    """
    prefix = vae.PREFIX if any(k.startswith(vae.PREFIX) for k in state_dict) else ""
    (part,) = _split({k: v for k, v in state_dict.items() if not k.startswith("loss.")}, [prefix])
    return to_diffusers(vae.vae_keymap(config), part, "vae")


def load_into(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], label: str = "", *,
              assign: bool = False) -> None:
    """Strict load_state_dict naming missing/unexpected keys and wrong shapes (text encoders: either naming).

    `assign=True` adopts the given tensors (for modules built on the meta device).
    """
    label = label or type(module).__name__
    own = module.state_dict()
    if getattr(getattr(module, "config", None), "model_type", None) == "clip_text_model":
        sd = clip.to_module_layout(clip.to_canonical(sd), module)
    missing, unexpected = set(own) - set(sd), set(sd) - set(own)
    if missing or unexpected:
        raise key_error(label, missing, unexpected)
    check_shapes(label, {k: v.shape for k, v in own.items()}, sd)
    module.load_state_dict(sd, strict=True, assign=assign)


__all__ = ["LAYOUTS", "IGNORED_KEYS", "IGNORED_PREFIXES", "ALIASES", "apply_aliases", "is_ignored", "keymaps",
           "ldm_to_diffusers", "diffusers_to_ldm", "vae_to_diffusers", "load_into", "text_encoder_keymap"]

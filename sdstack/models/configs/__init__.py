"""Shipped full-size architecture configs (diffusers / transformers config dicts) for offline loading.

One JSON file per (family, component): `sd1_unet.json`, `sdxl_text_encoder_2.json`, ... Each records where
its values come from in `_source` (dropped on load). SD 2.x shares the SD 1.x VAE architecture.
"""

from __future__ import annotations

import json
from importlib import resources

COMPONENTS = {
    "sd1": ("unet", "vae", "text_encoder", "scheduler"),
    "sd2": ("unet", "vae", "text_encoder", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"),
}
SHARED = {("sd2", "vae"): ("sd1", "vae")}


def load_config(family: str, component: str) -> dict:
    """The shipped config dict of one component, e.g. load_config("sdxl", "text_encoder_2")."""
    if component not in COMPONENTS.get(family, ()):
        valid = ", ".join(f"{f}/{c}" for f, cs in COMPONENTS.items() for c in cs)
        raise ValueError(f"no shipped config for {family}/{component}; valid: {valid}")
    family, component = SHARED.get((family, component), (family, component))
    text = resources.files(__name__).joinpath(f"{family}_{component}.json").read_text()
    cfg = json.loads(text)
    cfg.pop("_source", None)
    return cfg


def load_configs(family: str) -> dict:
    """All configs of a family in the layout sdstack stores in its files (see models.convert)."""
    names = COMPONENTS.get(family)
    if names is None:
        raise ValueError(f"unknown model family {family!r}; valid: {', '.join(COMPONENTS)}")
    encoders = [load_config(family, c) for c in names if c.startswith("text_encoder")]
    return {"family": family, "unet": load_config(family, "unet"), "vae": load_config(family, "vae"),
            "text_encoders": encoders, "scheduler": load_config(family, "scheduler")}

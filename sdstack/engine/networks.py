"""Extra networks named in prompts (`<lora:name:weight>`), loaded from the data dir for one job only."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from ..prompts.extra_networks import lora_weights, parse_extra_networks

LORA_NAMES = ("lora", "lyco")


@dataclass
class JobNetworks:
    loras: list = field(default_factory=list)  # (LoraFile, te_weight, unet_weight)

    @contextlib.contextmanager
    def applied(self, bundle):
        if not self.loras:
            yield
            return
        from ..models.lora import apply_loras

        with apply_loras(bundle, self.loras):
            yield

    def lora_hashes(self) -> str | None:
        if not self.loras:
            return None
        # A1111: the name as written, with ':' and ',' removed, and the file's short hash
        return ", ".join(f"{lf.name.replace(':', '').replace(',', '')}: {lf.shorthash}" for lf, _, _ in self.loras)


def prepare_extra_networks(prompt: str, negative: str, lora_dir, hash_cache=None):
    """Strip `<...:...>` tags from the prompts; load the LoRAs they name. Returns (prompt, negative, networks)."""
    prompt, calls = parse_extra_networks(prompt)
    negative, neg_calls = parse_extra_networks(negative)
    nets = JobNetworks()
    lora_calls = [c for c in calls + neg_calls if c.kind in LORA_NAMES]
    if lora_calls:
        from ..models.lora import LoraLibrary

        library = LoraLibrary(lora_dir, hash_cache=hash_cache)
        for call in lora_calls:
            name, te, unet = lora_weights(call)
            nets.loras.append((library.load(name), te, unet))
    return prompt, negative, nets

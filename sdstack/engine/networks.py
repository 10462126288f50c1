"""Extra networks named in prompts (`<lora:name:weight>`), loaded from the data dir for one job only."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from ..prompts.extra_networks import lora_weights, parse_extra_networks

LORA_NAMES = ("lora", "lyco")
log = logging.getLogger(__name__)


class EmbeddingChain:
    """Embedding lookup for one job: the embeddings folder first, then the embeddings bundled in the job's LoRAs
    (A1111 skips a bundled embedding whose name the folder already has)."""

    def __init__(self, base, bundled):
        self.base, self.bundled = base, bundled

    def find_at(self, token_ids, offset: int):
        hit = self.base.find_at(token_ids, offset) if self.base is not None else None
        return hit if hit is not None else self.bundled.find_at(token_ids, offset)


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

    def embeddings(self, base, bundle):
        """The job's embedding lookup: `base` (an EmbeddingLibrary or None) plus the LoRAs' bundled embeddings
        that fit the model's text encoders (others are skipped with a warning)."""
        from ..models.embeddings import EmbeddingsByName, expected_widths

        expected, extra = expected_widths(bundle), {}
        for lf, _, _ in self.loras:
            for name, emb in lf.bundled_embeddings.items():
                got = {k: int(v.shape[-1]) for k, v in emb.vectors.items()}
                if got != expected:
                    log.warning("LoRA %s: bundled embedding %r does not fit this model (%s, the model expects %s)",
                                lf.name, name, got, expected)
                    continue
                extra.setdefault(name, emb)
        if not extra:
            return base
        return EmbeddingChain(base, EmbeddingsByName(extra.values(), bundle.tokenizers[0]))

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

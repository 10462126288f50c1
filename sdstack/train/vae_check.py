"""Validating an autoencoder with the shapes oracle: every suite's reference images are encoded and decoded, and
the oracle scores the round trip against each prompt's claims. A VAE that a diffusion model is to be trained on
should keep >= 98% on every suite (a diffusion model cannot draw finer than its autoencoder can decode)."""

from __future__ import annotations

import torch

from .data import to_pil, to_tensor

PASS_MARK = 0.98


@torch.no_grad()
def round_trip(vae, images: list, batch: int = 32) -> list:
    """Encode (posterior mean) and decode PIL images through `vae`; returns PIL images."""
    p = next(vae.parameters())
    out = []
    for start in range(0, len(images), batch):
        x = torch.stack([to_tensor(im) for im in images[start:start + batch]]).to(p.device, p.dtype)
        out += [to_pil(r) for r in vae.decode(vae.encode(x).latent_dist.mean).sample]
    return out


def oracle_round_trip(vae, per_suite: int | None = None, resolution: int = 64, details: bool = False) -> dict:
    """{suite: share of round-tripped reference images with every claim right} (first `per_suite` prompts)."""
    from ..eval.oracle import evaluate
    from ..eval.suites import SUITE_NAMES, Suite, get_suite

    was_training = vae.training
    vae.eval()
    scores, summaries = {}, {}
    for name in SUITE_NAMES:
        suite = get_suite(name)
        if per_suite is not None:
            suite = Suite(name, suite.prompts[:per_suite])
        refs = [suite.reference_image(i, resolution) for i in range(len(suite))]
        summary = evaluate(round_trip(vae, refs), suite)
        scores[name] = summary["accuracy"]
        summaries[name] = summary
    vae.train(was_training)
    return (scores, summaries) if details else scores


def concept_round_trip(vae, concept: str, n: int = 88, seed: int = 0, resolution: int = 64) -> tuple[float, float]:
    """(share of `n` rendered images of `concept` (ring, crescent, outline) that the oracle reads as the concept
    in the right colour, the same share after the round trip). The colours taken in turn, the rest drawn from
    `seed`. Fine-tuning a diffusion model on a concept cannot beat what its VAE decodes."""
    import random

    from ..eval.concepts import concept_colours, concept_score, render_concept_image

    colours = concept_colours(concept)
    rng = random.Random(seed)
    wanted = [colours[i % len(colours)] for i in range(n)]
    images = [render_concept_image(concept, c, None, rng, resolution) for c in wanted]
    was_training = vae.training
    vae.eval()
    decoded = round_trip(vae, images)
    vae.train(was_training)
    source = sum(concept_score(im, concept, c) for im, c in zip(images, wanted)) / n
    return source, sum(concept_score(im, concept, c) for im, c in zip(decoded, wanted)) / n


def load_vae_folder(folder):
    """The AutoencoderKL of a VAE folder (or a model / autoencoder run folder with vae/), in float32."""
    from diffusers import AutoencoderKL

    from ..errors import UserError
    from .autoencoder import resolve_vae_folder

    path = resolve_vae_folder(folder)
    if path is None:
        raise UserError(f"no VAE (config.json + safetensors) in {folder}")
    return AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32)

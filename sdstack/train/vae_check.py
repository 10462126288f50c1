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


def check_vae_folder(folder, resolution: int = 64, per_suite: int | None = None) -> dict:
    """Load a VAE folder (or a model / autoencoder run folder with vae/) and score its round trip."""
    from diffusers import AutoencoderKL

    from ..errors import UserError
    from .autoencoder import resolve_vae_folder

    path = resolve_vae_folder(folder)
    if path is None:
        raise UserError(f"no VAE (config.json + safetensors) in {folder}")
    vae = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32)
    return oracle_round_trip(vae, per_suite=per_suite, resolution=resolution)

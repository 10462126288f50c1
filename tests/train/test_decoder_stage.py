"""Decoder-only autoencoder stages (the shapes-v1 decoder refinements) keep the latent space and its scale."""

from dataclasses import replace

import torch
from diffusers import AutoencoderKL

from sdstack.train.autoencoder import train_autoencoder

from .conftest import tiny_ae_config


def _weights(folder, prefix):
    vae = AutoencoderKL.from_pretrained(folder)
    return {k: v.clone() for k, v in vae.state_dict().items() if k.startswith(prefix)}, vae.config.scaling_factor


def test_decoder_stage_keeps_the_encoder_and_its_scaling_factor(tmp_path, tiny_vae_dir):
    src = AutoencoderKL.from_pretrained(tiny_vae_dir)
    src.register_to_config(scaling_factor=0.777)  # not what the latents' std would give
    src_dir = tmp_path / "src"
    src.save_pretrained(src_dir)
    base = tiny_ae_config(tmp_path / "dec", max_steps=3, checkpoint_every=0)
    cfg = replace(base, init_from=str(src_dir), loss=replace(base.loss, train_encoder=False),
                  model=replace(base.model, norm_num_groups=8), data=replace(base.data, detail_share=0.5))
    train_autoencoder(cfg)
    enc_before, _ = _weights(src_dir, "encoder.")
    enc_after, scale = _weights(tmp_path / "dec" / "vae", "encoder.")
    dec_before, _ = _weights(src_dir, "decoder.")
    dec_after, _ = _weights(tmp_path / "dec" / "vae", "decoder.")
    assert scale == 0.777
    assert all(torch.equal(enc_before[k], enc_after[k]) for k in enc_before)
    assert any(not torch.equal(dec_before[k], dec_after[k]) for k in dec_before)  # the decoder did train

    # training the encoder too changes the latent space: the factor is measured again
    cfg2 = replace(cfg, run=replace(cfg.run, out=str(tmp_path / "both")), loss=replace(cfg.loss, train_encoder=True))
    train_autoencoder(cfg2)
    _, scale2 = _weights(tmp_path / "both" / "vae", "encoder.")
    assert scale2 != 0.777

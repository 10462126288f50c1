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


# ------------------------------------------------------------------ decoding the model's own estimates (stage 5)

def _builtin():
    from sdstack.models.registry import builtin_model_path

    return builtin_model_path()


def _estimate_error(t: int) -> float:
    """RMS distance between the encoder's latent of a world image and the built-in model's guided one-step
    estimate of it from timestep t, relative to the latent's RMS."""
    from sdstack.data.shapes import ShapesWorld
    from sdstack.train.autoencoder import ModelEstimates
    from sdstack.train.config import AutoencoderLossConfig
    from sdstack.train.data import to_tensor

    world = ShapesWorld(resolution=64, split="train")
    pairs = [world.sample(i) for i in range(4)]
    est = ModelEstimates(AutoencoderLossConfig(train_encoder=False, denoise_model=str(_builtin()),
                                               denoise_share=1.0, denoise_t=(t, t)), "cpu")
    vae = AutoencoderKL.from_pretrained(_builtin() / "vae", torch_dtype=torch.float32)
    with torch.no_grad():
        z = vae.encode(torch.stack([to_tensor(p[0]) for p in pairs])).latent_dist.mean
    out = est(z, [p[1] for p in pairs], torch.Generator().manual_seed(0))
    assert out.shape == z.shape
    return float((out - z).square().mean().sqrt() / z.square().mean().sqrt())


def test_model_estimates_are_near_the_latent_at_low_noise_and_far_at_high():
    # at t = 0 the noise is tiny (sigma ~ 0.03 in scaled units): the estimate is the latent, up to the model's error;
    # at t = 999 (zero terminal SNR: no signal left) it is the model's idea of the caption, not this image
    assert _estimate_error(0) < 0.15
    assert _estimate_error(999) > 0.4


def test_denoise_options_are_checked(tmp_path):
    import pytest

    from sdstack.errors import UserError
    from sdstack.train.config import validate

    base = tiny_ae_config(tmp_path / "x")
    ok = replace(base.loss, train_encoder=False, denoise_model=str(_builtin()), denoise_share=0.5)
    validate(replace(base, loss=ok))
    for loss, words in [(replace(ok, denoise_model=""), "needs loss.denoise_model"),
                        (replace(ok, train_encoder=True), "train_encoder = false"),
                        (replace(ok, denoise_t=(50, 10)), "loss.denoise_t"),
                        (replace(ok, denoise_share=1.5), "from 0 to 1"),
                        (replace(ok, denoise_model=str(tmp_path)), "no model folder")]:
        with pytest.raises(UserError, match=words):
            validate(replace(base, loss=loss))


def test_decoder_stage_on_model_estimates_trains_the_decoder_only(tmp_path):
    base = tiny_ae_config(tmp_path / "dec", max_steps=2, checkpoint_every=0)
    vae_dir = _builtin() / "vae"
    cfg = replace(base, init_from=str(vae_dir), data=replace(base.data, resolution=64),
                  model=replace(base.model, block_out_channels=(32, 64, 128), norm_num_groups=32),
                  loss=replace(base.loss, train_encoder=False, denoise_model=str(_builtin()), denoise_share=1.0))
    train_autoencoder(cfg)
    enc_before, scale_before = _weights(vae_dir, "encoder.")
    enc_after, scale = _weights(tmp_path / "dec" / "vae", "encoder.")
    dec_before, _ = _weights(vae_dir, "decoder.")
    dec_after, _ = _weights(tmp_path / "dec" / "vae", "decoder.")
    assert scale == scale_before
    assert all(torch.equal(enc_before[k].float(), enc_after[k]) for k in enc_before)
    assert any(not torch.equal(dec_before[k].float(), dec_after[k]) for k in dec_before)

"""Tiny configs for the trainer tests: 32 px, a few steps, networks of a few thousand parameters."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each trainer builds an Accelerator; accelerate keeps its state process-wide, so reset it around tests."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def tiny_ae_config(out, **run):
    from sdstack.train.config import AutoencoderConfig, AutoencoderModelConfig, DataConfig, RunConfig

    run = dict(dict(out=str(out), max_steps=4, batch_size=2, checkpoint_every=2, sample_every=0, log_every=0,
                    threads=1, mixed_precision="no", progress=False), **run)
    return AutoencoderConfig(run=RunConfig(**run), data=DataConfig(resolution=32),
                             model=AutoencoderModelConfig(block_out_channels=(8, 16), norm_num_groups=8))


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A random-weight VAE folder (factor 2) for text2image tests."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        mid_block_add_attention=False)
    out = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(out)
    return out


def tiny_t2i_config(out, vae, **run):
    from sdstack.train.config import (DataConfig, EMAConfig, RunConfig, SampleConfig, Text2ImageConfig,
                                      TextEncoderConfig, UNetConfig)

    run = dict(dict(out=str(out), max_steps=4, batch_size=2, checkpoint_every=2, sample_every=0, log_every=0,
                    threads=1, mixed_precision="no", progress=False), **run)
    unet = UNetConfig(block_out_channels=(16, 32), cross_attention_dim=32, norm_num_groups=8,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    te = TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return Text2ImageConfig(run=RunConfig(**run), data=DataConfig(resolution=32), unet=unet, text_encoder=te,
                            ema=EMAConfig(decay=0.9), sample=SampleConfig(prompts=("a red circle",), seeds=(1,),
                                                                          steps=3),
                            vae=str(vae))


def cli(*args):
    """Run `sdstack ARGS` in-process; its exit code (0 when it returns)."""
    from sdstack.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0

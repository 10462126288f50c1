"""Single-file checkpoints: sdstack's own files round-trip exactly; real layouts get the shipped configs."""

from __future__ import annotations

import json

import pytest
import torch

from sdstack.errors import CheckpointKeyError, UnsafeCheckpointError, UserError
from sdstack.models.configs import load_config, load_configs
from sdstack.models.io import read_state_dict
from sdstack.models.single_file import (
    METADATA_KEY, expected_ldm_shapes, load_single_file, read_single_file_components,
    write_single_file,
)
from sdstack.models.tiny import tiny_bundle


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def unet_out(bundle, x, ctx):
    kw = {}
    if bundle.family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.ones(1, 32), "time_ids": torch.ones(1, 6)}
    return bundle.unet(x, 500, ctx, **kw).sample


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_write_then_load_is_exact(tmp_path, family):
    pred = "v_prediction" if family == "sd2" else "epsilon"
    b = tiny_bundle(family, prediction_type=pred)
    path = write_single_file(b, tmp_path / f"{family}.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    b2 = load_single_file(path)
    assert (b2.family, b2.prediction_type, b2.name) == (family, pred, family)
    assert b2.schedule == dict(b.schedule, prediction_type=pred)
    for m1, m2 in [(b.unet, b2.unet), (b.vae, b2.vae), *zip(b.text_encoders, b2.text_encoders)]:
        assert type(m1) is type(m2) and same_weights(m1, m2)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, b.unet.config.cross_attention_dim, generator=g)
    assert torch.equal(unet_out(b, x, ctx), unet_out(b2, x, ctx))
    ids = torch.tensor([b.tokenizers[-1]("a red star")])
    assert torch.equal(b.text_encoders[-1](ids).last_hidden_state, b2.text_encoders[-1](ids).last_hidden_state)
    assert [t.pad_token_id for t in b2.tokenizers] == [t.pad_token_id for t in b.tokenizers]


def test_file_has_ldm_keys_and_configs_in_metadata(tmp_path):
    b = tiny_bundle("sdxl")
    sd, meta = read_state_dict(write_single_file(b, tmp_path / "m.safetensors"))
    assert "model.diffusion_model.label_emb.0.0.weight" in sd
    assert "conditioner.embedders.1.model.text_projection" in sd
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sd
    cfg = json.loads(meta[METADATA_KEY])
    assert cfg["family"] == "sdxl" and cfg["unet"]["transformer_layers_per_block"] == [1, 1, 2]
    assert len(cfg["text_encoders"]) == 2 and cfg["scheduler"]["prediction_type"] == "epsilon"


def test_overwrite_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    path = write_single_file(tiny_bundle("sd1"), tmp_path / "m.safetensors")
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        write_single_file(tiny_bundle("sd1", seed=1), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_real_layout_uses_shipped_configs(family):
    sd = {k: torch.empty(v, device="meta") for k, v in expected_ldm_shapes(family).items()}
    sd["alphas_cumprod"] = torch.empty(1000, device="meta")
    detected, configs, comps = read_single_file_components(sd, {"format": "pt"})
    assert (detected.family, detected.variant) == (family, "base")
    assert configs == load_configs(family)
    assert len(comps["text_encoders"]) == (2 if family == "sdxl" else 1)
    assert comps["unet"]["conv_in.weight"].shape == (320, 4, 3, 3)


def test_shipped_configs_have_the_real_values():
    assert load_config("sd1", "unet")["cross_attention_dim"] == 768
    assert load_config("sd2", "unet")["attention_head_dim"] == [5, 10, 20, 20]
    assert load_config("sd2", "text_encoder")["num_hidden_layers"] == 23
    assert load_config("sdxl", "unet")["transformer_layers_per_block"] == [1, 2, 10]
    assert load_config("sdxl", "vae")["scaling_factor"] == 0.13025
    assert load_config("sdxl", "text_encoder_2")["projection_dim"] == 1280
    assert load_config("sd2", "vae") == load_config("sd1", "vae")
    for family, pred in (("sd1", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon")):
        s = load_config(family, "scheduler")
        assert (s["beta_schedule"], s["beta_start"], s["beta_end"], s["num_train_timesteps"], s["steps_offset"]) == (
            "scaled_linear", 0.00085, 0.012, 1000, 1)
        assert s["prediction_type"] == pred
    with pytest.raises(ValueError, match="no shipped config"):
        load_config("sd1", "text_encoder_2")


def test_wrong_shape_is_named(tmp_path):
    sd, meta = read_state_dict(write_single_file(tiny_bundle("sd1"), tmp_path / "m.safetensors"))
    sd["model.diffusion_model.out.2.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointKeyError, match=r"unet: tensor shapes .*conv_out.bias is \[5\], expected \[4\]"):
        read_single_file_components(sd, meta)


def test_metadata_must_agree_with_keys(tmp_path):
    sd, meta = read_state_dict(write_single_file(tiny_bundle("sd1"), tmp_path / "m.safetensors"))
    cfg = json.loads(meta[METADATA_KEY])
    with pytest.raises(CheckpointKeyError, match="says it is 'sd2'"):
        read_single_file_components(sd, {METADATA_KEY: json.dumps(dict(cfg, family="sd2"))})
    with pytest.raises(CheckpointKeyError, match="not valid JSON"):
        read_single_file_components(sd, {METADATA_KEY: "{oops"})
    cfg["unet"]["block_out_channels"] = [16, 16, 64]
    with pytest.raises(CheckpointKeyError, match="tensor shapes"):
        read_single_file_components(sd, {METADATA_KEY: json.dumps(cfg)})


def test_unsupported_and_partial_files_are_refused():
    shapes = expected_ldm_shapes("sd1")
    sd = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(320, 9, 3, 3, device="meta")
    with pytest.raises(UserError, match="inpainting"):
        read_single_file_components(sd)
    vae_only = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    with pytest.raises(UserError, match="VAE on its own"):
        read_single_file_components(vae_only)


def test_yaml_next_to_file_sets_prediction_type(tmp_path):
    path = write_single_file(tiny_bundle("sd1"), tmp_path / "m.safetensors")
    (tmp_path / "m.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert load_single_file(path).prediction_type == "v_prediction"


def test_ckpt_is_loaded_weights_only_and_unsafe_pickles_are_refused(tmp_path):
    sd, _ = read_state_dict(write_single_file(tiny_bundle("sd1"), tmp_path / "m.safetensors"))
    torch.save({"state_dict": sd, "global_step": 10}, tmp_path / "m.ckpt")
    got, meta = read_state_dict(tmp_path / "m.ckpt")
    assert meta == {} and got.keys() == sd.keys()
    torch.save({"state_dict": sd, "evil": UserError("x")}, tmp_path / "bad.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        read_state_dict(tmp_path / "bad.ckpt")
    with pytest.raises(UserError, match="not found"):
        read_state_dict(tmp_path / "missing.safetensors")

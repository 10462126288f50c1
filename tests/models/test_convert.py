"""LDM <-> diffusers key maps: exact round trips, agreement with diffusers' own converter, strict errors."""

from __future__ import annotations

import functools

import pytest
import torch

from sdstack.errors import CheckpointKeyError
from sdstack.models.configs import load_configs
from sdstack.models.convert import clip, diffusers_to_ldm, keymaps, ldm_to_diffusers, load_into, vae_to_diffusers
from sdstack.models.convert.unet import unet_keymap
from sdstack.models.convert.vae import vae_keymap
from sdstack.models.single_file import instantiate

FAMILIES = ("sd1", "sd2", "sdxl")


@functools.lru_cache(maxsize=None)
def tiny(family: str):
    """(bundle, configs, diffusers component state dicts, LDM flat state dict) of a tiny model."""
    from sdstack.models.tiny import tiny_bundle

    b = tiny_bundle(family)
    configs = {"unet": dict(b.unet.config), "vae": dict(b.vae.config),
               "text_encoders": [e.config.to_dict() for e in b.text_encoders]}
    comps = {"unet": b.unet.state_dict(), "vae": b.vae.state_dict(),
             "text_encoders": [e.state_dict() for e in b.text_encoders]}
    return b, configs, comps, diffusers_to_ldm(comps, family, configs)


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: key sets differ: {sorted(set(a) ^ set(b))[:5]}"
    bad = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: tensors differ: {bad[:5]}"


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_exact(family):
    _, configs, comps, ldm = tiny(family)
    back = ldm_to_diffusers(ldm, family, configs)
    assert_same(back["unet"], comps["unet"], "unet")
    assert_same(back["vae"], comps["vae"], "vae")
    assert len(back["text_encoders"]) == len(comps["text_encoders"])
    for i, (got, want) in enumerate(zip(back["text_encoders"], comps["text_encoders"])):
        assert_same(got, clip.to_canonical(want), f"text_encoders[{i}]")
    again = diffusers_to_ldm(back, family, configs)
    assert_same(again, ldm, "ldm")


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_diffusers_single_file_conversion(family):
    """diffusers' own LDM->diffusers functions on the same LDM dict give the same keys and tensors."""
    from diffusers.loaders import single_file_utils as ref

    b, configs, comps, ldm = tiny(family)
    ours = ldm_to_diffusers(ldm, family, configs)
    assert_same(ref.convert_ldm_unet_checkpoint(ldm, dict(b.unet.config)), ours["unet"], "unet")
    assert_same(ref.convert_ldm_vae_checkpoint(ldm, dict(b.vae.config)), ours["vae"], "vae")
    if family == "sd2":
        theirs = [ref.convert_open_clip_checkpoint(b.text_encoders[0], ldm)]
    else:
        theirs = [ref.convert_ldm_clip_checkpoint(ldm)]
    if family == "sdxl":
        prefix = "conditioner.embedders.1.model."
        theirs.append(ref.convert_open_clip_checkpoint(b.text_encoders[1], ldm, prefix=prefix))
    for i, (t, o) in enumerate(zip(theirs, ours["text_encoders"])):
        assert_same(t, o, f"text_encoders[{i}]")
    # and diffusers reading our LDM names gets back the original weights: our LDM naming is right
    assert_same(ref.convert_ldm_unet_checkpoint(ldm, dict(b.unet.config)), comps["unet"], "unet vs original")


def full_size_ldm(family: str) -> tuple[dict, dict]:
    """Full-size shipped architecture, as LDM keys with meta tensors (shapes only, no memory)."""
    configs = load_configs(family)
    unet, vae, encoders = instantiate(family, configs, empty=True)
    comps = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoders": [e.state_dict() for e in encoders]}
    return configs, diffusers_to_ldm(comps, family, configs)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_key_sets_match_diffusers_conversion(family):
    from diffusers.loaders import single_file_utils as ref

    configs, ldm = full_size_ldm(family)
    ours = ldm_to_diffusers(ldm, family, configs)
    for name, theirs in (("unet", ref.convert_ldm_unet_checkpoint(ldm, configs["unet"])),
                         ("vae", ref.convert_ldm_vae_checkpoint(ldm, configs["vae"]))):
        assert theirs.keys() == ours[name].keys(), name
        assert all(theirs[k].shape == ours[name][k].shape for k in theirs), name


def sd15_unet_tensor_count() -> int:
    """v1-5 UNet tensors in LDM layout, counted from the architecture (openaimodel.UNetModel, SD1 config):
    ResBlock = in_layers.0/2, emb_layers.1, out_layers.0/3 (w+b each) = 10, +2 with skip_connection;
    SpatialTransformer = norm, proj_in, proj_out (6) + block: attn1/attn2 q,k,v (no bias) + out (w+b) = 10,
    norm1-3 = 6, ff.net.0.proj + ff.net.2 = 4 -> 26; Downsample/Upsample conv = 2; time_embed + out = 8."""
    res, res_skip, attn, resample = 10, 12, 26, 2
    down = (2 * res + 2 * attn + resample) + 2 * (res_skip + res + 2 * attn + resample) + 2 * res
    middle = res + attn + res
    up = 12 * res_skip + 9 * attn + 3 * resample
    return 2 + down + middle + up + 8


def test_sd15_full_size_unet_maps_all_686_tensors():
    configs = load_configs("sd1")
    km = unet_keymap(configs["unet"])
    unet, _, _ = instantiate("sd1", configs, empty=True)
    assert sorted(km.diffusers_keys) == sorted(unet.state_dict())
    assert len(km.ldm_keys) == len(set(km.ldm_keys)) == sd15_unet_tensor_count() == 686
    known = {"output_blocks.11.0.skip_connection.weight", "input_blocks.11.0.in_layers.2.weight",
             "input_blocks.9.0.op.weight", "output_blocks.8.2.conv.weight", "output_blocks.2.1.conv.bias",
             "middle_block.1.proj_in.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"}
    assert known <= set(km.ldm_keys)


def test_sdxl_full_size_keys():
    configs, ldm = full_size_ldm("sdxl")
    unet_keys = [k for k in ldm if k.startswith("model.diffusion_model.")]
    assert len(unet_keys) == 1680
    for k in ("label_emb.0.0.weight", "input_blocks.3.0.op.weight",
              "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
              "middle_block.1.transformer_blocks.9.ff.net.2.bias", "output_blocks.2.2.conv.weight",
              "output_blocks.5.2.conv.weight", "output_blocks.8.0.skip_connection.weight"):
        assert "model.diffusion_model." + k in ldm, k
    assert ldm["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    assert ldm["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert ldm["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in ldm


def test_sd2_last_openclip_layer_and_projection_are_dropped_like_diffusers():
    from diffusers.loaders import single_file_utils as ref

    configs, ldm = full_size_ldm("sd2")
    assert not any(".resblocks.23." in k for k in ldm) and "cond_stage_model.model.text_projection" not in ldm
    real = dict(ldm)  # a real v2-1 file also has the 24th resblock, text_projection and logit_scale
    for k in ("attn.in_proj_weight", "attn.in_proj_bias", "ln_1.weight", "mlp.c_fc.weight", "mlp.c_proj.bias"):
        real[f"cond_stage_model.model.transformer.resblocks.23.{k}"] = torch.empty(1, device="meta")
    real["cond_stage_model.model.text_projection"] = torch.empty(1024, 1024, device="meta")
    real["cond_stage_model.model.logit_scale"] = torch.empty((), device="meta")
    ours = ldm_to_diffusers(real, "sd2", configs)["text_encoders"][0]
    _, _, (enc,) = instantiate("sd2", configs, empty=True)
    theirs = ref.convert_open_clip_checkpoint(enc, real)
    assert ours.keys() == theirs.keys() == clip.to_canonical(enc.state_dict()).keys()


def test_known_non_weight_keys_are_ignored():
    _, configs, _, ldm = tiny("sd1")
    extra = dict(ldm)
    for k in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "log_one_minus_alphas_cumprod", "posterior_mean_coef2",
              "model_ema.decay", "model_ema.num_updates", "model_ema.diffusion_modelout0weight",
              "cond_stage_model.transformer.text_model.embeddings.position_ids", "first_stage_model.loss.logvar"):
        extra[k] = torch.zeros(1)
    a, b = ldm_to_diffusers(extra, "sd1", configs), ldm_to_diffusers(ldm, "sd1", configs)
    assert_same(a["unet"], b["unet"], "unet")
    assert_same(a["text_encoders"][0], b["text_encoders"][0], "te")


def test_old_sd1_text_encoder_layout_is_accepted():
    _, configs, _, ldm = tiny("sd1")
    new, legacy = "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."
    old = {k.replace(new, legacy): v for k, v in ldm.items()}
    assert_same(ldm_to_diffusers(old, "sd1", configs)["text_encoders"][0],
                ldm_to_diffusers(ldm, "sd1", configs)["text_encoders"][0], "te")


def test_missing_keys_are_named():
    _, configs, _, ldm = tiny("sd1")
    broken = dict(ldm)
    del broken["model.diffusion_model.out.2.bias"], broken["model.diffusion_model.input_blocks.1.1.proj_in.weight"]
    with pytest.raises(CheckpointKeyError) as e:
        ldm_to_diffusers(broken, "sd1", configs)
    msg = str(e.value)
    assert "unet" in msg and "2 missing" in msg and "out.2.bias" in msg and "input_blocks.1.1.proj_in.weight" in msg


def test_unexpected_keys_are_named_with_count():
    _, configs, _, ldm = tiny("sdxl")
    extra = dict(ldm, **{f"model.diffusion_model.bogus.{i}.weight": torch.zeros(1) for i in range(7)})
    with pytest.raises(CheckpointKeyError, match=r"7 unexpected key\(s\): bogus.0.weight.*\(7 in all\)"):
        ldm_to_diffusers(extra, "sdxl", configs)
    with pytest.raises(CheckpointKeyError, match="checkpoint: .*unexpected.*lora_unet_foo"):
        ldm_to_diffusers(dict(ldm, lora_unet_foo=torch.zeros(1)), "sdxl", configs)


def test_wrong_family_fails_loudly():
    _, configs, _, ldm = tiny("sd1")
    with pytest.raises(CheckpointKeyError, match="52 unexpected key.*cond_stage_model.transformer.text_model"):
        ldm_to_diffusers(ldm, "sd2", dict(configs, text_encoders=tiny("sd2")[1]["text_encoders"]))


def test_diffusers_to_ldm_is_strict():
    _, configs, comps, _ = tiny("sd2")
    vae = dict(comps["vae"])
    vae.pop("decoder.mid_block.attentions.0.to_q.weight")
    with pytest.raises(CheckpointKeyError, match="vae.*decoder.mid_block.attentions.0.to_q.weight"):
        diffusers_to_ldm(dict(comps, vae=vae), "sd2", configs)
    with pytest.raises(CheckpointKeyError, match="1 text encoder"):
        diffusers_to_ldm(dict(comps, text_encoders=[]), "sd2", configs)


def test_vae_attention_reshapes_both_ways():
    _, configs, comps, ldm = tiny("sd1")
    q = ldm["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert q.shape[2:] == (1, 1)
    assert torch.equal(q[:, :, 0, 0], comps["vae"]["encoder.mid_block.attentions.0.to_q.weight"])
    standalone = {k[len("first_stage_model."):]: v for k, v in ldm.items() if k.startswith("first_stage_model.")}
    standalone["loss.discriminator.main.0.weight"] = torch.zeros(1)
    assert_same(vae_to_diffusers(standalone, configs["vae"]), comps["vae"], "standalone vae")
    prefixed = {k: v for k, v in ldm.items() if k.startswith("first_stage_model.")}
    assert_same(vae_to_diffusers(prefixed, configs["vae"]), comps["vae"], "prefixed vae")
    del prefixed["first_stage_model.encoder.conv_in.bias"]
    with pytest.raises(CheckpointKeyError, match="encoder.conv_in.bias"):
        vae_to_diffusers(prefixed, configs["vae"])


def test_text_projection_is_transposed():
    b, _, _, ldm = tiny("sdxl")
    w = b.text_encoders[1].text_projection.weight
    assert torch.equal(ldm["conditioner.embedders.1.model.text_projection"], w.T)


def test_keymaps_have_no_duplicates():
    for family in FAMILIES:
        for label, _, km in keymaps(family, load_configs(family)):
            assert len(set(km.ldm_keys)) == len(km.ldm_keys), label
            assert len(set(km.diffusers_keys)) == len(km.diffusers_keys), label


def test_unsupported_unet_config_is_refused():
    cfg = dict(load_configs("sd1")["unet"], class_embed_type="timestep")
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_keymap(cfg)
    with pytest.raises(ValueError, match="block type"):
        vae_keymap(dict(load_configs("sd1")["vae"], down_block_types=["Foo"] * 4))


def test_load_into_adapts_text_encoder_names_and_is_strict():
    b, configs, _, ldm = tiny("sd1")
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = ldm_to_diffusers(ldm, "sd1", configs)["text_encoders"][0]
    enc = CLIPTextModel(CLIPTextConfig(**b.text_encoders[0].config.to_dict()))
    load_into(enc, sd)
    assert_same(clip.to_canonical(enc.state_dict()), sd, "loaded")
    sd.pop("text_model.final_layer_norm.bias")
    with pytest.raises(CheckpointKeyError, match="final_layer_norm.bias"):
        load_into(enc, sd, "text_encoder")

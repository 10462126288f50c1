"""kohya-format LoRA writing: key names, ss_* metadata and hashes, and the same result in stock diffusers
(`load_lora_weights`), in sdstack's `<lora:name:w>` and in the peft model the weights came from."""

from __future__ import annotations

import copy
import dataclasses
import hashlib

import pytest
import torch
from safetensors import safe_open

from sdstack.engine.networks import prepare_extra_networks
from sdstack.errors import UserError
from sdstack.models.lora import apply_loras, read_lora
from sdstack.models.lora_save import (addnet_hashes, base_model_version, kohya_state_dict, kohya_training_metadata,
                                      peft_lora_modules, read_modules, save_kohya_lora)
from sdstack.models.tiny import tiny_bundle

RANK, ALPHA = 4, 2.0
TOL = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sd1():
    return tiny_bundle("sd1", seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_bundle("sdxl", seed=0)


def _modules(bundle, seed=1) -> dict:
    """Random rank-RANK updates for the kohya LierLa targets: UNet attention Linear / 1x1 conv, TE attn + MLP,
    keyed as the bundle names its modules (transformers 5: no `text_model.` in CLIPTextModel)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    comps = [("unet", bundle.unet)] + [(("text_encoder", "text_encoder_2")[i], te)
                                       for i, te in enumerate(bundle.text_encoders)]
    for comp, net in comps:
        for name, m in net.named_modules():
            ok = "attentions" in name if comp == "unet" else ".layers." in name
            if ok and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                w = m.weight
                down = torch.randn(RANK, *w.shape[1:], generator=g) * 0.3
                up = torch.randn(w.shape[0], RANK, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.3
                out[(comp, name)] = (down, up, ALPHA)
    return out


def _inputs(bundle, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, bundle.unet.config.cross_attention_dim, generator=g)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    extra = {}
    if bundle.family == "sdxl":
        extra = dict(added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g),
                                        "time_ids": torch.randn(2, 6, generator=g)})
    return x, ctx, ids, extra


@torch.no_grad()
def _outputs(unet, encoders, inputs):
    x, ctx, ids, extra = inputs
    return [unet(x, torch.tensor([10, 500]), ctx, **extra).sample] + [te(ids)[0] for te in encoders]


def _diffusers(bundle, path, scale=None):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = dict(vae=bundle.vae, unet=copy.deepcopy(bundle.unet), scheduler=EulerDiscreteScheduler(),
                 text_encoder=copy.deepcopy(bundle.text_encoders[0]), tokenizer=None)
    if bundle.family == "sdxl":
        pipe = StableDiffusionXLPipeline(text_encoder_2=copy.deepcopy(bundle.text_encoders[1]), tokenizer_2=None,
                                         **parts)
    else:
        pipe = StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                       **parts)
    pipe.load_lora_weights(str(path))
    if scale is not None:
        pipe.fuse_lora(lora_scale=scale)
    tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if bundle.family == "sdxl" else [])
    return pipe.unet, tes


def _close(ours, ref, base):
    for o, r, b in zip(ours, ref, base):
        assert not torch.allclose(r, b, atol=1e-3), "the LoRA must change the output for the test to mean anything"
        torch.testing.assert_close(o, r, **TOL)


def test_sd1_keys_shapes_and_metadata(sd1, tmp_path):
    mods = _modules(sd1)
    sd = kohya_state_dict(sd1, mods)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[f"{stem}.lora_down.weight"].shape == (RANK, 16) and sd[f"{stem}.lora_up.weight"].shape == (16, RANK)
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (RANK, 16, 1, 1)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert float(sd[f"{te}.alpha"]) == ALPHA and f"{te}.lora_up.weight" in sd
    assert "lora_te_text_model_encoder_layers_2_mlp_fc2.alpha" in sd
    assert len(sd) == 3 * len(mods) and all(k.startswith(("lora_unet_", "lora_te_")) for k in sd)
    meta = kohya_training_metadata(sd1, mods, output_name="my_style", training_started_at=1700000000.5,
                                   num_train_images=23, tag_frequency={"10_sks": {"sks": 3}})
    path = save_kohya_lora(tmp_path / "out" / "my_style.safetensors", sd1, mods, metadata=meta,
                           dtype=torch.float16)
    assert [p.name for p in path.parent.iterdir()] == ["my_style.safetensors"]  # no temp file left behind
    with safe_open(str(path), framework="pt") as f:
        m = f.metadata()
        assert f.get_tensor(f"{stem}.lora_up.weight").dtype == torch.float16
    assert m["ss_network_module"] == "networks.lora" and m["ss_network_dim"] == "4" and m["ss_network_alpha"] == "2.0"
    assert m["ss_base_model_version"] == "sd_v1" and m["ss_v2"] == "False" and m["ss_output_name"] == "my_style"
    assert m["ss_training_started_at"] == "1700000000.5" and m["ss_num_train_images"] == "23"
    assert m["ss_tag_frequency"] == '{"10_sks": {"sks": 3}}'
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert m["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest() == read_lora(path).addnet_hash
    assert m["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]  # a file under 1 MiB: nothing at 1 MiB
    assert (m["sshs_model_hash"], m["sshs_legacy_hash"]) == addnet_hashes(read_lora(path).tensors, m)
    assert read_lora(path).alias == "my_style"


def test_sd1_same_result_in_diffusers_and_prompt_syntax(sd1, tmp_path):
    mods = _modules(sd1)
    lora_dir = tmp_path / "Lora"
    path = save_kohya_lora(lora_dir / "file_name.safetensors", sd1, mods,
                           metadata=kohya_training_metadata(sd1, mods, output_name="styleA"))
    inputs = _inputs(sd1)
    base = _outputs(sd1.unet, sd1.text_encoders, inputs)
    for weight in (1.0, 0.5):
        ref = _outputs(*_diffusers(sd1, path, scale=weight), inputs)
        prompt, _, nets = prepare_extra_networks(f"a cat <lora:styleA:{weight}>", "", lora_dir)
        assert prompt.strip() == "a cat" and len(nets.loras) == 1
        with nets.applied(sd1):
            ours = _outputs(sd1.unet, sd1.text_encoders, inputs)
        _close(ours, ref, base)
    # and back: reading the file gives the modules that were written
    back = read_modules(sd1, read_lora(path).tensors)
    assert len(back) == len(mods)
    for (comp, name), (down, up, alpha) in mods.items():
        d, u, a = back[(comp, name)]
        assert torch.equal(d.reshape(down.shape), down) and torch.equal(u.reshape(up.shape), up) and a == alpha


def test_sdxl_ldm_names_and_diffusers(sdxl, tmp_path):
    mods = _modules(sdxl)
    sd = kohya_state_dict(sdxl, mods)
    # tiny SDXL: down_blocks.1.attentions.0 = input_blocks.4.1 (3*1+0+1), up_blocks.0.attentions.1 = output_blocks.1.1
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha" in sd
    assert "lora_unet_output_blocks_1_1_proj_out.alpha" in sd and "lora_unet_middle_block_1_proj_in.alpha" in sd
    assert not any(k.startswith("lora_unet_down_blocks") for k in sd)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_k_proj.alpha" in sd
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1.alpha" in sd
    meta = kohya_training_metadata(sdxl, mods, output_name="xl")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" == base_model_version(sdxl)
    path = save_kohya_lora(tmp_path / "xl.safetensors", sdxl, mods, metadata=meta)
    inputs = _inputs(sdxl)
    base = _outputs(sdxl.unet, sdxl.text_encoders, inputs)
    ref = _outputs(*_diffusers(sdxl, path), inputs)
    with apply_loras(sdxl, [(read_lora(path), 1.0, 1.0)]) as matches:
        assert not matches[0].unmatched and len(matches[0].modules) == len(mods)
        ours = _outputs(sdxl.unet, sdxl.text_encoders, inputs)
    _close(ours, ref, base)


@pytest.mark.parametrize("variant", ["plain", "rslora_pattern"])
def test_peft_adapter_saved_as_kohya_gives_the_peft_output(sd1, tmp_path, variant):
    from peft import LoraConfig, inject_adapter_in_model

    extra = {"use_rslora": True, "alpha_pattern": {"to_k": 3.0}} if variant == "rslora_pattern" else {}
    unet, te = copy.deepcopy(sd1.unet), copy.deepcopy(sd1.text_encoders[0])
    torch.manual_seed(0)  # init_lora_weights=False: B is random too (not zero), so the adapter changes outputs
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=8, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"], **extra), unet)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=1, init_lora_weights=False,
                                       target_modules=["q_proj", "v_proj", "fc1"]), te)
    mods = peft_lora_modules(unet, "unet") | peft_lora_modules(te, "text_encoder")
    assert ("unet", "down_blocks.0.attentions.0.proj_in") in mods
    assert ("text_encoder", "encoder.layers.0.self_attn.q_proj") in mods
    ranks = {int(d.shape[0]) for d, _, _ in mods.values()}
    assert ranks == {2, 4}
    if variant == "plain":
        assert {a for (c, _), (_, _, a) in mods.items() if c == "unet"} == {8.0}
    else:  # rsLoRA scale alpha / sqrt(r) = kohya alpha' / r  ->  alpha' = alpha * sqrt(r); to_k: 3 * 2
        k = next(a for (c, n), (_, _, a) in mods.items() if n.endswith("attn1.to_k"))
        assert k == pytest.approx(6.0) and mods[("unet", "down_blocks.0.attentions.0.proj_in")][2] == 16.0
    in_place = kohya_state_dict(dataclasses.replace(sd1, unet=unet, text_encoders=[te]), mods)  # trainer's case
    assert {k: v.shape for k, v in in_place.items()} == {k: v.shape for k, v in kohya_state_dict(sd1, mods).items()}
    meta = kohya_training_metadata(sd1, mods, output_name="peft")
    assert meta["ss_network_dim"] == "Dynamic"
    path = save_kohya_lora(tmp_path / "peft.safetensors", sd1, mods, metadata=meta)
    inputs = _inputs(sd1)
    base = _outputs(sd1.unet, sd1.text_encoders, inputs)
    ref = _outputs(unet, [te], inputs)
    with apply_loras(sd1, [(read_lora(path), 1.0, 1.0)]):
        ours = _outputs(sd1.unet, sd1.text_encoders, inputs)
    _close(ours, ref, base)


def test_mistakes(sd1, tmp_path):
    mods = _modules(sd1)
    (comp, name), (down, up, alpha) = next(iter(mods.items()))
    with pytest.raises(ValueError, match="do not fit"):
        kohya_state_dict(sd1, {(comp, name): (torch.zeros(RANK, down.shape[1] + 1), up, alpha)})
    with pytest.raises(ValueError, match="no module"):
        kohya_state_dict(sd1, {("unet", "down_blocks.9.nothing"): (down, up, alpha)})
    with pytest.raises(ValueError, match="component"):
        kohya_state_dict(sd1, {("text_encoder_2", name): (down, up, alpha)})
    with pytest.raises(UserError, match=".safetensors"):
        save_kohya_lora(tmp_path / "x.pt", sd1, mods)
    with pytest.raises(UserError, match="no peft LoRA layers"):
        peft_lora_modules(sd1.unet, "unet")
    from peft import LoraConfig, inject_adapter_in_model

    dora = inject_adapter_in_model(LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]),
                                   copy.deepcopy(sd1.text_encoders[0]))
    with pytest.raises(UserError, match="DoRA"):
        peft_lora_modules(dora, "text_encoder")


def test_bundled_embeddings_are_written_as_a1111_reads_them_and_read_back(tmp_path):
    """SD1/SD2: `bundle_emb.<name>.string_to_param.*` (A1111's Lora extension rebuilds {'string_to_param': {'*': v}});
    SDXL: `bundle_emb.<name>.clip_l` / `.clip_g`. sdstack reads both back as the same vectors."""
    from safetensors.torch import load_file, save_file

    from sdstack.models.lora_save import bundled_embedding_tensors

    g = torch.Generator().manual_seed(0)
    one = {"": torch.randn(2, 32, generator=g)}
    two = {"clip_l": torch.randn(1, 32, generator=g), "clip_g": torch.randn(1, 64, generator=g)}
    assert list(bundled_embedding_tensors("zwx", one)) == ["bundle_emb.zwx.string_to_param.*"]
    assert sorted(bundled_embedding_tensors("zwx", two)) == ["bundle_emb.zwx.clip_g", "bundle_emb.zwx.clip_l"]
    with pytest.raises(ValueError):
        bundled_embedding_tensors("z.wx", one)
    for vectors in (one, two):
        path = tmp_path / "x.safetensors"
        save_file({"lora_unet_a.alpha": torch.tensor(1.0), **bundled_embedding_tensors("zwx", vectors)}, path)
        emb = read_lora(path).bundled_embeddings["zwx"]
        assert emb.vectors.keys() == vectors.keys()
        for k in vectors:
            torch.testing.assert_close(emb.vectors[k], vectors[k], rtol=0, atol=0)
        assert set(load_file(path)) - {"lora_unet_a.alpha"} == set(bundled_embedding_tensors("zwx", vectors))

"""LoRA reading and merging, checked against stock diffusers' `load_lora_weights` on the same tiny models."""

from __future__ import annotations

import copy
import hashlib
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from sdstack.errors import UnsafeCheckpointError, UserError
from sdstack.models.lora import LoraLibrary, apply_loras, ldm_unet_module_names, match_lora, read_lora
from sdstack.models.tiny import tiny_bundle

RANK, ALPHA = 4, 2.0
TOL = dict(atol=2e-5, rtol=1e-4)  # float32; diffusers adds B(A(x)) in forward, we merge into W


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny ops: one intra-op thread is ~10x faster than two on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sd1():
    return tiny_bundle("sd1", seed=0)


def _lora_targets(bundle, convs: bool = True) -> list[tuple[str, str, torch.nn.Module]]:
    """(component, module path, module): UNet attention Linear/1x1 convs (+ one 3x3 resnet conv), TE layers."""
    out = []
    for name, m in bundle.unet.named_modules():
        is_layer = isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
        if is_layer and ("attentions" in name or (convs and name.endswith("resnets.0.conv1"))):
            out.append(("unet", name, m))
    for i, te in enumerate(bundle.text_encoders):
        comp = "text_encoder" if i == 0 else "text_encoder_2"
        for n, m in te.named_modules():  # files spell CLIP layers `text_model.encoder.layers...`
            if isinstance(m, torch.nn.Linear) and ".layers." in n:
                out.append((comp, n if n.startswith("text_model.") else "text_model." + n, m))
    return out


def _random_deltas(bundle, seed: int = 1, convs: bool = True) -> dict:
    """{(component, module path): (down, up)}, rank RANK, for every `_lora_targets` layer."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for comp, name, m in _lora_targets(bundle, convs):
        w = m.weight
        if w.dim() == 4:
            down = torch.randn(RANK, w.shape[1], w.shape[2], w.shape[3], generator=g) * 0.3
            up = torch.randn(w.shape[0], RANK, 1, 1, generator=g) * 0.3
        else:
            down = torch.randn(RANK, w.shape[1], generator=g) * 0.3
            up = torch.randn(w.shape[0], RANK, generator=g) * 0.3
        deltas[(comp, name)] = (down, up)
    return deltas


KOHYA_TE = {"text_encoder": "lora_te", "text_encoder_2": "lora_te2"}


def _kohya(deltas, te_prefixes=KOHYA_TE, unet_names=None) -> dict[str, torch.Tensor]:
    sd = {}
    for (comp, name), (down, up) in deltas.items():
        flat = (unet_names or {}).get(name, name) if comp == "unet" else name
        key = ("lora_unet" if comp == "unet" else te_prefixes[comp]) + "_" + flat.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        sd[f"{key}.alpha"] = torch.tensor(ALPHA)
    return sd


def _peft(deltas, fold_scale: bool = True) -> dict[str, torch.Tensor]:
    """PEFT keys; alpha folded into B (what diffusers' training scripts save: lora_alpha = rank)."""
    k = ALPHA / RANK if fold_scale else 1.0
    sd = {}
    for (comp, name), (down, up) in deltas.items():
        sd[f"{comp}.{name}.lora_A.weight"], sd[f"{comp}.{name}.lora_B.weight"] = down, up * k
    return sd


def _save(sd, path, metadata=None):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def _diffusers_pipe(bundle, lora_path):
    """Stock diffusers pipeline on deep copies of the same tiny components, with the LoRA loaded by diffusers."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = dict(vae=bundle.vae, unet=copy.deepcopy(bundle.unet), scheduler=EulerDiscreteScheduler(),
                 text_encoder=copy.deepcopy(bundle.text_encoders[0]), tokenizer=None)
    if bundle.family == "sdxl":
        pipe = StableDiffusionXLPipeline(text_encoder_2=copy.deepcopy(bundle.text_encoders[1]), tokenizer_2=None,
                                         **parts)
    else:
        pipe = StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                       **parts)
    pipe.load_lora_weights(str(lora_path))
    return pipe


def _inputs(bundle, seed=3):
    g = torch.Generator().manual_seed(seed)
    width = bundle.unet.config.cross_attention_dim
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, width, generator=g)
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


def _pipe_outputs(pipe, inputs):
    tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])
    return _outputs(pipe.unet, tes, inputs)


def _assert_close_all(ours, ref, base):
    for o, r, b in zip(ours, ref, base):
        assert not torch.allclose(r, b, atol=1e-3), "the LoRA must change the output for this test to mean anything"
        torch.testing.assert_close(o, r, **TOL)


# ------------------------------------------------------------------------------------------ matches diffusers


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_sd1_lora_matches_diffusers(sd1, tmp_path, fmt):
    deltas = _random_deltas(sd1)
    sd = _kohya(deltas) if fmt == "kohya" else _peft(deltas)
    path = _save(sd, tmp_path / f"style_{fmt}.safetensors")
    inputs = _inputs(sd1)
    base = _outputs(sd1.unet, sd1.text_encoders, inputs)
    ref = _pipe_outputs(_diffusers_pipe(sd1, path), inputs)
    lora = read_lora(path)
    with apply_loras(sd1, [(lora, 1.0, 1.0)]) as matches:
        assert len(matches[0].modules) == len(deltas) and not matches[0].unmatched
        ours = _outputs(sd1.unet, sd1.text_encoders, inputs)
    _assert_close_all(ours, ref, base)


def test_peft_alpha_from_adapter_metadata(sd1, tmp_path):
    """diffusers files with lora_alpha != r carry it in the `lora_adapter_metadata` header."""
    deltas = _random_deltas(sd1, convs=False)
    cfg = {f"{c}.{k}": v for c in ("unet", "text_encoder") for k, v in (("r", RANK), ("lora_alpha", ALPHA))}
    for comp in ("unet", "text_encoder"):  # PEFT LoraConfig fields, as diffusers' save_lora_weights writes them
        cfg[f"{comp}.target_modules"] = sorted(n.removeprefix("text_model.") for c, n in deltas if c == comp)
    path = _save(_peft(deltas, fold_scale=False), tmp_path / "meta.safetensors",
                 {"lora_adapter_metadata": json.dumps(cfg)})
    inputs = _inputs(sd1)
    base = _outputs(sd1.unet, sd1.text_encoders, inputs)
    ref = _pipe_outputs(_diffusers_pipe(sd1, path), inputs)
    with apply_loras(sd1, [(read_lora(path), 1.0, 1.0)]) as matches:
        assert {m.scale for m in matches[0].modules} == {ALPHA / RANK}
        ours = _outputs(sd1.unet, sd1.text_encoders, inputs)
    _assert_close_all(ours, ref, base)


def test_weight_half_matches_diffusers_fuse(sd1, tmp_path):
    path = _save(_kohya(_random_deltas(sd1)), tmp_path / "half.safetensors")
    inputs = _inputs(sd1)
    base = _outputs(sd1.unet, sd1.text_encoders, inputs)
    pipe = _diffusers_pipe(sd1, path)
    pipe.fuse_lora(lora_scale=0.5)
    ref = _pipe_outputs(pipe, inputs)
    with apply_loras(sd1, [(read_lora(path), 0.5, 0.5)]):
        ours = _outputs(sd1.unet, sd1.text_encoders, inputs)
    with apply_loras(sd1, [(read_lora(path), 1.0, 1.0)]):
        full = _outputs(sd1.unet, sd1.text_encoders, inputs)
    _assert_close_all(ours, ref, base)
    assert not torch.allclose(ours[0], full[0], atol=1e-3)


def test_te_and_unet_weights_are_separate(sd1, tmp_path):
    path = _save(_kohya(_random_deltas(sd1)), tmp_path / "sep.safetensors")
    inputs = _inputs(sd1)
    base = _outputs(sd1.unet, sd1.text_encoders, inputs)
    ref = _pipe_outputs(_diffusers_pipe(sd1, path), inputs)
    with apply_loras(sd1, [(read_lora(path), 0.0, 1.0)]):
        unet_only = _outputs(sd1.unet, sd1.text_encoders, inputs)
    with apply_loras(sd1, [(read_lora(path), 1.0, 0.0)]):
        te_only = _outputs(sd1.unet, sd1.text_encoders, inputs)
    assert torch.equal(unet_only[1], base[1]) and torch.equal(te_only[0], base[0])
    torch.testing.assert_close(unet_only[0], ref[0], **TOL)
    torch.testing.assert_close(te_only[1], ref[1], **TOL)


# ------------------------------------------------------------------------------------------ restore, stacking


def _snapshot(bundle):
    return {f"{i}.{k}": v.clone() for i, net in enumerate([bundle.unet, *bundle.text_encoders])
            for k, v in net.state_dict().items()}


def test_restore_is_bit_exact_even_after_an_error(sd1, tmp_path):
    lora = read_lora(_save(_kohya(_random_deltas(sd1)), tmp_path / "r.safetensors"))
    other = read_lora(_save(_peft(_random_deltas(sd1, seed=9)), tmp_path / "o.safetensors"))
    before = _snapshot(sd1)
    with apply_loras(sd1, [(lora, 0.7, 1.3), (other, -0.4, 0.9)]):
        changed = _snapshot(sd1)
    after = _snapshot(sd1)
    assert any(not torch.equal(before[k], changed[k]) for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_loras(sd1, [(lora, 1.0, 1.0)]):
            raise RuntimeError("boom")
    after = _snapshot(sd1)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_two_loras_stack(sd1, tmp_path):
    """Two LoRAs on the same layers add up: same as one file holding both updates (diffusers as reference)."""
    d1, d2 = _random_deltas(sd1, seed=1, convs=False), _random_deltas(sd1, seed=2, convs=False)
    both = {k: (torch.cat([d1[k][0], d2[k][0]]), torch.cat([d1[k][1], d2[k][1]], dim=1)) for k in d1}
    p1, p2 = _save(_peft(d1), tmp_path / "a.safetensors"), _save(_peft(d2), tmp_path / "b.safetensors")
    combined = _save(_peft(both), tmp_path / "ab.safetensors")
    inputs = _inputs(sd1)
    ref = _pipe_outputs(_diffusers_pipe(sd1, combined), inputs)
    with apply_loras(sd1, [(read_lora(p1), 1.0, 1.0), (read_lora(p2), 1.0, 1.0)]):
        ours = _outputs(sd1.unet, sd1.text_encoders, inputs)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, **TOL)


# ------------------------------------------------------------------------------------------ other key formats


def _old_diffusers(deltas) -> dict[str, torch.Tensor]:
    """Older diffusers layouts: attention processors (`processor.to_q_lora.down`), `lora.down`, `lora_linear_layer`."""
    k = ALPHA / RANK
    sd = {}
    for i, ((comp, name), (down, up)) in enumerate(deltas.items()):
        head, _, last = name.rpartition(".")
        if comp == "unet" and last in ("to_q", "to_k", "to_v") and i % 2:
            stem = f"unet.{head}.processor.{last}_lora"
        elif comp == "unet" and name.endswith("to_out.0") and i % 2:
            stem = f"unet.{name[:-len('.to_out.0')]}.processor.to_out_lora"
        elif comp == "unet":
            stem = f"unet.{name}.lora"
        else:
            stem = f"{comp}.{name}.lora_linear_layer"
        sd[f"{stem}.down.weight"], sd[f"{stem}.up.weight"] = down, up * k
    return sd


def test_old_diffusers_formats_give_the_same_weights(sd1, tmp_path):
    deltas = _random_deltas(sd1, convs=False)
    new = read_lora(_save(_peft(deltas), tmp_path / "new.safetensors"))
    old = read_lora(_save(_old_diffusers(deltas), tmp_path / "old.safetensors"))
    with apply_loras(sd1, [(new, 1.0, 1.0)]):
        want = _snapshot(sd1)
    with apply_loras(sd1, [(old, 1.0, 1.0)]) as matches:
        assert len(matches[0].modules) == len(deltas) and not matches[0].unmatched
        got = _snapshot(sd1)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_locon_cp_mid_matches_functional_conv(sd1, tmp_path):
    """LoCon with `lora_mid` (CP): merged conv == conv + scale * up(mid(down(x))) computed layer by layer."""
    name = "down_blocks.0.resnets.0.conv1"
    conv = sd1.unet.get_submodule(name)
    g = torch.Generator().manual_seed(5)
    down = torch.randn(RANK, conv.in_channels, 1, 1, generator=g) * 0.3
    mid = torch.randn(RANK, RANK, 3, 3, generator=g) * 0.3
    up = torch.randn(conv.out_channels, RANK, 1, 1, generator=g) * 0.3
    key = "lora_unet_" + name.replace(".", "_")
    path = _save({f"{key}.lora_down.weight": down, f"{key}.lora_mid.weight": mid, f"{key}.lora_up.weight": up,
                  f"{key}.alpha": torch.tensor(ALPHA)}, tmp_path / "locon.safetensors")
    x = torch.randn(1, conv.in_channels, 8, 8, generator=g)
    with torch.no_grad():
        h = torch.nn.functional.conv2d(x, down)
        h = torch.nn.functional.conv2d(h, mid, padding=conv.padding, stride=conv.stride)
        want = conv(x) + 0.8 * (ALPHA / RANK) * torch.nn.functional.conv2d(h, up)
        with apply_loras(sd1, [(read_lora(path), 0.0, 0.8)]):
            got = conv(x)
    torch.testing.assert_close(got, want, **TOL)


# ------------------------------------------------------------------------------------------ errors and warnings


def test_unknown_keys_are_warned_and_foreign_lora_is_refused(sd1, tmp_path, caplog):
    sd = _kohya(_random_deltas(sd1, convs=False))
    sd["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(4, 8)
    sd["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(8, 4)
    sd["lora_unet_x.hada_w1_a"] = torch.zeros(2, 2)
    dora = next(k for k in sd if k.endswith(".alpha"))[: -len(".alpha")]
    sd[f"{dora}.dora_scale"] = torch.ones(1, 8)  # DoRA is not applied as plain LoRA: the whole module is skipped
    with caplog.at_level(logging.WARNING, logger="sdstack.models.lora"):
        with apply_loras(sd1, [(read_lora(_save(sd, tmp_path / "partly.safetensors")), 1.0, 1.0)]) as matches:
            assert len(matches[0].unmatched) == 3 + 4
            assert dora not in {m.key for m in matches[0].modules}
    assert "partly" in caplog.text and "no_such_layer" in caplog.text and "LoHa/LoKr/DoRA" in caplog.text
    wider = {k: (torch.zeros(RANK, d.shape[1] + 8, *d.shape[2:]), u) for k, (d, u) in _random_deltas(sd1).items()}
    other_family = read_lora(_save(_kohya(wider), tmp_path / "other_family.safetensors"))
    unrelated = {"lora_transformer_single_blocks_0_attn_to_q.lora_down.weight": torch.zeros(4, 8),
                 "lora_transformer_single_blocks_0_attn_to_q.lora_up.weight": torch.zeros(8, 4)}
    torch.save(unrelated, tmp_path / "flux.pt")
    before = _snapshot(sd1)
    for name, lora in [("other_family", other_family), ("flux", read_lora(tmp_path / "flux.pt"))]:
        with pytest.raises(UserError, match=f"LoRA '{name}' .*no keys that match"):
            with apply_loras(sd1, [(lora, 1.0, 1.0)]):
                pass
    after = _snapshot(sd1)
    assert all(torch.equal(v, after[k]) for k, v in before.items())


# ------------------------------------------------------------------------------------------ SDXL, LDM names


def _sdxl_ldm_names(unet) -> dict[str, str]:
    """Hand-written for the tiny SDXL config (2 layers per block; CrossAttn in down 1, 2 and up 0, 1):
    down_blocks.i.attentions.j -> input_blocks.{3i+j+1}.1, up_blocks.i.attentions.j -> output_blocks.{3i+j}.1,
    mid_block.attentions.0 -> middle_block.1 (kohya sdxl_model_util / diffusers' SGM mapping)."""
    names = {}
    for name, _ in unet.named_modules():
        parts = name.split(".")
        if len(parts) > 3 and parts[2] in ("attentions", "resnets") and parts[0] in ("down_blocks", "up_blocks"):
            i, j, sub = int(parts[1]), int(parts[3]), "1" if parts[2] == "attentions" else "0"
            block = f"input_blocks.{3 * i + j + 1}" if parts[0] == "down_blocks" else f"output_blocks.{3 * i + j}"
            names[name] = ".".join([block, sub] + parts[4:])
        elif name.startswith("mid_block.attentions.0."):
            names[name] = "middle_block.1." + name[len("mid_block.attentions.0."):]
        elif name.startswith("mid_block.resnets.0."):
            names[name] = "middle_block.0." + name[len("mid_block.resnets.0."):]
    return {k: v.replace(".0.conv1", ".0.in_layers.2") for k, v in names.items()}  # resnet conv1 = in_layers.2


def test_sdxl_kohya_ldm_names_match_diffusers(tmp_path):
    xl = tiny_bundle("sdxl", seed=0)
    if not ldm_unet_module_names(xl.unet):
        pytest.xfail("LDM UNet name map (sdstack.models.convert.unet) not available yet")
    deltas = _random_deltas(xl)  # attention layers and each block's first resnet conv1 (LoCon, 3x3)
    ldm = _sdxl_ldm_names(xl.unet)
    assert all(name in ldm for comp, name in deltas if comp == "unet")
    sd = _kohya(deltas, te_prefixes={"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}, unet_names=ldm)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha" in sd
    assert "lora_unet_output_blocks_3_0_in_layers_2.alpha" in sd and "lora_unet_middle_block_0_in_layers_2.alpha" in sd
    path = _save(sd, tmp_path / "xl.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    inputs = _inputs(xl)
    base = _outputs(xl.unet, xl.text_encoders, inputs)
    ref = _pipe_outputs(_diffusers_pipe(xl, path), inputs)
    with apply_loras(xl, [(read_lora(path), 1.0, 1.0)]) as matches:
        assert not matches[0].unmatched and len(matches[0].modules) == len(deltas)
        ours = _outputs(xl.unet, xl.text_encoders, inputs)
    _assert_close_all(ours, ref, base)


def test_sdxl_kohya_diffusers_names_and_te2(tmp_path):
    """SDXL LoRAs with diffusers-style UNet names (ai-toolkit) and both text encoders."""
    xl = tiny_bundle("sdxl", seed=0)
    deltas = _random_deltas(xl, convs=False)
    sd = _kohya(deltas, te_prefixes={"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"})
    path = _save(sd, tmp_path / "xl_diffusers_names.safetensors")
    m = match_lora(read_lora(path), xl)
    assert not m.unmatched and len(m.modules) == len(deltas)
    assert {x.component for x in m.modules} == {"unet", "text_encoder", "text_encoder_2"}
    inputs = _inputs(xl)
    base = _outputs(xl.unet, xl.text_encoders, inputs)
    ref = _pipe_outputs(_diffusers_pipe(xl, path), inputs)
    with apply_loras(xl, [(read_lora(path), 1.0, 1.0)]):
        ours = _outputs(xl.unet, xl.text_encoders, inputs)
    _assert_close_all(ours, ref, base)


# ------------------------------------------------------------------------------------------ files, hashes, folder


def test_read_lora_hashes_and_alias(tmp_path):
    sd = {"lora_unet_a.lora_down.weight": torch.ones(2, 3), "lora_unet_a.lora_up.weight": torch.ones(3, 2)}
    path = _save(sd, tmp_path / "file_stem.safetensors", {"ss_output_name": "nice_name"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    lf = read_lora(path)
    assert lf.name == "file_stem" and lf.alias == "nice_name"
    assert lf.hash_sha256 == hashlib.sha256(raw).hexdigest()
    assert lf.addnet_hash == hashlib.sha256(raw[8 + n:]).hexdigest() != lf.hash_sha256
    assert lf.shorthash == lf.addnet_hash[:12]
    with_sshs = read_lora(_save(sd, tmp_path / "b.safetensors", {"sshs_model_hash": "f" * 64}))
    assert with_sshs.shorthash == "f" * 12


class _NotATensor:
    pass


def test_library_scans_names_and_refuses_unsafe_pickles(tmp_path):
    root = tmp_path / "Lora"
    (root / "sub").mkdir(parents=True)
    sd = {"lora_unet_a.lora_down.weight": torch.ones(2, 3), "lora_unet_a.lora_up.weight": torch.ones(3, 2)}
    _save(sd, root / "alpha.safetensors", {"ss_output_name": "alpha_out", "ss_tag_frequency": '{"x": {"a": 1}}'})
    _save(sd, root / "sub" / "beta.safetensors")
    torch.save(sd, root / "sub" / "gamma.pt")
    torch.save({"x": _NotATensor()}, root / "evil.ckpt")
    (root / "notes.txt").write_text("not a lora")
    lib = LoraLibrary(root)
    assert sorted(lib.names()) == ["alpha", "beta", "evil", "gamma"]
    info = {d["name"]: d for d in lib.api_list()}
    assert info["alpha"]["alias"] == "alpha_out" and info["beta"]["alias"] == "beta"
    assert info["alpha"]["metadata"]["ss_tag_frequency"] == {"x": {"a": 1}}
    assert info["gamma"]["metadata"] == {} and info["beta"]["path"].endswith("beta.safetensors")
    assert torch.equal(lib.load("gamma").tensors["lora_unet_a.lora_up.weight"], torch.ones(3, 2))
    assert lib.load("alpha_out").name == "alpha" and lib.get("alpha_out") == (root / "alpha.safetensors").resolve()
    assert lib.load("alpha") is lib.load("alpha")  # cached until the file changes
    with pytest.raises(UserError, match="unknown LoRA 'nope'.*'alpha'"):
        lib.get("nope")
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt"):
        lib.load("evil")

"""`sdstack finetune`: the four methods on tiny random SD 1.x (and SD 2.x, SDXL) models, their output formats read
back by stock diffusers and by sdstack's own prompt syntax, exact resume, prior preservation, caches and the one-line
errors."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdstack.errors import UserError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from sdstack.models.tiny import save_diffusers_folder, tiny_bundle

    root = tmp_path_factory.mktemp("ft")
    save_diffusers_folder(tiny_bundle("sd1", seed=0), root / "model")
    from sdstack.eval.concepts import concept_dataset

    concept_dataset("ring", root / "data", n=6, seed=0, token="sks", resolution=32)
    concept_dataset("ring", root / "data-ti", n=6, seed=0, token="zring", resolution=32)
    return root


def _cfg(base, tmp_path, method, *sets, **flags):
    from sdstack.train.cli import finetune_config

    flags = dict(dict(model=str(base / "model"), data=str(base / "data"), steps=4, batch_size=2, resolution=32),
                 **flags)
    sets = ("run.threads=1", "run.progress=false", "run.log_every=0", f"data.cache_dir='{tmp_path / 'cache'}'",
            "run.mixed_precision='no'") + sets
    return finetune_config(method, None, None, tmp_path / method, flags, sets)


def _run(cfg, **kw):
    from sdstack.train.finetune import finetune

    return finetune(cfg, **kw)


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), ctx).sample


# ---------------------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("convs", [False, True], ids=["attention", "with-resnet-convs"])
def test_lora_file_loads_in_diffusers_and_in_prompt_syntax_with_the_trained_result(base, tmp_path, convs):
    """kohya's default targets (the transformer blocks), and the same plus the ResNet 3x3 convolutions (kohya's
    LoCon / conv_dim, which A1111 and ComfyUI read)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from safetensors import safe_open

    from sdstack.engine.generate import generate
    from sdstack.models.loader import load_model
    from sdstack.params import make_params
    from sdstack.train.finetune import FinetuneTask
    from sdstack.train.loop import train

    targets = ('lora.unet_targets=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", '
               '"ff.net.2", "conv1", "conv2"]',) if convs else ()
    cfg = _cfg(base, tmp_path, "lora", "optim.lr=0.2", "lora.rank=4", "lora.alpha=4.0", *targets,
               output_name="ring_style")
    task = FinetuneTask(cfg)
    result = train(cfg, task)
    path = Path(result["model"])
    assert path == tmp_path / "lora" / "ring_style.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    conv_key = "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"
    assert (conv_key in keys) == convs
    if convs:
        with safe_open(str(path), framework="pt") as f:
            assert f.get_tensor(conv_key).shape[1:] == (task.bundle.unet.down_blocks[0].resnets[0].conv1
                                                        .base_layer.in_channels, 3, 3)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0" and meta["ss_output_name"] == \
        "ring_style"
    assert json.loads(meta["ss_dataset_dirs"]) == {"data": {"n_repeats": 1, "img_count": 6}}
    assert not any(k.startswith("lora_te") for k in keys)  # text encoder not trained by default

    trained = _unet_out(task.bundle.unet)  # the peft model as it trained
    plain = load_model(base / "model")
    untouched = _unet_out(plain.unet)
    assert (trained - untouched).abs().max() > 1e-3, "training must have changed the UNet"

    pipe = StableDiffusionPipeline(vae=plain.vae, unet=copy.deepcopy(plain.unet), scheduler=EulerDiscreteScheduler(),
                                   text_encoder=copy.deepcopy(plain.text_encoders[0]), tokenizer=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(_unet_out(pipe.unet), trained, atol=2e-5, rtol=1e-4)

    # the same image from sdstack's <lora:ring_style:1> as from the trained model itself
    p = make_params(prompt="a red sks ring", steps=4, seed=7, cfg_scale=5, width=32, height=32)
    ours = generate(task.bundle, p).images[0]
    p2 = make_params(prompt="a red sks ring <lora:ring_style:1>", steps=4, seed=7, cfg_scale=5, width=32, height=32)
    via_prompt = generate(plain, p2, lora_dir=path.parent).images[0]
    a, b = (torch.tensor(list(im.getdata()), dtype=torch.float32) for im in (ours, via_prompt))
    assert (a - b).abs().max() <= 2
    without = torch.tensor(list(generate(plain, p).images[0].getdata()), dtype=torch.float32)
    assert (a - without).abs().max() > 2  # the LoRA is visible in the image


def test_lora_checkpoint_holds_only_the_lora_and_resume_is_exact(base, tmp_path):
    from sdstack.train.checkpoint import load_checkpoint

    whole = _run(_cfg(base, tmp_path / "a", "lora", "optim.lr=0.01", "run.checkpoint_every=2"))
    cfg = _cfg(base, tmp_path / "b", "lora", "optim.lr=0.01", "run.checkpoint_every=2")
    assert _run(cfg, stop_at=2)["step"] == 2
    state = load_checkpoint(tmp_path / "b" / "lora")
    assert state["model"] and all(".lora_" in k for k in state["model"])  # no frozen base weights
    resumed = _run(cfg, resume=tmp_path / "b" / "lora")
    assert resumed["step"] == whole["step"] == 4
    from safetensors.torch import load_file

    a, b = load_file(whole["model"]), load_file(resumed["model"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_resume_from_another_method_is_refused_before_training(base, tmp_path):
    _run(_cfg(base, tmp_path, "lora", "run.checkpoint_every=2"), stop_at=2)
    cfg = _cfg(base, tmp_path, "full")
    with pytest.raises(UserError, match="cannot resume a full run from a lora checkpoint"):
        _run(cfg, resume=tmp_path / "lora")


def test_lora_rank_larger_than_a_layer_is_refused(base, tmp_path):
    with pytest.raises(UserError, match="lora.rank 64 is larger than the layer"):
        _run(_cfg(base, tmp_path, "lora", "lora.rank=64"))


# ---------------------------------------------------------------------------------------------- TI


def test_textual_inversion_trains_only_the_vectors_and_the_file_works_by_name(base, tmp_path):
    from sdstack.models.embeddings import EmbeddingLibrary, read_embedding
    from sdstack.models.loader import load_model
    from sdstack.prompts.conditioning import TextConditioner
    from sdstack.train.finetune import FinetuneTask, TrainingText, encode_text
    from sdstack.train.loop import train

    cfg = _cfg(base, tmp_path, "textual_inversion", "optim.lr=0.05", data=str(base / "data-ti"), token="zring",
               init_word="circle", num_vectors=2)
    task = FinetuneTask(cfg)
    before = {k: v.clone() for k, v in task.bundle.unet.state_dict().items()}
    init = task.vectors[0].detach().clone()
    result = train(cfg, task)
    assert Path(result["model"]).name == "zring.safetensors"
    after = task.bundle.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the UNet is frozen
    assert (task.vectors[0].detach() - init).abs().max() > 1e-3  # the vectors moved

    emb = read_embedding(result["model"])
    assert emb.name == "zring" and emb.num_vectors == 2
    torch.testing.assert_close(emb.vectors[""], task.vectors[0].detach().float())

    plain = load_model(base / "model")
    circle = plain.tokenizers[0].encode("circle")
    table = plain.text_encoders[0].get_input_embeddings().weight
    torch.testing.assert_close(init[0], table[circle[0]])  # initialised from the init word

    lib_dir = tmp_path / "embeddings"
    lib_dir.mkdir()
    shutil.copy(result["model"], lib_dir / "zring.safetensors")
    lib = EmbeddingLibrary(lib_dir, plain)
    engine = TextConditioner(plain, embeddings=lib)("a red zring").context
    text = TrainingText(plain, "zring", 2)(["a red zring"])
    trained = encode_text(plain, plain.text_encoders, text["ids"], text["slots"], [emb.vectors[""]], 1)[0][0]
    torch.testing.assert_close(engine, trained, atol=1e-5, rtol=1e-4)
    no_emb = TextConditioner(plain)("a red zring").context
    assert (no_emb - engine).abs().max() > 1e-3


def test_textual_inversion_max_norm_scales_long_vectors_back_onto_the_sphere(base, tmp_path):
    """One AdamW step, with and without `textual_inversion.max_norm` (same seed, same
    batch): the constrained run's vectors are the free run's vectors scaled to the limit where longer (the
    projection by hand), and left alone where not."""
    from sdstack.train.finetune import FinetuneTask
    from sdstack.train.loop import train

    def one_step(*sets):
        cfg = _cfg(base, tmp_path / str(len(sets)), "textual_inversion", "optim.lr=0.1", "optim.warmup_steps=0",
                   *sets, data=str(base / "data-ti"), token="zring", init_word="a red circle", num_vectors=3,
                   steps=1)
        task = FinetuneTask(cfg)
        train(cfg, task)
        return task.vectors[0].detach().clone()

    free = one_step()
    norms = free.norm(dim=-1)
    limit = float(norms.median())  # some vectors above it, some not
    assert (norms > limit * 1.01).any() and (norms < limit * 0.99).any()
    capped = one_step(f"textual_inversion.max_norm={limit}")
    expected = free * torch.clamp(limit / norms, max=1.0)[:, None]
    torch.testing.assert_close(capped, expected, rtol=1e-5, atol=1e-6)
    assert float(capped.norm(dim=-1).max()) <= limit * (1 + 1e-5)

    with pytest.raises(UserError, match="max_norm must be 0"):
        _cfg(base, tmp_path, "textual_inversion", "textual_inversion.max_norm=-1", token="zring")


def test_pivotal_lora_trains_the_token_with_the_lora_and_bundles_it_for_a1111(base, tmp_path):
    """A LoRA given a token (pivotal tuning): the UNet's LoRA layers and the token's vectors train, the text
    encoder stays frozen, the file holds the vectors as A1111's `bundle_emb.<token>.string_to_param.*`, and
    `<lora:name:1>` with the token in the prompt gives the trained model's image."""
    from safetensors.torch import load_file

    from sdstack.engine.generate import generate
    from sdstack.models.loader import load_model
    from sdstack.params import make_params
    from sdstack.train.checkpoint import load_checkpoint
    from sdstack.train.finetune import FinetuneTask
    from sdstack.train.loop import train

    cfg = _cfg(base, tmp_path, "lora", "optim.lr=0.05", "textual_inversion.lr=0.2", "lora.rank=4", "lora.alpha=4.0",
               "run.checkpoint_every=4", data=str(base / "data-ti"), token="zring", init_word="circle",
               num_vectors=2, output_name="piv")
    task = FinetuneTask(cfg)
    groups = task.param_groups(0.05)
    assert [g["lr"] for g in groups] == [0.05, 0.2] and groups[1]["params"] == list(task.vectors)
    te_before = {k: v.clone() for k, v in task.bundle.text_encoders[0].state_dict().items()}
    init = task.vectors[0].detach().clone()
    result = train(cfg, task)
    te_after = task.bundle.text_encoders[0].state_dict()
    assert all(torch.equal(te_before[k], te_after[k]) for k in te_before)  # the text encoder is frozen
    assert (task.vectors[0].detach() - init).abs().max() > 1e-3  # the vectors moved
    assert sorted(k for k in load_checkpoint(tmp_path / "lora")["model"] if ".lora_" not in k) == ["vectors.0"]

    tensors = load_file(result["model"])
    bundled = [k for k in tensors if k.startswith("bundle_emb.")]
    assert bundled == ["bundle_emb.zring.string_to_param.*"]
    torch.testing.assert_close(tensors[bundled[0]], task.vectors[0].detach().float())
    assert not any(k.startswith("lora_te") for k in tensors) and any(k.startswith("lora_unet") for k in tensors)
    from sdstack.models.embeddings import read_embedding

    own = read_embedding(tmp_path / "lora" / "embeddings" / "zring.safetensors")  # also as its own A1111 embedding
    assert own.name == "zring" and torch.equal(own.vectors[""], tensors[bundled[0]])

    p = make_params(prompt="a red zring", steps=4, seed=7, cfg_scale=5, width=32, height=32)
    ours = generate(task.bundle, p, embeddings=task._embeddings()).images[0]
    plain = load_model(base / "model")
    p2 = make_params(prompt="a red zring <lora:piv:1>", steps=4, seed=7, cfg_scale=5, width=32, height=32)
    res = generate(plain, p2, lora_dir=Path(result["model"]).parent)
    a, b = (torch.tensor(list(im.getdata()), dtype=torch.float32) for im in (ours, res.images[0]))
    assert (a - b).abs().max() <= 2
    assert 'TI hashes: "zring: ' in res.infotexts[0]
    # without the bundled vectors the token is the plain text "zring": another image
    other = torch.tensor(list(generate(task.bundle, p).images[0].getdata()), dtype=torch.float32)
    assert (a - other).abs().max() > 2


def test_pivotal_lora_without_bundling_loads_in_diffusers_with_its_embedding_file(base, tmp_path):
    """lora.bundle_embedding = false: the LoRA file holds only layers (diffusers' load_lora_weights refuses
    `bundle_emb` keys) and diffusers' load_textual_inversion reads the embedding file written beside it."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    from sdstack.models.loader import load_model
    from sdstack.train.finetune import FinetuneTask
    from sdstack.train.loop import train

    cfg = _cfg(base, tmp_path, "lora", "optim.lr=0.05", "lora.rank=4", "lora.bundle_embedding=false",
               data=str(base / "data-ti"), token="zring", output_name="piv")
    task = FinetuneTask(cfg)
    result = train(cfg, task)
    assert not any(k.startswith("bundle_emb") for k in load_file(result["model"]))
    from transformers import CLIPTokenizer

    plain = load_model(base / "model")
    plain.tokenizers[0].save_pretrained(tmp_path / "tok")
    tokenizer = CLIPTokenizer(str(tmp_path / "tok" / "vocab.json"), str(tmp_path / "tok" / "merges.txt"))
    pipe = StableDiffusionPipeline(vae=plain.vae, unet=plain.unet, scheduler=EulerDiscreteScheduler(),
                                   text_encoder=plain.text_encoders[0], tokenizer=tokenizer,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(result["model"])
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(task.bundle.unet), atol=2e-5, rtol=1e-4)
    pipe.load_textual_inversion(str(tmp_path / "lora" / "embeddings" / "zring.safetensors"), token="zring")
    ids = pipe.tokenizer("a zring", add_special_tokens=False).input_ids
    table = pipe.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(table[ids[-1]].detach(), task.vectors[0][0].detach().float())


def test_pivotal_dreambooth_trains_the_unet_and_the_token_and_writes_the_embedding(base, tmp_path):
    from sdstack.models.embeddings import read_embedding
    from sdstack.models.loader import load_model
    from sdstack.train.finetune import FinetuneTask
    from sdstack.train.loop import train

    cfg = _cfg(base, tmp_path, "dreambooth", "optim.lr=0.01", "textual_inversion.lr=0.1", data=str(base / "data-ti"),
               token="zring", output_name="db")
    task = FinetuneTask(cfg)
    assert [g["lr"] for g in task.param_groups(0.01)] == [0.01, 0.1]
    init = task.vectors[0].detach().clone()
    result = train(cfg, task)
    emb = read_embedding(tmp_path / "dreambooth" / "embeddings" / "zring.safetensors")
    torch.testing.assert_close(emb.vectors[""], task.vectors[0].detach().float())
    assert (emb.vectors[""] - init).abs().max() > 1e-3
    saved, plain = load_model(result["model"]), load_model(base / "model")
    assert (_unet_out(saved.unet) - _unet_out(plain.unet)).abs().max() > 1e-4  # the UNet trained
    for k, v in plain.text_encoders[0].state_dict().items():  # the text encoder did not
        assert torch.equal(v, saved.text_encoders[0].state_dict()[k]), k


def test_textual_inversion_refuses_a_word_the_vocabulary_has(base, tmp_path):
    with pytest.raises(UserError, match="already a word in the model's vocabulary"):
        _run(_cfg(base, tmp_path, "textual_inversion", token="ring"))


def test_textual_inversion_refuses_captions_without_the_token(base, tmp_path):
    with pytest.raises(UserError, match="no caption contains the token 'zzqring'"):
        _run(_cfg(base, tmp_path, "textual_inversion", token="zzqring"))


# ---------------------------------------------------------------------------------------------- full / DreamBooth


def test_full_finetune_writes_a_diffusers_folder_and_a_single_file_with_the_trained_unet(base, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdstack.models.loader import load_model

    cfg = _cfg(base, tmp_path, "full", "optim.lr=0.001", output_name="tuned")
    result = _run(cfg)
    folder = Path(result["model"])
    single = tmp_path / "full" / "tuned.safetensors"
    assert folder.name == "tuned" and single.is_file()
    a, b = load_model(folder), load_model(single)
    base_out = _unet_out(load_model(base / "model").unet)
    out = _unet_out(a.unet)
    assert (out - base_out).abs().max() > 1e-3
    torch.testing.assert_close(_unet_out(b.unet), out, atol=1e-5, rtol=1e-4)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    torch.testing.assert_close(_unet_out(pipe.unet), out, atol=1e-5, rtol=1e-4)


def test_dreambooth_class_images_are_made_once_and_weighted(base, tmp_path, monkeypatch):
    from sdstack.train import finetune as ft

    cfg = _cfg(base, tmp_path, "dreambooth", "dreambooth.class_steps=2", "dreambooth.prior_loss_weight=0.5",
               class_prompt="a circle", num_class_images=3, instance_prompt="a sks ring")
    task = ft.FinetuneTask(cfg)
    class_dir = tmp_path / "dreambooth" / "class_images"
    assert sorted(p.name for p in class_dir.glob("*.png")) == [f"class_0000{i}.png" for i in range(3)]
    assert (class_dir / "class_00000.txt").read_text() == "a circle"
    assert task.index.num_reg_images == task.index.num_train_images == 6  # kohya balancing: reg repeated to match

    made = []
    monkeypatch.setattr(ft, "_generate_class_image", lambda *a: made.append(a) or None)
    ft.ensure_class_images(cfg, task.bundle)  # the same recipe: nothing new is generated
    assert made == []
    from PIL import Image

    (class_dir / "class_00001.png").unlink()
    monkeypatch.setattr(ft, "_generate_class_image",
                        lambda bundle, db, seed, res: made.append(seed) or Image.new("RGB", (res, res)))
    ft.ensure_class_images(cfg, task.bundle)  # only the missing one, with its own seed
    assert made == [1] and len(list(class_dir.glob("class_*.png"))) == 3
    assert json.loads((class_dir / "class_images.json").read_text())["images"] == \
        [f"class_0000{i}.png" for i in range(3)]

    _check_prior_loss_weight(task, 0.5)
    _check_prior_timesteps(task)


def _check_prior_timesteps(task) -> None:
    """noise.prior_max_timestep: the class image of a batch draws t from its own range, the instance one below
    max_timestep (the t the loss sees, recorded through the model call)."""
    import dataclasses

    reg = [i for i, it in enumerate(task.index.items) if task.index.subsets[it.subset].is_reg][0]
    inst = [i for i, it in enumerate(task.index.items) if not task.index.subsets[it.subset].is_reg][0]
    batch = task.make_batch([inst, reg], 0, 0)
    seen = []

    def model(noisy, t, text, time_ids):
        seen.append(t.clone())
        return torch.zeros_like(noisy)

    saved = task.cfg.noise
    try:
        task.cfg.noise = dataclasses.replace(saved, min_timestep=0, max_timestep=10, prior_max_timestep=1000)
        with torch.no_grad():
            for k in range(40):
                task.loss(model, batch, torch.Generator().manual_seed(k))
    finally:
        task.cfg.noise = saved
    t = torch.stack(seen)
    assert int(t[:, 0].max()) < 10 and int(t[:, 1].max()) >= 10


def _check_prior_loss_weight(task, w: float) -> None:
    """One instance and one class image in a batch: loss = (l_inst + w l_class) / 2 with the same noise."""
    from accelerate import Accelerator

    reg = [i for i, it in enumerate(task.index.items) if task.index.subsets[it.subset].is_reg][0]
    inst = [i for i, it in enumerate(task.index.items) if not task.index.subsets[it.subset].is_reg][0]
    task.setup(Accelerator(cpu=True))
    batch = task.make_batch([inst, reg], 0, 0)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    with torch.no_grad():
        weighted, _ = task.loss(task.module, batch, g())
        both, _ = task.loss(task.module, batch, g(), sample_weights=torch.tensor([1.0, 1.0]))  # (l0 + l1) / 2
        first, _ = task.loss(task.module, batch, g(), sample_weights=torch.tensor([1.0, 0.0]))  # l0 / 2
    torch.testing.assert_close(weighted, first + w * (both - first), atol=1e-6, rtol=1e-5)  # (l0 + w l1) / 2
    assert not torch.allclose(weighted, both)


def test_lora_takes_prior_preservation_from_several_class_prompts_in_turn(base, tmp_path):
    from PIL import Image

    from sdstack.engine.generate import generate
    from sdstack.params import make_params
    from sdstack.train import finetune as ft

    # a repeated --class-prompt arrives from click as a tuple
    cfg = _cfg(base, tmp_path, "lora", "dreambooth.class_steps=2", "dreambooth.prior_loss_weight=0.25",
               class_prompt=("a circle", "a red star"), num_class_images=3)
    assert cfg.prior_preservation and cfg.dreambooth.class_prompt == ("a circle", "a red star")
    task = ft.FinetuneTask(cfg)
    class_dir = tmp_path / "lora" / "class_images"
    assert [(class_dir / f"class_0000{i}.txt").read_text() for i in range(3)] == ["a circle", "a red star",
                                                                                  "a circle"]
    # image 1 is the base model's "a red star" at seed 1 with the class settings
    expected = generate(task.bundle, make_params(prompt="a red star", steps=2, cfg_scale=7.0, seed=1, width=32,
                                                 height=32)).images[0]
    got = np.asarray(Image.open(class_dir / "class_00001.png").convert("RGB"), dtype=np.int16)
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1
    assert task.index.num_reg_images == task.index.num_train_images
    captions = {task.index.items[i].caption for i, it in enumerate(task.index.items)
                if task.index.subsets[it.subset].is_reg}
    assert captions == {"a circle", "a red star"}
    assert json.loads((class_dir / "class_images.json").read_text())["recipe"]["prompt"] == ["a circle",
                                                                                           "a red star"]
    _check_prior_loss_weight(task, 0.25)  # the prior loss weight applies to a LoRA run's class images

    # textual inversion takes no prior: its vectors never see a caption without the word
    ti = _cfg(base, tmp_path, "textual_inversion", token="zwq", class_prompt="a circle", num_class_images=3)
    assert not ti.prior_preservation
    (warning,) = ti.ignored_settings()
    assert "textual inversion takes no prior preservation" in warning and "num_class_images = 3" in warning
    assert cfg.ignored_settings() == []
    assert _cfg(base, tmp_path, "textual_inversion", token="zwq").ignored_settings() == []


# ---------------------------------------------------------------------------------------------- data, errors, CLI


def test_caches_are_reused_and_give_the_same_loss(base, tmp_path):
    from accelerate import Accelerator

    from sdstack.train.finetune import FinetuneTask

    cfg = _cfg(base, tmp_path, "lora")
    uncached = _cfg(base, tmp_path, "lora", "data.cache_latents=false", "data.cache_text=false")
    t1 = FinetuneTask(cfg)
    t1.setup(Accelerator(cpu=True))
    assert t1.cache.misses == 12 and t1.cache.hits == 0  # 6 latents + 6 captions
    t2 = FinetuneTask(cfg)
    t2.setup(Accelerator(cpu=True))
    assert t2.cache.misses == 0 and t2.cache.hits == 12
    t3 = FinetuneTask(uncached)
    t3.setup(Accelerator(cpu=True))
    assert t3.cache is None
    b_cached, b_plain = t2.make_batch([0, 1], 0, 0), t3.make_batch([0, 1], 0, 0)
    assert "latents" in b_cached and "text" in b_cached and "latents" not in b_plain
    l1, _ = t2.loss(t2.module, b_cached, torch.Generator().manual_seed(1))
    l2, _ = t3.loss(t3.module, b_plain, torch.Generator().manual_seed(1))
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-4)


def test_validation_loss_is_logged(base, tmp_path):
    cfg = _cfg(base, tmp_path, "lora", "data.validation_split=0.34", "run.validate_every=2")
    _run(cfg)
    rows = [json.loads(x) for x in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4] and all(r["val_loss"] > 0 for r in val)


def _cli(*args) -> int:
    from sdstack.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


@pytest.mark.parametrize("extra, needle", [
    (["--data", "{tmp}/empty"], "no usable images"),
    (["--data", "{tmp}/missing"], "data folder not found"),
    (["--data", "{base}/data", "--set", "lora.nope=1"], "unknown key 'lora.nope'"),
    (["--data", "{base}/data", "--set", "optim.decay='cosinus'"], "optim.decay must be one of"),
    (["--data", "{base}/data", "--rank", "0"], "lora.rank must be at least 1"),
    (["--data", "{base}/data", "--set", "noise.min_timestep=500", "--set", "noise.max_timestep=500"],
     "noise.min_timestep (500) must be at least 0 and below noise.max_timestep (500)"),
    (["--data", "{base}/data", "--set", "noise.max_timestep=1001"], "above the model's 1000 training timesteps"),
    (["--data", "{base}/data", "--set", "noise.prior_max_timestep=1200"], "noise.prior_max_timestep (1200) is above"),
    (["--data", "{tmp}/uncaptioned", "--set", "data.require_captions=true"], "have no caption"),
])
def test_bad_input_is_one_line_and_exit_2_before_training(base, tmp_path, capsys, extra, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "uncaptioned").mkdir()
    for p in list((base / "data").glob("*.png"))[:2]:
        shutil.copy(p, tmp_path / "uncaptioned" / p.name)
    extra = [x.format(tmp=tmp_path, base=base) for x in extra]
    code = _cli("finetune", "lora", "--model", base / "model", "--out", tmp_path / "run", *extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_trains_a_lora_with_flags(base, tmp_path, capsys):
    code = _cli("finetune", "lora", "--model", base / "model", "--data", base / "data", "--steps", "2",
                "--resolution", "32", "--rank", "2", "--out", tmp_path / "run", "--set", "run.threads=1",
                "--set", "run.progress=false", "--set", "run.mixed_precision='no'")
    assert code == 0
    out = capsys.readouterr().out
    assert "step 2" in out and "run.safetensors" in out
    from sdstack.models.lora import read_lora

    assert read_lora(tmp_path / "run" / "run.safetensors").metadata["ss_network_dim"] == "2"


def test_cli_warns_that_textual_inversion_ignores_class_images(base, tmp_path, capsys):
    code = _cli("finetune", "textual-inversion", "--model", base / "model", "--data", base / "data-ti", "--steps",
                "1", "--resolution", "32", "--token", "zring", "--class-prompt", "a circle", "--num-class-images", "2",
                "--out", tmp_path / "ti", "--set", "run.threads=1", "--set", "run.progress=false",
                "--set", "run.mixed_precision='no'")
    assert code == 0
    err = capsys.readouterr().err
    assert err.count("takes no prior preservation") == 1 and "num_class_images = 2" in err
    assert not (tmp_path / "ti" / "class_images").exists()  # nothing was drawn for it


@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                    reason="accelerate launcher not installed")
def test_accelerate_launch_two_cpu_processes_lora(base, tmp_path):
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "sdstack", "finetune", "lora", "--model", str(base / "model"),
           "--data", str(base / "data"), "--steps", "2", "--resolution", "32", "--batch-size", "1",
           "--out", str(tmp_path / "run"), "--set", "run.threads=1", "--set", "run.progress=true",
           "--set", "run.mixed_precision='no'", "--set", f"data.cache_dir='{tmp_path / 'cache'}'"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "2 process(es)" in run.stdout and run.stdout.count("model written to") == 1
    from sdstack.models.lora import read_lora

    assert read_lora(tmp_path / "run" / "run.safetensors").tensors


def test_sdxl_lora_with_text_encoders_trains_and_reads_back(tmp_path):
    from sdstack.eval.concepts import concept_dataset
    from sdstack.models.loader import load_model
    from sdstack.models.lora import match_lora, read_lora
    from sdstack.models.tiny import save_diffusers_folder, tiny_bundle

    save_diffusers_folder(tiny_bundle("sdxl", seed=0), tmp_path / "xl")
    concept_dataset("ring", tmp_path / "data", n=3, seed=0, token="sks", resolution=32)
    base = tmp_path
    cfg = _cfg(base, tmp_path, "lora", "lora.train_text_encoder=true", "lora.rank=2", "optim.lr=0.01",
               model=str(tmp_path / "xl"), data=str(tmp_path / "data"), steps=2)
    result = _run(cfg)
    lora = read_lora(result["model"])
    keys = list(lora.tensors)
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # SDXL kohya files use LDM names
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    m = match_lora(lora, load_model(tmp_path / "xl"))
    assert not m.unmatched and lora.metadata["ss_base_model_version"] == "sdxl_base_v1-0"


def test_gradient_checkpointing_gives_the_same_gradients(base, tmp_path):
    from accelerate import Accelerator

    from sdstack.train.finetune import FinetuneTask

    grads = []
    for on in (False, True):
        cfg = _cfg(base, tmp_path / str(on), "full", f"gradient_checkpointing={'true' if on else 'false'}")
        task = FinetuneTask(cfg)
        task.setup(Accelerator(cpu=True))
        assert task.bundle.unet.is_gradient_checkpointing == on
        loss, _ = task.loss(task.module, task.make_batch([0, 1], 0, 0), torch.Generator().manual_seed(3))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in task.bundle.unet.parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_a_partial_table_keeps_the_fine_tune_defaults(base, tmp_path):
    from sdstack.train.finetune_config import FinetuneConfig

    plain = FinetuneConfig()
    cfg = _cfg(base, tmp_path, "lora", "ema.warmup=false", lr=3e-4)  # [run], [optim], [ema] given in part
    assert cfg.run.batch_size == 2 and cfg.run.checkpoint_every == plain.run.checkpoint_every == 0
    assert cfg.optim.lr == 3e-4 and cfg.optim.warmup_steps == plain.optim.warmup_steps == 0
    assert cfg.optim.decay == plain.optim.decay == "constant"
    assert cfg.ema.decay == 0.0 and cfg.ema.warmup is False


def test_adamw8bit_trains_and_resumes_exactly(base, tmp_path, monkeypatch):
    """bitsandbytes is optional (pip install 'sdstack[8bit]'); its 8-bit optimizer state must survive a resume."""
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    made = []
    real = bnb.optim.AdamW8bit

    def spy(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    monkeypatch.setattr(bnb.optim, "AdamW8bit", spy)
    sets = ("optim.lr=0.01", "run.checkpoint_every=2", "optim.optimizer='adamw8bit'")
    whole = _run(_cfg(base, tmp_path / "a", "lora", *sets))
    cfg = _cfg(base, tmp_path / "b", "lora", *sets)
    _run(cfg, stop_at=2)
    resumed = _run(cfg, resume=tmp_path / "b" / "lora")
    assert len(made) == 3 and all(o.state for o in made)  # every run stepped bitsandbytes' optimizer
    a, b = load_file(whole["model"]), load_file(resumed["model"])
    ups = [k for k in a if "lora_up" in k]
    assert ups and any(a[k].abs().max() > 0 for k in ups)  # lora_up starts at zero: it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- SD 2.x


def test_sd2_v_prediction_full_finetune_loss_matches_diffusers_and_the_single_file_is_sd2(tmp_path):
    """SD 2.x (v-prediction, OpenCLIP-layout text encoder): the fine-tune loss is the v-prediction MSE that stock
    diffusers and transformers give for the same batch, timesteps and noise, and the A1111 single file it writes is
    an SD2 checkpoint (OpenCLIP keys) that loads back as v-prediction with the trained UNet."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdstack.eval.concepts import concept_dataset
    from sdstack.models.loader import load_model
    from sdstack.models.tiny import save_diffusers_folder, tiny_bundle
    from sdstack.train.finetune import FinetuneTask

    folder = save_diffusers_folder(tiny_bundle("sd2", seed=1, prediction_type="v_prediction"), tmp_path / "sd2")
    concept_dataset("ring", tmp_path / "data", n=4, seed=0, token="sks", resolution=32)
    cfg = _cfg(tmp_path, tmp_path, "full", "optim.lr=0.001", "noise.min_snr_gamma=0.0", model=str(folder),
               data=str(tmp_path / "data"), output_name="tuned2")
    task = FinetuneTask(cfg)
    from accelerate import Accelerator

    task.setup(Accelerator(cpu=True))
    assert task.bundle.family == "sd2" and task.bundle.prediction_type == "v_prediction"
    batch = task.make_batch([0, 1], 0, 0)
    with torch.no_grad():
        ours, _ = task.loss(task.module, batch, torch.Generator().manual_seed(7))

    # the same step with stock diffusers / transformers classes read from the folder
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    enc = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    sched = DDPMScheduler.from_pretrained(folder / "scheduler")
    assert sched.config.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if "latents" in batch:
            x0 = batch["latents"]
        else:
            x0 = vae.encode(batch["pixels"]).latent_dist.mean * vae.config.scaling_factor
        ids = tok(batch["captions"], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
        context = enc(input_ids=ids).last_hidden_state
        t = torch.randint(0, sched.config.num_train_timesteps, (2,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        pred = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=context).sample
        reference = torch.nn.functional.mse_loss(pred, sched.get_velocity(x0, noise, t))
    assert abs(float(ours) - float(reference)) < 1e-5 * max(1.0, float(reference))

    result = _run(cfg)
    single = tmp_path / "full" / "tuned2.safetensors"
    with safe_open(str(single), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("cond_stage_model.model.transformer.resblocks.") for k in keys)
    back = load_model(single)
    assert back.family == "sd2" and back.prediction_type == "v_prediction"
    out = _unet_out(load_model(result["model"]).unet)
    assert (out - _unet_out(unet)).abs().max() > 1e-3  # the UNet trained
    torch.testing.assert_close(_unet_out(back.unet), out, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method,keys", [("dreambooth", ("dreambooth.train_text_encoder=true",
                                                         "dreambooth.text_encoder_lr=0.003")),
                                         ("full", ("train_text_encoder=true", "text_encoder_lr=0.003"))])
def test_dreambooth_and_full_train_the_text_encoder_at_its_own_rate(base, tmp_path, method, keys):
    """kohya's --learning_rate_te: the whole text encoder in its own optimizer group, the UNet at optim.lr."""
    from sdstack.train.finetune import FinetuneTask

    cfg = _cfg(base, tmp_path, method, "optim.lr=0.01", *keys)
    task = FinetuneTask(cfg)
    groups = task.param_groups(0.01)
    te = {id(p) for enc in task.bundle.text_encoders for p in enc.parameters()}
    assert [g["lr"] for g in groups] == [0.01, 0.003]
    assert {id(p) for p in groups[1]["params"]} == te
    assert not te & {id(p) for p in groups[0]["params"]} and len(groups[0]["params"]) > 0
    plain = FinetuneTask(_cfg(base, tmp_path / "plain", method, "optim.lr=0.01", keys[0]))
    assert [g["lr"] for g in plain.param_groups(0.01)] == [0.01]  # 0: the text encoder at optim.lr, one group

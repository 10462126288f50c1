"""The trained text2image output is a diffusers folder that sdstack's loader and stock diffusers both load."""

import json

import numpy as np
import pytest
import torch

from sdstack.train.text2image import export_model, train_text2image

from .conftest import tiny_t2i_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_vae_dir):
    out = tmp_path_factory.mktemp("t2i")
    cfg = tiny_t2i_config(out, tiny_vae_dir, max_steps=2, sample_every=2)
    result = train_text2image(cfg)
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return out, result


def test_run_writes_model_samples_and_loss_curve(trained):
    out, result = trained
    assert result["model"] == out / "model"
    for name in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "tokenizer/vocab.json", "scheduler/scheduler_config.json"):
        assert (out / "model" / name).is_file(), name
    assert (out / "samples" / "step-00000002.png").is_file() and (out / "loss.png").is_file()
    sched = json.loads((out / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["rescale_betas_zero_snr"] is True
    assert sched["timestep_spacing"] == "trailing" and sched["_class_name"] == "EulerDiscreteScheduler"
    assert (out / "checkpoints" / "latest").is_file() and (out / "config.toml").is_file()


def test_sdstack_loader_and_engine_generate(trained):
    from sdstack.engine.generate import generate
    from sdstack.models.loader import load_model
    from sdstack.params import make_params

    bundle = load_model(trained[0] / "model")
    assert bundle.family == "sd1" and bundle.prediction_type == "v_prediction"
    assert bundle.tokenizers[0].pad_token_id == 49407
    images = generate(bundle, make_params(prompt="a red circle", steps=2, seed=1)).images
    assert images[0].size == (32, 32)


def test_stock_diffusers_pipeline_loads_and_runs(trained):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(trained[0] / "model", safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    out = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_fp16_export_halves_weights_and_still_loads(trained, tmp_path):
    from safetensors.torch import load_file

    from sdstack.models.loader import load_model

    dest = export_model(trained[0], tmp_path / "shipped", fp16=True)
    weights = load_file(next((dest / "unet").glob("*.safetensors")))
    assert all(t.dtype == torch.float16 for t in weights.values())
    a, b = load_model(trained[0] / "model"), load_model(dest)
    w32 = a.unet.conv_in.weight
    torch.testing.assert_close(b.unet.conv_in.weight, w32.half().float())
    for name in ("unet", "vae", "text_encoder"):  # no machine-local path in a shipped config
        text = (dest / name / "config.json").read_text()
        assert "_name_or_path" not in text and str(tmp_path) not in text and "/tmp" not in text


def test_export_from_a_checkpoint_uses_ema_weights(trained, tmp_path):
    from sdstack.models.loader import load_model
    from sdstack.train.checkpoint import load_checkpoint

    dest = export_model(trained[0] / "checkpoints" / "step-00000002", tmp_path / "from-ckpt", fp16=False)
    shadow = load_checkpoint(trained[0])["ema"]["shadow"]
    torch.testing.assert_close(load_model(dest).unet.conv_in.weight, shadow["unet.conv_in.weight"])
    assert not torch.equal(shadow["unet.conv_in.weight"], load_checkpoint(trained[0])["model"]["unet.conv_in.weight"])


def test_export_refuses_a_vae_with_another_encoder(trained, tmp_path):
    from diffusers import AutoencoderKL

    from sdstack.errors import UserError

    other = AutoencoderKL.from_pretrained(trained[0] / "model" / "vae")
    with torch.no_grad():
        other.encoder.conv_in.weight.add_(1.0)
    other.save_pretrained(tmp_path / "other-vae")
    with pytest.raises(UserError, match="another encoder"):
        export_model(trained[0], tmp_path / "x", vae=str(tmp_path / "other-vae"))


def test_exported_files_are_world_readable(trained, tmp_path):
    dest = export_model(trained[0], tmp_path / "shipped")
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in dest.rglob("*") if f.is_file())


def test_pooled_text_embedding_unet_trains_and_loads_in_sdstack_and_stock_diffusers(tmp_path, tiny_vae_dir):
    """unet.addition_embed_type = "text": the prompt also reaches the timestep embedding (attention-pooled);
    the result is still a model stock StableDiffusionPipeline runs, and sdstack loads it as sd1."""
    from dataclasses import replace

    from diffusers import StableDiffusionPipeline

    from sdstack.engine.generate import generate
    from sdstack.models.loader import load_model
    from sdstack.params import make_params

    cfg = tiny_t2i_config(tmp_path / "run", tiny_vae_dir, max_steps=1, checkpoint_every=1)
    cfg = replace(cfg, unet=replace(cfg.unet, addition_embed_type="text", addition_embed_type_num_heads=2))
    assert train_text2image(cfg)["model"] == tmp_path / "run" / "model"
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    bundle = load_model(tmp_path / "run" / "model")
    assert bundle.family == "sd1" and bundle.unet.config.addition_embed_type == "text"
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    ctx = torch.randn(1, 77, 32)
    with torch.no_grad():
        before = bundle.unet(x, t, encoder_hidden_states=ctx).sample
        bundle.unet.add_embedding.proj.weight.neg_()  # the pooled text really feeds the UNet
        after = bundle.unet(x, t, encoder_hidden_states=ctx).sample
    assert (before - after).abs().max() > 1e-4
    bundle = load_model(tmp_path / "run" / "model")
    ours = np.asarray(generate(bundle, make_params(prompt="a red circle", steps=2, seed=1, width=32,
                                                   height=32)).images[0])
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "model", safety_checker=None)
    out = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all() and ours.shape == (32, 32, 3)


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def test_init_from_a_model_folder_starts_training_from_its_weights(trained, tmp_path, tiny_vae_dir):
    """init_from = an exported (fp16) model folder: with lr 0 one step changes nothing, so the run's exported
    model holds exactly the folder's weights (the random init is gone, in both nets)."""
    from dataclasses import replace

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdstack.models.loader import load_model

    shipped = export_model(trained[0], tmp_path / "shipped", fp16=True)
    cfg = tiny_t2i_config(tmp_path / "run", tiny_vae_dir, max_steps=1, checkpoint_every=1)
    cfg = replace(cfg, init_from=str(shipped), optim=replace(cfg.optim, lr=0.0))
    assert train_text2image(cfg)["model"] == tmp_path / "run" / "model"
    _reset_accelerate()
    got = load_model(tmp_path / "run" / "model")
    unet = UNet2DConditionModel.from_pretrained(shipped / "unet")
    te = CLIPTextModel.from_pretrained(shipped / "text_encoder")
    for a, b in ((got.unet.state_dict(), unet.state_dict()), (got.text_encoders[0].state_dict(), te.state_dict())):
        for k in b:
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=0, msg=k)
    fresh = load_model(trained[0] / "model")  # and not the other run's fp32 weights (fp16 rounding differs)
    assert not torch.equal(fresh.unet.conv_in.weight, got.unet.conv_in.weight)


def test_init_from_a_checkpoint_takes_its_ema_weights(trained, tiny_vae_dir, tmp_path):
    from sdstack.train.checkpoint import load_checkpoint
    from sdstack.train.text2image import Text2ImageTask, load_init_weights

    task = Text2ImageTask(tiny_t2i_config(tmp_path / "x", tiny_vae_dir))
    load_init_weights(task.module, str(trained[0]))
    state = load_checkpoint(trained[0])
    own = task.module.state_dict()
    for k, v in state["model"].items():
        expected = state["ema"]["shadow"].get(k, v)
        torch.testing.assert_close(own[k], expected.to(own[k].dtype), rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("what", ["missing", "plain folder", "other architecture"])
def test_init_from_problems_stop_with_one_line(trained, tiny_vae_dir, tmp_path, what):
    from dataclasses import replace

    from sdstack.errors import UserError

    cfg = tiny_t2i_config(tmp_path / "run", tiny_vae_dir, max_steps=1)
    if what == "missing":
        cfg, match = replace(cfg, init_from=str(tmp_path / "nope")), "does not exist"
    elif what == "plain folder":
        (tmp_path / "plain").mkdir()
        cfg, match = replace(cfg, init_from=str(tmp_path / "plain")), "neither a model folder"
    else:
        cfg = replace(cfg, init_from=str(trained[0] / "model"),
                      unet=replace(cfg.unet, block_out_channels=(16, 48)))
        match = "do not fit"
    with pytest.raises(UserError, match=match) as e:
        train_text2image(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training


def test_ema_state_loads_onto_the_parameters_device():
    """A checkpoint loads on the CPU; the EMA shadow must follow the parameters (on a GPU when training there)."""
    from sdstack.train.ema import EMA

    params = {"w": torch.nn.Parameter(torch.ones(3, device="meta"))}
    ema = EMA(params, 0.9)
    ema.load_state_dict({"updates": 5, "shadow": {"w": torch.full((3,), 2.0, dtype=torch.float64)}})
    assert ema.shadow["w"].device.type == "meta" and ema.shadow["w"].dtype == torch.float32


def test_ema_update_follows_the_formula():
    from sdstack.train.ema import EMA

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3, 1))
    ema = EMA({"a": a, "b": b}, 0.99, warmup=True)
    with torch.no_grad():
        a.fill_(1.0), b.fill_(-2.0)
    ema.update()  # first update: decay min(0.99, 1/10) = 0.1 -> shadow = 0.1 * 0 + 0.9 * new
    torch.testing.assert_close(ema.shadow["a"], torch.full((2,), 0.9))
    torch.testing.assert_close(ema.shadow["b"], torch.full((3, 1), -1.8))
    ema.update()  # second: decay 2/11
    torch.testing.assert_close(ema.shadow["a"], torch.full((2,), 0.9 * 2 / 11 + 9 / 11))

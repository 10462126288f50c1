"""load_model on every layout: diffusers folder, single file (all families), separate VAE, errors."""

import numpy as np
import pytest
import torch

from sdstack.engine.generate import generate
from sdstack.errors import UserError
from sdstack.models.loader import load_model
from sdstack.models.single_file import write_single_file
from sdstack.models.tiny import save_diffusers_folder, tiny_bundle
from sdstack.params import make_params


def image(bundle, **kw):
    r = generate(bundle, make_params(prompt="a cat", steps=2, seed=3, **kw))
    return np.asarray(r.images[0])


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_folder_and_single_file_give_the_same_model(tmp_path, family):
    src = tiny_bundle(family, prediction_type="v_prediction" if family == "sd2" else "epsilon")
    folder = save_diffusers_folder(src, tmp_path / "folder")
    single = write_single_file(src, tmp_path / "model.safetensors")
    a, b = load_model(folder), load_model(single)
    assert a.family == b.family == family
    assert a.prediction_type == b.prediction_type == src.prediction_type
    for x, y in [(a.unet, b.unet), (a.vae, b.vae)] + list(zip(a.text_encoders, b.text_encoders)):
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)
    assert np.array_equal(image(a), image(b))
    assert b.sha256 and len(b.shorthash) == 10 and b.name == "model"


def test_separate_vae_file_replaces_the_models_vae(tmp_path):
    from safetensors.torch import save_file

    from sdstack.models.convert import diffusers_to_ldm

    src = tiny_bundle("sd1")
    folder = save_diffusers_folder(src, tmp_path / "m")
    other = tiny_bundle("sd1", seed=5).vae
    # an A1111-style VAE file: LDM key names without the first_stage_model. prefix
    ldm = {k[len("first_stage_model."):]: v for k, v in diffusers_to_ldm(
        {"unet": src.unet.state_dict(), "vae": other.state_dict(),
         "text_encoders": [e.state_dict() for e in src.text_encoders]}, "sd1",
        {"unet": dict(src.unet.config), "vae": dict(other.config),
         "text_encoders": [e.config.to_dict() for e in src.text_encoders]}).items()
        if k.startswith("first_stage_model.")}
    save_file(ldm, tmp_path / "other.vae.safetensors")
    b = load_model(folder, vae=tmp_path / "other.vae.safetensors")
    assert all(torch.equal(b.vae.state_dict()[k], v) for k, v in other.state_dict().items())
    assert b.vae_name == "other.vae.safetensors"
    assert "VAE: other.vae.safetensors" in generate(b, make_params(prompt="x", steps=1, seed=1)).infotexts[0]


def test_prediction_type_override(tmp_path):
    folder = save_diffusers_folder(tiny_bundle("sd1"), tmp_path / "m")
    assert load_model(folder, prediction_type="v_prediction").prediction_type == "v_prediction"
    with pytest.raises(UserError, match="prediction type"):
        load_model(folder, prediction_type="x0")


def test_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UserError, match="model_index.json"):
        load_model(tmp_path / "emptydir")
    folder = save_diffusers_folder(tiny_bundle("sd1"), tmp_path / "m")
    w = folder / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    sd = load_file(w)
    sd.pop(next(iter(sd)))
    save_file(sd, w)
    with pytest.raises(UserError, match="missing"):
        load_model(folder)

"""Architecture detection on real key layouts (full-size shapes from the shipped configs, meta device)."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from sdstack.errors import UserError
from sdstack.models.detect import (
    SIGNATURES, detect_family, guess_v_prediction, prediction_type_from_yaml, yaml_prediction_type,
)
from sdstack.models.single_file import expected_ldm_shapes

IN = "model.diffusion_model.input_blocks.0.0.weight"


@functools.lru_cache(maxsize=None)
def real(family: str) -> dict:
    """Key -> shape of a real checkpoint: the architecture's weights plus the extras real files carry."""
    shapes = dict(expected_ldm_shapes(family))
    if family == "sd1":  # v1-5-pruned-emaonly
        shapes["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (1, 77)
        shapes["alphas_cumprod"] = (1000,)
    if family == "sd2":  # v2-1_768-ema-pruned: OpenCLIP-H's 24th layer, projection, logit scale
        shapes["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] = (3072, 1024)
        shapes["cond_stage_model.model.text_projection"] = (1024, 1024)
        shapes["cond_stage_model.model.logit_scale"] = ()
    if family == "sdxl":  # sd_xl_base_1.0
        shapes["conditioner.embedders.1.model.logit_scale"] = ()
    return shapes


def refiner() -> dict:
    """SDXL refiner: OpenCLIP bigG alone, at conditioner.embedders.0.model (no CLIP-L)."""
    shapes = {k: v for k, v in real("sdxl").items() if not k.startswith("conditioner.")}
    for k, v in real("sdxl").items():
        if k.startswith("conditioner.embedders.1.model."):
            shapes[k.replace("embedders.1", "embedders.0")] = v
    shapes[IN] = (384, 4, 3, 3)
    return shapes


def with_in_channels(shapes: dict, n: int) -> dict:
    out = dict(shapes)
    out[IN] = (out[IN][0], n, *out[IN][2:])
    return out


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_real_checkpoints_are_detected(family):
    d = detect_family(real(family))
    assert (d.family, d.variant, d.layout, d.supported, d.in_channels) == (family, "base", "ldm", True, 4)
    assert d.require_supported() is d


def test_detection_accepts_tensors_as_well_as_shapes():
    tensors = {k: torch.empty(v, device="meta") for k, v in real("sd1").items()}
    assert detect_family(tensors).family == "sd1"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_inpainting_is_recognised_and_refused(family):
    d = detect_family(with_in_channels(real(family), 9))
    assert (d.family, d.variant, d.supported, d.in_channels) == (family, "inpaint", False, 9)
    with pytest.raises(UserError, match="inpainting.*not supported"):
        d.require_supported()


def test_instruct_pix2pix_is_recognised_and_refused():
    d = detect_family(with_in_channels(real("sd1"), 8))
    assert (d.variant, d.supported) == ("instruct-pix2pix", False)


def test_sdxl_refiner_is_recognised_and_refused():
    d = detect_family(refiner())
    assert (d.family, d.variant, d.supported) == ("sdxl", "refiner", False)
    with pytest.raises(UserError, match="refiner"):
        d.require_supported()


def test_other_widths_are_not_taken_for_sd2():
    """A1111 requires OpenCLIP width 1024 for SD2 (768/1024 unCLIP etc. share key names)."""
    shapes = dict(real("sd2"))
    shapes["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = (3072, 768)
    with pytest.raises(UserError, match="not a recognised"):
        detect_family(shapes)
    assert detect_family(shapes, check_widths=False).family == "sd2"


def test_vae_only_and_unet_only_files():
    vae_ldm = {k[len("first_stage_model."):]: v for k, v in real("sd1").items() if k.startswith("first_stage_model.")}
    d = detect_family(vae_ldm)
    assert (d.family, d.variant, d.layout, d.supported) == (None, "vae", "ldm", False)
    from sdstack.models.single_file import instantiate
    from sdstack.models.configs import load_configs

    for family in ("sd1", "sd2", "sdxl"):
        unet, vae, _ = instantiate(family, load_configs(family), empty=True)
        d = detect_family(unet.state_dict())
        assert (d.family, d.variant, d.layout, d.supported) == (family, "unet", "diffusers", False)
        assert detect_family(vae.state_dict()).variant == "vae"
    unet_ldm = {k: v for k, v in real("sd2").items() if k.startswith("model.diffusion_model.")}
    assert (detect_family(unet_ldm).family, detect_family(unet_ldm).variant) == ("sd2", "unet")


def test_unknown_state_dict_is_a_clear_error():
    with pytest.raises(UserError, match=r"not a recognised Stable Diffusion checkpoint.*2 tensors"):
        detect_family({"foo.weight": (3, 3), "bar": (1,)})


def test_sdxl_vpred_markers():
    d = detect_family(dict(real("sdxl"), v_pred=(), ztsnr=()))
    assert (d.prediction_type, d.zero_snr) == ("v_prediction", True)
    assert detect_family(real("sdxl")).prediction_type is None


def test_table_order_puts_refusals_before_bases():
    order = [(s.family, s.variant) for s in SIGNATURES]
    for family in ("sd1", "sd2", "sdxl"):
        assert order.index((family, "inpaint")) < order.index((family, "base"))


def test_yaml_parameterization():
    yaml = 'model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: "v"\n'
    assert prediction_type_from_yaml(yaml) == "v_prediction"
    assert prediction_type_from_yaml("  parameterization: eps  # default\n") == "epsilon"
    assert prediction_type_from_yaml("model:\n  params:\n    linear_start: 0.00085\n") is None
    assert prediction_type_from_yaml("# parameterization: v\n") is None


def test_yaml_next_to_checkpoint(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    assert yaml_prediction_type(ckpt) is None
    (tmp_path / "model.yaml").write_text("    parameterization: 'v'\n")
    assert yaml_prediction_type(ckpt) == "v_prediction"


class StubUNet(torch.nn.Module):
    """Records its inputs; returns x + shift."""

    def __init__(self, shift: float):
        super().__init__()
        self.config = SimpleNamespace(in_channels=4, cross_attention_dim=1024, addition_embed_type=None)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.shift, self.seen = shift, None

    def forward(self, x, t, encoder_hidden_states):
        self.seen = (x.clone(), t.clone(), encoder_hidden_states.clone())
        return SimpleNamespace(sample=x + self.shift)


def test_guess_v_prediction_uses_a1111_inputs_and_threshold():
    unet = StubUNet(-1.5)
    assert guess_v_prediction(unet) is True
    x, t, ctx = unet.seen
    assert x.shape == (1, 4, 8, 8) and bool((x == 0.5).all())
    assert t.tolist() == [999]
    assert ctx.shape == (1, 2, 1024) and bool((ctx == 0.5).all())
    assert guess_v_prediction(StubUNet(-0.9)) is False
    assert guess_v_prediction(StubUNet(0.3)) is False


def test_guess_v_prediction_runs_on_a_real_unet():
    from sdstack.models.tiny import tiny_bundle

    assert isinstance(guess_v_prediction(tiny_bundle("sd2").unet), bool)
    with pytest.raises(ValueError, match="added conditioning"):
        guess_v_prediction(tiny_bundle("sdxl").unet)

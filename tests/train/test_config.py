import dataclasses

import pytest

from sdstack.errors import UserError
from sdstack.train.config import AutoencoderConfig, Text2ImageConfig, load_config, to_toml


def _write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_toml_maps_onto_typed_dataclass(tmp_path):
    p = _write(tmp_path, 'vae = "v"\n[run]\nmax_steps = 7\n[optim]\nlr = 1\nbetas = [0.8, 0.9]\n'
                         '[unet]\nblock_out_channels = [8, 16]\n')
    cfg = load_config(p, Text2ImageConfig)
    assert cfg.run.max_steps == 7
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.unet.block_out_channels == (8, 16)


def test_saved_config_reads_back_equal(tmp_path):
    cfg = AutoencoderConfig()
    cfg.run.max_steps, cfg.loss.edge_weight, cfg.model.block_out_channels = 9, 2.5, (4, 8, 8)
    again = load_config(_write(tmp_path, to_toml(cfg)), AutoencoderConfig)
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


@pytest.mark.parametrize("text, needle", [
    ("[run]\nmax_stepz = 3\n", "run.max_stepz"),
    ("colour = 1\n", "colour"),
    ("[run]\nmax_steps = \"3\"\n", "run.max_steps"),
    ("[run]\nmax_steps = 2.5\n", "run.max_steps"),
    ("[run]\nprogress = 1\n", "run.progress"),
    ("[optim]\nbetas = [0.9]\n", "optim.betas"),
    ("run = 3\n", "run"),
    ("[run]\nmixed_precision = \"fp8\"\n", "run.mixed_precision"),
    ("[data]\nsource = \"folder\"\n", "data.path"),
    ("[run]\nmax_steps = [\n", "not valid TOML"),
    ("[data]\nkind_weights = [1, 2]\n", "data.kind weights"),
    ("[data]\nkind_weights = [1, -1, 1, 1, 1]\n", "data.kind weights"),
    ("[data]\ndetail_share = 1.5\n", "data.detail_share"),
    ("[data]\ndetail_widths = [3.0, 1.0]\n", "data.detail_widths"),
    ("[data]\ndetail_widths = [0.0, 1.0]\n", "data.detail_widths"),
])
def test_bad_config_is_one_line_naming_the_problem(tmp_path, text, needle):
    with pytest.raises(UserError) as e:
        load_config(_write(tmp_path, text), AutoencoderConfig)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_text2image_needs_vae_and_v_prediction_for_zero_snr(tmp_path):
    with pytest.raises(UserError, match="vae"):
        load_config(_write(tmp_path, ""), Text2ImageConfig)
    with pytest.raises(UserError, match="zero_terminal_snr"):
        load_config(_write(tmp_path, 'vae = "v"\n[noise]\nprediction_type = "epsilon"\n'), Text2ImageConfig)
    with pytest.raises(UserError, match="unet.addition_embed_type"):
        load_config(_write(tmp_path, 'vae = "v"\n[unet]\naddition_embed_type = "text_time"\n'), Text2ImageConfig)
    with pytest.raises(UserError, match="addition_embed_type_num_heads"):
        load_config(_write(tmp_path, 'vae = "v"\n[unet]\naddition_embed_type = "text"\n'
                                     'addition_embed_type_num_heads = 5\n'), Text2ImageConfig)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.toml", AutoencoderConfig)

"""Checkpoints: atomic layout, pruning, and exact resume (a stopped-and-resumed run ends with the same step count
and the same weights as an uninterrupted one; a resume of a resume too)."""

import pytest
import torch

from sdstack.errors import UserError
from sdstack.train.autoencoder import train_autoencoder
from sdstack.train.checkpoint import checkpoint_dirs, find_checkpoint, load_checkpoint, save_checkpoint
from sdstack.train.text2image import train_text2image

from .conftest import tiny_ae_config, tiny_t2i_config


def _final_state(run):
    return load_checkpoint(run)


def _assert_same(a, b, keys=("model",)):
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    for key in keys:
        for name, tensor in a[key].items():
            torch.testing.assert_close(tensor, b[key][name], rtol=1e-5, atol=1e-6, msg=f"{key} {name} differs")


def _assert_optimizers_same(a, b):
    for k, s in a["optimizer"]["state"].items():
        torch.testing.assert_close(s["exp_avg"], b["optimizer"]["state"][k]["exp_avg"], rtol=1e-5, atol=1e-7)
    assert a["lr_scheduler"]["last_epoch"] == b["lr_scheduler"]["last_epoch"]


def test_autoencoder_stop_resume_resume_equals_uninterrupted(tmp_path):
    straight = train_autoencoder(tiny_ae_config(tmp_path / "a"))
    assert straight["step"] == 4 and (tmp_path / "a" / "vae" / "config.json").is_file()

    part = tiny_ae_config(tmp_path / "b")
    assert train_autoencoder(part, stop_at=1)["step"] == 1
    assert train_autoencoder(part, resume=tmp_path / "b", stop_at=3)["step"] == 3  # resume...
    assert train_autoencoder(part, resume=tmp_path / "b")["step"] == 4  # ...of a resume
    a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    _assert_same(a, b)
    _assert_optimizers_same(a, b)


def test_the_equality_check_can_fail(tmp_path):
    """Another seed, or a resume that loses the optimizer state, gives different weights: the check has teeth."""
    train_autoencoder(tiny_ae_config(tmp_path / "a"))
    a = _final_state(tmp_path / "a")["model"]
    train_autoencoder(tiny_ae_config(tmp_path / "c", seed=5))
    c = _final_state(tmp_path / "c")["model"]
    assert any(not torch.allclose(a[k], c[k]) for k in a)

    cfg = tiny_ae_config(tmp_path / "b")
    train_autoencoder(cfg, stop_at=2)
    ckpt = find_checkpoint(tmp_path / "b") / "state.pt"
    state = torch.load(ckpt, weights_only=True)
    state["optimizer"]["state"] = {}  # as if only the weights had been saved
    torch.save(state, ckpt)
    train_autoencoder(cfg, resume=tmp_path / "b")
    b = _final_state(tmp_path / "b")["model"]
    assert any(not torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


def test_text2image_resume_with_ema_equals_uninterrupted(tmp_path, tiny_vae_dir):
    train_text2image(tiny_t2i_config(tmp_path / "a", tiny_vae_dir))
    cfg = tiny_t2i_config(tmp_path / "b", tiny_vae_dir)
    train_text2image(cfg, stop_at=2)
    result = train_text2image(cfg, resume=tmp_path / "b")
    assert result["step"] == 4
    a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    _assert_same(a, b)
    for name, t in a["ema"]["shadow"].items():
        torch.testing.assert_close(t, b["ema"]["shadow"][name], rtol=1e-5, atol=1e-6)
    assert a["ema"]["updates"] == b["ema"]["updates"] == 4


def test_checkpoints_are_atomic_pruned_and_found(tmp_path):
    state = {"step": 1, "epoch": 0, "w": torch.ones(2)}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, dict(state, step=step), "x = 1\n", step=step, keep=2)
    names = [p.name for p in checkpoint_dirs(tmp_path)]
    assert names == ["step-00000002", "step-00000003"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert find_checkpoint(tmp_path).name == "step-00000003"
    assert load_checkpoint(tmp_path / "checkpoints" / "step-00000002")["step"] == 2
    assert (find_checkpoint(tmp_path) / "config.toml").read_text() == "x = 1\n"


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        find_checkpoint(tmp_path)


def test_truncated_checkpoint_is_a_user_error(tmp_path):
    save_checkpoint(tmp_path, {"step": 1}, "", step=1)
    (find_checkpoint(tmp_path) / "state.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="unreadable"):
        load_checkpoint(tmp_path)

"""The `sdstack` command, run as a user would (in-process via main(argv), plus one real subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdstack.cli import main
from sdstack.models.tiny import save_diffusers_folder, tiny_bundle


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    save_diffusers_folder(tiny_bundle("sd1"), d / "models" / "Stable-diffusion" / "tiny")
    return d


def cli(*args):
    try:
        main(list(args))
    except SystemExit as e:
        return e.code
    return 0


def test_generate_writes_a1111_named_png_with_infotext(data_dir, capsys):
    assert cli("generate", "a red star", "--steps", "2", "--seed", "42", "--data-dir", str(data_dir)) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert out.name == "00000-42.png" and out.parent.parent.name == "txt2img-images"
    assert "Seed: 42" in Image.open(out).info["parameters"]
    assert cli("generate", "a red star", "--steps", "2", "--seed", "43", "--data-dir", str(data_dir)) == 0
    assert Path(capsys.readouterr().out.strip()).name == "00001-43.png"


def test_regenerate_from_image(data_dir, tmp_path, capsys):
    first = tmp_path / "a.png"
    assert cli("generate", "a (blue:1.2) circle", "--steps", "3", "--seed", "7", "--sampler", "Euler a",
               "--data-dir", str(data_dir), "--out", str(first)) == 0
    second = tmp_path / "b.png"
    assert cli("generate", "--from", str(first), "--data-dir", str(data_dir), "--out", str(second)) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    capsys.readouterr()
    assert cli("info", str(second)) == 0
    printed = capsys.readouterr().out
    assert "Prompt: a (blue:1.2) circle" in printed and "Sampler: Euler a" in printed


@pytest.mark.parametrize("args,needle", [
    (["--sampler", "Nope"], "valid"),
    (["--width", "100"], "multiple of 8"),
    (["--steps", "0"], "steps"),
    (["--model", "/nonexistent/model.safetensors"], "not found"),
    (["--model", "nosuchname"], "unknown model"),
    (["--init-image", "/nonexistent.png"], "init image"),
    (["--device", "tpu9"], "unknown device"),
    (["--device", "meta"], "not supported"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA GPU")]))
def test_user_errors_exit_2_with_one_line(data_dir, capsys, args, needle):
    assert cli("generate", "x", "--steps", "1", "--data-dir", str(data_dir), *args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_eval_refuses_a_device_it_cannot_use(data_dir, capsys):
    model = data_dir / "models" / "Stable-diffusion" / "tiny"
    assert cli("eval", "--model", str(model), "--suite", "single", "--limit", "1", "--device", "cuda:7") == 2
    err = capsys.readouterr().err.strip()
    assert ("no CUDA GPU" in err or "GPU(s) here" in err) and len(err.splitlines()) == 1


def test_corrupt_model_and_init_image(data_dir, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    assert cli("generate", "x", "--model", str(bad), "--data-dir", str(data_dir)) == 2
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    assert cli("generate", "x", "--init-image", str(junk), "--data-dir", str(data_dir)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 2


def test_models_lists_checkpoints(data_dir, capsys):
    assert cli("models", "--data-dir", str(data_dir)) == 0
    assert "tiny" in capsys.readouterr().out


def test_real_subprocess_exit_code(data_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "sdstack", "generate", "x", "--sampler", "bogus",
                        "--data-dir", str(data_dir)], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "bogus" in r.stderr and "Traceback" not in r.stderr
